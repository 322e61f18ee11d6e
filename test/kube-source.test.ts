// The Kubernetes pod source (its own small client) against the in-repo API test server:
// node filtering, live changes, watch restarts, 410 Gone, bookmarks, the status patch, and the
// lookup of a pod the watch has not brought yet (CNI ADD first).
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { KubePodSource } from '../cni-agent/src/pods/kube-source.js';
import { REDIRECTION_ANNOTATION } from '../cni-agent/src/pods/pod.js';
import type { SourceChange } from '../cni-agent/src/pods/pod.js';
import { silentLogger } from '../ztunnel-bridge/src/logger.js';
import { KubeApiTestServer, mergePatch } from './helpers/kube-api-server.js';
import { until } from './helpers/wait.js';

const pod = (name: string, node: string, labels: Record<string, string> = {}) => ({
  apiVersion: 'v1',
  kind: 'Pod',
  metadata: { name, namespace: 'shop', uid: `uid-${name}`, labels },
  spec: { nodeName: node, containers: [] },
  status: { phase: 'Running', podIP: '198.18.80.2' },
});
const ns = (name: string, mode?: string) => ({
  apiVersion: 'v1',
  kind: 'Namespace',
  metadata: { name, labels: mode ? { 'istio.io/dataplane-mode': mode } : {} },
});

describe('Kubernetes pod source', () => {
  async function setup(t: { after: (fn: () => Promise<void> | void) => void }) {
    const api = new KubeApiTestServer();
    await api.start();
    api.upsert('namespaces', ns('shop', 'ambient'));
    api.upsert('pods', pod('here', 'node-a'));
    api.upsert('pods', pod('there', 'node-b'));
    const changes: SourceChange[] = [];
    const source = new KubePodSource({
      kubeconfig: api.connection(),
      nodeName: 'node-a',
      onChange: (c) => changes.push(...c),
      log: silentLogger,
      initialBackoffMs: 20,
    });
    t.after(async () => {
      source.stop();
      await api.close();
    });
    return { api, source, changes };
  }
  const names = (changes: SourceChange[]) =>
    changes.map((c) =>
      c.kind === 'pod' ? `${c.type} pod ${c.pod.metadata.name}` : `${c.type} ns ${c.namespace.metadata.name}`,
    );

  it('lists this node’s pods and all namespaces, then follows changes', async (t) => {
    const { api, source, changes } = await setup(t);
    const state = await source.start();
    assert.deepEqual(
      [...state.pods.values()].map((p) => p.metadata.name),
      ['here'],
    );
    assert.deepEqual([...state.namespaces.keys()], ['shop']);
    api.upsert('pods', pod('here', 'node-a', { 'istio.io/dataplane-mode': 'none' }));
    api.upsert('pods', pod('other', 'node-b'));
    api.upsert('namespaces', ns('shop'));
    api.remove('pods', 'here', 'shop');
    await until(() => changes.length === 3, 'three changes');
    // Order holds within a kind; pods and namespaces are separate watch streams.
    assert.deepEqual(
      names(changes).filter((n) => n.includes(' pod ')),
      ['updated pod here', 'deleted pod here'],
    );
    assert.deepEqual(
      names(changes).filter((n) => n.includes(' ns ')),
      ['updated ns shop'],
    );
  });

  it('is not synced until both lists succeed: an unreachable API is never an empty cluster', async (t) => {
    const { api, source } = await setup(t);
    api.failNext(6);
    let done = false;
    const started = source.start().then((s) => ((done = true), s));
    await until(() => api.requests.length >= 4, 'the lists are retried');
    assert.equal(done, false, 'start() resolved while the lists were failing');
    assert.equal(source.isSynced, false);
    const state = await started;
    assert.deepEqual(
      [...state.pods.values()].map((p) => p.metadata.name),
      ['here'],
    );
    assert.deepEqual([...state.namespaces.keys()], ['shop']);
  });

  it('resumes a broken watch from its resourceVersion, and lists again after 410 Gone', async (t) => {
    const { api, source, changes } = await setup(t);
    await source.start();
    api.bookmark();
    api.breakWatches();
    api.upsert('pods', pod('new', 'node-a'));
    await until(() => changes.length === 1, 'the change after the break');
    assert.ok(
      api.watchRequests.filter((w) => w.kind === 'pods').at(-1)!.resourceVersion,
      'the watch restarted without a resourceVersion',
    );

    // History gone while disconnected: the informer must list again and notice what changed.
    api.breakWatches();
    api.compact();
    api.remove('pods', 'new', 'shop');
    api.compact();
    await until(() => names(changes).includes('deleted pod new'), 'the deletion seen by a fresh list', 10_000);
    assert.deepEqual([...source.current.pods.keys()], ['uid-here']);
  });

  it('writes the redirection annotation with a merge patch on pods/status', async (t) => {
    const { api, source } = await setup(t);
    const state = await source.start();
    const here = state.pods.get('uid-here')!;
    await source.setRedirection(here, 'enabled');
    assert.equal(
      (api.get('pods', 'here', 'shop')!.metadata as { annotations?: Record<string, string> }).annotations?.[
        REDIRECTION_ANNOTATION
      ],
      'enabled',
    );
    await source.setRedirection(here, undefined);
    assert.deepEqual(
      api.patches.map((p) => [p.contentType.split(';')[0], p.body]),
      [
        ['application/merge-patch+json', { metadata: { annotations: { [REDIRECTION_ANNOTATION]: 'enabled' } } }],
        ['application/merge-patch+json', { metadata: { annotations: { [REDIRECTION_ANNOTATION]: null } } }],
      ],
    );
    assert.equal(
      (api.get('pods', 'here', 'shop')!.metadata as { annotations?: Record<string, string> }).annotations?.[
        REDIRECTION_ANNOTATION
      ],
      undefined,
    );
  });

  it('looks up a pod the watch has not brought yet: into the cache with its namespace, bounded in time', async (t) => {
    const { api, source, changes } = await setup(t);
    await source.start();
    api.holdWatchEvents('pods');
    api.holdWatchEvents('namespaces');
    api.upsert('namespaces', ns('fresh', 'ambient'));
    api.upsert('pods', {
      ...pod('early', 'node-a', { 'istio.io/dataplane-mode': 'none' }),
      metadata: { name: 'early', namespace: 'fresh', uid: 'uid-early', labels: { 'istio.io/dataplane-mode': 'none' } },
    });
    const found = await source.lookup('fresh', 'early', 2000);
    assert.equal(found?.metadata.uid, 'uid-early');
    assert.deepEqual(found?.metadata.labels, { 'istio.io/dataplane-mode': 'none' });
    assert.equal(source.current.pods.get('uid-early')?.metadata.name, 'early', 'not in the cache');
    assert.equal(
      source.current.namespaces.get('fresh')?.metadata.labels?.['istio.io/dataplane-mode'],
      'ambient',
      'its namespace is not in the cache',
    );
    assert.deepEqual(names(changes), ['added ns fresh', 'added pod early']);
    // A pod of another node, or none: nothing goes into the cache.
    api.upsert('pods', pod('elsewhere', 'node-b'));
    assert.equal(await source.lookup('shop', 'elsewhere', 2000), undefined);
    assert.equal(await source.lookup('shop', 'none-such', 2000), undefined);
    assert.equal(source.current.pods.has('uid-elsewhere'), false);
    // The watch catches up: the same pod is an update, not a second pod.
    api.releaseWatchEvents('namespaces');
    api.releaseWatchEvents('pods');
    await until(() => changes.length === 4, 'the held events');
    assert.deepEqual(names(changes).slice(2), ['updated ns fresh', 'updated pod early']);
    // A pod the watch deleted is not brought back by a lookup's answer.
    api.remove('pods', 'early', 'fresh');
    await until(() => !source.current.pods.has('uid-early'), 'deleted');
    api.holdWatchEvents('pods');
    api.upsert('pods', {
      ...pod('early', 'node-a'),
      metadata: { name: 'early', namespace: 'fresh', uid: 'uid-early' },
    });
    assert.equal(await source.lookup('fresh', 'early', 2000), undefined);
    assert.equal(source.current.pods.has('uid-early'), false);
    // An API that does not answer: rejected once the time is up.
    api.stallGets = true;
    const began = Date.now();
    await assert.rejects(source.lookup('fresh', 'late', 300), /did not answer within 300 ms|no answer within 0.3 s/);
    assert.ok(Date.now() - began < 5000);
  });

  it('merge patch follows RFC 7386', () => {
    assert.deepEqual(mergePatch({ a: 1, b: { c: 2, d: 3 } }, { b: { c: null, e: 4 }, f: [1] }), {
      a: 1,
      b: { d: 3, e: 4 },
      f: [1],
    });
  });
});
