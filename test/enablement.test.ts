// Upstream's ambient enablement selectors: label selector semantics (matchLabels, the four
// matchExpressions operators), pod AND namespace per entry, the list as an OR, the exclusions no
// selector overrides, the CNI policy file they produce, and the agent's flags refusing bad input
// at start-up (the real CLI: exit code and a message naming the flag and the value).
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, it } from 'node:test';
import { renderCniPolicy } from '../cni-agent/src/cni/policy-file.js';
import {
  DEFAULT_ENABLEMENT_SELECTORS,
  EnablementSelectors,
  labelSelectorMatches,
  parseEnablementSelectors,
  type LabelSelector,
} from '../cni-agent/src/pods/enablement.js';
import type { ClusterState, Namespace, Pod } from '../cni-agent/src/pods/pod.js';
import { DEFAULT_POLICY, selectPod, type SelectionPolicy } from '../cni-agent/src/pods/selection.js';
import { runCli } from './helpers/cli.js';
import { TEST_PREFIX } from './helpers/kernel.js';

const pod = (
  namespace: string,
  labels: Record<string, string> = {},
  extra: { hostNetwork?: boolean; annotations?: Record<string, string>; name?: string } = {},
): Pod => ({
  metadata: {
    name: extra.name ?? 'p',
    namespace,
    uid: `uid-${namespace}-${extra.name ?? 'p'}`,
    labels,
    annotations: extra.annotations ?? {},
  },
  spec: { hostNetwork: extra.hostNetwork ?? false },
});
const ns = (name: string, labels: Record<string, string> = {}): Namespace => ({ metadata: { name, labels } });
const policy = (selectorsYaml: string, more: Partial<SelectionPolicy> = {}): SelectionPolicy => ({
  ...DEFAULT_POLICY,
  enablementSelectors: parseEnablementSelectors(selectorsYaml),
  ...more,
});

describe('label selectors', () => {
  const labels = { app: 'cart', tier: 'web' };
  const cases: [string, LabelSelector, Record<string, string>, boolean][] = [
    ['empty matches everything', {}, labels, true],
    ['empty matches no labels', {}, {}, true],
    ['matchLabels, all present', { matchLabels: { app: 'cart', tier: 'web' } }, labels, true],
    ['matchLabels, one differs', { matchLabels: { app: 'cart', tier: 'db' } }, labels, false],
    ['matchLabels, one missing', { matchLabels: { app: 'cart', zone: 'a' } }, labels, false],
    [
      'In, value listed',
      { matchExpressions: [{ key: 'app', operator: 'In', values: ['shop', 'cart'] }] },
      labels,
      true,
    ],
    ['In, value not listed', { matchExpressions: [{ key: 'app', operator: 'In', values: ['shop'] }] }, labels, false],
    ['In, key missing', { matchExpressions: [{ key: 'zone', operator: 'In', values: ['a'] }] }, labels, false],
    ['NotIn, value listed', { matchExpressions: [{ key: 'app', operator: 'NotIn', values: ['cart'] }] }, labels, false],
    [
      'NotIn, value not listed',
      { matchExpressions: [{ key: 'app', operator: 'NotIn', values: ['shop'] }] },
      labels,
      true,
    ],
    [
      'NotIn, key missing matches',
      { matchExpressions: [{ key: 'zone', operator: 'NotIn', values: ['a'] }] },
      labels,
      true,
    ],
    ['Exists', { matchExpressions: [{ key: 'tier', operator: 'Exists' }] }, labels, true],
    ['Exists, missing', { matchExpressions: [{ key: 'zone', operator: 'Exists' }] }, labels, false],
    ['Exists, empty value counts', { matchExpressions: [{ key: 'zone', operator: 'Exists' }] }, { zone: '' }, true],
    ['DoesNotExist', { matchExpressions: [{ key: 'zone', operator: 'DoesNotExist' }] }, labels, true],
    ['DoesNotExist, present', { matchExpressions: [{ key: 'tier', operator: 'DoesNotExist' }] }, labels, false],
    [
      'matchLabels and expressions are ANDed',
      { matchLabels: { app: 'cart' }, matchExpressions: [{ key: 'tier', operator: 'In', values: ['db'] }] },
      labels,
      false,
    ],
    [
      'several expressions are ANDed',
      {
        matchExpressions: [
          { key: 'app', operator: 'Exists' },
          { key: 'tier', operator: 'NotIn', values: ['db'] },
        ],
      },
      labels,
      true,
    ],
  ];
  for (const [what, selector, l, expected] of cases)
    it(what, () => assert.equal(labelSelectorMatches(selector, l), expected));
});

describe('enablement selectors', () => {
  it('an entry needs both its pod and its namespace selector to match', () => {
    const s = parseEnablementSelectors(
      '[{podSelector: {matchLabels: {mesh: "on"}}, namespaceSelector: {matchLabels: {team: payments}}}]',
    );
    assert.equal(s.match({ mesh: 'on' }, { team: 'payments' }), 0);
    assert.equal(s.match({ mesh: 'on' }, { team: 'search' }), -1, 'pod matches, namespace does not');
    assert.equal(s.match({}, { team: 'payments' }), -1, 'namespace matches, pod does not');
  });

  it('the list is an OR, and a missing selector matches everything', () => {
    const s = parseEnablementSelectors(`
- podSelector: {matchLabels: {mesh: "on"}}
- namespaceSelector:
    matchExpressions:
      - {key: team, operator: In, values: [payments, billing]}
`);
    assert.equal(s.match({ mesh: 'on' }, {}), 0, 'first entry: any namespace');
    assert.equal(s.match({}, { team: 'billing' }), 1, 'second entry: any pod');
    assert.equal(s.match({}, { team: 'search' }), -1);
    assert.equal(s.matchesNamespace({ team: 'billing' }), true);
    assert.equal(s.matchesNamespace({}), false, 'an empty namespace selector does not make every namespace "enabled"');
  });

  it('JSON and YAML give the same selectors; upstream’s Helm default is the default', () => {
    const yaml = `
- podSelector:
    matchLabels: {istio.io/dataplane-mode: ambient}
- podSelector:
    matchExpressions:
      - { key: istio.io/dataplane-mode, operator: NotIn, values: [none] }
  namespaceSelector:
    matchLabels: {istio.io/dataplane-mode: ambient}
`;
    const fromYaml = parseEnablementSelectors(yaml);
    const fromJson = parseEnablementSelectors(JSON.stringify(DEFAULT_ENABLEMENT_SELECTORS));
    assert.deepEqual(fromYaml.selectors, DEFAULT_ENABLEMENT_SELECTORS);
    assert.deepEqual(fromJson.selectors, DEFAULT_ENABLEMENT_SELECTORS);
    assert.equal(fromYaml.isDefault, true);
    assert.equal(parseEnablementSelectors('[{podSelector: {matchLabels: {mesh: "on"}}}]').isDefault, false);
  });

  it('the default selectors decide as the dataplane-mode labels always did', () => {
    const d = new EnablementSelectors(DEFAULT_ENABLEMENT_SELECTORS);
    const mode = (m?: string) => (m ? { 'istio.io/dataplane-mode': m } : {});
    for (const podMode of [undefined, 'ambient', 'none', 'other']) {
      for (const nsMode of [undefined, 'ambient', 'none']) {
        const expected = podMode === 'ambient' || (podMode !== 'none' && nsMode === 'ambient');
        assert.equal(d.match(mode(podMode), mode(nsMode)) >= 0, expected, `pod ${podMode}, namespace ${nsMode}`);
      }
    }
  });

  it('the DaemonSet’s commented example is the default', () => {
    const daemonSet = readFileSync(
      fileURLToPath(new URL('../../manifests/base/daemonset.yaml', import.meta.url)),
      'utf8',
    );
    const example = /^\s*# - '--enablement-selectors=(.*)'$/m.exec(daemonSet);
    assert.ok(example, 'no commented --enablement-selectors in the DaemonSet');
    assert.equal(parseEnablementSelectors(example[1]!).isDefault, true);
  });

  const bad: [string, RegExp][] = [
    ['{podSelector: {}}', /must be a list/],
    ['[]', /empty list/],
    ['[{podSelektor: {}}]', /\[0\]: unknown field "podSelektor"/],
    [
      '[{podSelector: {matchLabels: {mesh: [on]}}}]',
      /\[0\]\.podSelector\.matchLabels: label mesh: the value must be a string/,
    ],
    ['[{podSelector: {matchLabels: {"bad key!": x}}}]', /label key "bad key!"/],
    [
      '[{namespaceSelector: {matchExpressions: [{key: team, operator: Equals, values: [a]}]}}]',
      /\[0\]\.namespaceSelector\.matchExpressions\[0\]: "Equals" is not a valid label selector operator/,
    ],
    ['[{podSelector: {matchExpressions: [{key: team, operator: In}]}}]', /values set can't be empty/],
    ['[{podSelector: {matchExpressions: [{key: team, operator: Exists, values: [a]}]}}]', /values set must be empty/],
    [
      '[{podSelector: {matchExpressions: [{key: team, operator: In, values: ["not a value"]}]}}]',
      /"not a value" is not a label value/,
    ],
    ['[{podSelector: [', /not JSON or YAML/],
  ];
  for (const [text, message] of bad)
    it(`refuses ${text}`, () => assert.throws(() => parseEnablementSelectors(text), message));
});

describe('selection with custom selectors', () => {
  const everything = policy('[{}]');
  it('a match-everything selector still never takes host-network, sidecar, ztunnel, agent or excluded pods', () => {
    assert.equal(selectPod(pod('shop'), ns('shop'), everything).ambient, true);
    assert.match(selectPod(pod('shop'), ns('shop'), everything).reason, /every pod is selected/);
    assert.match(selectPod(pod('shop', {}, { hostNetwork: true }), ns('shop'), everything).reason, /host network/);
    assert.equal(selectPod(pod('shop', {}, { hostNetwork: true }), ns('shop'), everything).ambient, false);
    assert.equal(
      selectPod(pod('shop', {}, { annotations: { 'sidecar.istio.io/status': '{}' } }), ns('shop'), everything).ambient,
      false,
    );
    assert.equal(selectPod(pod('istio-system', { app: 'ztunnel' }), ns('istio-system'), everything).ambient, false);
    assert.equal(
      selectPod(pod('istio-system', { 'app.kubernetes.io/name': 'ambient-bpf' }), ns('istio-system'), everything)
        .ambient,
      false,
    );
    assert.equal(selectPod(pod('kube-system'), ns('kube-system'), everything).ambient, false);
  });

  it('a custom pod label enrols a pod the default selectors leave out', () => {
    const p = pod('shop', { mesh: 'on' });
    assert.equal(selectPod(p, ns('shop')).ambient, false);
    const s = selectPod(p, ns('shop'), policy('[{podSelector: {matchLabels: {mesh: "on"}}}]'));
    assert.equal(s.ambient, true);
    assert.match(s.reason, /pod label mesh=on/);
    const none = selectPod(pod('shop'), ns('shop'), policy('[{podSelector: {matchLabels: {mesh: "on"}}}]'));
    assert.equal(none.ambient, false);
    assert.match(none.reason, /no enablement selector matches .*mesh=on/);
  });

  it('a labelled but excluded namespace says so in the reason', () => {
    const custom = { ...DEFAULT_POLICY, excludedNamespaces: ['legacy'] };
    const s = selectPod(pod('legacy'), ns('legacy', { 'istio.io/dataplane-mode': 'ambient' }), custom);
    assert.equal(s.ambient, false);
    assert.match(
      s.reason,
      /namespace legacy is excluded \(--exclude-namespaces\), although its labels or the pod's select it/,
    );
    assert.match(selectPod(pod('legacy'), ns('legacy'), custom).reason, /^namespace legacy is excluded$/);
    assert.match(
      selectPod(
        pod('legacy', {}, { hostNetwork: true }),
        ns('legacy', { 'istio.io/dataplane-mode': 'ambient' }),
        custom,
      ).reason,
      /^namespace legacy is excluded$/,
      'a host-network pod would not be enrolled anyway',
    );
    assert.equal(
      selectPod(pod('kube-system'), ns('kube-system', { 'istio.io/dataplane-mode': 'ambient' }), custom).ambient,
      true,
      'kube-system is only excluded by default',
    );
  });

  it('the CNI policy file follows the selectors', () => {
    const p = policy(`
- podSelector: {matchLabels: {mesh: "on"}}
- namespaceSelector: {matchLabels: {team: payments}}
- namespaceSelector: {matchLabels: {team: search}}
  podSelector: {matchExpressions: [{key: mesh, operator: In, values: ["on"]}]}
`);
    const state: ClusterState = {
      namespaces: new Map([
        ['payments', ns('payments', { team: 'payments' })],
        ['search', ns('search', { team: 'search' })],
        ['plain', ns('plain')],
        ['labelled', ns('labelled')],
      ]),
      pods: new Map([
        ['a', pod('labelled', { mesh: 'on' }, { name: 'a' })],
        ['b', pod('plain', {}, { name: 'b' })],
      ]),
    };
    const lines = renderCniPolicy(state, p).split('\n');
    assert.ok(lines.includes('namespace payments ambient'), 'every pod selected there');
    assert.ok(lines.includes('namespace search none'), 'only labelled pods there, none seen');
    assert.ok(lines.includes('namespace labelled pod-label'), 'a pod is selected by its labels there');
    assert.ok(lines.includes('namespace plain none'));
    assert.ok(lines.includes('namespace kube-system excluded'));
    // (the pod's uid last, so that a pod made again under its name is not taken for it)
    assert.ok(
      lines.some((l) => /^pod labelled a ambient \S+$/.test(l)),
      lines.join('\n'),
    );
    assert.ok(
      lines.some((l) => /^pod plain b none \S+$/.test(l)),
      lines.join('\n'),
    );
  });
});

describe('agent flags', () => {
  async function agentWith(args: string[]): Promise<{ code: number; stderr: string; left: string[] }> {
    const dir = mkdtempSync(join(tmpdir(), `${TEST_PREFIX}-enable-`));
    try {
      const r = await runCli([
        'agent',
        '--local-pods',
        join(dir, 'pods.yaml'),
        '--cni-policy-file',
        join(dir, 'policy'),
        '--plugin-socket',
        join(dir, 'cni.sock'),
        '--status-socket',
        join(dir, 'status.sock'),
        '--ztunnel-socket',
        join(dir, 'z.sock'),
        '--bpffs',
        join(dir, 'bpf'),
        ...args,
      ]);
      return { ...r, left: readdirSync(dir) };
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }

  it('malformed selectors stop the agent at start, naming the flag and the value, with nothing made', async () => {
    const value = '[{podSelector: {matchExpressions: [{key: mesh, operator: Equals, values: [on]}]}}]';
    const r = await agentWith(['--enablement-selectors', value]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /--enablement-selectors/);
    assert.ok(r.stderr.includes(JSON.stringify(value)), r.stderr);
    assert.match(r.stderr, /"Equals" is not a valid label selector operator/);
    assert.equal(r.stderr.trim().split('\n').length, 1, 'one line');
    assert.deepEqual(r.left, [], 'nothing created');

    const notYaml = await agentWith(['--enablement-selectors', '{podSelector: [']);
    assert.equal(notYaml.code, 2);
    assert.match(notYaml.stderr, /--enablement-selectors "\{podSelector: \[": not JSON or YAML/);
  });

  it('bad namespace names in --exclude-namespaces and --system-namespace are refused', async () => {
    const ex = await agentWith(['--exclude-namespaces', 'kube-system,Bad_NS']);
    assert.equal(ex.code, 2);
    assert.match(ex.stderr, /--exclude-namespaces "Bad_NS": not a namespace name/);
    const sys = await agentWith(['--system-namespace', 'istio system']);
    assert.equal(sys.code, 2);
    assert.match(sys.stderr, /--system-namespace "istio system": not a namespace name/);
  });

  it('the help lists the selection flags', async () => {
    const help = (await runCli(['agent', '--help'])).stdout;
    for (const flag of ['--enablement-selectors', '--exclude-namespaces', '--system-namespace'])
      assert.match(help, new RegExp(flag));
  });
});
