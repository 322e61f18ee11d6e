// The reconciler's logic without a kernel: fakes for the datapath, the ZDS server, the netns and
// cgroup lookups, the sandbox records and the annotator (test/unit/fakes.ts). No root, no netns, no
// bpffs, no native addon: these run anywhere in a few seconds (`npm run test:unit`). What the
// kernel does with the same calls is test/reconciler.test.ts and the datapath tests.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import type { NetnsChange } from '../../bpf/src/index.js';
import {
  INTERFACE_URGENT_PASSES,
  Reconciler,
  UPGRADE_IDLE_MS,
  type AddVerdict,
  type ReconcilerOptions,
} from '../../cni-agent/src/enrollment/reconciler.js';
import {
  REDIRECTION_ANNOTATION,
  type ClusterState,
  type Namespace,
  type Pod,
  type SourceChange,
} from '../../cni-agent/src/pods/pod.js';
import { silentLogger } from '../../ztunnel-bridge/src/logger.js';
import { sleep, until } from '../helpers/wait.js';
import {
  failure,
  FakeCgroups,
  FakeNetns,
  FakeRedirector,
  FakeZds,
  Gate,
  MemorySandboxStore,
  RecordingAnnotator,
  RecordingLogger,
} from './fakes.js';

const dir = mkdtempSync(join(tmpdir(), 'abt-unit-'));
after(() => rmSync(dir, { recursive: true, force: true }));

const shop: Namespace = { metadata: { name: 'shop', labels: { 'istio.io/dataplane-mode': 'ambient' } } };
let nextIp = 2;

interface PodSpec {
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
  ip?: string;
}

/** A running pod in the ambient namespace `shop`, uid `uid-<name>`. */
function pod(name: string, spec: PodSpec = {}): Pod {
  const ip = spec.ip ?? ipOf(name);
  return {
    metadata: {
      name,
      namespace: 'shop',
      uid: `uid-${name}`,
      labels: spec.labels ?? {},
      annotations: spec.annotations ?? {},
    },
    spec: { serviceAccountName: name } as NonNullable<Pod['spec']>, // sources keep fields the type does not name
    status: { phase: 'Running', podIP: ip, podIPs: [{ ip }] },
  };
}

const ips = new Map<string, string>();
function ipOf(name: string): string {
  if (!ips.has(name)) ips.set(name, `198.18.60.${nextIp++}`);
  return ips.get(name)!;
}

function state(...pods: Pod[]): ClusterState {
  return { pods: new Map(pods.map((p) => [p.metadata.uid, p])), namespaces: new Map([['shop', shop]]) };
}

const added = (p: Pod): SourceChange => ({ kind: 'pod', type: 'added', pod: p });
const updated = (p: Pod): SourceChange => ({ kind: 'pod', type: 'updated', pod: p });
const deleted = (p: Pod): SourceChange => ({ kind: 'pod', type: 'deleted', pod: p });

/** A "netns" the reconciler can open (it hands ztunnel an fd of it): a plain file. */
function netnsFile(name: string): string {
  const path = join(dir, `netns-${name}-${Math.random().toString(36).slice(2, 8)}`);
  writeFileSync(path, '');
  return path;
}

/** A reconciler over fresh fakes; the named pods' netns are known to the netns finder. */
function rig(t: { after: (fn: () => void) => void }, names: string[], options: Partial<ReconcilerOptions> = {}) {
  const dp = new FakeRedirector();
  const zds = new FakeZds();
  const netns = new FakeNetns();
  const annotator = new RecordingAnnotator();
  const log = new RecordingLogger();
  for (const n of names) netns.paths.set(`uid-${n}`, netnsFile(n));
  const reconciler = new Reconciler({
    datapath: dp,
    zds,
    netns,
    log,
    annotator,
    initialBackoffMs: 20,
    maxBackoffMs: 80,
    ...options,
  });
  t.after(() => reconciler.stop());
  const states = () => Object.fromEntries(reconciler.status().map((s) => [s.name, s.state]));
  return { dp, zds, netns, annotator, log, reconciler, states };
}

describe('reconciler (unit, fakes, no kernel)', () => {
  it('runs overlapping passes for one pod one after another, and the last state wins', async (t) => {
    const { dp, zds, reconciler, states } = rig(t, ['web']);
    await reconciler.start(state());
    dp.gate = new Gate();
    const v1 = pod('web');
    reconciler.applyChanges([added(v1)], state(v1));
    await until(() => dp.attachCalls().length === 1, 'the first attach');
    // Two more changes while the first attach is pending.
    const v2 = pod('web', { annotations: { 'ambient.istio.io/bypass-inbound-capture': 'true' } });
    reconciler.applyChanges([updated(v2)], state(v2));
    const v3 = pod('web', {
      annotations: { 'ambient.istio.io/bypass-inbound-capture': 'true', 'istio.io/reroute-virtual-interfaces': 'tap0' },
    });
    reconciler.applyChanges([updated(v3)], state(v3));
    await sleep(30);
    assert.equal(dp.attachCalls().length, 1, 'a second pass started while the first was in progress');
    dp.gate.open();
    await until(
      () => dp.attachCalls().length === 2 && dp.attachments.get('uid-web')?.pod.bypassInbound === true,
      'the pass for the later changes',
    );
    await sleep(30);
    assert.equal(dp.attachCalls().length, 2, 'the changes made meanwhile are one more pass, not one each');
    assert.equal(dp.maxConcurrentPerPod, 1, 'two datapath calls for the pod at once');
    const last = dp.attachments.get('uid-web')!.pod;
    assert.deepEqual([last.bypassInbound, last.rerouteInterfaces], [true, ['tap0']], 'the last state must win');
    assert.equal(zds.enrolled.length, 1, 'handed to ztunnel once');
    assert.equal(states().web, 'enabled');
  });

  it('a pod that opts out while its attach is pending ends detached and removed from ztunnel', async (t) => {
    const { dp, zds, reconciler, states } = rig(t, ['api']);
    await reconciler.start(state());
    dp.gate = new Gate();
    const v1 = pod('api');
    reconciler.applyChanges([added(v1)], state(v1));
    await until(() => dp.attachCalls().length === 1, 'the first attach');
    const v2 = pod('api', { labels: { 'istio.io/dataplane-mode': 'none' } });
    reconciler.applyChanges([updated(v2)], state(v2));
    dp.gate.open();
    await until(
      () => dp.detachCalls().length === 1 && zds.removed.length === 1 && !reconciler.status()[0]?.attached,
      'detached after the attach in progress',
    );
    await sleep(30);
    assert.equal(dp.attachments.size, 0);
    assert.equal(states().api, 'not ambient');
    assert.deepEqual(
      dp.calls.filter((c) => c.op !== 'list').map((c) => c.op),
      ['attach', 'detach'],
    );
    assert.equal(dp.maxConcurrentPerPod, 1);
    assert.deepEqual(zds.removed, ['uid-api']);
    assert.equal(zds.known.size, 0);
    assert.equal(reconciler.isEnabled('uid-api'), false);
  });

  it('retries a failing attach with exponential backoff up to the maximum, then resets it', async (t) => {
    const { dp, log, reconciler, states } = rig(t, ['db'], { initialBackoffMs: 20, maxBackoffMs: 80 });
    await reconciler.start(state());
    for (let i = 1; i <= 5; i++) dp.attachFailures.push(failure(`attach failed ${i}`));
    const p = pod('db');
    reconciler.applyChanges([added(p)], state(p));
    await until(() => states().db === 'failed', 'the failed state');
    assert.match(reconciler.status()[0]!.reason, /attach failed/);
    await until(() => states().db === 'enabled', 'enabled once the datapath stops failing', 5000);
    // Each failure has its own message, so each is logged with the delay before its retry.
    const retries = () =>
      log.lines.filter((l) => l.msg === 'cannot reconcile pod; will retry').map((l) => l.obj.retryMs);
    assert.deepEqual(retries(), [20, 40, 80, 80, 80]);
    const at = dp.attachCalls('uid-db').map((c) => c.at);
    assert.equal(at.length, 6);
    for (let i = 1; i < at.length; i++)
      assert.ok(
        at[i]! - at[i - 1]! >= [20, 40, 80, 80, 80][i - 1]! - 2,
        `retry ${i} came before its backoff: ${at[i]! - at[i - 1]!} ms`,
      );
    assert.equal(reconciler.reconcileErrors, 5);
    assert.ok(log.lines.some((l) => l.msg === 'pod reconciled after earlier failures'));

    // After a success the backoff starts again from the initial delay.
    dp.attachFailures.push(failure('attach failed again'));
    await reconciler.reconcileAll();
    assert.equal(states().db, 'failed');
    assert.equal(retries().at(-1), 20);
    await until(() => states().db === 'enabled', 'enabled again');
  });

  it('with attach mode auto, attaches with tc and moves to tcx once no pod was enrolled for the idle delay', async (t) => {
    const { dp, zds, reconciler, states } = rig(t, ['a', 'b'], {
      attachMode: 'auto',
      capture: { strict: false, dnsCapture: false },
    });
    await reconciler.start(state());
    const a = pod('a');
    reconciler.applyChanges([added(a)], state(a));
    await until(() => states().a === 'enabled', 'a enabled');
    assert.deepEqual(
      dp.attachCalls().map((c) => c.mode),
      ['tc'],
      'not on the tc fast path',
    );
    await sleep(UPGRADE_IDLE_MS / 2);
    // Another pod enrolled: the node is not idle yet, nothing moves.
    const b = pod('b');
    reconciler.applyChanges([added(b)], state(a, b));
    await until(() => states().b === 'enabled', 'b enabled');
    const bEnrolledAt = dp.attachCalls('uid-b')[0]!.at;
    await until(() => dp.attachCalls().filter((c) => c.mode === 'tcx').length === 2, 'both moved to tcx', 5000);
    const moves = dp.attachCalls().filter((c) => c.mode === 'tcx');
    assert.deepEqual(
      moves.map((c) => c.uid),
      ['uid-a', 'uid-b'],
      'moved one at a time, in order',
    );
    assert.ok(
      moves[0]!.at - bEnrolledAt >= UPGRADE_IDLE_MS - 5,
      `moved ${moves[0]!.at - bEnrolledAt} ms after the last enrollment`,
    );
    assert.deepEqual(
      [...dp.attachments.values()].map((x) => x.mode),
      ['tcx', 'tcx'],
    );
    assert.equal(zds.enrolled.length, 2, 'the move is not a new hand-off to ztunnel');
    assert.deepEqual(states(), { a: 'enabled', b: 'enabled' });
  });

  it('with attach mode auto, a kernel without tcx leaves the pod on tc, and later pods skip the fast path', async (t) => {
    const { dp, reconciler, states } = rig(t, ['c', 'd'], {
      attachMode: 'auto',
      capture: { strict: false, dnsCapture: false },
    });
    await reconciler.start(state());
    const c = pod('c');
    reconciler.applyChanges([added(c)], state(c));
    await until(() => states().c === 'enabled', 'c enabled');
    dp.attachFailures.push(failure('no tcx links here', 'EKERNEL'));
    await until(() => dp.attachCalls().length >= 3, 'the failed move and the pass after it', 5000);
    assert.deepEqual(
      dp.attachCalls().map((x) => x.mode),
      ['tc', 'tcx', 'auto'],
    );
    assert.equal(states().c, 'enabled', 'a failed move must leave the pod redirected');
    const d = pod('d');
    reconciler.applyChanges([added(d)], state(c, d));
    await until(() => states().d === 'enabled', 'd enabled');
    assert.deepEqual(
      dp.attachCalls('uid-d').map((x) => x.mode),
      ['auto'],
    );
  });

  it('a CNI ADD answers only once ztunnel acked; a nack answers the failure and is retried', async (t) => {
    const { zds, netns, annotator, reconciler, states } = rig(t, ['pay']);
    await reconciler.start(state());
    zds.hold = true;
    const p = pod('pay');
    const answers: AddVerdict[] = [];
    void reconciler.cniAdd(p, netns.paths.get('uid-pay')!, [ipOf('pay')]).then((v) => answers.push(v));
    await until(() => zds.waiting === 1, 'the pod handed to ztunnel');
    await sleep(20);
    assert.equal(answers.length, 0, 'the ADD answered before ztunnel did');
    assert.equal(states().pay, 'pending');
    zds.answerPending({ status: 'nacked', error: 'no certificate yet' });
    await until(() => answers.length === 1, 'the ADD answered');
    const first = answers[0]!;
    assert.equal(first.ok, false);
    assert.match(first.ok === false ? first.reason : '', /ztunnel refused the pod: no certificate yet/);
    // Retried with backoff: handed over again, and acked this time.
    await until(() => zds.waiting === 1, 'handed to ztunnel again');
    assert.equal(states().pay, 'failed');
    const second = reconciler.cniAdd(p, netns.paths.get('uid-pay')!, [ipOf('pay')]);
    zds.answerPending({ status: 'acked' });
    await until(() => states().pay === 'enabled', 'enabled once acked');
    zds.hold = false;
    assert.deepEqual(await second, { ok: true });
    assert.deepEqual(annotator.values(), ['pending', 'enabled']);
  });

  it('a pod whose netns cannot be told fails with the reason and is enrolled once it can', async (t) => {
    const { dp, netns, reconciler, states } = rig(t, ['twin']);
    await reconciler.start(state());
    netns.refused.set('uid-twin', 'two network namespaces claim the pod');
    const p = pod('twin');
    reconciler.applyChanges([added(p)], state(p));
    await until(() => states().twin === 'failed', 'failed');
    assert.match(reconciler.status()[0]!.reason, /two network namespaces claim the pod/);
    assert.equal(dp.attachCalls().length, 0, 'attached without knowing the netns');
    netns.refused.clear();
    await until(() => states().twin === 'enabled', 'enabled on a retry');
  });

  it('drift repair re-attaches a pod the datapath finds broken, and leaves sound ones alone', async (t) => {
    const { dp, zds, reconciler, states } = rig(t, ['ok', 'bad']);
    const ok = pod('ok');
    const bad = pod('bad');
    await reconciler.start(state(ok, bad));
    assert.deepEqual(states(), { ok: 'enabled', bad: 'enabled' });
    dp.broken.add('uid-bad');
    await reconciler.verifyAll();
    assert.equal(reconciler.driftRepairs, 1);
    assert.deepEqual(
      dp
        .attachCalls()
        .map((c) => c.uid)
        .sort(),
      ['uid-bad', 'uid-bad', 'uid-ok'],
    );
    assert.equal(zds.enrolled.length, 2, 'a repair is not a new hand-off to ztunnel');
  });

  it('drift repair leaves a pod alone whose only problems are what its attach said it cannot capture', async (t) => {
    const { dp, reconciler } = rig(t, ['tun']);
    const refusal = 'interface tun0 of the pod carries no Ethernet header (type 65534); refused';
    dp.attachWarnings.set('uid-tun', `${refusal}; interface net9: the pod has more than 8 interfaces`);
    await reconciler.start(state(pod('tun')));
    assert.equal(dp.attachCalls('uid-tun').length, 1);
    dp.problems.set('uid-tun', [refusal]);
    await reconciler.verifyAll();
    await reconciler.verifyAll();
    assert.equal(reconciler.driftRepairs, 0, 'nothing a repair could change');
    assert.equal(dp.attachCalls('uid-tun').length, 1);
    // Anything else is drift, repaired as ever.
    dp.problems.set('uid-tun', [refusal, 'the ingress link is detached']);
    await reconciler.verifyAll();
    assert.equal(reconciler.driftRepairs, 1);
    assert.equal(dp.attachCalls('uid-tun').length, 2);
  });

  it('writes the annotation once while it holds, and again when its value changes', async (t) => {
    const { dp, annotator, reconciler, states } = rig(t, ['cart']);
    await reconciler.start(state());
    const v1 = pod('cart');
    reconciler.applyChanges([added(v1)], state(v1));
    await until(() => states().cart === 'enabled', 'enabled');
    assert.deepEqual(annotator.values(), ['enabled']);
    // More passes over the same pod object (the patch has not come back yet).
    await reconciler.reconcileAll();
    await reconciler.reconcileAll();
    assert.equal(dp.attachCalls().length, 3);
    assert.deepEqual(annotator.values(), ['enabled'], 'written again before the patch came back');
    // The patch comes back: only our annotation changed, no pass at all.
    const v2 = pod('cart', { annotations: { [REDIRECTION_ANNOTATION]: 'enabled' } });
    reconciler.applyChanges([updated(v2)], state(v2));
    await sleep(30);
    assert.equal(dp.attachCalls().length, 3, 'our own annotation coming back made a pass');
    // Another change: a pass, and the pod already carries the value.
    const v3 = pod('cart', { labels: { app: 'cart-v2' }, annotations: { [REDIRECTION_ANNOTATION]: 'enabled' } });
    reconciler.applyChanges([updated(v3)], state(v3));
    await until(() => dp.attachCalls().length === 4, 'the pass for the label');
    await sleep(20);
    assert.deepEqual(annotator.values(), ['enabled']);
    // The value changes: ztunnel lost the pod, then the pod opts out.
    reconciler.ztunnelStatus('uid-cart', { status: 'unreachable', reason: 'ztunnel restarted' });
    await until(() => annotator.values().length === 2, 'the pending annotation');
    assert.equal(states().cart, 'pending');
    const v4 = pod('cart', {
      labels: { app: 'cart-v2', 'istio.io/dataplane-mode': 'none' },
      annotations: { [REDIRECTION_ANNOTATION]: 'pending' },
    });
    reconciler.applyChanges([updated(v4)], state(v4));
    await until(() => annotator.values().length === 3, 'the annotation removed');
    assert.deepEqual(annotator.values(), ['enabled', 'pending', undefined]);
    assert.equal(states().cart, 'not ambient');
  });

  it('retries a pass whose annotation write failed, without handing the pod to ztunnel again', async (t) => {
    const { annotator, zds, reconciler, states } = rig(t, ['ui']);
    await reconciler.start(state());
    annotator.failures = 1;
    const p = pod('ui');
    reconciler.applyChanges([added(p)], state(p));
    await until(() => states().ui === 'failed', 'failed on the annotation');
    assert.match(reconciler.status()[0]!.reason, /refused the patch/);
    await until(() => states().ui === 'enabled', 'enabled on the retry');
    assert.deepEqual(annotator.values(), ['enabled']);
    assert.equal(zds.enrolled.length, 1);
    assert.equal(reconciler.reconcileErrors, 1);
  });

  it('after a restart, adopts attached pods that are still ambient without detaching them, and detaches the others', async (t) => {
    const { dp, zds, netns, annotator, reconciler, states } = rig(t, ['kept', 'optedout', 'gone']);
    const path = (n: string) => netns.paths.get(`uid-${n}`)!;
    for (const n of ['kept', 'optedout', 'gone']) dp.preload({ uid: `uid-${n}`, netnsPath: path(n), ips: [ipOf(n)] });
    const kept = pod('kept', { annotations: { [REDIRECTION_ANNOTATION]: 'enabled' } });
    const optedOut = pod('optedout', {
      labels: { 'istio.io/dataplane-mode': 'none' },
      annotations: { [REDIRECTION_ANNOTATION]: 'enabled' },
    });

    await reconciler.adopt(state(kept, optedOut));
    assert.deepEqual(
      dp.calls.map((c) => c.op),
      ['list'],
      'adopting changed the datapath',
    );
    assert.deepEqual(
      zds.remembered.map((p) => [p.uid, p.info, p.netnsFd !== undefined]),
      [['uid-kept', { name: 'kept', namespace: 'shop', serviceAccount: 'kept' }, true]],
      'the first snapshot must hold the adopted pod, and only it',
    );
    assert.equal(zds.enrolled.length, 0);

    await reconciler.reconcileAll();
    assert.deepEqual(
      dp
        .detachCalls()
        .map((c) => c.uid)
        .sort(),
      ['uid-gone', 'uid-optedout'],
    );
    assert.deepEqual([...dp.attachments.keys()], ['uid-kept']);
    // The adopted pod is updated in place in the netns it was attached in (not looked up again).
    assert.deepEqual(
      dp.attachCalls().map((c) => [c.uid, c.pod?.netnsPath]),
      [['uid-kept', path('kept')]],
    );
    assert.equal(netns.finds, 0);
    assert.deepEqual(zds.removed.sort(), ['uid-gone', 'uid-optedout']);
    assert.deepEqual(
      zds.enrolled.map((p) => p.uid),
      ['uid-kept'],
    );
    assert.deepEqual(states(), { kept: 'enabled', optedout: 'not ambient' });
    assert.equal(
      reconciler.status().some((s) => s.uid === 'uid-gone'),
      false,
      'a pod gone from the source is forgotten once detached',
    );
    // The stale annotation of the pod that opted out is removed; the adopted one's is left alone.
    assert.deepEqual(annotator.writes, [{ pod: 'optedout', value: undefined }]);
  });

  it('detaches a deleted pod, removes it from ztunnel and forgets its sandbox record', async (t) => {
    const sandboxes = new MemorySandboxStore();
    const cgroups = new FakeCgroups();
    const { dp, zds, netns, reconciler, states } = rig(t, ['job'], { sandboxes, cgroups });
    const cgroupDir = mkdtempSync(join(dir, 'cgroup-'));
    cgroups.paths.set('uid-job', cgroupDir);
    await reconciler.start(state());
    const p = pod('job');
    // The runtime's CNI ADD enrols it first; then the source sees it.
    assert.deepEqual(await reconciler.cniAdd(p, netns.paths.get('uid-job')!, [ipOf('job')], 'sandbox-1'), { ok: true });
    assert.equal(sandboxes.get('uid-job'), 'sandbox-1');
    assert.equal(dp.attachments.get('uid-job')?.pod.podCgroup, cgroupDir);
    reconciler.applyChanges([added(p)], state(p));
    await until(() => dp.attachCalls().length === 2, 'the pass for the source’s add');
    assert.equal(reconciler.status()[0]?.dns, 'on');
    // A DEL for an earlier sandbox of the pod changes nothing.
    assert.equal(await reconciler.cniDel('uid-job', 'sandbox-0'), false);
    assert.equal(states().job, 'enabled');

    reconciler.applyChanges([deleted(p)], state());
    await until(() => reconciler.status().length === 0, 'the pod forgotten');
    assert.deepEqual(
      dp.detachCalls().map((c) => c.uid),
      ['uid-job'],
    );
    assert.equal(dp.attachments.size, 0);
    assert.deepEqual(zds.removed, ['uid-job']);
    assert.equal(zds.known.size, 0);
    assert.equal(sandboxes.records.size, 0);
    assert.equal(reconciler.isEnabled('uid-job'), false);
    assert.equal(reconciler.podEvents.delete, 1);
  });

  it('debounces the passes the netns watch asks for, backs off while changes keep coming, and rate-limits its log', async (t) => {
    let onChange: ((change: NetnsChange) => void) | undefined;
    let closed = 0;
    const interfaces = {
      watch: (_path: string, cb: (change: NetnsChange) => void) => {
        onChange = cb;
        return Promise.resolve({ close: () => void closed++ });
      },
    };
    const { dp, log, reconciler } = rig(t, ['w'], { interfaces, interfaceDebounceMs: 40, interfaceMaxDelayMs: 1000 });
    await reconciler.start(state(pod('w')));
    assert.ok(onChange, "the pod's netns is watched");
    const passes = () => dp.attachCalls('uid-w').length;
    const logged = () => log.lines.filter((l) => /interfaces (or addresses changed|lost track)/.test(l.msg)).length;
    assert.equal(passes(), 1);
    // A burst: one pass, after the delay.
    for (let i = 0; i < 20; i++) onChange({ interfaces: false });
    await sleep(10);
    assert.equal(passes(), 1, 'not at once');
    await until(() => passes() === 2, 'one pass for the burst');
    await sleep(100);
    assert.equal(passes(), 2, 'one pass only');
    assert.equal(logged(), 1);
    // Another change soon after: a longer delay (80 ms), and no new log line within the interval.
    onChange({ interfaces: false, reason: 'the netns watch lost messages' });
    await sleep(50);
    assert.equal(passes(), 2, 'backed off');
    await until(() => passes() === 3, 'the backed-off pass');
    assert.equal(logged(), 1, 'rate-limited');
    reconciler.stop();
    onChange({ interfaces: false });
    await sleep(150);
    assert.equal(passes(), 3, 'no pass after stop');
    assert.equal(closed, 1);
  });

  it('passes at once for a new interface, up to its limit per window, then debounces those too', async (t) => {
    let onChange: ((change: NetnsChange) => void) | undefined;
    const interfaces = {
      watch: (_path: string, cb: (change: NetnsChange) => void) => {
        onChange = cb;
        return Promise.resolve({ close: () => undefined });
      },
    };
    const { dp, reconciler } = rig(t, ['n'], { interfaces, interfaceDebounceMs: 1000, interfaceMaxDelayMs: 1000 });
    await reconciler.start(state(pod('n')));
    assert.ok(onChange, "the pod's netns is watched");
    const passes = () => dp.attachCalls('uid-n').length;
    for (let i = 0; i < INTERFACE_URGENT_PASSES; i++) {
      const before = passes();
      const asked = performance.now();
      onChange({ interfaces: true });
      await until(() => passes() === before + 1, `immediate pass ${i + 1}`);
      assert.ok(performance.now() - asked < 500, 'well before the 1000 ms debounce');
    }
    // A pod that keeps creating interfaces: the next one waits like any other change.
    const before = passes();
    onChange({ interfaces: true });
    await sleep(300);
    assert.equal(passes(), before, 'debounced beyond the limit');
    await until(() => passes() === before + 1, 'the debounced pass');
  });
});

// A reconciler with the silent logger and no annotator also works over the fakes (the local
// source's set-up): the smallest construction.
describe('reconciler construction (unit)', () => {
  it('needs only the datapath, the ZDS port and the netns finder', async (t) => {
    const dp = new FakeRedirector();
    const zds = new FakeZds();
    const netns = new FakeNetns();
    netns.paths.set('uid-min', netnsFile('min'));
    const reconciler = new Reconciler({ datapath: dp, zds, netns, log: silentLogger });
    t.after(() => reconciler.stop());
    const p = pod('min');
    await reconciler.start(state(p));
    assert.equal(reconciler.isEnabled('uid-min'), true);
    assert.equal(dp.attachCalls().length, 1);
  });
});
