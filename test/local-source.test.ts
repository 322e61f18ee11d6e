// The local pod source: kubectl-shaped YAML, node filtering, live edits, and bad files that are
// reported without dropping the last good state.
import assert from 'node:assert/strict';
import { mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { LocalPodSource, LocalPodsError, parseLocalPods } from '../cni-agent/src/pods/local-source.js';
import { podIPs, type SourceChange } from '../cni-agent/src/pods/pod.js';
import { until } from './helpers/wait.js';

const file = `
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: cart
  namespace: shop
  uid: 6f1c3a62-1111-4222-8333-944455556666
spec:
  containers: [{ name: app, image: cart }]
status:
  podIP: 198.18.1.2
  podIPs: [{ ip: 198.18.1.2 }, { ip: "2001:db8:1::2" }]
---
apiVersion: v1
kind: Pod
metadata: { name: elsewhere, namespace: shop }
spec: { nodeName: other-node }
---
apiVersion: v1
kind: Pod
metadata: { name: here, namespace: shop }
spec: { nodeName: node-a }
status: { podIP: 198.18.1.3 }
`;

describe('local pod source', () => {
  it('pod IPs are compared in the kernel’s text: a hand-written IPv6 address is made canonical', () => {
    const pod = {
      metadata: { name: 'p', namespace: 'n', uid: 'u' },
      status: { podIPs: [{ ip: '198.18.1.2' }, { ip: '2001:DB8:1:0:0::2' }, { ip: '::ffff:198.18.1.2' }] },
    };
    assert.deepEqual(podIPs(pod), ['198.18.1.2', '2001:db8:1::2', '::ffff:198.18.1.2']);
  });

  it('reads kubectl-shaped YAML: namespaces, this node’s pods, IPs, stable uids', () => {
    const state = parseLocalPods(file, 'node-a');
    assert.deepEqual([...state.namespaces.keys()], ['shop']);
    const pods = [...state.pods.values()];
    assert.deepEqual(
      pods.map((p) => [p.metadata.namespace, p.metadata.name]),
      [
        ['shop', 'cart'],
        ['shop', 'here'],
      ],
    );
    assert.equal(pods[0]!.metadata.uid, '6f1c3a62-1111-4222-8333-944455556666');
    assert.match(pods[1]!.metadata.uid, /^local-[0-9a-f]{24}$/);
    assert.equal(
      parseLocalPods(file, 'node-a').pods.get(pods[1]!.metadata.uid)?.metadata.name,
      'here',
      'uid not stable',
    );
    assert.deepEqual(podIPs(pods[0]!), ['198.18.1.2', '2001:db8:1::2']);
    assert.deepEqual(podIPs(pods[1]!), ['198.18.1.3']);
  });

  it('reads a kind: List as `kubectl get pods,ns -o yaml` prints it', () => {
    const list = `apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: { name: a }\n- apiVersion: v1\n  kind: Namespace\n  metadata: { name: default }\n`;
    const state = parseLocalPods(list, 'n');
    assert.deepEqual(
      [...state.pods.values()].map((p) => `${p.metadata.namespace}/${p.metadata.name}`),
      ['default/a'],
    );
    assert.deepEqual([...state.namespaces.keys()], ['default']);
  });

  it('rejects what it cannot use, saying where', () => {
    const bad: [string, RegExp][] = [
      ['kind: Pod\napiVersion: v1\nmetadata: {}\n', /object 1: Pod without metadata.name/],
      [
        'apiVersion: apps/v1\nkind: Deployment\nmetadata: { name: d }\n',
        /only v1 Pod and Namespace objects are supported, not apps\/v1 Deployment/,
      ],
      ['a: [unclosed\n', /YAML/],
      ['- 1\n- 2\n', /only v1 Pod and Namespace/],
      [
        'apiVersion: v1\nkind: Pod\nmetadata: { name: a, uid: u }\n---\napiVersion: v1\nkind: Pod\nmetadata: { name: b, uid: u }\n',
        /duplicate pod uid u/,
      ],
    ];
    for (const [text, message] of bad)
      assert.throws(
        () => parseLocalPods(text, 'n'),
        (e: Error) => e instanceof LocalPodsError && message.test(e.message),
      );
  });

  it('watches the file: label flips and deletions arrive as changes; a broken edit keeps the last good state', async (t) => {
    const dir = mkdtempSync(join(tmpdir(), 'abt-local-'));
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    const path = join(dir, 'pods.yaml');
    writeFileSync(path, file);
    const seen: SourceChange[][] = [];
    const errors: Error[] = [];
    const source = new LocalPodSource({
      file: path,
      nodeName: 'node-a',
      onChange: (c) => seen.push(c),
      onError: (e) => errors.push(e),
      debounceMs: 20,
    });
    t.after(() => source.stop());
    assert.equal((await source.start()).pods.size, 2);

    // An editor-style replace (write elsewhere, rename over): the namespace label is flipped.
    writeFileSync(`${path}.tmp`, file.replace('istio.io/dataplane-mode: ambient', 'istio.io/dataplane-mode: none'));
    renameSync(`${path}.tmp`, path);
    await until(() => seen.length === 1, 'the label flip');
    assert.deepEqual(
      seen[0]!.map((c) => [c.kind, c.type]),
      [['namespace', 'updated']],
    );

    writeFileSync(path, 'kind: [broken');
    await until(() => errors.length >= 1, 'the parse error');
    assert.equal(source.current.pods.size, 2, 'a broken edit dropped pods');

    writeFileSync(path, file.split('---').slice(0, 2).join('---'));
    await until(() => seen.length === 2, 'the deletion');
    assert.deepEqual(
      seen[1]!.map((c) => (c.kind === 'pod' ? `${c.type} ${c.pod.metadata.name}` : `${c.type} ns`)).sort(),
      ['deleted here', 'updated ns'],
    );
  });

  it('fails to start on a missing or broken file', async () => {
    const noop = () => undefined;
    await assert.rejects(
      new LocalPodSource({ file: '/nonexistent/pods.yaml', nodeName: 'n', onChange: noop, onError: noop }).start(),
      /cannot read/,
    );
  });
});
