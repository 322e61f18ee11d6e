// Every interface of the pod netns is captured, not only the one with the pod IP: a second veth (a
// Multus network) and a macvlan, with real packets, for tcx and the tc fallback. Each capture is
// paired with its control: the same connection before the programs (or after detach) reaches the app.
import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Datapath, watchNetns, type NetnsChange, type NetnsWatch } from '../bpf/src/index.js';
import { testRunnerCgroup, useKernelSteering } from './helpers/app.js';
import { CLI, runCli } from './helpers/cli.js';
import { crafter, type Crafter } from './helpers/crafter.js';
import { KERNEL_HAS_TCX, kernelTest, TEST_PREFIX, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft, linksOfPrograms, podProgramIds, removeDatapath } from './helpers/leftovers.js';
import { podWithRemote, sh, Topology, type PodNet } from './helpers/topology.js';
import { connectFails, RecordingServer, udpInNetns, whoAnswers, ztunnelListener } from './helpers/traffic.js';
import { sleep, until } from './helpers/wait.js';

const APP_PORT = 8080;

after(assertNothingLeft);

/** A network the pod reaches through one of its other interfaces: the far side's netns and addresses. */
interface OtherNet {
  ns: string;
  dev: string; // in the pod
  podV4: string;
  podV6: string;
  farV4: string;
  farV6: string;
}

async function addresses(
  topo: Topology,
  pod: string,
  dev: string,
  far: string,
  farDev: string,
  n: number,
): Promise<OtherNet> {
  const net = {
    ns: far,
    dev,
    podV4: `198.18.${n}.2`,
    podV6: `2001:db8:${n}::2`,
    farV4: `198.18.${n}.1`,
    farV6: `2001:db8:${n}::1`,
  };
  await topo.batch(pod, [
    `link set ${dev} up`,
    `addr add ${net.podV4}/24 dev ${dev}`,
    `addr add ${net.podV6}/64 dev ${dev} nodad`,
  ]);
  await topo.batch(far, [
    `link set ${farDev} up`,
    `addr add ${net.farV4}/24 dev ${farDev}`,
    `addr add ${net.farV6}/64 dev ${farDev} nodad`,
  ]);
  return net;
}

/** A second veth: net1 in the pod, its peer in a netns of its own (another network). */
async function secondVeth(topo: Topology, pod: string, dev: string, n: number): Promise<OtherNet> {
  const far = await topo.netns(`o${n}`);
  await topo.batch(undefined, [`link add ${dev} netns ${pod} type veth peer name eth0 netns ${far}`]);
  return addresses(topo, pod, dev, far, 'eth0', n);
}

/** A macvlan moved into the pod; its parent is a veth in a netns whose peer is the far side. */
async function macvlan(topo: Topology, pod: string, dev: string, n: number): Promise<OtherNet> {
  const parent = await topo.netns(`p${n}`);
  const far = await topo.netns(`m${n}`);
  await topo.batch(undefined, [`link add uplink netns ${parent} type veth peer name eth0 netns ${far}`]);
  await topo.batch(parent, [
    'link set uplink up',
    `link add ${dev} link uplink type macvlan mode bridge`,
    `link set ${dev} netns ${pod}`,
  ]);
  return addresses(topo, pod, dev, far, 'eth0', n);
}

/** The tc filters on a device of a netns, as bpftool lists them (it predates tcx: see tcxLinks). */
async function filtersOn(topo: Topology, ns: string, dev: string): Promise<string[]> {
  const out = JSON.parse(await topo.exec(ns, 'bpftool', '-j', 'net', 'show', 'dev', dev)) as {
    tc?: { kind: string; name?: string }[];
  }[];
  return (out[0]?.tc ?? []).map((h) => `${h.kind}:${(h.name ?? '').replace(/:\[\d+\]$/, '')}`).sort();
}

/** The tcx links running the pod's programs (those of its own pinned links), on any device. */
async function tcxLinks(root: string, uid: string): Promise<number[]> {
  return linksOfPrograms(await podProgramIds(root, uid));
}

async function sysctl(topo: Topology, ns: string, key: string): Promise<string> {
  return (await topo.exec(ns, 'sysctl', '-n', key)).trim();
}

// sk-lookup steering (the pre-6.6 path, forced here) needs each address in pod_policy: the programs
// steer a SYN for the netns cookie found there.
for (const [mode, subnet, steering] of [
  ['tcx', 180, 'sk-assign'],
  ['tc', 190, 'sk-assign'],
  ['tcx', 170, 'sk-lookup'],
] as const) {
  /** Steering as the kernel needs it, or sk-lookup forced; the test's own marked sockets play ztunnel's. */
  const steer = async (dp: Datapath) => {
    if (steering === 'sk-assign') await useKernelSteering(dp);
    else await dp.configure({ ztunnelExemption: 'ztunnel-sockets', strictAllow: [], steering });
    dp.trustZtunnelCgroup(testRunnerCgroup());
  };
  describe(
    `other interfaces of the pod with ${mode}, ${steering}`,
    kernelTest({ name: `interfaces with ${mode}, ${steering}`, tcx: mode === 'tcx' }),
    () => {
      const topo = new Topology();
      const uid = `pod-${topo.id}`;
      const root = testBpffsRoot(topo.id);
      let net: PodNet;
      let veth: OtherNet, mv: OtherNet;
      let dp: Datapath;
      let outbound: RecordingServer, inbound: RecordingServer, hbone: RecordingServer, app: RecordingServer;
      const farServers: RecordingServer[] = [];

      const attach = () => dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] }, { mode });
      const from = (o: OtherNet) => Topology.netnsPath(o.ns);

      before(async () => {
        net = await podWithRemote(topo, subnet);
        veth = await secondVeth(topo, net.pod, 'net1', subnet + 1);
        mv = await macvlan(topo, net.pod, 'mv0', subnet + 2);
        dp = await Datapath.open({ bpffsRoot: root });
        await steer(dp);
        app = await RecordingServer.start('app', { netns: net.podPath, family: 6, address: '::', port: APP_PORT });
        for (const o of [veth, mv])
          farServers.push(
            await RecordingServer.start(`far-${o.dev}`, { netns: from(o), family: 6, address: '::', port: APP_PORT }),
          );
      });

      after(async () => {
        for (const s of [outbound, inbound, hbone, app, ...farServers]) await s?.close();
        await dp?.detach(uid);
        dp?.close();
        await topo.cleanup();
        rmSync(root, { recursive: true, force: true });
      });

      it('control: before the programs, inbound TCP on the other interfaces reaches the app', async () => {
        for (const o of [veth, mv])
          for (const host of [o.podV4, o.podV6])
            assert.equal(await whoAnswers({ netns: from(o), host, port: APP_PORT }), 'app');
        assert.equal(await whoAnswers({ netns: net.podPath, host: veth.farV4, port: APP_PORT }), 'far-net1');
      });

      it('attaches to every interface but lo, and lists them with their addresses', async () => {
        const r = await attach();
        assert.equal(r.mode, mode);
        outbound = await ztunnelListener(net.podPath, 15001);
        inbound = await ztunnelListener(net.podPath, 15006);
        hbone = await ztunnelListener(net.podPath, 15008);
        const [pod] = await dp.list();
        assert.equal(pod?.interface, 'eth0');
        assert.deepEqual(pod.otherInterfaces.map((i) => i.name).sort(), ['mv0', 'net1']);
        assert.deepEqual([...pod.otherAddresses].sort(), [mv.podV4, mv.podV6, veth.podV4, veth.podV6].sort());
        if (mode === 'tcx')
          assert.equal((await tcxLinks(root, uid)).length, 6, 'ingress and egress on each of the 3 interfaces');
        for (const dev of ['eth0', 'net1', 'mv0']) {
          assert.deepEqual(
            await filtersOn(topo, net.pod, dev),
            mode === 'tcx' ? [] : ['clsact/egress:pod_egress', 'clsact/ingress:pod_ingress'],
            dev,
          );
          assert.equal(await sysctl(topo, net.pod, `net.ipv4.conf.${dev}.accept_local`), '1', dev);
        }
        assert.deepEqual((await dp.verify(uid)).problems, []);
        const cli = await runCli(['datapath', 'verify', '--uid', uid, '--bpffs', root]);
        assert.equal(cli.code, 0, cli.stderr);
        assert.match(cli.stdout, /: ok \(captured: eth0, (net1, mv0|mv0, net1)\)\n$/);
        assert.match((await runCli(['datapath', 'list', '--bpffs', root])).stdout, /\beth0,(net1,mv0|mv0,net1)\b/);
      });

      it('sends inbound TCP arriving on the other interfaces to 15006, with their address as local address', async () => {
        const appBefore = app.accepted.length;
        for (const o of [veth, mv]) {
          for (const [host, src] of [
            [o.podV4, o.farV4],
            [o.podV6, o.farV6],
          ] as const) {
            assert.equal(
              await whoAnswers({ netns: from(o), host, port: APP_PORT }),
              'ztunnel-15006',
              `${o.dev} ${host}`,
            );
            const got = inbound.accepted.at(-1)!;
            assert.deepEqual([got.localAddress, got.localPort, got.remoteAddress], [host, APP_PORT, src]);
          }
        }
        assert.equal(app.accepted.length, appBefore, 'the app took a connection on another interface directly');
      });

      it('sends outbound TCP leaving through the other interfaces to 15001 with the original destination', async () => {
        for (const o of [veth, mv]) {
          for (const [host, src] of [
            [o.farV4, o.podV4],
            [o.farV6, o.podV6],
          ] as const) {
            assert.equal(
              await whoAnswers({ netns: net.podPath, host, port: APP_PORT }),
              'ztunnel-15001',
              `${o.dev} ${host}`,
            );
            const got = outbound.accepted.at(-1)!;
            assert.deepEqual([got.localAddress, got.localPort, got.remoteAddress], [host, APP_PORT, src]);
          }
        }
        assert.deepEqual(
          farServers.map((s) => s.accepted.length),
          [1, 0],
          'a far side saw a connection that should have gone to ztunnel (net1: the control only)',
        );
      });

      it('leaves HBONE (15008) on the other interfaces to its own listener', async () => {
        const before = inbound.accepted.length;
        for (const o of [veth, mv])
          for (const host of [o.podV4, o.podV6])
            assert.equal(await whoAnswers({ netns: from(o), host, port: 15008 }), 'ztunnel-15008');
        assert.equal(inbound.accepted.length, before);
      });

      it("applies the pod's options to the other interfaces' addresses: strict mode drops UDP leaving through net1", async () => {
        const far = await udpInNetns(from(veth), '0.0.0.0', 9999);
        const local = await udpInNetns(net.podPath, veth.podV4, 0);
        let got = 0;
        far.on('message', () => got++);
        const sent = async () => {
          const before = got;
          local.send('x', 9999, veth.farV4);
          await sleep(300);
          return got - before;
        };
        try {
          assert.equal(await sent(), 1, 'control: without strict mode it leaves');
          await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6], strict: true }, { mode });
          const dropped = (await dp.list())[0]!.counters.strictDropped;
          assert.equal(await sent(), 0, 'with strict mode it is dropped');
          assert.equal((await dp.list())[0]!.counters.strictDropped, dropped + 1, 'and counted for the pod');
        } finally {
          far.close();
          local.close();
          await attach();
        }
      });

      it("classifies the other interfaces' traffic as the pod's (its counters)", async () => {
        const [pod] = await dp.list();
        assert.equal(pod!.counters.inboundRedirected, 4);
        assert.equal(pod!.counters.outboundRedirected, 4);
        assert.equal(pod!.counters.bypassHbone, 4);
      });

      it('verify reports another interface whose hook was removed behind its back, and an update repairs it', async () => {
        if (mode === 'tcx') {
          const [f] = (await dp.list())[0]!.otherInterfaces.filter((i) => i.name === 'net1');
          await sh('bpftool', ['link', 'detach', 'pinned', join(root, 'pods', uid, `iface-${f!.ifindex}-ingress`)]);
        } else {
          await topo.exec(net.pod, 'tc', 'filter', 'del', 'dev', 'net1', 'ingress');
        }
        const broken = await dp.verify(uid);
        assert.ok(
          broken.problems.some((p) => /ingress hook of interface net1/.test(p)),
          broken.problems.join('; '),
        );
        assert.equal(
          await whoAnswers({ netns: from(veth), host: veth.podV4, port: APP_PORT }),
          'app',
          'the broken hook really let it through',
        );
        await attach();
        assert.deepEqual((await dp.verify(uid)).problems, []);
        assert.equal(await whoAnswers({ netns: from(veth), host: veth.podV4, port: APP_PORT }), 'ztunnel-15006');
      });

      it('verify reports an interface that appeared after enrollment; the next attach captures it', async () => {
        const late = await secondVeth(topo, net.pod, 'net2', subnet + 3);
        const far = await RecordingServer.start('far-net2', {
          netns: from(late),
          family: 6,
          address: '::',
          port: APP_PORT,
        });
        try {
          const seen = await dp.verify(uid);
          assert.ok(
            seen.problems.some((p) => /interface net2 appeared and is not captured yet/.test(p)),
            seen.problems.join('; '),
          );
          assert.ok(
            seen.problems.some((p) => p.includes(`address ${late.podV4} appeared`)),
            seen.problems.join('; '),
          );
          // Not captured yet (no hooks): the socket lookup refuses an address the record lacks.
          const taken = app.accepted.length;
          await connectFails({ netns: from(late), host: late.podV4, port: APP_PORT, timeoutMs: 1500 });
          assert.equal(app.accepted.length, taken, 'never the app');
          await attach();
          assert.deepEqual((await dp.verify(uid)).problems, []);
          assert.equal(await whoAnswers({ netns: from(late), host: late.podV4, port: APP_PORT }), 'ztunnel-15006');
          assert.equal(await whoAnswers({ netns: net.podPath, host: late.farV6, port: APP_PORT }), 'ztunnel-15001');
          await topo.ip(net.pod, 'link', 'del', 'net2');
          assert.ok((await dp.verify(uid)).problems.some((p) => /captured interface net2 .* is gone/.test(p)));
          await attach();
          assert.deepEqual((await dp.verify(uid)).problems, []);
          assert.equal(far.accepted.length, 0);
        } finally {
          await far.close();
        }
      });

      it('detach restores every interface: no hook, no qdisc, accept_local back, the app reachable again', async () => {
        const programs = mode === 'tcx' ? await podProgramIds(root, uid) : new Set<number>();
        const { found } = await dp.detach(uid);
        assert.ok(found);
        assert.deepEqual(await linksOfPrograms(programs), []);
        for (const dev of ['eth0', 'net1', 'mv0']) {
          assert.deepEqual(await filtersOn(topo, net.pod, dev), [], dev);
          assert.doesNotMatch(await topo.exec(net.pod, 'tc', 'qdisc', 'show', 'dev', dev), /clsact/, dev);
          assert.equal(await sysctl(topo, net.pod, `net.ipv4.conf.${dev}.accept_local`), '0', dev);
        }
        assert.ok(!existsSync(join(root, 'pods', uid)), "the pod's pins are gone");
        assert.equal(await whoAnswers({ netns: from(mv), host: mv.podV6, port: APP_PORT }), 'app');
      });
    },
  );

  describe(
    `a pod whose IPv4 and IPv6 are on different interfaces, with ${mode}, ${steering}`,
    kernelTest({ name: `split families with ${mode}, ${steering}`, tcx: mode === 'tcx' }),
    () => {
      const topo = new Topology();
      const uid = `pod-${topo.id}`;
      const root = testBpffsRoot(topo.id);
      let pod: string, v4: OtherNet, v6: OtherNet;
      let dp: Datapath;
      let servers: RecordingServer[] = [];

      before(async () => {
        pod = await topo.netns('pod');
        v4 = await secondVeth(topo, pod, 'eth0', subnet + 5);
        v6 = await secondVeth(topo, pod, 'net1', subnet + 6);
        await topo.ip(pod, '-6', 'addr', 'del', `${v4.podV6}/64`, 'dev', 'eth0');
        await topo.ip(pod, 'addr', 'del', `${v6.podV4}/24`, 'dev', 'net1');
        dp = await Datapath.open({ bpffsRoot: root });
        await steer(dp);
        servers = [
          await RecordingServer.start('app', {
            netns: Topology.netnsPath(pod),
            family: 6,
            address: '::',
            port: APP_PORT,
          }),
          await ztunnelListener(Topology.netnsPath(pod), 15006),
        ];
      });

      after(async () => {
        for (const s of servers) await s.close();
        await dp?.detach(uid);
        dp?.close();
        await topo.cleanup();
        rmSync(root, { recursive: true, force: true });
      });

      it('is enrolled, and both families are captured', async () => {
        assert.equal(
          await whoAnswers({ netns: Topology.netnsPath(v6.ns), host: v6.podV6, port: APP_PORT }),
          'app',
          'control',
        );
        await dp.attach({ uid, netnsPath: Topology.netnsPath(pod), ips: [v4.podV4, v6.podV6] }, { mode });
        const [p] = await dp.list();
        assert.deepEqual(
          [p?.interface, p?.otherInterfaces.map((i) => i.name), p?.otherAddresses],
          ['eth0', ['net1'], []],
        );
        assert.equal(
          await whoAnswers({ netns: Topology.netnsPath(v4.ns), host: v4.podV4, port: APP_PORT }),
          'ztunnel-15006',
        );
        assert.equal(
          await whoAnswers({ netns: Topology.netnsPath(v6.ns), host: v6.podV6, port: APP_PORT }),
          'ztunnel-15006',
        );
        assert.deepEqual((await dp.verify(uid)).problems, []);
      });
    },
  );
}

/** A pod_policy entry (slot, flags) by address, read from the pinned map; undefined if absent. */
async function policyEntry(root: string, ip: string): Promise<{ slot: number; flags: number } | undefined> {
  const v4 = ip.split('.').map(Number);
  const key = [...new Array<number>(10).fill(0), 0xff, 0xff, ...v4].map((b) => b.toString(16).padStart(2, '0'));
  try {
    const out = JSON.parse(
      await sh('bpftool', ['-j', 'map', 'lookup', 'pinned', join(root, 'maps', 'pod_policy'), 'key', 'hex', ...key]),
    ) as { value: string[] };
    const b = Buffer.from(out.value.map((x) => parseInt(x, 16)));
    return { slot: b.readUInt32LE(0), flags: b.readUInt32LE(4) };
  } catch (e) {
    if (/not found|No such file/i.test(String((e as { stderr?: string }).stderr ?? e))) return undefined;
    throw e;
  }
}

describe("another pod's address on a second interface", kernelTest({ name: 'interfaces: foreign address' }), () => {
  const topo = new Topology();
  const root = testBpffsRoot(topo.id);
  const uidA = `poda-${topo.id}`;
  const uidB = `podb-${topo.id}`;
  let a: PodNet, b: PodNet, side: string;
  let dp: Datapath;
  let servers: RecordingServer[] = [];

  before(async () => {
    b = await podWithRemote(topo, 160, 'b');
    a = await podWithRemote(topo, 161, 'a');
    side = await topo.netns('side');
    await topo.batch(undefined, [`link add net1 netns ${a.pod} type veth peer name eth0 netns ${side}`]);
    dp = await Datapath.open({ bpffsRoot: root });
    await useKernelSteering(dp);
    dp.trustZtunnelCgroup(testRunnerCgroup());
    servers = [
      await RecordingServer.start('app', { netns: b.podPath, family: 6, address: '::', port: APP_PORT }),
      await ztunnelListener(b.podPath, 15006),
    ];
  });

  after(async () => {
    for (const s of servers) await s.close();
    await dp?.detach(uidA);
    await dp?.detach(uidB);
    dp?.close();
    await topo.cleanup();
    rmSync(root, { recursive: true, force: true });
  });

  it('is never taken: the owner keeps its entry and stays captured, verify says so, detach leaves it', async () => {
    await dp.attach({ uid: uidB, netnsPath: b.podPath, ips: [b.podV4, b.podV6] });
    const mine = await policyEntry(root, b.podV4);
    assert.ok(mine && mine.slot > 0, 'B is in pod_policy');
    assert.equal(
      await whoAnswers({ netns: Topology.netnsPath(b.remote), host: b.podV4, port: APP_PORT }),
      'ztunnel-15006',
      'control: B captured',
    );
    await topo.batch(a.pod, ['link set net1 up', `addr add ${b.podV4}/32 dev net1`]);
    await dp.attach({ uid: uidA, netnsPath: a.podPath, ips: [a.podV4, a.podV6], bypassInbound: true });
    assert.deepEqual(await policyEntry(root, b.podV4), mine, "B's entry (slot, flags) unchanged");
    assert.equal(
      await whoAnswers({ netns: Topology.netnsPath(b.remote), host: b.podV4, port: APP_PORT }),
      'ztunnel-15006',
      'B still captured',
    );
    await dp.attach({ uid: uidA, netnsPath: a.podPath, ips: [a.podV4, a.podV6], bypassInbound: true }); // an update too
    assert.deepEqual(await policyEntry(root, b.podV4), mine);
    const seen = await dp.verify(uidA);
    assert.ok(
      seen.problems.some((p) => p.includes(`address ${b.podV4} on net1 belongs to another pod`)),
      seen.problems.join('; '),
    );
    assert.deepEqual((await dp.verify(uidB)).problems, []);
    await dp.detach(uidA);
    assert.deepEqual(await policyEntry(root, b.podV4), mine, "detaching A leaves B's entry");
    assert.equal(
      await whoAnswers({ netns: Topology.netnsPath(b.remote), host: b.podV4, port: APP_PORT }),
      'ztunnel-15006',
    );
    assert.equal(servers[0]!.accepted.length, 0, "B's app never took a connection directly");
  });
});

describe(
  'an enrolled pod that gets new interfaces, a tun device and a veth',
  kernelTest({ name: 'interfaces: tun and veth appear' }),
  () => {
    const topo = new Topology();
    const root = testBpffsRoot(topo.id);
    const uid = `pod-${topo.id}`;
    let net: PodNet;
    let dp: Datapath;
    let servers: RecordingServer[] = [];

    before(async () => {
      net = await podWithRemote(topo, 162);
      dp = await Datapath.open({ bpffsRoot: root });
      await useKernelSteering(dp);
      servers = [
        await RecordingServer.start('app', { netns: net.podPath, family: 6, address: '::', port: APP_PORT }),
        await ztunnelListener(net.podPath, 15006),
      ];
    });

    after(async () => {
      for (const s of servers) await s.close();
      await dp?.detach(uid);
      dp?.close();
      await topo.cleanup();
      rmSync(root, { recursive: true, force: true });
    });

    it('hooks both, and more than the address limit is no refusal (said in the warning)', async () => {
      await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] });
      await topo.ip(net.pod, 'tuntap', 'add', 'dev', 'tun0', 'mode', 'tun');
      const late = await secondVeth(topo, net.pod, 'net1', 163);
      // More addresses than a record holds (MAX_POD_IPS): capture does not need them.
      await topo.batch(
        net.pod,
        Array.from({ length: 8 }, (_, i) => `addr add 198.18.163.${10 + i}/32 dev net1`),
      );
      // Not hooked yet: the socket lookup refuses an address the pod's record lacks.
      await connectFails({ netns: Topology.netnsPath(late.ns), host: late.podV4, port: APP_PORT, timeoutMs: 1500 });
      const r = await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] });
      assert.match(r.warning, /more than \d+ addresses/);
      const [pod] = await dp.list();
      assert.deepEqual(
        pod?.otherInterfaces.map((i) => i.name),
        ['tun0', 'net1'],
      );
      assert.equal(
        await whoAnswers({ netns: Topology.netnsPath(late.ns), host: late.podV4, port: APP_PORT }),
        'ztunnel-15006',
      );
      assert.equal(
        await whoAnswers({ netns: Topology.netnsPath(late.ns), host: late.podV6, port: APP_PORT }),
        'ztunnel-15006',
      );
      assert.equal(
        await whoAnswers({ netns: Topology.netnsPath(late.ns), host: '198.18.163.17', port: APP_PORT }),
        'ztunnel-15006',
        'an address beyond the record is captured too',
      );
      // Kubelet's probes arrive on the pod's own veth only: from the probe address on net1, a
      // connection goes to ztunnel like any other (the reply routed back through net1).
      await topo.ip(late.ns, 'addr', 'add', '169.254.7.127/32', 'dev', 'eth0');
      await topo.ip(net.pod, 'route', 'add', '169.254.7.127/32', 'dev', 'net1');
      assert.equal(
        await whoAnswers({
          netns: Topology.netnsPath(late.ns),
          host: late.podV4,
          port: APP_PORT,
          localAddress: '169.254.7.127',
        }),
        'ztunnel-15006',
        'a connection from the probe address on net1 reached the app',
      );
      const problems = (await dp.verify(uid)).problems;
      assert.ok(!problems.some((p) => /net1|tun0/.test(p)), problems.join('; '));
      assert.equal(servers[0]!.accepted.length, 0, 'the app never took a connection');
    });
  },
);

describe('an update that cannot hook an interface again', kernelTest({ name: 'interfaces: failed re-hook' }), () => {
  const topo = new Topology();
  const root = testBpffsRoot(topo.id);
  const uid = `pod-${topo.id}`;
  let net: PodNet;
  let veth: OtherNet;
  let dp: Datapath;
  let servers: RecordingServer[] = [];
  const viaNet1 = () => whoAnswers({ netns: Topology.netnsPath(veth.ns), host: veth.podV4, port: APP_PORT });

  before(async () => {
    net = await podWithRemote(topo, 164);
    veth = await secondVeth(topo, net.pod, 'net1', 165);
    dp = await Datapath.open({ bpffsRoot: root });
    await useKernelSteering(dp);
    servers = [
      await RecordingServer.start('app', { netns: net.podPath, family: 6, address: '::', port: APP_PORT }),
      await ztunnelListener(net.podPath, 15006),
    ];
  });

  after(async () => {
    delete process.env.AMBIENT_BPF_FAULT_IFACE;
    for (const s of servers) await s.close();
    await dp?.detach(uid);
    dp?.close();
    await topo.cleanup();
    rmSync(root, { recursive: true, force: true });
  });

  /** An update of the attached pod while hooking net1 fails (injected, before any work). */
  const failingUpdate = async (mode: 'tc' | 'tcx') => {
    process.env.AMBIENT_BPF_FAULT_IFACE = 'net1';
    try {
      return await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] }, { mode });
    } finally {
      delete process.env.AMBIENT_BPF_FAULT_IFACE;
    }
  };

  it('keeps the interface hooked and recorded in the same mode, and says so', async () => {
    const mode = KERNEL_HAS_TCX ? 'tcx' : 'tc';
    await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] }, { mode });
    assert.equal(await viaNet1(), 'ztunnel-15006', 'control: net1 captured');
    const r = await failingUpdate(mode);
    assert.match(r.warning, /cannot hook interface net1 again .*its previous hooks are kept/);
    assert.deepEqual(
      (await dp.list())[0]?.otherInterfaces.map((i) => i.name),
      ['net1'],
    );
    assert.equal(await viaNet1(), 'ztunnel-15006', 'net1 still captured after the failed re-hook');
    assert.deepEqual((await dp.verify(uid)).problems, []);
    assert.equal(servers[0]!.accepted.length, 0, 'the app never took a connection');
  });

  it(
    'fails a mode switch and restores the previous mode, net1 captured throughout',
    { skip: KERNEL_HAS_TCX ? false : 'the kernel has no tcx' },
    async () => {
      await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] }, { mode: 'tc' });
      assert.equal(await viaNet1(), 'ztunnel-15006', 'control: net1 captured with tc');
      await assert.rejects(failingUpdate('tcx'), /cannot hook interface net1 in the new mode/);
      const [pod] = await dp.list();
      assert.equal(pod?.mode, 'tc');
      assert.deepEqual(
        pod?.otherInterfaces.map((i) => i.name),
        ['net1'],
      );
      assert.deepEqual(await filtersOn(topo, net.pod, 'net1'), [
        'clsact/egress:pod_egress',
        'clsact/ingress:pod_ingress',
      ]);
      assert.equal(await viaNet1(), 'ztunnel-15006', 'net1 still captured after the failed switch');
      assert.deepEqual((await dp.verify(uid)).problems, []);
      assert.equal(servers[0]!.accepted.length, 0, 'the app never took a connection');
    },
  );

  it('leaves out an interface whose hooks are gone when hooking it again fails: the socket lookup refuses it', async () => {
    await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] }, { mode: 'tc' });
    assert.equal(await viaNet1(), 'ztunnel-15006', 'control: net1 captured');
    // Its hooks go behind the agent's back (its clsact qdisc deleted), then the update fails on it.
    await topo.exec(net.pod, 'tc', 'qdisc', 'del', 'dev', 'net1', 'clsact');
    const r = await failingUpdate('tc');
    assert.match(r.warning, /cannot hook interface net1: /);
    assert.deepEqual((await dp.list())[0]?.otherInterfaces, [], 'not recorded as captured');
    await connectFails({ netns: Topology.netnsPath(veth.ns), host: veth.podV4, port: APP_PORT, timeoutMs: 1500 });
    assert.equal(servers[0]!.accepted.length, 0, 'the app never took a connection');
    await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] }, { mode: 'tc' });
    assert.equal(await viaNet1(), 'ztunnel-15006', 'the next pass hooks it again');
  });
});

describe(
  'an interface of an enrolled pod that has no hooks (over the interface limit)',
  kernelTest({ name: 'interfaces: unhooked interface' }),
  () => {
    const topo = new Topology();
    const root = testBpffsRoot(topo.id);
    const uid = `pod-${topo.id}`;
    let net: PodNet;
    let extra: OtherNet;
    let dp: Datapath;
    let servers: RecordingServer[] = [];

    before(async () => {
      net = await podWithRemote(topo, 166);
      dp = await Datapath.open({ bpffsRoot: root });
      await useKernelSteering(dp);
      servers = [
        await RecordingServer.start('app', { netns: net.podPath, family: 6, address: '::', port: APP_PORT }),
        await ztunnelListener(net.podPath, 15006),
      ];
      await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] });
      // As many interfaces as a pod's record holds, then one more that carries traffic: the last
      // one (the highest index) is left without hooks.
      await topo.batch(
        net.pod,
        Array.from({ length: 4 }, (_, i) => `link add da${i} type veth peer name db${i}`),
      );
      extra = await secondVeth(topo, net.pod, 'net9', 167);
      const r = await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] });
      assert.match(r.warning, /interface net9: the pod has more than \d+ interfaces/);
    });

    after(async () => {
      for (const s of servers) await s.close();
      await dp?.detach(uid);
      dp?.close();
      await topo.cleanup();
      rmSync(root, { recursive: true, force: true });
    });

    it('refuses a connection to its own address (the socket lookup, node-wide lookupRefused), never the app', async () => {
      const refused = dp.nodeCounters().lookupRefused;
      for (const host of [extra.podV4, extra.podV6])
        await connectFails({ netns: Topology.netnsPath(extra.ns), host, port: APP_PORT, timeoutMs: 1500 });
      assert.ok(dp.nodeCounters().lookupRefused >= refused + 2, 'counted node-wide');
      assert.equal(servers[0]!.accepted.length, 0, 'the app never took a connection');
    });

    it("refuses a connection to the pod's own IP that comes in on it (the pod's lookupRefused), never the app", async () => {
      // The far side sends to the pod's IPs through net9: Linux takes any local address on any
      // interface, and net9's tc never sees it.
      // (IPv6 neighbour discovery answers only for the receiving interface's own addresses.)
      const [link] = JSON.parse(await topo.exec(net.pod, 'ip', '-j', 'link', 'show', 'net9')) as { address: string }[];
      const mac = link!.address;
      await topo.batch(extra.ns, [
        `route add ${net.podV4}/32 dev eth0`,
        `route add ${net.podV6}/128 dev eth0`,
        `neigh replace ${net.podV6} lladdr ${mac} dev eth0`,
      ]);
      const refused = (await dp.list())[0]!.counters.lookupRefused;
      for (const host of [net.podV4, net.podV6])
        await connectFails({ netns: Topology.netnsPath(extra.ns), host, port: APP_PORT, timeoutMs: 1500 });
      const after = (await dp.list())[0]!.counters.lookupRefused;
      assert.ok(
        after >= refused + 2,
        `counted for the pod: ${refused} -> ${after}, node-wide ${dp.nodeCounters().lookupRefused}`,
      );
      assert.equal(servers[0]!.accepted.length, 0, 'the app never took a connection');
      assert.equal(
        await whoAnswers({ netns: Topology.netnsPath(net.remote), host: net.podV4, port: APP_PORT }),
        'ztunnel-15006',
        'through its own interface: captured',
      );
    });

    it('still lets the pod connect to that address itself', async () => {
      assert.equal(await whoAnswers({ netns: net.podPath, host: extra.podV4, port: APP_PORT }), 'app');
      assert.equal(await whoAnswers({ netns: net.podPath, host: extra.podV6, port: APP_PORT }), 'app');
    });

    it('a downgrade to layout 3 turns the check off with its map; adopted again, verify says so until the next attach', async () => {
      const taken = servers[0]!.accepted.length;
      dp.close();
      const down = await runCli(['datapath', 'downgrade', '--layout', '3', '--bpffs', root]);
      assert.equal(down.code, 0, down.stderr);
      assert.ok(
        !existsSync(join(root, 'maps', 'captured_ifaces')) && !existsSync(join(root, 'maps', 'gated_netns')),
        'its maps unpinned',
      );
      dp = await Datapath.open({ bpffsRoot: root });
      const seen = await dp.verify(uid);
      assert.ok(
        seen.problems.some((p) =>
          /interfaces are not recorded .*does not refuse connections from interfaces without hooks/.test(p),
        ),
        seen.problems.join('; '),
      );
      const r = await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] });
      assert.match(r.warning, /interface net9/);
      assert.ok(!(await dp.verify(uid)).problems.some((p) => /not recorded|captured_ifaces|gated_netns/.test(p)));
      await connectFails({ netns: Topology.netnsPath(extra.ns), host: net.podV4, port: APP_PORT, timeoutMs: 1500 });
      assert.equal(servers[0]!.accepted.length, taken, 'the app took no connection');
    });

    it('after detach, the address reaches the app again (control)', async () => {
      await dp.detach(uid);
      assert.equal(await whoAnswers({ netns: Topology.netnsPath(extra.ns), host: extra.podV4, port: APP_PORT }), 'app');
    });
  },
);

describe('the netns watch', kernelTest({ name: 'interfaces: watch overrun' }), () => {
  const topo = new Topology();

  after(() => topo.cleanup());

  it('survives an overrun of its socket (ENOBUFS, a poll error): reopened, said, and a later interface is still noticed', async () => {
    const ns = await topo.netns('w');
    const reasons: (string | undefined)[] = [];
    process.env.AMBIENT_BPF_TEST_WATCH_RCVBUF = '1'; // the kernel's minimum: a few links overrun it
    let w: NetnsWatch;
    try {
      w = await watchNetns(Topology.netnsPath(ns), ({ reason }) => reasons.push(reason));
    } finally {
      delete process.env.AMBIENT_BPF_TEST_WATCH_RCVBUF; // the reopened socket has the normal buffer
    }
    try {
      // The event loop blocked while the kernel announces more than the buffer holds.
      execFileSync('ip', ['-n', ns, '-batch', '-'], {
        input: Array.from({ length: 20 }, (_, i) => `link add va${i} type veth peer name vb${i}\n`).join(''),
      });
      await until(
        () => reasons.some((r) => r !== undefined && /reopened/.test(r)),
        () => `the watch reopened (got ${JSON.stringify(reasons)})`,
      );
      const before = reasons.length;
      await topo.ip(ns, 'link', 'add', 'late0', 'type', 'veth', 'peer', 'name', 'late1');
      await until(() => reasons.length > before, 'the interface created after the overrun noticed');
    } finally {
      w.close();
    }
  });

  it('says whether an interface appeared or left (a pass at once), and not for an address', async () => {
    const ns = await topo.netns('n');
    const changes: NetnsChange[] = [];
    const w = await watchNetns(Topology.netnsPath(ns), (c) => changes.push(c));
    try {
      await topo.ip(ns, 'link', 'add', 'new0', 'type', 'veth', 'peer', 'name', 'new1');
      await until(() => changes.length > 0, 'the new interface reported');
      assert.ok(changes.some((c) => c.interfaces));
      await sleep(100); // its trailing messages (the peer, state changes)
      const before = changes.length;
      await topo.batch(ns, ['link set new0 up', 'addr add 198.18.164.77/32 dev new0']);
      await until(() => changes.length > before, 'the address reported');
      assert.ok(
        changes.slice(before).every((c) => !c.interfaces && c.reason === undefined),
        JSON.stringify(changes.slice(before)),
      );
      await sleep(100);
      const beforeDel = changes.length;
      await topo.ip(ns, 'link', 'del', 'new0');
      await until(() => changes.slice(beforeDel).some((c) => c.interfaces), 'the departure reported as such');
    } finally {
      w.close();
    }
  });

  it('keeps trying to reopen a watch that cannot be reopened, and then reports again', async () => {
    const ns = await topo.netns('r');
    // The watch's own path to the netns: a bind mount the test can take away and give back.
    const dir = mkdtempSync(join(tmpdir(), `${TEST_PREFIX}-watch-`));
    const path = join(dir, 'netns');
    writeFileSync(path, '');
    execFileSync('mount', ['--bind', Topology.netnsPath(ns), path]);
    let mounted = true;
    const changes: NetnsChange[] = [];
    const reasons = () => changes.flatMap((c) => (c.reason ? [c.reason] : []));
    process.env.AMBIENT_BPF_TEST_WATCH_RCVBUF = '1';
    let w: NetnsWatch;
    try {
      w = await watchNetns(path, (c) => changes.push(c));
    } finally {
      delete process.env.AMBIENT_BPF_TEST_WATCH_RCVBUF;
    }
    try {
      execFileSync('umount', [path]);
      mounted = false;
      execFileSync('ip', ['-n', ns, '-batch', '-'], {
        input: Array.from({ length: 20 }, (_, i) => `link add ra${i} type veth peer name rb${i}\n`).join(''),
      });
      await until(
        () => reasons().filter((r) => /cannot be reopened/.test(r)).length >= 2,
        () => `two failed reopens said (got ${JSON.stringify(reasons())})`,
      );
      assert.match(
        reasons().find((r) => /cannot be reopened/.test(r))!,
        /tried again in 1000 ms/,
      );
      assert.ok(!reasons().some((r) => /reopened$/.test(r)), 'not reopened while the path is gone');
      execFileSync('mount', ['--bind', Topology.netnsPath(ns), path]);
      mounted = true;
      await until(
        () => reasons().some((r) => /the watch was reopened$/.test(r)),
        () => `reopened once the path is back (got ${JSON.stringify(reasons())})`,
        10_000,
      );
      const before = changes.length;
      await topo.ip(ns, 'link', 'add', 'rlate0', 'type', 'veth', 'peer', 'name', 'rlate1');
      await until(
        () => changes.slice(before).some((c) => c.interfaces && !c.reason),
        'the reopened watch notices a later interface',
      );
    } finally {
      w.close();
      if (mounted) execFileSync('umount', [path]);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('a downgrade to layout 2', kernelTest({ name: 'interfaces: downgrade' }), () => {
  const topo = new Topology();
  const uid = `pod-${topo.id}`;
  const root = testBpffsRoot(topo.id);
  let net: PodNet;

  before(async () => {
    net = await podWithRemote(topo, 200);
    await secondVeth(topo, net.pod, 'net1', 201);
  });

  after(async () => {
    const dp = await Datapath.open({ bpffsRoot: root }).catch(() => undefined);
    await dp?.detach(uid);
    dp?.close();
    await topo.cleanup();
    rmSync(root, { recursive: true, force: true });
  });

  for (const mode of ['tc', 'tcx'] as const) {
    it(
      `removes the other interfaces' hooks (${mode}), which layout 2 does not know, and keeps the pod's own`,
      { skip: mode === 'tcx' && !KERNEL_HAS_TCX ? 'the kernel has no tcx' : false },
      async () => {
        const dp = await Datapath.open({ bpffsRoot: root });
        await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] }, { mode });
        dp.close();
        const hooks = async (dev: string) =>
          mode === 'tcx' ? (await tcxLinks(root, uid)).length : (await filtersOn(topo, net.pod, dev)).length;
        assert.equal(await hooks('net1'), mode === 'tcx' ? 4 : 2);
        const down = await runCli(['datapath', 'downgrade', '--layout', '2', '--bpffs', root]);
        assert.equal(down.code, 0, down.stderr);
        assert.equal(await hooks('net1'), mode === 'tcx' ? 2 : 0, 'net1 unhooked');
        assert.doesNotMatch(await topo.exec(net.pod, 'tc', 'qdisc', 'show', 'dev', 'net1'), /clsact/);
        assert.equal(await sysctl(topo, net.pod, 'net.ipv4.conf.net1.accept_local'), '0');
        assert.equal(await hooks('eth0'), 2, "the pod's own hooks stay");
        assert.ok(!existsSync(join(root, 'maps', 'pod_ifaces')) && !existsSync(join(root, 'maps', 'captured_ifaces')));
        // This release adopts layout 2 again and captures net1 on its next attach.
        const again = await Datapath.open({ bpffsRoot: root });
        await again.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] }, { mode });
        assert.equal(await hooks('net1'), mode === 'tcx' ? 4 : 2);
        await again.detach(uid);
        again.close();
      },
    );
  }
});

describe('the agent', kernelTest({ name: 'interfaces: agent' }), () => {
  it('captures an interface that appears in an enrolled pod at once, without the drift check', async (t) => {
    const topo = new Topology();
    const root = testBpffsRoot(topo.id);
    const dir = mkdtempSync(join(tmpdir(), `${TEST_PREFIX}-ifaces-`));
    const net = await podWithRemote(topo, 210);
    const uid = `ifaces-${topo.id}`;
    const pods = join(dir, 'pods.yaml');
    writeFileSync(
      pods,
      [
        'apiVersion: v1\nkind: Namespace\nmetadata: { name: shop, labels: { istio.io/dataplane-mode: ambient } }',
        `apiVersion: v1\nkind: Pod\nmetadata: { name: cart, namespace: shop, uid: ${uid} }\nstatus: { phase: Running, podIP: ${net.podV4} }`,
      ].join('\n---\n'),
    );
    const socket = join(dir, 'ztunnel.sock');
    const procs: ChildProcess[] = [];
    t.after(async () => {
      for (const p of procs) p.kill('SIGKILL');
      await Promise.all(
        procs.map(
          (p) => new Promise((r) => (p.exitCode === null && p.signalCode === null ? p.once('exit', r) : r(null))),
        ),
      );
      await removeDatapath(root);
      await topo.cleanup();
      rmSync(dir, { recursive: true, force: true });
    });
    let stderr = '';
    const agent = spawn(
      CLI,
      [
        'agent',
        '--node-name',
        'node-a',
        '--local-pods',
        pods,
        '--ztunnel-socket',
        socket,
        '--plugin-socket',
        join(dir, 'cni.sock'),
        '--cni-policy-file',
        join(dir, 'cni-policy'),
        '--status-socket',
        join(dir, 'status.sock'),
        '--bpffs',
        root,
        '--verify-interval',
        '0',
        '--attach-mode',
        'tc',
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    agent.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    procs.push(agent, spawn(CLI, ['ztunnel', '--socket', socket], { stdio: 'ignore' }));
    const status = async () =>
      (
        JSON.parse(
          (await runCli(['status', '--json', '--status-socket', join(dir, 'status.sock')])).stdout || '{"pods":[]}',
        ) as { pods: { state: string; interfaces: string[] }[] }
      ).pods[0];
    await until(
      async () => (await status().catch(() => undefined))?.state === 'enabled',
      () => `pod enabled; agent: ${stderr}`,
      15_000,
    );
    assert.deepEqual((await status())?.interfaces, ['eth0']);

    const appeared = performance.now();
    const late = await secondVeth(topo, net.pod, 'net1', 211);
    const captured = async () => {
      const dp = await Datapath.open({ bpffsRoot: root });
      try {
        return (
          (await dp.verify(uid)).problems.length === 0 &&
          (await dp.list())[0]?.otherAddresses.includes(late.podV6) === true
        );
      } finally {
        dp.close();
      }
    };
    await until(
      captured,
      () => `net1 captured (the drift check is off: only the watch can have told the agent); agent: ${stderr}`,
      2000,
    );
    const ms = performance.now() - appeared;
    t.diagnostic(`net1 captured ${ms.toFixed(0)} ms after it was made`);
    assert.deepEqual((await status())?.interfaces, ['eth0', 'net1']);
    assert.match(stderr, /the pod’s interfaces or addresses changed; capturing them/);
    const dp = await Datapath.open({ bpffsRoot: root });
    const before = (await dp.list())[0]!.counters.inboundRedirected;
    await connectFails({ netns: Topology.netnsPath(late.ns), host: late.podV4, port: 8080, timeoutMs: 2000 }).catch(
      () => undefined,
    );
    assert.equal((await dp.list())[0]!.counters.inboundRedirected, before + 1, 'the SYN on net1 went to ztunnel');
    dp.close();
  });
});

for (const [mode, subnet] of [
  ['tcx', 220],
  ['tc', 225],
] as const) {
  describe(
    `crafted SYNs on another interface, with ${mode}`,
    kernelTest({ name: `interfaces: crafted with ${mode}`, tcx: mode === 'tcx' }),
    () => {
      const topo = new Topology();
      const uid = `pod-${topo.id}`;
      const root = testBpffsRoot(topo.id);
      let net: PodNet, other: OtherNet;
      let dp: Datapath | undefined;
      let peer: Crafter;
      let podMac: string;
      const servers: RecordingServer[] = [];
      const attacker = { v4: `198.18.${subnet + 1}.66`, v6: `2001:db8:${subnet + 1}::66` };
      // scapy-made, from an address no namespace owns (so no kernel resets the pod's SYN-ACK): a plain
      // SYN, one carrying data, one with an IP option.
      const cases = [
        ['control', false],
        ['control', true],
        ['syn-data', false],
        ['ipopt-nop', false],
      ] as const;
      const send = (name: string, v6: boolean) =>
        peer.send({
          op: 'inbound',
          case: name,
          src: v6 ? attacker.v6 : attacker.v4,
          dst: v6 ? other.podV6 : other.podV4,
          dport: APP_PORT,
          dmac: podMac,
        });

      before(async () => {
        net = await podWithRemote(topo, subnet);
        other = await secondVeth(topo, net.pod, 'net1', subnet + 1);
        const mac = async (ns: string, dev: string) =>
          (JSON.parse(await topo.ip(ns, '-j', 'link', 'show', dev)) as { address: string }[])[0]!.address;
        podMac = await mac(net.pod, 'net1');
        const farMac = await mac(other.ns, 'eth0');
        await topo.ip(net.pod, 'neigh', 'replace', attacker.v4, 'lladdr', farMac, 'dev', 'net1', 'nud', 'permanent');
        await topo.ip(
          net.pod,
          '-6',
          'neigh',
          'replace',
          attacker.v6,
          'lladdr',
          farMac,
          'dev',
          'net1',
          'nud',
          'permanent',
        );
        servers.push(
          await RecordingServer.start('app', { netns: net.podPath, family: 6, address: '::', port: APP_PORT }),
        );
        peer = await crafter(Topology.netnsPath(other.ns));
      });

      after(async () => {
        await peer?.stop();
        for (const s of servers) await s.close();
        await dp?.detach(uid);
        dp?.close();
        await topo.cleanup();
        rmSync(root, { recursive: true, force: true });
      });

      it('control: without the programs each reaches the app', async () => {
        for (const [name, v6] of cases) assert.equal((await send(name, v6)).banner, 'app', `${name} IPv${v6 ? 6 : 4}`);
      });

      it('with them, each reaches ztunnel’s 15006, never the app', async () => {
        dp = await Datapath.open({ bpffsRoot: root });
        await useKernelSteering(dp);
        dp.trustZtunnelCgroup(testRunnerCgroup());
        await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] }, { mode });
        servers.push(await ztunnelListener(net.podPath, 15006));
        const appBefore = servers[0]!.accepted.length;
        for (const [name, v6] of cases)
          assert.equal((await send(name, v6)).banner, 'ztunnel-15006', `${name} IPv${v6 ? 6 : 4}`);
        assert.equal(servers[0]!.accepted.length, appBefore);
      });
    },
  );
}
