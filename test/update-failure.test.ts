// A failed update of an attached pod never opens it: for every step of an in-place update, a
// failure injected there (AMBIENT_BPF_FAULT_STEP, test only) leaves the previous attachment in
// place, while a client in a peer namespace and the pod's app make connections all along; every
// one of them reaches the test's ztunnel listeners, none the app or the remote directly.
import assert from 'node:assert/strict';
import { readdirSync, rmSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { Datapath, type PodAttachment } from '../bpf/src/index.js';
import { AppCgroup, testRunnerCgroup } from './helpers/app.js';
import { kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { podWithRemote, Topology, type PodNet } from './helpers/topology.js';
import { RecordingServer, whoAnswers, ztunnelListener } from './helpers/traffic.js';
import { sleep } from './helpers/wait.js';

const APP_PORT = 8080;
const STEPS = [
  'routing',
  'programs',
  'mode-switch',
  'ifaces',
  'reroutes',
  'policy',
  'sk_lookup',
  'host',
  'dns',
  'record',
];

after(assertNothingLeft);

/** Connections made one after another in both directions until stop(); who answered each. */
function continuousTraffic(
  net: PodNet,
  peer: string,
): { stop: () => Promise<{ inbound: string[]; outbound: string[] }> } {
  let running = true;
  const inbound: string[] = [];
  const outbound: string[] = [];
  const loop = async (out: string[], connect: () => Promise<string>) => {
    while (running) out.push(await connect().catch((e: Error) => `error: ${e.message}`));
  };
  const loops = Promise.all([
    loop(inbound, () =>
      whoAnswers({ netns: Topology.netnsPath(peer), host: net.podV4, port: APP_PORT, timeoutMs: 2000 }),
    ),
    loop(inbound, () =>
      whoAnswers({ netns: Topology.netnsPath(peer), host: net.podV6, port: APP_PORT, timeoutMs: 2000 }),
    ),
    loop(outbound, () => whoAnswers({ netns: net.podPath, host: net.remoteV4, port: APP_PORT, timeoutMs: 2000 })),
    loop(outbound, () => whoAnswers({ netns: net.podPath, host: net.remoteV6, port: APP_PORT, timeoutMs: 2000 })),
  ]);
  return {
    stop: async () => {
      await sleep(50);
      running = false;
      await loops;
      return { inbound, outbound };
    },
  };
}

function assertCaptured(seen: { inbound: string[]; outbound: string[] }): void {
  // Each of the four loops made at least one connection (an inbound SYN is sometimes retransmitted
  // after 1 s when an update with tc puts a clsact qdisc on the node side of the veth).
  assert.ok(
    seen.inbound.length >= 2 && seen.outbound.length >= 2,
    `too little traffic: ${seen.inbound.length} in, ${seen.outbound.length} out`,
  );
  assert.deepEqual(
    seen.inbound.filter((w) => w !== 'ztunnel-15006'),
    [],
    'inbound connections not captured',
  );
  assert.deepEqual(
    seen.outbound.filter((w) => w !== 'ztunnel-15001'),
    [],
    'outbound connections not captured',
  );
}

for (const [mode, other, subnet] of [
  ['tc', 'tcx', 40],
  ['tcx', 'tc', 41],
] as const) {
  describe(`a failed update of a pod attached with ${mode}`, kernelTest(), () => {
    const topo = new Topology();
    const uid = `pod-${topo.id}`;
    const root = testBpffsRoot(topo.id);
    let net: PodNet;
    let peer: string; // the client: a host behind the remote (which is also the pod's node here)
    let dp: Datapath;
    let cg: AppCgroup;
    let servers: RecordingServer[] = [];
    let pinsBefore: string[];
    let rulesBefore: string;
    let vm0Before: string;
    const first = (): PodAttachment => ({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] });
    // Everything an update can change at once: the mode, a reroute interface, DNS capture, the
    // node-side hooks (the pod's veth peer lives in the remote netns here).
    const update = (): PodAttachment => ({
      ...first(),
      rerouteInterfaces: ['vm0'],
      podCgroup: cg.path,
      hostNetns: Topology.netnsPath(net.remote),
    });

    /** The pod is attached as before the update, verify is clean, and nothing the update added remains. */
    async function assertAsBefore(): Promise<void> {
      const pods = await dp.list();
      assert.equal(pods.length, 1);
      assert.equal(pods[0]?.mode, mode);
      assert.deepEqual(pods[0]?.rerouteInterfaces, []);
      assert.equal(pods[0]?.podCgroupId, 0);
      assert.equal(pods[0]?.hostIfindex, 0);
      assert.deepEqual((await dp.verify(uid)).problems, []);
      assert.deepEqual(readdirSync(`${root}/pods/${uid}`).sort(), pinsBefore);
      assert.equal(await topo.ip(net.pod, 'rule'), rulesBefore);
      const tc = await topo.exec(net.pod, 'tc', 'filter', 'show', 'dev', 'eth0', 'ingress');
      assert.equal(/ab1/.test(tc), mode === 'tc', `tc filter on eth0: ${tc}`);
      // (vm0 is captured like any interface of the pod until the update makes it a reroute one.)
      assert.equal(await topo.exec(net.pod, 'tc', 'filter', 'show', 'dev', 'vm0', 'ingress'), vm0Before);
    }

    before(async () => {
      net = await podWithRemote(topo, subnet);
      await topo.veth(net.pod, 'vm0', net.pod, 'vm1');
      // Connections the node itself opens count as kubelet probes once the node-side hooks are
      // on: the client sits one hop further, the remote forwarding for it.
      peer = await topo.netns('peer');
      await topo.veth(peer, 'eth0', net.remote, 'p0');
      await topo.addAddress(peer, 'eth0', `198.19.${subnet}.2/24`);
      await topo.addAddress(peer, 'eth0', `2001:db8:1${subnet}::2/64`);
      await topo.addAddress(net.remote, 'p0', `198.19.${subnet}.1/24`);
      await topo.addAddress(net.remote, 'p0', `2001:db8:1${subnet}::1/64`);
      await topo.ip(peer, 'route', 'add', 'default', 'via', `198.19.${subnet}.1`);
      await topo.ip(peer, '-6', 'route', 'add', 'default', 'via', `2001:db8:1${subnet}::1`);
      await topo.exec(net.remote, 'sysctl', '-q', '-w', 'net.ipv4.ip_forward=1', 'net.ipv6.conf.all.forwarding=1');
      cg = new AppCgroup(topo.id);
      dp = await Datapath.open({ bpffsRoot: root });
      dp.trustZtunnelCgroup(testRunnerCgroup()); // the test's own marked sockets play ztunnel's
      assert.equal((await dp.attach(first(), { mode })).mode, mode);
      servers = [
        await ztunnelListener(net.podPath, 15001),
        await ztunnelListener(net.podPath, 15006),
        await RecordingServer.start('app', { netns: net.podPath, family: 6, address: '::', port: APP_PORT }),
        await RecordingServer.start('remote', {
          netns: Topology.netnsPath(net.remote),
          family: 6,
          address: '::',
          port: APP_PORT,
        }),
      ];
      pinsBefore = readdirSync(`${root}/pods/${uid}`).sort();
      rulesBefore = await topo.ip(net.pod, 'rule');
      vm0Before = await topo.exec(net.pod, 'tc', 'filter', 'show', 'dev', 'vm0', 'ingress');
      assert.equal(/pod_ingress/.test(vm0Before), mode === 'tc');
      assert.match(rulesBefore, /0x111/);
    });

    after(async () => {
      delete process.env.AMBIENT_BPF_FAULT_STEP;
      for (const s of servers) await s.destroy();
      await dp?.detach(uid);
      dp?.close();
      await topo.cleanup();
      cg?.remove();
      rmSync(root, { recursive: true, force: true });
    });

    for (const step of STEPS) {
      it(`keeps the pod attached as before when the update fails at "${step}"; every connection captured meanwhile`, async () => {
        const traffic = continuousTraffic(net, peer);
        process.env.AMBIENT_BPF_FAULT_STEP = step;
        try {
          for (let i = 0; i < 5; i++) {
            await assert.rejects(dp.attach(update(), { mode: other }), new RegExp(`injected failure at step ${step}`));
            await sleep(10);
          }
        } finally {
          delete process.env.AMBIENT_BPF_FAULT_STEP;
        }
        assertCaptured(await traffic.stop());
        await assertAsBefore();
      });
    }

    it('refuses to reroute the pod’s own interface before changing anything, and stays attached', async () => {
      const traffic = continuousTraffic(net, peer);
      for (let i = 0; i < 5; i++) {
        await assert.rejects(
          dp.attach({ ...update(), rerouteInterfaces: ['eth0'] }, { mode: other }),
          /reroute interface eth0 is the pod's own interface/,
        );
      }
      assertCaptured(await traffic.stop());
      await assertAsBefore();
    });

    it('then updates for real, and back, capturing every connection', async () => {
      const traffic = continuousTraffic(net, peer);
      assert.equal((await dp.attach(update(), { mode: other })).mode, other);
      const pod = (await dp.list())[0];
      assert.deepEqual([pod?.rerouteInterfaces, pod?.podCgroupId !== 0, pod?.hostIfindex !== 0], [['vm0'], true, true]);
      assert.deepEqual((await dp.verify(uid)).problems, []);
      assert.equal((await dp.attach(first(), { mode })).mode, mode);
      assertCaptured(await traffic.stop());
      await assertAsBefore();
    });
  });
}
