// The loopback route for a pod's outbound TCP (progs/outbound_route.bpf.c and the pod netns's
// sk_lookup program): an app's connect is marked at its cgroup, routed over lo with the pod's
// address as source, and handed to ztunnel's 15001 with its original destination, or refused at
// once. Never to a listener of the app's, never out of the pod; sockets the hook leaves alone
// still meet pod_egress. Real processes in a cgroup, real sockets, both families.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { AppCgroup, testRunnerCgroup } from './helpers/app.js';
import { kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { podWithRemote, sh, Topology, type PodNet } from './helpers/topology.js';
import { RecordingServer, whoAnswers, ztunnelListener } from './helpers/traffic.js';

const APP_PORT = 8080;
const POD_MTU = 1500; // the pod's eth0 (topology default): the lo route keeps it, as REDIRECT keeps the socket's route

after(assertNothingLeft);

describe('outbound TCP over the pod’s loopback', kernelTest(), () => {
  const topo = new Topology();
  const uid = `pod-${topo.id}`;
  const otherUid = `other-${topo.id}`;
  const root = testBpffsRoot(topo.id);
  let net: PodNet;
  let other: PodNet;
  let dp: Datapath;
  let app: AppCgroup;
  let remote: RecordingServer;
  let appListener: RecordingServer;

  const attach = () =>
    dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6], podCgroup: app.path, dnsCapture: false });
  /** Connections the app's own listener took that were not for the pod's own addresses. */
  const stolen = () =>
    appListener.accepted.filter((a) => a.localAddress !== net.podV4 && a.localAddress !== net.podV6).length;
  const counters = async () => (await dp.list()).find((p) => p.uid === uid)!.counters;
  /** "<who answered> mark=0x.. mss=N", or "ERR ..." */
  const route = (host: string, mark?: string) =>
    app.client(net.podPath, 'route', host, APP_PORT, ...(mark ? [mark] : []));
  const parse = (line: string) => {
    const m = /^(\S+) mark=(0x[0-9a-f]+) mss=(\d+)$/.exec(line);
    assert.ok(m, `unexpected answer: ${line}`);
    return { who: m[1], mark: Number(m[2]), mss: Number(m[3]) };
  };

  before(async () => {
    net = await podWithRemote(topo, 49);
    other = await podWithRemote(topo, 50, 'o');
    dp = await Datapath.open({ bpffsRoot: root });
    dp.trustZtunnelCgroup(testRunnerCgroup()); // ztunnel's listeners are made by the test runner
    await dp.configure({ ztunnelExemption: 'ztunnel-sockets', strictAllow: [] });
    app = new AppCgroup(topo.id);
    await attach();
    await dp.attach({ uid: otherUid, netnsPath: other.podPath, ips: [other.podV4, other.podV6] });
    remote = await RecordingServer.start('remote', {
      netns: Topology.netnsPath(net.remote),
      family: 6,
      address: '::',
      port: APP_PORT,
    });
    // The app's own listener on the remote's port: what a looped SYN must never reach.
    appListener = await RecordingServer.start('app', { netns: net.podPath, family: 6, address: '::', port: APP_PORT });
  });

  after(async () => {
    await appListener?.destroy();
    await remote?.destroy();
    await dp?.detach(otherUid);
    await dp?.detach(uid);
    dp?.close();
    app?.remove();
    await topo.cleanup();
    await sh('rm', ['-rf', root]);
  });

  it('goes to ztunnel over lo, from the pod’s address, with the original destination (IPv4 and IPv6)', async () => {
    const ztunnel = await ztunnelListener(net.podPath, 15001);
    try {
      const before = (await counters()).outboundRedirected;
      for (const [dst, src] of [
        [net.remoteV4, net.podV4],
        [net.remoteV6, net.podV6],
      ] as const) {
        const r = parse(await route(dst));
        assert.equal(r.who, 'ztunnel-15001', `to ${dst}`);
        assert.equal(r.mark, 0x111, 'the connect hook did not mark the socket');
        assert.ok(r.mss <= POD_MTU - 40, `MSS ${r.mss}: segments must be cut to the pod interface's MTU`);
        // What a socket with that mark is routed by: lo, from the pod's address, the interface's MTU.
        const routeOut = await sh('ip', ['-n', net.pod, 'route', 'get', dst, 'mark', '0x111']);
        assert.match(
          routeOut,
          new RegExp(`^local ${dst} (from \\S+ )?dev lo table 100 src ${src} .*mtu ${POD_MTU}\\b`, 's'),
        );
        assert.deepEqual(
          { ...ztunnel.accepted.at(-1)!, remotePort: 0 },
          { localAddress: dst, localPort: APP_PORT, remoteAddress: src, remotePort: 0 },
          'ztunnel must see the original destination and the pod’s address',
        );
      }
      assert.equal((await counters()).outboundRedirected - before, 2);
      assert.equal(remote.accepted.length, 0, 'a connection reached the remote host around ztunnel');
      assert.equal(stolen(), 0, 'the app’s own listener took its outbound connection');
    } finally {
      await ztunnel.destroy();
    }
  });

  it('to another enrolled pod’s address on the node: through this pod’s ztunnel', async () => {
    const ztunnel = await ztunnelListener(net.podPath, 15001);
    try {
      const r = parse(await route(other.podV4));
      assert.equal(r.who, 'ztunnel-15001');
      assert.equal(r.mark, 0x111);
      assert.equal(ztunnel.accepted.at(-1)!.localAddress, other.podV4);
    } finally {
      await ztunnel.destroy();
    }
  });

  it('ztunnel’s inbound connections to the app, spoofing another enrolled pod’s address, still reach the app', async () => {
    // As ztunnel delivers pod B -> pod A on one node: from B's address, inside A's netns, over lo.
    for (const [src, dst] of [
      [other.podV4, net.podV4],
      [other.podV6, net.podV6],
    ] as const) {
      const who = await whoAnswers({
        netns: net.podPath,
        host: dst,
        port: APP_PORT,
        localAddress: src,
        transparent: true,
        freebind: true,
        mark: 0x539,
      });
      assert.equal(who, 'app', `from ${src}`);
    }
  });

  it('to the pod’s own address: left to the stack, as pod_egress leaves it', async () => {
    const r = parse(await route(net.podV4));
    assert.deepEqual([r.who, r.mark], ['app', 0]);
  });

  it('without ztunnel’s listener: not routed, and refused at once by pod_egress, never the app’s listener', async () => {
    const before = (await counters()).outboundNoZtunnel;
    // A reset answered the SYN (a dropped one would time out): refused, not left hanging.
    assert.match(await route(net.remoteV4), /^ERR ConnectionRefusedError/);
    assert.equal((await counters()).outboundNoZtunnel - before, 1);
    assert.equal(stolen(), 0, 'the app’s own listener took its outbound connection');
  });

  it('a SYN routed to lo while ztunnel is away is dropped, never the app’s, and a retry reaches ztunnel once it listens', async () => {
    // The app marks its socket itself, as the hook would have while ztunnel listened: the SYN
    // arrives on lo with no 15001 listener in the sockhash, and the app listens on that port.
    const before = (await counters()).outboundNoZtunnel;
    const answer = route(net.remoteV4, '0x111');
    for (let i = 0; (await counters()).outboundNoZtunnel === before; i++) {
      assert.ok(i < 100, 'the socket lookup never saw the SYN');
      await new Promise((r) => setTimeout(r, 20));
    }
    const ztunnel = await ztunnelListener(net.podPath, 15001);
    try {
      assert.equal(parse(await answer).who, 'ztunnel-15001', 'the retransmitted SYN must reach ztunnel');
      assert.equal(stolen(), 0, 'the app’s own listener took its outbound connection');
      assert.equal(remote.accepted.length, 0, 'a connection reached the remote host around ztunnel');
    } finally {
      await ztunnel.destroy();
    }
  });

  it('a socket the app marked itself (NET_ADMIN) is left to pod_egress, and still captured', async () => {
    const ztunnel = await ztunnelListener(net.podPath, 15001);
    try {
      const r = parse(await route(net.remoteV4, '0x100'));
      assert.deepEqual([r.who, r.mark], ['ztunnel-15001', 0x100]);
    } finally {
      await ztunnel.destroy();
    }
  });

  it('verify notices the local route without the pod’s source or MTU, and an update repairs it', async () => {
    assert.deepEqual((await dp.verify(uid)).problems, []);
    await sh('ip', ['-n', net.pod, 'route', 'replace', 'local', 'default', 'dev', 'lo', 'table', '100']);
    assert.match(
      (await dp.verify(uid)).problems.join('\n'),
      /IPv4 local route in table 100 has not the pod's address as source/,
    );
    await sh('ip', [
      '-n',
      net.pod,
      '-6',
      'route',
      'replace',
      'local',
      'default',
      'dev',
      'lo',
      'table',
      '100',
      'src',
      net.podV6,
      'mtu',
      '9000',
    ]);
    assert.match(
      (await dp.verify(uid)).problems.join('\n'),
      /IPv6 local route in table 100 has MTU 9000, not the pod interface's 1500/,
    );
    await attach();
    assert.deepEqual((await dp.verify(uid)).problems, []);
    const ztunnel = await ztunnelListener(net.podPath, 15001);
    try {
      assert.equal(parse(await route(net.remoteV4)).who, 'ztunnel-15001');
    } finally {
      await ztunnel.destroy();
    }
  });

  it('after detach the app’s sockets are not marked and go straight to the remote', async () => {
    const ztunnel = await ztunnelListener(net.podPath, 15001);
    try {
      await dp.detach(uid);
      const r = parse(await route(net.remoteV4));
      assert.deepEqual([r.who, r.mark], ['remote', 0]);
    } finally {
      await ztunnel.destroy();
      await attach();
    }
  });
});
