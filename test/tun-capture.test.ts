// A tun device in the pod (a VPN client, wireguard) has no link header: tc sees its packets from the
// IP header on, so it gets the L3 variants of the pod's programs (pod_ingress_l3, pod_egress_l3) and
// is captured like eth0, both ways, with its control (before the attach and after detach the same
// SYN reaches the app), for tcx and the tc fallback.
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { after, before, describe, it } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { CLIENT, useKernelSteering } from './helpers/app.js';
import { kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { podWithRemote, sh, Topology, type PodNet } from './helpers/topology.js';
import { RecordingServer, ztunnelListener } from './helpers/traffic.js';

const APP_PORT = 8080;
/** The source the node side of the pod's veth gives kubelet's probes (ambient_shared.h). */
const PROBE_V4 = '169.254.7.127';
const TUN_SYN = fileURLToPath(new URL('../../test/fixtures/tun-syn.py', import.meta.url));

after(assertNothingLeft);

/** Who answered a crafted SYN written into a tun device by its reader (test/fixtures/tun-syn.py). */
async function synIntoTun(podPath: string, dev: string, src: string, dst: string, port: number) {
  const out = await sh('nsenter', [`--net=${podPath}`, '/usr/bin/python3', TUN_SYN, dev, src, dst, String(port)]);
  return JSON.parse(out.trim()) as { result: string; banner?: string | null };
}

for (const mode of ['tcx', 'tc'] as const) {
  const title = `a tun device of the pod with ${mode}`;
  describe(title, kernelTest({ name: title, tcx: mode === 'tcx' }), () => {
    const topo = new Topology();
    const root = testBpffsRoot(topo.id);
    const uid = `pod-${topo.id}`;
    const tunV4 = mode === 'tcx' ? '198.18.199.1' : '198.18.198.1';
    const behindTun = mode === 'tcx' ? '198.18.199.2' : '198.18.198.2';
    let net: PodNet;
    let dp: Datapath;
    let servers: RecordingServer[] = [];
    const attach = () => dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4] }, { mode });

    before(async () => {
      net = await podWithRemote(topo, mode === 'tcx' ? 196 : 197);
      await topo.ip(net.pod, 'tuntap', 'add', 'dev', 'tun0', 'mode', 'tun');
      await topo.batch(net.pod, ['link set tun0 up', `addr add ${tunV4}/24 dev tun0`]);
      dp = await Datapath.open({ bpffsRoot: root });
      await useKernelSteering(dp);
      servers = [
        await RecordingServer.start('app', { netns: net.podPath, family: 6, address: '::', port: APP_PORT }),
        await ztunnelListener(net.podPath, 15006),
        await ztunnelListener(net.podPath, 15001),
      ];
    });

    after(async () => {
      for (const s of servers) await s.close();
      await dp?.detach(uid);
      dp?.close();
      await topo.cleanup();
      rmSync(root, { recursive: true, force: true });
    });

    it('control: before the pod is enrolled, a SYN from behind tun0 reaches the app', async () => {
      const got = await synIntoTun(net.podPath, 'tun0', behindTun, tunV4, APP_PORT);
      assert.deepEqual([got.result, got.banner], ['synack', 'app']);
    });

    it('is captured at a first attach with the L3 programs: inbound from behind it goes to 15006', async () => {
      const r = await attach();
      assert.equal(r.warning, '');
      assert.deepEqual(
        (await dp.list())[0]?.otherInterfaces.map((i) => i.name),
        ['tun0'],
      );
      assert.deepEqual((await dp.verify(uid)).problems, []);
      const accepted = servers[0]!.accepted.length;
      const got = await synIntoTun(net.podPath, 'tun0', behindTun, tunV4, APP_PORT);
      assert.deepEqual([got.result, got.banner], ['synack', 'ztunnel-15006']);
      assert.equal(servers[0]!.accepted.length, accepted, 'the app took a connection from behind tun0');
    });

    it('outbound through it goes to 15001 with the original destination', async () => {
      const out = await sh('nsenter', [
        `--net=${net.podPath}`,
        'python3',
        CLIENT,
        'tcp-dev',
        'tun0',
        behindTun,
        String(APP_PORT),
      ]);
      assert.equal(out.trim(), 'connected');
      const got = servers[2]!.accepted.at(-1)!;
      assert.deepEqual([got.localAddress, got.localPort], [behindTun, APP_PORT]);
    });

    it('gives a SYN from the probe address to ztunnel: kubelet probes arrive on the pod’s veth only', async () => {
      // (Routed back through tun0, as a VPN's default route would: the answer is seen there.)
      await topo.ip(net.pod, 'route', 'add', `${PROBE_V4}/32`, 'dev', 'tun0');
      try {
        const accepted = servers[0]!.accepted.length;
        const got = await synIntoTun(net.podPath, 'tun0', PROBE_V4, tunV4, APP_PORT);
        assert.deepEqual([got.result, got.banner], ['synack', 'ztunnel-15006']);
        assert.equal(servers[0]!.accepted.length, accepted, 'the app took a connection from the probe address');
      } finally {
        await topo.ip(net.pod, 'route', 'del', `${PROBE_V4}/32`, 'dev', 'tun0');
      }
    });

    it('refuses at once without ztunnel’s listener, with a reset sent back through tun0', async () => {
      await servers[1]!.close();
      try {
        const got = await synIntoTun(net.podPath, 'tun0', behindTun, tunV4, APP_PORT);
        assert.equal(got.result, 'rst');
      } finally {
        servers[1] = await ztunnelListener(net.podPath, 15006);
      }
    });

    it('is released by detach', async () => {
      await dp.detach(uid);
      const got = await synIntoTun(net.podPath, 'tun0', behindTun, tunV4, APP_PORT);
      assert.deepEqual([got.result, got.banner], ['synack', 'app']);
    });
  });
}
