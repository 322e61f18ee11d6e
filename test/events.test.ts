// Kubernetes Events on pods, through the in-repo API test server: one Event per pod, reason and
// message, whose repeats patch its count instead of creating more (rate-limited); recording never
// throws nor waits for the API, and an API that fails is only logged; an Event that expired is
// created again.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { EventRecorder } from '../cni-agent/src/pods/events.js';
import { KubeClient } from '../cni-agent/src/pods/kube-client.js';
import type { Pod } from '../cni-agent/src/pods/pod.js';
import type { Logger } from '../ztunnel-bridge/src/logger.js';
import { KubeApiTestServer } from './helpers/kube-api-server.js';
import { until } from './helpers/wait.js';

const cart: Pod = { metadata: { name: 'cart', namespace: 'shop', uid: 'uid-cart', resourceVersion: '7' } };
const other: Pod = { metadata: { name: 'other', namespace: 'shop', uid: 'uid-other' } };

function collectingLog(): Logger & { lines: { level: string; msg: string }[] } {
  const lines: { level: string; msg: string }[] = [];
  const at = (level: string) => (_: object, msg: string) => void lines.push({ level, msg });
  return { lines, debug: at('debug'), info: at('info'), warn: at('warn'), error: at('error') };
}

async function setup(t: { after: (fn: () => unknown) => void }, minIntervalMs: number) {
  const api = new KubeApiTestServer();
  await api.start();
  const client = new KubeClient(api.connection());
  const log = collectingLog();
  const recorder = new EventRecorder({ client, nodeName: 'node-a', log, minIntervalMs });
  t.after(async () => {
    recorder.stop();
    client.close();
    await api.close();
  });
  return { api, recorder, log };
}

describe('pod events', () => {
  it('creates a core v1 Event about the pod, as kubectl describe shows it', async (t) => {
    const { api, recorder } = await setup(t, 60_000);
    recorder.podEvent(
      cart,
      'Warning',
      'AmbientEnrollmentFailed',
      'cannot enrol the pod in ambient (retrying): no network namespace holds the pod IPs',
    );
    await recorder.idle();
    assert.equal(api.eventCalls.length, 1);
    const [call] = api.eventCalls;
    assert.equal(call!.method, 'POST');
    assert.equal(call!.namespace, 'shop');
    const e = call!.body as {
      involvedObject: Record<string, string>;
      source: Record<string, string>;
      count: number;
      firstTimestamp: string;
      lastTimestamp: string;
      reason: string;
      type: string;
    };
    assert.deepEqual(e.involvedObject, {
      apiVersion: 'v1',
      kind: 'Pod',
      name: 'cart',
      namespace: 'shop',
      uid: 'uid-cart',
      resourceVersion: '7',
    });
    assert.deepEqual(e.source, { component: 'ambient-bpf', host: 'node-a' });
    assert.equal(e.count, 1);
    assert.match(e.firstTimestamp, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
    assert.deepEqual(api.eventsFor('shop', 'cart'), [
      {
        reason: 'AmbientEnrollmentFailed',
        type: 'Warning',
        count: 1,
        message: 'cannot enrol the pod in ambient (retrying): no network namespace holds the pod IPs',
      },
    ]);
  });

  it('repeats patch one Event’s count, at most once per interval; other reasons and pods are their own', async (t) => {
    const { api, recorder } = await setup(t, 300);
    recorder.podEvent(cart, 'Warning', 'AmbientEnrollmentFailed', 'ztunnel refused: no');
    await recorder.idle();
    for (let i = 1; i < 20; i++) recorder.podEvent(cart, 'Warning', 'AmbientEnrollmentFailed', 'ztunnel refused: no');
    recorder.podEvent(
      cart,
      'Warning',
      'AmbientAnnotationInvalid',
      'annotation ambient.istio.io/dns-capture: "maybe" is not a boolean',
    );
    recorder.podEvent(other, 'Warning', 'AmbientEnrollmentFailed', 'ztunnel refused: no');
    await recorder.idle();
    assert.equal(api.eventCalls.filter((c) => c.method === 'POST').length, 3, 'one Event per pod, reason and message');
    await until(
      () => api.eventsFor('shop', 'cart').find((e) => e.reason === 'AmbientEnrollmentFailed')?.count === 20,
      'the repeats counted into the one Event',
    );
    const patches = api.eventCalls.filter((c) => c.method === 'PATCH');
    assert.equal(patches.length, 1, 'twenty repeats in one interval: one patch');
    assert.equal(api.events.size, 3);
    // Later repeats: patched again, no new object.
    recorder.podEvent(cart, 'Warning', 'AmbientEnrollmentFailed', 'ztunnel refused: no');
    await until(
      () => api.eventsFor('shop', 'cart').find((e) => e.reason === 'AmbientEnrollmentFailed')?.count === 21,
      'counted',
    );
    assert.equal(api.events.size, 3);
  });

  it('never throws nor waits when the API fails; logs, and records on the next occurrence', async (t) => {
    const { api, recorder, log } = await setup(t, 50);
    api.failNext(1);
    recorder.podEvent(cart, 'Warning', 'AmbientEnrollmentFailed', 'boom');
    // Returned before the API's answer was in (a timed check flakes on a busy machine).
    assert.equal(recorder.stats.failed, 0, 'podEvent waited for the API');
    await recorder.idle();
    assert.equal(api.events.size, 0);
    assert.equal(recorder.stats.failed, 1);
    assert.ok(log.lines.some((l) => l.level === 'warn' && /cannot record a Kubernetes event/.test(l.msg)));
    await new Promise((r) => setTimeout(r, 60));
    recorder.podEvent(cart, 'Warning', 'AmbientEnrollmentFailed', 'boom');
    await until(() => api.eventsFor('shop', 'cart')[0]?.count === 2, 'recorded with both occurrences');
  });

  it('an Event gone from the API (expired) is created again', async (t) => {
    const { api, recorder } = await setup(t, 0);
    recorder.podEvent(cart, 'Warning', 'AmbientEnrollmentFailed', 'boom');
    await recorder.idle();
    api.events.clear();
    recorder.podEvent(cart, 'Warning', 'AmbientEnrollmentFailed', 'boom');
    await until(() => api.events.size === 1, 'created again');
    assert.deepEqual(
      api.eventCalls.map((c) => c.method),
      ['POST', 'POST'],
    );
    assert.equal(api.eventsFor('shop', 'cart')[0]!.count, 2);
  });

  it('a forgotten pod starts afresh; a full queue drops instead of growing', async (t) => {
    const { api, recorder } = await setup(t, 60_000);
    recorder.podEvent(cart, 'Warning', 'AmbientEnrollmentFailed', 'boom');
    await recorder.idle();
    recorder.forgetPod('uid-cart');
    recorder.podEvent(cart, 'Warning', 'AmbientEnrollmentFailed', 'boom');
    await recorder.idle();
    assert.equal(api.eventCalls.filter((c) => c.method === 'POST').length, 2);

    const client = new KubeClient(api.connection());
    t.after(() => client.close());
    const small = new EventRecorder({ client, nodeName: 'node-a', log: collectingLog(), maxQueued: 2 });
    t.after(() => small.stop());
    for (let i = 0; i < 5; i++) small.podEvent(cart, 'Warning', 'AmbientEnrollmentFailed', `different ${i}`);
    await small.idle();
    assert.equal(small.stats.created, 2);
    assert.equal(small.stats.dropped, 3);
  });
});
