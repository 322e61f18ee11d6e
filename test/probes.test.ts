// Kubelet probes with BPF on the node's side of the pod's veth, no iptables on the node: a
// connection the node itself opens to an ambient pod reaches the app from the probe address
// (bypassing capture); forwarded traffic, also when masqueraded to the node's address (NodePort),
// is still captured. A "node" netns plays the host.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readdirSync, rmSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { Datapath, type DatapathCounters } from '../bpf/src/index.js';
import { connectFromNetns } from '../bpf/src/netns-socket.js';
import { useKernelSteering } from './helpers/app.js';
import { kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { sh, Topology } from './helpers/topology.js';
import { RecordingServer, whoAnswers, ztunnelListener } from './helpers/traffic.js';
import { scaled, until } from './helpers/wait.js';

const PROBE_V4 = '169.254.7.127';
const PROBE_V6 = 'fd16:9254:7127:1337:ffff:ffff:ffff:ffff';
const APP_PORT = 8080;
/** Sends one IPv6 TCP RST, source and ports as given, through a raw socket (header included). */
const FORGED_RST = `import socket, struct, sys
src, dst, sport, dport = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
s6, d6 = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
tcp = struct.pack('!HHIIBBHHH', sport, dport, 1, 0, 5 << 4, 0x04, 0, 0, 0)
tcp = tcp[:16] + struct.pack('!H', csum(s6 + d6 + struct.pack('!I', len(tcp)) + bytes(3) + bytes([6]) + tcp)) + tcp[18:]
ip6 = struct.pack('!IHBB', 6 << 28, len(tcp), 6, 64) + s6 + d6
sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
sock.sendto(ip6 + tcp, (dst, 0))`;
/** In the pod: the source address of the first IPv6 TCP RST to the given port on eth0 ("none" after 5 s). */
const RST_SOURCE = `import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
s.bind(("eth0", 0))
s.settimeout(0.2)
print("ready", flush=True)
end = time.time() + 5
while time.time() < end:
    try:
        ip = s.recv(4096)[14:]
    except socket.timeout:
        continue
    if ip[6] == 6 and int.from_bytes(ip[42:44], "big") == int(sys.argv[1]) and ip[53] & 0x04:
        print(socket.inet_ntop(socket.AF_INET6, ip[8:24]), flush=True)
        sys.exit(0)
print("none", flush=True)`;

after(assertNothingLeft);

for (const [mode, n] of [
  ['tcx', 30],
  ['tc', 31],
] as const) {
  describe(
    `kubelet probes with ${mode}`,
    kernelTest({ name: `kubelet probes with ${mode}`, tcx: mode === 'tcx' }),
    () => {
      const topo = new Topology();
      const uid = `pod-${topo.id}`;
      const root = testBpffsRoot(topo.id);
      const addr = {
        podV4: `198.18.${n}.2`,
        nodeV4: `198.18.${n}.1`,
        podV6: `2001:db8:${n}::2`,
        nodeV6: `2001:db8:${n}::1`,
        outV4: `198.18.${n + 50}.2`,
        nodeOutV4: `198.18.${n + 50}.1`,
        outV6: `2001:db8:${n + 50}::2`,
        nodeOutV6: `2001:db8:${n + 50}::1`,
      };
      let pod: string, node: string, outside: string;
      let dp: Datapath;
      let app: RecordingServer, inbound: RecordingServer, lateCloser: RecordingServer;
      const servers: RecordingServer[] = [];

      const path = (ns: string): string => Topology.netnsPath(ns);
      const counters = async (): Promise<DatapathCounters> => (await dp.list()).find((p) => p.uid === uid)!.counters;
      /** The probe translations, from the map's current pin: probe_nat, or probe_nat_vN once its
       * layout changed (bpf/native/layout.h). */
      const translations = async (): Promise<{ formatted?: { key: { node_port: number } } }[]> => {
        const version = (name: string) => Number(/_v(\d+)$/.exec(name)?.[1] ?? 1);
        const pin = readdirSync(`${root}/maps`)
          .filter((n) => /^probe_nat(_v\d+)?$/.test(n))
          .sort((a, b) => version(b) - version(a))[0];
        return JSON.parse(await sh('bpftool', ['-j', 'map', 'dump', 'pinned', `${root}/maps/${pin}`])) as {
          formatted?: { key: { node_port: number } };
        }[];
      };
      const attach = () =>
        dp.attach({ uid, netnsPath: path(pod), ips: [addr.podV4, addr.podV6], hostNetns: path(node) }, { mode });

      before(async () => {
        pod = await topo.netns('pod');
        node = await topo.netns('node');
        outside = await topo.netns('out');
        await topo.veth(pod, 'eth0', node, 'vp0');
        await topo.veth(outside, 'eth0', node, 'ext0');
        await topo.addAddress(pod, 'eth0', `${addr.podV4}/24`);
        await topo.addAddress(pod, 'eth0', `${addr.podV6}/64`);
        await topo.addAddress(node, 'vp0', `${addr.nodeV4}/24`);
        await topo.addAddress(node, 'vp0', `${addr.nodeV6}/64`);
        await topo.addAddress(node, 'ext0', `${addr.nodeOutV4}/24`);
        await topo.addAddress(outside, 'eth0', `${addr.outV4}/24`);
        await topo.addAddress(node, 'ext0', `${addr.nodeOutV6}/64`);
        await topo.addAddress(outside, 'eth0', `${addr.outV6}/64`);
        await topo.ip(pod, 'route', 'add', 'default', 'via', addr.nodeV4);
        await topo.ip(pod, '-6', 'route', 'add', 'default', 'via', addr.nodeV6);
        await topo.ip(outside, 'route', 'add', 'default', 'via', addr.nodeOutV4);
        await topo.ip(outside, '-6', 'route', 'add', 'default', 'via', addr.nodeOutV6);
        await topo.exec(node, 'sysctl', '-qw', 'net.ipv4.ip_forward=1');
        await topo.exec(node, 'sysctl', '-qw', 'net.ipv6.conf.all.forwarding=1');
        dp = await Datapath.open({ bpffsRoot: root });
        await useKernelSteering(dp);
        const r = await attach();
        assert.equal(r.mode, mode);
        assert.ok(r.hostIfindex > 0, 'the node side of the veth was not found');
        app = await RecordingServer.start('app', { netns: path(pod), family: 6, address: '::', port: APP_PORT });
        inbound = await ztunnelListener(path(pod), 15006);
        // Closes 200 ms after the node's FIN: the node's socket is in TIME_WAIT by then, and its last
        // ACK leaves from there (without a socket for IPv6 on Linux 6.1).
        lateCloser = await RecordingServer.start(
          'late-closer',
          { netns: path(pod), family: 6, address: '::', port: APP_PORT + 1 },
          200,
        );
        servers.push(app, inbound, lateCloser, await ztunnelListener(path(pod), 15001));
      });

      after(async () => {
        for (const s of servers) await s.close();
        await dp?.detach(uid);
        dp?.close();
        await topo.cleanup();
        rmSync(root, { recursive: true, force: true });
      });

      it('gives node-opened connections the probe address, so they reach the app (IPv4 and IPv6)', async () => {
        const before = await counters();
        for (const [host, probe] of [
          [addr.podV4, PROBE_V4],
          [addr.podV6, PROBE_V6],
        ] as const) {
          assert.equal(await whoAnswers({ netns: path(node), host, port: APP_PORT }), 'app');
          assert.equal(app.accepted.at(-1)!.remoteAddress, probe);
        }
        assert.equal((await counters()).bypassProbe - before.bypassProbe, 2);
        assert.equal((await dp.verify(uid)).ok, true);
      });

      it('still captures forwarded traffic, also when masqueraded to the node’s address', async () => {
        assert.equal(await whoAnswers({ netns: path(outside), host: addr.podV4, port: APP_PORT }), 'ztunnel-15006');
        assert.equal(inbound.accepted.at(-1)!.remoteAddress, addr.outV4);
        // NodePort's shape: the node masquerades forwarded traffic to its own address (in the test's
        // "node" netns only).
        await topo.exec(node, 'iptables', '-t', 'nat', '-A', 'POSTROUTING', '-o', 'vp0', '-j', 'MASQUERADE');
        assert.equal(await whoAnswers({ netns: path(outside), host: addr.podV4, port: APP_PORT }), 'ztunnel-15006');
        assert.equal(inbound.accepted.at(-1)!.remoteAddress, addr.nodeV4);
      });

      it('forgets each translation when its connection ends, so probe churn cannot evict a live one', async () => {
        const entries = async (): Promise<number> => (await translations()).length;
        for (let i = 0; i < 20; i++) {
          assert.equal(
            await whoAnswers({ netns: path(node), host: i % 2 ? addr.podV6 : addr.podV4, port: APP_PORT }),
            'app',
          );
        }
        for (let i = 0; i < 6; i++) {
          assert.equal(
            await whoAnswers({ netns: path(node), host: i % 2 ? addr.podV6 : addr.podV4, port: APP_PORT + 1 }),
            'late-closer',
          );
        }
        await until(async () => (await entries()) === 0, 'probe translations of closed connections removed', 3000);
      });

      it(
        'ignores a forwarded reset that names a live probe connection, even from the node’s own address',
        { timeout: scaled(30_000) },
        async () => {
          const nodePorts = async (): Promise<number[]> =>
            (await translations()).map((e) => e.formatted?.key.node_port ?? -1);
          const probe = await connectFromNetns({ netns: path(node), host: addr.podV6, port: APP_PORT });
          try {
            const nodePort = probe.localPort!;
            const port = ((nodePort & 0xff) << 8) | (nodePort >> 8); // as the map holds it (network order)
            await until(async () => (await nodePorts()).includes(port), 'the live probe’s translation', 3000);
            // The control: the reset does reach the pod, with the source it was sent with (translated,
            // it would come from the probe address).
            const sniffer = spawn('nsenter', [`--net=${path(pod)}`, 'python3', '-c', RST_SOURCE, String(APP_PORT)], {
              stdio: ['ignore', 'pipe', 'inherit'],
            });
            let seen = '';
            sniffer.stdout.on('data', (d: Buffer) => (seen += d.toString()));
            // Listened for now: the sniffer can see the reset and exit before the sender returns.
            const sniffed = new Promise<void>((r) => sniffer.once('exit', () => r()));
            await until(() => seen.includes('ready'), 'the sniffer in the pod', 5000);
            // An IPv6 RST forwarded through the node (IPv6 forwarding keeps a local source address),
            // spoofing the node's address and the probe's ports: without a socket, like the node's own
            // TIME_WAIT segments on older kernels, but received on an interface.
            await sh('nsenter', [
              `--net=${path(outside)}`,
              'python3',
              '-c',
              FORGED_RST,
              addr.nodeV6,
              addr.podV6,
              String(nodePort),
              String(APP_PORT),
            ]);
            await sniffed;
            assert.equal(
              seen.replace('ready', '').trim(),
              addr.nodeV6,
              'the forged reset did not reach the pod as sent',
            );
            assert.ok((await nodePorts()).includes(port), 'a forwarded reset ended the live probe’s translation');
            const received = app.received.length;
            probe.write('still here');
            await until(
              () => app.received.slice(received - 1).some((r) => r.includes('still here')),
              'the live probe still carrying data',
              3000,
            );
          } finally {
            probe.destroy();
          }
        },
      );

      it('detach removes the node-side hooks', async () => {
        await dp.detach(uid);
        assert.equal(await whoAnswers({ netns: path(node), host: addr.podV4, port: APP_PORT }), 'app');
        assert.equal(app.accepted.at(-1)!.remoteAddress, addr.nodeV4, 'the node-side hook outlived detach');
        assert.deepEqual((await topo.exec(node, 'tc', 'filter', 'show', 'dev', 'vp0', 'ingress')).trim(), '');
        await attach();
      });
    },
  );
}
