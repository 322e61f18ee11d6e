// Per-pod capture options and the programs' own counters, with real packets: counters match the
// traffic sent; only ztunnel's own sockets may skip redirection with the 0x539 mark (an app that
// forges it is still redirected, unless the node runs in mark-only mode); bypass-inbound-capture;
// strict mode drops what would escape ztunnel and nothing else; reroute-virtual-interfaces (a veth
// and a tun device, which has no Ethernet header).
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { after, afterEach, before, describe, it } from 'node:test';
import { cgroup2Mount, Datapath, type DatapathCounters } from '../bpf/src/index.js';
import { AppCgroup, CLIENT, testRunnerCgroup } from './helpers/app.js';
import { kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { podWithRemote, sh, Topology, type PodNet } from './helpers/topology.js';
import { RecordingServer, udpInNetns, whoAnswers, ztunnelListener } from './helpers/traffic.js';

const APP_PORT = 8080;
const TUN_SYN = fileURLToPath(new URL('../../test/fixtures/tun-syn.py', import.meta.url));
const execFileP = promisify(execFile);
const PROBE_V4 = '169.254.7.127';

after(assertNothingLeft);

describe('capture policy and counters', kernelTest(), () => {
  const topo = new Topology();
  const uid = `pod-${topo.id}`;
  const root = testBpffsRoot(topo.id);
  let net: PodNet;
  let dp: Datapath;
  let app: AppCgroup;
  let servers: RecordingServer[] = [];
  let outbound: RecordingServer, inbound: RecordingServer;

  const remoteNs = (): string => Topology.netnsPath(net.remote);
  const counters = async (): Promise<DatapathCounters> => {
    const p = (await dp.list()).find((x) => x.uid === uid);
    assert.ok(p, 'pod not attached');
    return p.counters;
  };
  const attach = (extra: { bypassInbound?: boolean; strict?: boolean } = {}) =>
    dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6], ...extra }, { mode: 'tcx' });

  before(async () => {
    net = await podWithRemote(topo, 5);
    await topo.addAddress(net.remote, 'eth0', `${PROBE_V4}/32`);
    await topo.ip(net.pod, 'route', 'add', PROBE_V4, 'dev', 'eth0');
    dp = await Datapath.open({ bpffsRoot: root });
    dp.trustZtunnelCgroup(testRunnerCgroup()); // the stand-in runs in the test runner
    await dp.configure({ ztunnelExemption: 'ztunnel-sockets', strictAllow: [] });
    await attach();
    app = new AppCgroup(topo.id);
    outbound = await ztunnelListener(net.podPath, 15001);
    inbound = await ztunnelListener(net.podPath, 15006);
    servers = [
      outbound,
      inbound,
      await ztunnelListener(net.podPath, 15008),
      await RecordingServer.start('app', { netns: net.podPath, family: 6, address: '::', port: APP_PORT }),
      await RecordingServer.start('remote', { netns: remoteNs(), family: 6, address: '::', port: APP_PORT }),
    ];
  });

  after(async () => {
    for (const s of servers) await s.close();
    await dp?.detach(uid);
    dp?.close();
    app?.remove();
    await topo.cleanup();
    rmSync(root, { recursive: true, force: true });
  });

  afterEach(async () => {
    await attach(); // back to the defaults, in place
    await dp.configure({ ztunnelExemption: 'ztunnel-sockets', strictAllow: [] });
  });

  it('counts exactly the connections it redirected and bypassed, per pod', async () => {
    const before = await counters();
    for (let i = 0; i < 3; i++)
      assert.equal(await whoAnswers({ netns: net.podPath, host: net.remoteV4, port: APP_PORT }), 'ztunnel-15001');
    assert.equal(await whoAnswers({ netns: net.podPath, host: net.remoteV6, port: APP_PORT }), 'ztunnel-15001');
    for (let i = 0; i < 2; i++)
      assert.equal(await whoAnswers({ netns: remoteNs(), host: net.podV4, port: APP_PORT }), 'ztunnel-15006');
    assert.equal(await whoAnswers({ netns: remoteNs(), host: net.podV6, port: 15008 }), 'ztunnel-15008');
    assert.equal(
      await whoAnswers({ netns: remoteNs(), host: net.podV4, port: APP_PORT, localAddress: PROBE_V4 }),
      'app',
    );
    // ztunnel's own connection out of the pod (marked, from the test runner: the root cgroup).
    assert.equal(await whoAnswers({ netns: net.podPath, host: net.remoteV4, port: APP_PORT, mark: 0x539 }), 'remote');
    const after = await counters();
    const delta = (k: keyof DatapathCounters): number => after[k] - before[k];
    assert.deepEqual(
      {
        out: delta('outboundRedirected'),
        in: delta('inboundRedirected'),
        hbone: delta('bypassHbone'),
        probe: delta('bypassProbe'),
        ztunnel: delta('bypassZtunnel'),
      },
      { out: 4, in: 2, hbone: 1, probe: 1, ztunnel: 1 },
    );
    assert.deepEqual([delta('forgedMark'), delta('strictDropped'), delta('inboundNoZtunnel')], [0, 0, 0]);
  });

  it('redirects an app that forges ztunnel’s mark (SO_MARK 0x539 with NET_ADMIN) from its own cgroup', async () => {
    const before = await counters();
    assert.equal(await app.client(net.podPath, 'tcp', net.remoteV4, APP_PORT, '0x539'), 'ztunnel-15001');
    assert.equal(await app.client(net.podPath, 'tcp', net.remoteV6, APP_PORT, '0x539'), 'ztunnel-15001');
    assert.equal((await counters()).forgedMark - before.forgedMark, 2);
    // The same app without the mark, for contrast: redirected too, not counted as forged.
    assert.equal(await app.client(net.podPath, 'tcp', net.remoteV4, APP_PORT), 'ztunnel-15001');
    assert.equal((await counters()).forgedMark - before.forgedMark, 2);
  });

  it('lets ztunnel’s sockets skip once its cgroup is trusted, and anything marked in mark-only mode', async () => {
    // The app's cgroup trusted as if it were ztunnel's: its marked traffic goes direct.
    dp.trustZtunnelCgroup(app.path);
    assert.equal(await app.client(net.podPath, 'tcp', net.remoteV4, APP_PORT, '0x539'), 'remote');
    const fresh = new AppCgroup(`${topo.id}b`);
    try {
      assert.equal(await fresh.client(net.podPath, 'tcp', net.remoteV4, APP_PORT, '0x539'), 'ztunnel-15001');
      await dp.configure({ ztunnelExemption: 'mark', strictAllow: [] });
      assert.equal(
        await fresh.client(net.podPath, 'tcp', net.remoteV4, APP_PORT, '0x539'),
        'remote',
        'mark-only mode is upstream’s rule',
      );
    } finally {
      fresh.remove();
    }
  });

  it('bypass-inbound-capture: inbound goes to the app, outbound still to ztunnel; undone in place', async () => {
    await attach({ bypassInbound: true });
    const before = await counters();
    assert.equal(await whoAnswers({ netns: remoteNs(), host: net.podV4, port: APP_PORT }), 'app');
    assert.equal(await whoAnswers({ netns: remoteNs(), host: net.podV6, port: APP_PORT }), 'app');
    assert.equal(await whoAnswers({ netns: net.podPath, host: net.remoteV4, port: APP_PORT }), 'ztunnel-15001');
    assert.equal((await counters()).bypassInboundAnnotation - before.bypassInboundAnnotation, 2);
    await attach({ bypassInbound: false });
    assert.equal(await whoAnswers({ netns: remoteNs(), host: net.podV4, port: APP_PORT }), 'ztunnel-15006');
  });

  it('strict mode drops UDP (but DNS) and other protocols from the pod, keeps TCP, ND and the allow list', async () => {
    const udp = await udpInNetns(remoteNs(), '::', 9999);
    const dns = await udpInNetns(remoteNs(), '::', 53);
    for (const s of [udp, dns])
      s.on('message', (m, r) => s.send(`${s.address().port}:${m.toString()}`, r.port, r.address));
    try {
      assert.equal(
        await app.client(net.podPath, 'udp', net.remoteV4, 9999),
        '9999:ping',
        'UDP passes without strict mode',
      );
      assert.equal(
        await app.client(net.podPath, 'icmp', net.remoteV4),
        'echo-reply',
        'ICMP passes without strict mode',
      );
      await attach({ strict: true });
      const before = await counters();
      assert.match(await app.client(net.podPath, 'udp', net.remoteV4, 9999), /^ERR .*timed out/);
      assert.match(await app.client(net.podPath, 'udp', net.remoteV6, 9999), /^ERR .*timed out/);
      assert.equal(await app.client(net.podPath, 'udp', net.remoteV4, 53), '53:ping', 'DNS is not dropped');
      assert.match(await app.client(net.podPath, 'icmp', net.remoteV4), /^ERR .*timed out/, 'ICMP escaped strict mode');
      // Neighbour discovery still works: IPv6 TCP after the neighbour cache is flushed.
      await topo.ip(net.pod, '-6', 'neigh', 'flush', 'dev', 'eth0');
      assert.equal(await whoAnswers({ netns: net.podPath, host: net.remoteV6, port: APP_PORT }), 'ztunnel-15001');
      const dropped = (await counters()).strictDropped - before.strictDropped;
      assert.ok(dropped >= 3, `strictDropped counted ${dropped}, want at least 3`);
      await dp.configure({
        ztunnelExemption: 'ztunnel-sockets',
        strictAllow: [{ protocol: 17, port: 9999 }, { protocol: 1 }],
      });
      assert.equal(await app.client(net.podPath, 'udp', net.remoteV4, 9999), '9999:ping', 'the allow list');
      assert.equal(await app.client(net.podPath, 'icmp', net.remoteV4), 'echo-reply');
    } finally {
      udp.close();
      dns.close();
    }
  });
});

for (const mode of ['tcx', 'tc'] as const) {
  describe(`reroute-virtual-interfaces with ${mode}`, kernelTest(), () => {
    const topo = new Topology();
    const uid = `pod-${topo.id}`;
    const root = testBpffsRoot(topo.id);
    const subnet = mode === 'tcx' ? 6 : 7;
    const vmV4 = `198.18.${subnet + 100}.2`;
    const gwV4 = `198.18.${subnet + 100}.1`;
    let net: PodNet;
    let dp: Datapath;
    let vm: string;
    let servers: RecordingServer[] = [];

    const attach = () =>
      dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6], rerouteInterfaces: ['vm0'] }, { mode });

    before(async () => {
      net = await podWithRemote(topo, subnet);
      vm = await topo.netns('vm');
      dp = await Datapath.open({ bpffsRoot: root });
      dp.trustZtunnelCgroup(testRunnerCgroup()); // the stand-in runs in the test runner
      await attach(); // before the VM's interface exists, as when a VM starts after the pod
      servers = [
        await ztunnelListener(net.podPath, 15001),
        await RecordingServer.start('remote', {
          netns: Topology.netnsPath(net.remote),
          family: 6,
          address: '::',
          port: APP_PORT,
        }),
      ];
    });

    after(async () => {
      for (const s of servers) await s.close();
      await dp?.detach(uid);
      dp?.close();
      await topo.cleanup();
      rmSync(root, { recursive: true, force: true });
    });

    it('hooks the interface once it appears; TCP from behind it goes to 15001 with the original destination', async () => {
      assert.equal((await dp.verify(uid)).ok, true);
      await topo.veth(net.pod, 'vm0', vm, 'eth0');
      await topo.addAddress(net.pod, 'vm0', `${gwV4}/24`);
      await topo.addAddress(vm, 'eth0', `${vmV4}/24`);
      await topo.ip(vm, 'route', 'add', 'default', 'via', gwV4);
      // The pod routes for the VM (as a VM pod does), and the remote host knows the way back.
      await topo.exec(net.pod, 'sysctl', '-qw', 'net.ipv4.ip_forward=1');
      await topo.ip(net.remote, 'route', 'add', `198.18.${subnet + 100}.0/24`, 'via', net.podV4);
      const v = await dp.verify(uid);
      assert.deepEqual(v.problems, [
        'reroute interface vm0 appeared and is not hooked yet',
        'interface vm0 has no egress guard', // (on the egress of every interface without pod_egress)
      ]);
      await attach();
      assert.equal((await dp.verify(uid)).ok, true);
      const before = dp.nodeCounters().rerouted;
      assert.equal(
        await whoAnswers({ netns: Topology.netnsPath(vm), host: net.remoteV4, port: APP_PORT }),
        'ztunnel-15001',
      );
      const got = servers[0]!.accepted.at(-1)!;
      assert.deepEqual([got.localAddress, got.localPort, got.remoteAddress], [net.remoteV4, APP_PORT, vmV4]);
      assert.equal(servers[1]!.accepted.length, 0, 'the VM reached the remote host around ztunnel');
      assert.equal(dp.nodeCounters().rerouted - before, 1);
    });

    it('detach removes the interface’s hook too', async () => {
      await dp.detach(uid);
      assert.equal(await whoAnswers({ netns: Topology.netnsPath(vm), host: net.remoteV4, port: APP_PORT }), 'remote');
      await attach();
    });
  });
}

/** What tun-syn.py saw on the tun device: who answered a crafted SYN from behind it. */
interface TunAnswer {
  result: 'synack' | 'rst' | 'none' | 'other';
  banner?: string | null;
  sport: number;
}

for (const mode of ['tcx', 'tc'] as const) {
  // A device with no link-layer header (tun in tun mode, like wireguard): its packets start at the
  // IP header, so it gets pod_reroute_ingress_l3; the Ethernet one would read the IP header 14
  // bytes too far and let the SYN through to the remote host. vm0 (a veth) keeps the Ethernet one.
  describe(`reroute-virtual-interfaces on a tun device with ${mode}`, kernelTest(), () => {
    const topo = new Topology();
    const uid = `pod-${topo.id}`;
    const root = testBpffsRoot(topo.id);
    const subnet = mode === 'tcx' ? 10 : 11;
    const tunGw = `198.18.${subnet + 100}.1`;
    const behindTun = `198.18.${subnet + 100}.2`; // the workload behind the tun device
    let net: PodNet;
    let dp: Datapath;
    let servers: RecordingServer[] = [];

    const attach = () =>
      dp.attach(
        { uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6], rerouteInterfaces: ['tun0', 'vm0'] },
        { mode },
      );
    const synFromBehindTun = async (): Promise<TunAnswer> => {
      const { stdout } = await execFileP(
        'nsenter',
        [`--net=${net.podPath}`, '/usr/bin/python3', TUN_SYN, 'tun0', behindTun, net.remoteV4, String(APP_PORT)],
        {
          timeout: 20_000,
        },
      );
      return JSON.parse(stdout.trim()) as TunAnswer;
    };

    before(async () => {
      net = await podWithRemote(topo, subnet);
      const vm = await topo.netns('vm');
      await topo.veth(net.pod, 'vm0', vm, 'eth0');
      dp = await Datapath.open({ bpffsRoot: root });
      dp.trustZtunnelCgroup(testRunnerCgroup()); // the stand-in runs in the test runner
      await attach(); // before the tun device exists
      servers = [
        await ztunnelListener(net.podPath, 15001),
        await RecordingServer.start('remote', {
          netns: Topology.netnsPath(net.remote),
          family: 6,
          address: '::',
          port: APP_PORT,
        }),
      ];
      // The pod routes for what is behind the tun device, and the remote host knows the way back:
      // a SYN the hook lets through reaches the remote host and is answered by it.
      await topo.exec(net.pod, 'sysctl', '-qw', 'net.ipv4.ip_forward=1');
      await topo.ip(net.remote, 'route', 'add', `198.18.${subnet + 100}.0/24`, 'via', net.podV4);
    });

    after(async () => {
      for (const s of servers) await s.close();
      await dp?.detach(uid);
      dp?.close();
      await topo.cleanup(); // the tun device goes with the pod netns
      rmSync(root, { recursive: true, force: true });
    });

    it('hooks the tun device with the L3 program once it appears; its SYN reaches 15001 with the original destination', async () => {
      await topo.ip(net.pod, 'tuntap', 'add', 'dev', 'tun0', 'mode', 'tun');
      await topo.addAddress(net.pod, 'tun0', `${tunGw}/24`);
      await topo.ip(net.pod, 'link', 'set', 'tun0', 'up');
      assert.deepEqual((await dp.verify(uid)).problems, [
        'reroute interface tun0 appeared and is not hooked yet',
        'interface tun0 has no egress guard',
      ]);
      await attach(); // an update: the tun device is hooked now
      assert.deepEqual((await dp.verify(uid)).problems, []); // tun0 runs the L3 program, vm0 the Ethernet one
      const before = dp.nodeCounters().rerouted;
      const got = await synFromBehindTun();
      assert.deepEqual([got.result, got.banner], ['synack', 'ztunnel-15001']);
      const acc = servers[0]!.accepted.at(-1)!;
      assert.deepEqual(
        [acc.localAddress, acc.localPort, acc.remoteAddress, acc.remotePort],
        [net.remoteV4, APP_PORT, behindTun, got.sport],
      );
      assert.equal(
        servers[1]!.accepted.length,
        0,
        'the SYN from behind the tun device reached the remote host around ztunnel',
      );
      assert.equal(dp.nodeCounters().rerouted - before, 1);
    });

    it('without the hook the same SYN reaches the remote host; a first attach with the tun device present hooks it again', async () => {
      await dp.detach(uid);
      const got = await synFromBehindTun(); // the control: the harness delivers past the pod
      assert.deepEqual([got.result, got.banner], ['synack', 'remote']);
      assert.equal(servers[1]!.accepted.at(-1)!.remoteAddress, behindTun);
      await attach();
      assert.deepEqual((await dp.verify(uid)).problems, []);
      const again = await synFromBehindTun();
      assert.deepEqual([again.result, again.banner], ['synack', 'ztunnel-15001']);
      assert.equal(servers[0]!.accepted.at(-1)!.remotePort, again.sport);
    });
  });
}

describe('the ztunnel exemption and the root cgroup', kernelTest(), () => {
  const topo = new Topology();
  const uid = `pod-${topo.id}`;
  const root = testBpffsRoot(topo.id);
  let net: PodNet;
  let dp: Datapath;
  let servers: RecordingServer[] = [];

  /** The app client with ztunnel's mark, run by a process in the root cgroup v2 (where every socket
   * sits on a node whose pods do not use cgroup v2). */
  const markedFromRootCgroup = async (): Promise<string> => {
    const script = `echo $$ > ${join(cgroup2Mount(), 'cgroup.procs')} && exec nsenter --net=${net.podPath} python3 ${CLIENT} tcp ${net.remoteV4} ${APP_PORT} 0x539`;
    return (await sh('sh', ['-c', script])).trim();
  };

  before(async () => {
    net = await podWithRemote(topo, 9);
    dp = await Datapath.open({ bpffsRoot: root });
    await dp.configure({ ztunnelExemption: 'ztunnel-sockets', strictAllow: [] });
    await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] });
    servers = [
      await ztunnelListener(net.podPath, 15001),
      await RecordingServer.start('remote', {
        netns: Topology.netnsPath(net.remote),
        family: 6,
        address: '::',
        port: APP_PORT,
      }),
    ];
  });

  after(async () => {
    for (const s of servers) await s.close();
    await dp?.detach(uid);
    dp?.close();
    await topo.cleanup();
    rmSync(root, { recursive: true, force: true });
  });

  it('does not trust the root cgroup with the mark unless ztunnel runs there', async () => {
    assert.equal(await markedFromRootCgroup(), 'ztunnel-15001', 'a marked socket of the root cgroup skipped capture');
    dp.trustZtunnelCgroup(cgroup2Mount()); // ztunnel itself in the root cgroup: then, and only then
    assert.equal(await markedFromRootCgroup(), 'remote');
  });
});
