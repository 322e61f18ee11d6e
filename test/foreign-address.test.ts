// A pod (A) that holds an enrolled pod's (B's) address on one of its interfaces (a second network whose
// range overlaps the pod network's) never gets B's pod_policy entry for it: where tc programs may read
// their netns's cookie, B's bypass-inbound-capture does not let a SYN to that address reach A's app
// past ztunnel, B's strict mode is not what decides A's packets, and B's counters are not A's. Without
// that (forced here) the programs cannot tell, and the attach says so.
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { Datapath, type AttachResult } from '../bpf/src/index.js';
import { testRunnerCgroup, useKernelSteering } from './helpers/app.js';
import { kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { podWithRemote, Topology, type PodNet } from './helpers/topology.js';
import { connectFails, RecordingServer, udpInNetns, whoAnswers, ztunnelListener } from './helpers/traffic.js';
import { sleep } from './helpers/wait.js';

const APP_PORT = 8080;

after(assertNothingLeft);

/** Pods B and A (each with its eth0 on a network of its own) and a third netns, `side`, reached from
 * A through its second interface net1, which carries B's addresses: the overlap. */
interface Overlap {
  a: PodNet;
  b: PodNet;
  side: string;
  sidePath: string;
  sideV4: string;
  sideV6: string;
}

async function overlap(topo: Topology, subnet: number): Promise<Overlap> {
  const b = await podWithRemote(topo, subnet, 'b');
  const a = await podWithRemote(topo, subnet + 1, 'a');
  const side = await topo.netns('side');
  const sideV4 = `198.18.${subnet + 2}.1`;
  const sideV6 = `2001:db8:${subnet + 2}::1`;
  await topo.batch(undefined, [`link add net1 netns ${a.pod} type veth peer name eth0 netns ${side}`]);
  await topo.batch(a.pod, [
    'link set net1 up',
    `addr add ${b.podV4}/32 dev net1`,
    `addr add ${b.podV6}/128 dev net1 nodad`,
    `route add ${sideV4}/32 dev net1`,
    `route add ${sideV6}/128 dev net1`,
  ]);
  await topo.batch(side, [
    'link set eth0 up',
    `addr add ${sideV4}/32 dev eth0`,
    `addr add ${sideV6}/128 dev eth0 nodad`,
    `route add ${b.podV4}/32 dev eth0`,
    `route add ${b.podV6}/128 dev eth0`,
  ]);
  return { a, b, side, sidePath: Topology.netnsPath(side), sideV4, sideV6 };
}

/** Datagrams from A (bound to B's IPv4 address) to `side`, out through net1: how many arrived. */
async function udpThroughNet1(o: Overlap): Promise<number> {
  const far = await udpInNetns(o.sidePath, '0.0.0.0', 9999);
  const local = await udpInNetns(o.a.podPath, o.b.podV4, 0);
  let got = 0;
  far.on('message', () => got++);
  try {
    for (let i = 0; i < 3; i++) local.send('x', 9999, o.sideV4);
    await sleep(400);
    return got;
  } finally {
    far.close();
    local.close();
  }
}

describe(
  "another pod's address on a pod's interface, tc programs reading the netns cookie",
  kernelTest({ name: 'foreign address: netns cookie', tcNetnsCookie: true }),
  () => {
    const topo = new Topology();
    const root = testBpffsRoot(topo.id);
    const uidA = `poda-${topo.id}`;
    const uidB = `podb-${topo.id}`;
    let o: Overlap;
    let dp: Datapath;
    let app: RecordingServer, inbound: RecordingServer | undefined;
    let attachedA: AttachResult;

    before(async () => {
      o = await overlap(topo, 150);
      dp = await Datapath.open({ bpffsRoot: root });
      await useKernelSteering(dp);
      dp.trustZtunnelCgroup(testRunnerCgroup());
      app = await RecordingServer.start('app', { netns: o.a.podPath, family: 6, address: '::', port: APP_PORT });
      inbound = await ztunnelListener(o.a.podPath, 15006);
    });

    after(async () => {
      for (const s of [app, inbound]) await s?.close();
      await dp?.detach(uidA);
      await dp?.detach(uidB);
      dp?.close();
      await topo.cleanup();
      rmSync(root, { recursive: true, force: true });
    });

    it("control: before A is enrolled, a SYN to B's address on A's net1 reaches A's app", async () => {
      for (const host of [o.b.podV4, o.b.podV6])
        assert.equal(await whoAnswers({ netns: o.sidePath, host, port: APP_PORT }), 'app', host);
      assert.equal(await udpThroughNet1(o), 3, 'and UDP from it leaves');
      app.accepted.length = 0;
    });

    it("enrolls B (bypass-inbound-capture) and A: B's entry is not taken, and A's attach says the address", async () => {
      await dp.attach({ uid: uidB, netnsPath: o.b.podPath, ips: [o.b.podV4, o.b.podV6], bypassInbound: true });
      attachedA = await dp.attach({ uid: uidA, netnsPath: o.a.podPath, ips: [o.a.podV4, o.a.podV6] });
      for (const ip of [o.b.podV4, o.b.podV6])
        assert.ok(
          attachedA.warning.includes(
            `address ${ip} on net1 belongs to another pod: not taken; here it has the node-wide policy`,
          ),
          attachedA.warning,
        );
      const problems = (await dp.verify(uidA)).problems;
      assert.ok(
        problems.some((p) => p.includes(`address ${o.b.podV4} on net1 belongs to another pod: not taken`)),
        problems.join('; '),
      );
    });

    it("sends a SYN to B's address arriving in A to A's ztunnel (15006), not past it: B's bypass is B's", async () => {
      const pods = () => dp.list().then((l) => new Map(l.map((p) => [p.uid, p.counters])));
      const before = await pods();
      const nodeBefore = dp.nodeCounters();
      for (const host of [o.b.podV4, o.b.podV6]) {
        assert.equal(await whoAnswers({ netns: o.sidePath, host, port: APP_PORT }), 'ztunnel-15006', host);
        const got = inbound!.accepted.at(-1)!;
        assert.deepEqual(
          [got.localAddress, got.localPort, got.remoteAddress],
          [host, APP_PORT, host.includes(':') ? o.sideV6 : o.sideV4],
        );
      }
      assert.equal(app.accepted.length, 0, "A's app took a connection past ztunnel");
      const now = await pods();
      assert.equal(
        now.get(uidB)!.bypassInboundAnnotation,
        before.get(uidB)!.bypassInboundAnnotation,
        "B's bypass was not applied (nor counted for B)",
      );
      assert.equal(now.get(uidB)!.inboundRedirected, before.get(uidB)!.inboundRedirected, 'not counted for B');
      assert.equal(now.get(uidA)!.inboundRedirected, before.get(uidA)!.inboundRedirected, 'nor for A');
      assert.equal(dp.nodeCounters().inboundRedirected, nodeBefore.inboundRedirected + 2, 'counted node-wide');
    });

    it('without ztunnel listening in A, refuses that SYN (a reset), never the app', async () => {
      await inbound!.close();
      inbound = undefined;
      for (const host of [o.b.podV4, o.b.podV6]) {
        const err = (await connectFails({ netns: o.sidePath, host, port: APP_PORT })) as NodeJS.ErrnoException;
        assert.equal(err.code, 'ECONNREFUSED', `${host}: ${err.message}`);
      }
      assert.equal(app.accepted.length, 0);
    });

    it("fails closed on strict mode: A's UDP from B's address is dropped as strict mode drops it, counted node-wide", async () => {
      const dropped = dp.nodeCounters().strictDropped;
      assert.equal(await udpThroughNet1(o), 0);
      assert.equal(dp.nodeCounters().strictDropped, dropped + 3);
    });

    it("leaves B's own traffic to B's entry: B's bypass still applies in B", async () => {
      const bApp = await RecordingServer.start('b-app', {
        netns: o.b.podPath,
        family: 6,
        address: '::',
        port: APP_PORT,
      });
      try {
        const before = (await dp.list()).find((p) => p.uid === uidB)!.counters.bypassInboundAnnotation;
        assert.equal(
          await whoAnswers({ netns: Topology.netnsPath(o.b.remote), host: o.b.podV4, port: APP_PORT }),
          'b-app',
        );
        const after = (await dp.list()).find((p) => p.uid === uidB)!.counters.bypassInboundAnnotation;
        assert.equal(after, before + 1);
      } finally {
        await bApp.close();
      }
    });
  },
);

describe(
  "another pod's address on a pod's interface, tc programs without the netns cookie (forced)",
  kernelTest({ name: 'foreign address: no netns cookie' }),
  () => {
    const topo = new Topology();
    const root = testBpffsRoot(topo.id);
    const uidA = `poda-${topo.id}`;
    const uidB = `podb-${topo.id}`;
    let o: Overlap;
    let dp: Datapath;
    let servers: RecordingServer[] = [];

    before(async () => {
      o = await overlap(topo, 140);
      dp = await Datapath.open({ bpffsRoot: root, tcNetnsCookie: false });
      await useKernelSteering(dp);
      dp.trustZtunnelCgroup(testRunnerCgroup());
      servers = [
        await RecordingServer.start('app', { netns: o.a.podPath, family: 6, address: '::', port: APP_PORT }),
        await ztunnelListener(o.a.podPath, 15006),
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

    it("says, at attach and in verify, that B's options apply to its address in A", async () => {
      await dp.attach({ uid: uidB, netnsPath: o.b.podPath, ips: [o.b.podV4, o.b.podV6], bypassInbound: true });
      const r = await dp.attach({ uid: uidA, netnsPath: o.a.podPath, ips: [o.a.podV4, o.a.podV6] });
      const said = (ip: string) =>
        `address ${ip} on net1 belongs to another pod, whose options (bypass-inbound-capture, strict mode) apply here too: tc cannot read the netns cookie here`;
      for (const ip of [o.b.podV4, o.b.podV6]) assert.ok(r.warning.includes(said(ip)), r.warning);
      const problems = (await dp.verify(uidA)).problems;
      assert.ok(problems.includes(said(o.b.podV4)), problems.join('; '));
      // tc takes B's entry (bypass-inbound: the limitation the warning names), but the socket
      // lookup refuses it: A's net1 is not among B's captured interfaces (it would pass only if
      // its index were one of B's, which it is not here).
      await connectFails({ netns: o.sidePath, host: o.b.podV4, port: APP_PORT, timeoutMs: 1500 });
    });
  },
);
