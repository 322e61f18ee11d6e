// Enrollment driven by the local pod source with real pieces: pods as network namespaces, the
// datapath, the ZDS server and the ztunnel stand-in. Label flips enrol and unenrol running pods, a
// restarted agent adopts what is attached, and ztunnel's absence shows as pending.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { NetnsLocator } from '../cni-agent/src/enrollment/netns-locator.js';
import { Reconciler, UPGRADE_IDLE_MS, type ReconcilerOptions } from '../cni-agent/src/enrollment/reconciler.js';
import { LocalPodSource } from '../cni-agent/src/pods/local-source.js';
import { silentLogger } from '../ztunnel-bridge/src/logger.js';
import { ZtunnelStandIn } from '../ztunnel-bridge/src/standin/ztunnel.js';
import { ZdsServer } from '../ztunnel-bridge/src/zds-server.js';
import { kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { Topology } from './helpers/topology.js';
import { until } from './helpers/wait.js';
import { FakeZtunnel } from './helpers/zds-peer.js';

after(assertNothingLeft);

interface PodSpec {
  name: string;
  namespace: string;
  ip: string;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
}

function podsYaml(namespaces: Record<string, string | undefined>, pods: PodSpec[]): string {
  const docs = Object.entries(namespaces).map(([name, mode]) =>
    JSON.stringify({
      apiVersion: 'v1',
      kind: 'Namespace',
      metadata: { name, labels: mode ? { 'istio.io/dataplane-mode': mode } : {} },
    }),
  );
  for (const p of pods) {
    docs.push(
      JSON.stringify({
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: {
          name: p.name,
          namespace: p.namespace,
          uid: `uid-${p.name}`,
          labels: p.labels ?? {},
          annotations: p.annotations ?? {},
        },
        spec: { serviceAccountName: p.name },
        status: { phase: 'Running', podIP: p.ip, podIPs: [{ ip: p.ip }] },
      }),
    );
  }
  return docs.join('\n---\n');
}

describe('enrollment with the local pod source', kernelTest(), () => {
  it('enrols and unenrols running pods as labels change, adopts after a restart, and reports ztunnel’s absence', async (t) => {
    const topo = new Topology();
    const root = testBpffsRoot(topo.id);
    const dir = mkdtempSync(join(tmpdir(), 'abt-rec-'));
    const file = join(dir, 'pods.yaml');
    const socketPath = join(dir, 'ztunnel.sock');
    const pods: PodSpec[] = [
      { name: 'cart', namespace: 'shop', ip: '198.18.50.2' },
      { name: 'web', namespace: 'shop', ip: '198.18.50.3' },
      { name: 'legacy', namespace: 'shop', ip: '198.18.50.4', labels: { 'istio.io/dataplane-mode': 'none' } },
      { name: 'api', namespace: 'plain', ip: '198.18.50.5' },
    ];
    const node = await topo.netns('node');
    for (const [i, p] of pods.entries()) {
      const ns = await topo.netns(p.name);
      await topo.veth(ns, 'eth0', node, `v${i}`);
      await topo.addAddress(ns, 'eth0', `${p.ip}/24`);
    }
    writeFileSync(file, podsYaml({ shop: 'ambient', plain: undefined }, pods));

    const dp = await Datapath.open({ bpffsRoot: root });
    const standIn = new ZtunnelStandIn({ socketPath });
    let zds = new ZdsServer({ socketPath, onStatus: (uid, r) => reconciler.ztunnelStatus(uid, r) });
    let reconciler = new Reconciler({
      datapath: dp,
      zds,
      netns: new NetnsLocator(),
      log: silentLogger,
      initialBackoffMs: 50,
    });
    const source = new LocalPodSource({
      file,
      nodeName: 'node-a',
      onChange: (c, s) => reconciler.applyChanges(c, s),
      onError: (e) => assert.fail(e),
      debounceMs: 20,
    });
    t.after(async () => {
      source.stop();
      reconciler.stop();
      standIn.stop();
      zds.close();
      for (const p of await dp.list()) await dp.detach(p.uid);
      dp.close();
      await topo.cleanup();
      rmSync(root, { recursive: true, force: true });
      rmSync(dir, { recursive: true, force: true });
    });
    const attached = async () => (await dp.list()).map((p) => p.uid).sort();
    const proxied = () =>
      standIn
        .stats()
        .map((p) => p.uid)
        .sort();
    const states = () => Object.fromEntries(reconciler.status().map((s) => [s.name, s.state]));

    // ztunnel is not there yet: redirected, but pending.
    zds.start();
    await reconciler.start(await source.start());
    assert.deepEqual(await attached(), ['uid-cart', 'uid-web']);
    assert.deepEqual(states(), { cart: 'pending', web: 'pending', legacy: 'not ambient', api: 'not ambient' });
    assert.match(reconciler.status().find((s) => s.name === 'legacy')!.reason, /=none/);

    // ztunnel arrives: the snapshot hands both pods over.
    standIn.start();
    await until(() => states().cart === 'enabled' && states().web === 'enabled', 'enabled after ztunnel connected');
    assert.deepEqual(proxied(), ['uid-cart', 'uid-web']);

    // Label flips: the namespace opts out, a pod in a plain namespace opts in.
    writeFileSync(
      file,
      podsYaml(
        { shop: undefined, plain: undefined },
        pods.map((p) => (p.name === 'api' ? { ...p, labels: { 'istio.io/dataplane-mode': 'ambient' } } : p)),
      ),
    );
    await until(async () => (await attached()).join() === 'uid-api', 'namespace opt-out and pod opt-in');
    await until(() => proxied().join() === 'uid-api', 'stand-in follows');
    // (the stand-in lists the pod before the agent has read its ack)
    await until(() => states().api === 'enabled', 'api enabled once acked');

    // The agent restarts: a new reconciler and ZDS server adopt the attachment without redoing it.
    reconciler.stop();
    zds.close();
    const before = await dp.list();
    zds = new ZdsServer({ socketPath, onStatus: (uid, r) => reconciler.ztunnelStatus(uid, r) });
    reconciler = new Reconciler({
      datapath: dp,
      zds,
      netns: new NetnsLocator(),
      log: silentLogger,
      initialBackoffMs: 50,
    });
    // As the agent does: adopt, then serve ztunnel, then reconcile. A ztunnel connecting right
    // then gets the adopted pod in its first snapshot (one missing from it would be drained).
    standIn.stop();
    await reconciler.adopt(source.current);
    zds.start();
    const early = new FakeZtunnel(socketPath).hello();
    const first = await early.request(2000);
    assert.deepEqual(
      [first?.request, first?.fdCount],
      [{ add: { uid: 'uid-api', workloadInfo: { name: 'api', namespace: 'plain', serviceAccount: 'api' } } }, 1],
    );
    early.ack();
    assert.deepEqual((await early.request(2000))?.request, { snapshotSent: {} });
    early.ack();
    early.close();
    standIn.start();
    await reconciler.reconcileAll();
    await until(() => states().api === 'enabled', 're-acked after restart');
    const afterRestart = await dp.list();
    assert.deepEqual(
      afterRestart.map((p) => [p.uid, p.attachedAt.getTime()]),
      before.map((p) => [p.uid, p.attachedAt.getTime()]),
    );
    await until(() => proxied().join() === 'uid-api', 'the reconnected stand-in serves the pod');

    // The pod is deleted from the source: unenrolled.
    writeFileSync(
      file,
      podsYaml(
        { shop: undefined, plain: undefined },
        pods.filter((p) => p.name !== 'api'),
      ),
    );
    await until(async () => (await attached()).length === 0, 'deleted pod detached');
    await until(() => proxied().length === 0, 'stand-in drops it');
    assert.equal(states().api, undefined);
  });

  /** One pod (netns, veth, address) in an ambient namespace of a local pods file, with a reconciler
   * that is started; everything is removed after the test. */
  async function onePod(
    t: { after: (fn: () => Promise<void>) => void },
    pod: PodSpec,
    options: Partial<ReconcilerOptions> = {},
  ) {
    const topo = new Topology();
    const root = testBpffsRoot(topo.id);
    const dir = mkdtempSync(join(tmpdir(), 'abt-rec-'));
    const file = join(dir, 'pods.yaml');
    const node = await topo.netns('node');
    const ns = await topo.netns(pod.name);
    await topo.veth(ns, 'eth0', node, 'v0');
    await topo.addAddress(ns, 'eth0', `${pod.ip}/24`);
    const write = (annotations: Record<string, string>) =>
      writeFileSync(file, podsYaml({ shop: 'ambient' }, [{ ...pod, annotations }]));
    write(pod.annotations ?? {});
    const dp = await Datapath.open({ bpffsRoot: root });
    const zds = new ZdsServer({ socketPath: join(dir, 'ztunnel.sock') });
    const reconciler = new Reconciler({
      datapath: dp,
      zds,
      netns: new NetnsLocator(),
      log: silentLogger,
      initialBackoffMs: 50,
      ...options,
    });
    const source = new LocalPodSource({
      file,
      nodeName: 'node-a',
      onChange: (c, s) => reconciler.applyChanges(c, s),
      onError: (e) => assert.fail(e),
      debounceMs: 20,
    });
    t.after(async () => {
      source.stop();
      reconciler.stop();
      zds.close();
      for (const p of await dp.list()) await dp.detach(p.uid);
      dp.close();
      await topo.cleanup();
      rmSync(root, { recursive: true, force: true });
      rmSync(dir, { recursive: true, force: true });
    });
    zds.start();
    const start = async () => reconciler.start(await source.start());
    return { dp, reconciler, write, start };
  }

  it('applies capture annotations in place, and ignores a malformed one with a warning in the pod’s status, never failing the pod', async (t) => {
    const annotations = {
      'ambient.istio.io/bypass-inbound-capture': 'true',
      'istio.io/reroute-virtual-interfaces': 'tap0, tap1',
    };
    const { dp, reconciler, write, start } = await onePod(t, {
      name: 'vm',
      namespace: 'shop',
      ip: '198.18.51.2',
      annotations,
    });
    const attached = async () => (await dp.list())[0];

    await start();
    const first = await attached();
    assert.deepEqual([first?.bypassInbound, first?.rerouteInterfaces], [true, ['tap0', 'tap1']]);

    write({});
    await until(async () => (await attached())?.bypassInbound === false, 'annotation removed, applied');
    const second = await attached();
    assert.deepEqual(second?.rerouteInterfaces, []);
    assert.equal(second?.attachedAt.getTime(), first?.attachedAt.getTime(), 'updated in place, not re-attached');

    write({ 'ambient.istio.io/bypass-inbound-capture': 'yes', 'istio.io/reroute-virtual-interfaces': 'tap0,a/b' });
    await until(
      () => /reroute-virtual-interfaces/.test(reconciler.status()[0]?.reason ?? ''),
      'the warning in the status',
    );
    const status = reconciler.status()[0]!;
    assert.notEqual(status.state, 'failed', 'a malformed annotation must not fail the pod');
    assert.equal((await dp.list()).length, 1, 'the pod must stay redirected');
    assert.match(status.reason, /bypass-inbound-capture: "yes" is not a boolean .*ignored: false applies/);
    assert.match(status.reason, /reroute-virtual-interfaces: "a\/b" is not an interface name, ignored/);
    const third = await attached();
    assert.deepEqual([third?.bypassInbound, third?.rerouteInterfaces], [false, ['tap0']], 'the valid part applies');
  });

  it('with attach mode auto, enrols on the tc fast path and moves to tcx once idle, still redirected', async (t) => {
    const { dp, start } = await onePod(
      t,
      { name: 'fast', namespace: 'shop', ip: '198.18.52.2' },
      { attachMode: 'auto', capture: { strict: false, dnsCapture: false } },
    );
    const t0 = performance.now();
    await start();
    assert.deepEqual(
      (await dp.list()).map((p) => p.mode),
      ['tc'],
      'not attached on the tc fast path',
    );
    await until(async () => (await dp.list())[0]?.mode === 'tcx', 'moved to tcx', 10_000);
    assert.ok(performance.now() - t0 >= UPGRADE_IDLE_MS, 'moved before the node was idle');
    assert.equal((await dp.verify('uid-fast')).ok, true);
  });
});
