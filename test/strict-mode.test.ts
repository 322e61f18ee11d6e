// Strict mode's edges, with real packets: what it lets out must not become a channel around
// ztunnel. Later IPv4 fragments follow their first fragment's verdict (alone, they carry no ports
// to judge); an allow-listed datagram leaves whole when it is fragmented (IPv4 and IPv6); neighbour
// discovery stays on the link; the app's own UDP/53 is dropped once its DNS is captured at the
// socket. Each drop is paired with the same packet leaving when strict mode is off.
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { AppCgroup, testRunnerCgroup, useKernelSteering } from './helpers/app.js';
import { KERNEL_HAS_TCX, kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { podWithRemote, Topology, type PodNet } from './helpers/topology.js';
import { udpInNetns } from './helpers/traffic.js';
import { scaled } from './helpers/wait.js';

after(assertNothingLeft);

describe('strict mode', kernelTest(), () => {
  const topo = new Topology();
  const uid = `pod-${topo.id}`;
  const root = testBpffsRoot(topo.id);
  const OFF_LINK_V6 = '2001:db8:4848::7'; // routed through the remote, the pod's gateway
  let net: PodNet;
  let dp: Datapath;
  let app: AppCgroup;

  const remoteNs = (): string => Topology.netnsPath(net.remote);
  const attach = (extra: { strict?: boolean; podCgroup?: string }) =>
    dp.attach(
      { uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6], ...extra },
      { mode: KERNEL_HAS_TCX ? 'tcx' : 'tc' },
    );
  const strictDropped = async (): Promise<number> =>
    (await dp.list()).find((p) => p.uid === uid)!.counters.strictDropped;

  /** Frames of `kind` the remote host's eth0 saw while `send` ran (app-client.py sniff). A packet
   * strict mode drops may fail its send (ENOBUFS): what counts is what arrived. */
  async function seenByRemote(kind: string, send: () => Promise<string>): Promise<number> {
    const sniffer = app.spawn(
      'nsenter',
      [`--net=${remoteNs()}`, 'python3', app.clientScript, 'sniff', kind, String(scaled(1200) / 1000)],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    let out = '';
    sniffer.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    const exited = new Promise((r) => sniffer.once('exit', r));
    while (!out.includes('ready')) await new Promise((r) => setTimeout(r, 20));
    const sent = await send();
    await exited;
    assert.match(sent, /^(sent|ERR OSError: \[Errno 105\])/);
    return Number(out.trim().split('\n').at(-1));
  }

  before(async () => {
    net = await podWithRemote(topo, 48);
    await topo.ip(net.remote, '-6', 'route', 'add', `${OFF_LINK_V6}/128`, 'dev', 'lo');
    dp = await Datapath.open({ bpffsRoot: root });
    await useKernelSteering(dp);
    dp.trustZtunnelCgroup(testRunnerCgroup());
    await dp.configure({ ztunnelExemption: 'ztunnel-sockets', strictAllow: [] });
    app = new AppCgroup(topo.id);
  });

  after(async () => {
    await dp?.detach(uid);
    dp?.close();
    app?.remove();
    await topo.cleanup();
    rmSync(root, { recursive: true, force: true });
  });

  it('drops an IPv4 fragment whose first fragment it never let out (no raw channel through later fragments)', async () => {
    await attach({ strict: false });
    const fragLater = () => app.client(net.podPath, 'frag-later', net.remoteV4, 9999);
    assert.ok((await seenByRemote('frag4', fragLater)) >= 1, 'control: the harness did not see the fragment leave');
    await attach({ strict: true });
    const before = await strictDropped();
    assert.equal(await seenByRemote('frag4', fragLater), 0, 'a later fragment left a strict pod');
    assert.ok((await strictDropped()) > before);
  });

  it('lets an allow-listed datagram leave whole when it is fragmented, IPv4 and IPv6; others not', async () => {
    const echo = [await udpInNetns(remoteNs(), '::', 9999), await udpInNetns(remoteNs(), '::', 9998)];
    for (const s of echo) s.on('message', (m, r) => s.send(`${s.address().port}:${m.length}`, r.port, r.address));
    try {
      await attach({ strict: true });
      await dp.configure({ ztunnelExemption: 'ztunnel-sockets', strictAllow: [{ protocol: 17, port: 9999 }] });
      for (const host of [net.remoteV4, net.remoteV6]) {
        assert.equal(
          await app.client(net.podPath, 'udp', host, 9999, 4000),
          '9999:4000',
          `${host}: the allow-listed datagram`,
        );
        assert.match(
          await app.client(net.podPath, 'udp', host, 9998, 4000),
          /^ERR .*timed out/,
          `${host}: a datagram not on the list`,
        );
      }
    } finally {
      for (const s of echo) s.close();
      await dp.configure({ ztunnelExemption: 'ztunnel-sockets', strictAllow: [] });
    }
  });

  it('keeps neighbour discovery on the link: to an on-link neighbour yes, through a router no', async () => {
    const solicit = (host: string) => () => app.client(net.podPath, 'nd', host, host);
    await attach({ strict: false });
    assert.ok(
      (await seenByRemote(`ns6:${OFF_LINK_V6}`, solicit(OFF_LINK_V6))) >= 1,
      'control: the harness did not see the off-link solicitation',
    );
    await attach({ strict: true });
    assert.ok(
      (await seenByRemote(`ns6:${net.remoteV6}`, solicit(net.remoteV6))) >= 1,
      'a solicitation to an on-link neighbour was dropped',
    );
    assert.equal(
      await seenByRemote(`ns6:${OFF_LINK_V6}`, solicit(OFF_LINK_V6)),
      0,
      'a solicitation left through the router',
    );
  });

  it('drops the app’s own UDP/53 once its DNS is captured at the socket, and only then', async () => {
    const dns = await udpInNetns(remoteNs(), '::', 53);
    dns.on('message', (m, r) => dns.send('answer', r.port, r.address));
    // A socket of the test runner in the pod netns: outside the app's cgroup, so not rewritten to
    // ztunnel's 15053, as a hand-made query from a captured pod would leave.
    const query = async (): Promise<string> => {
      const s = await udpInNetns(net.podPath, '0.0.0.0', 0);
      try {
        return await new Promise<string>((resolve) => {
          const timer = setTimeout(() => resolve('timed out'), 800);
          s.once('message', (m) => {
            clearTimeout(timer);
            resolve(m.toString());
          });
          s.send('query', 53, net.remoteV4);
        });
      } finally {
        s.close();
      }
    };
    try {
      await attach({ strict: true });
      assert.equal(await query(), 'answer', 'DNS is allowed while the pod’s DNS is not captured');
      await attach({ strict: true, podCgroup: app.path });
      assert.equal(await query(), 'timed out', 'a hand-made UDP/53 packet left a pod whose DNS is captured');
    } finally {
      dns.close();
    }
  });
});
