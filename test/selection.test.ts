// Upstream's pod selection rules, case by case.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { selectPod, type NamespaceLike, type PodLike } from '../cni-agent/src/pods/selection.js';

const ns = (name: string, mode?: string): NamespaceLike => ({
  metadata: { name, labels: mode ? { 'istio.io/dataplane-mode': mode } : {} },
});
const pod = (
  namespace: string,
  extra: { labels?: Record<string, string>; annotations?: Record<string, string>; hostNetwork?: boolean } = {},
): PodLike => ({
  metadata: { name: 'p', namespace, labels: extra.labels ?? {}, annotations: extra.annotations ?? {} },
  spec: { hostNetwork: extra.hostNetwork ?? false },
});
const ambient = { 'istio.io/dataplane-mode': 'ambient' };

describe('pod selection', () => {
  const cases: [string, PodLike, NamespaceLike | undefined, boolean, RegExp][] = [
    ['namespace label', pod('shop'), ns('shop', 'ambient'), true, /namespace label/],
    ['pod label in a plain namespace', pod('shop', { labels: ambient }), ns('shop'), true, /pod label/],
    ['pod label without a known namespace', pod('shop', { labels: ambient }), undefined, true, /pod label/],
    [
      'pod opt-out in an ambient namespace',
      pod('shop', { labels: { 'istio.io/dataplane-mode': 'none' } }),
      ns('shop', 'ambient'),
      false,
      /=none/,
    ],
    ['neither labelled', pod('shop'), ns('shop'), false, /no istio.io\/dataplane-mode=ambient/],
    ['namespace label with another value', pod('shop'), ns('shop', 'none'), false, /no istio/],
    ['host network', pod('shop', { hostNetwork: true }), ns('shop', 'ambient'), false, /host network/],
    [
      'sidecar injected',
      pod('shop', { annotations: { 'sidecar.istio.io/status': '{}' } }),
      ns('shop', 'ambient'),
      false,
      /sidecar/,
    ],
    [
      'excluded namespace, even with the pod label',
      pod('kube-system', { labels: ambient }),
      ns('kube-system', 'ambient'),
      false,
      /excluded/,
    ],
    [
      'ztunnel',
      pod('istio-system', { labels: { app: 'ztunnel' } }),
      ns('istio-system', 'ambient'),
      false,
      /ztunnel pod/,
    ],
    [
      'an app=ztunnel pod elsewhere is an ordinary pod',
      pod('shop', { labels: { app: 'ztunnel' } }),
      ns('shop', 'ambient'),
      true,
      /namespace label/,
    ],
    [
      'the agent itself',
      pod('istio-system', { labels: { 'app.kubernetes.io/name': 'ambient-bpf' } }),
      ns('istio-system', 'ambient'),
      false,
      /node agent/,
    ],
    [
      'a pod with no namespace is in default',
      { metadata: { name: 'p' } },
      ns('default', 'ambient'),
      true,
      /namespace label/,
    ],
  ];
  for (const [what, p, n, expected, reason] of cases) {
    it(what, () => {
      const s = selectPod(p, n);
      assert.equal(s.ambient, expected);
      assert.match(s.reason, reason);
    });
  }
});
