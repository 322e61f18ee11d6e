// Upstream's ambient enablement selectors (istio-cni's `ambient.enablementSelectors` Helm value,
// cni/pkg/util/enablement_selector.go): a list of {podSelector, namespaceSelector}, each a
// Kubernetes LabelSelector (matchLabels and matchExpressions). A pod is selected when, for some
// entry of the list, its labels match the podSelector AND its namespace's labels match the
// namespaceSelector (the list is an OR). An empty or missing selector matches everything, as in
// upstream (its fields are not pointers). Host-network and sidecar-injected pods are never
// selected whatever the selectors say: selection.ts checks those first.
import { parse as parseYaml } from 'yaml';

export type Operator = 'In' | 'NotIn' | 'Exists' | 'DoesNotExist';
const OPERATORS: readonly string[] = ['In', 'NotIn', 'Exists', 'DoesNotExist'];

export interface LabelSelectorRequirement {
  key: string;
  operator: Operator;
  values?: string[];
}

export interface LabelSelector {
  matchLabels?: Record<string, string>;
  matchExpressions?: LabelSelectorRequirement[];
}

export interface EnablementSelector {
  podSelector?: LabelSelector;
  namespaceSelector?: LabelSelector;
}

/** Upstream's default (the chart's `ambient.enablementSelectors`): the pod label
 * `istio.io/dataplane-mode=ambient`, or the namespace label unless the pod says `none`. */
export const DEFAULT_ENABLEMENT_SELECTORS: EnablementSelector[] = [
  { podSelector: { matchLabels: { 'istio.io/dataplane-mode': 'ambient' } } },
  {
    podSelector: { matchExpressions: [{ key: 'istio.io/dataplane-mode', operator: 'NotIn', values: ['none'] }] },
    namespaceSelector: { matchLabels: { 'istio.io/dataplane-mode': 'ambient' } },
  },
];

type Labels = Record<string, string> | undefined;

/** A requirement as the label selector grammar writes it (kubectl's -l), for reasons and logs. */
function requirementText(r: LabelSelectorRequirement): string {
  switch (r.operator) {
    case 'In':
      return `${r.key} in (${(r.values ?? []).join(',')})`;
    case 'NotIn':
      return `${r.key} notin (${(r.values ?? []).join(',')})`;
    case 'Exists':
      return r.key;
    case 'DoesNotExist':
      return `!${r.key}`;
  }
}

function requirements(s: LabelSelector | undefined): LabelSelectorRequirement[] {
  return [
    ...Object.entries(s?.matchLabels ?? {}).map(([key, v]): LabelSelectorRequirement => ({
      key,
      operator: 'In',
      values: [v],
    })),
    ...(s?.matchExpressions ?? []),
  ];
}

/** Does a label set match the selector? An empty selector matches every set. */
export function labelSelectorMatches(s: LabelSelector | undefined, labels: Labels): boolean {
  const l = labels ?? {};
  return requirements(s).every((r) => {
    const has = Object.hasOwn(l, r.key);
    switch (r.operator) {
      case 'In':
        return has && (r.values ?? []).includes(l[r.key]!);
      case 'NotIn':
        return !has || !(r.values ?? []).includes(l[r.key]!);
      case 'Exists':
        return has;
      case 'DoesNotExist':
        return !has;
    }
  });
}

export function isEmptySelector(s: LabelSelector | undefined): boolean {
  return requirements(s).length === 0;
}

export function selectorText(s: LabelSelector | undefined): string {
  const r = requirements(s);
  return r.length
    ? r
        .map((x) =>
          x.operator === 'In' && x.values?.length === 1 && s?.matchLabels?.[x.key] === x.values[0]
            ? `${x.key}=${x.values[0]}`
            : requirementText(x),
        )
        .join(',')
    : '(everything)';
}

/** One entry, as a reason can name it. */
export function enablementSelectorText(e: EnablementSelector): string {
  return `pods ${selectorText(e.podSelector)} in namespaces ${selectorText(e.namespaceSelector)}`;
}

export class EnablementSelectors {
  /** Whether these are the default selectors (the reasons then say it as before). */
  readonly isDefault: boolean;

  constructor(readonly selectors: readonly EnablementSelector[]) {
    this.isDefault = JSON.stringify(selectors) === JSON.stringify(DEFAULT_ENABLEMENT_SELECTORS);
  }

  /** The index of the first entry selecting a pod with these labels in a namespace with those, or
   * -1. (Host network and sidecars are selection.ts's business.) */
  match(podLabels: Labels, namespaceLabels: Labels): number {
    return this.selectors.findIndex(
      (s) =>
        labelSelectorMatches(s.podSelector, podLabels) && labelSelectorMatches(s.namespaceSelector, namespaceLabels),
    );
  }

  /** Upstream's MatchesNamespace: is the namespace enabled by a (non-empty) namespace selector? */
  matchesNamespace(namespaceLabels: Labels): boolean {
    return this.selectors.some(
      (s) => !isEmptySelector(s.namespaceSelector) && labelSelectorMatches(s.namespaceSelector, namespaceLabels),
    );
  }

  /** Would a pod with no labels at all be selected in this namespace? (The CNI plugin's view of a
   * pod it never saw: it may only be ambient, or it is ambient unless it opts out.) */
  selectsUnlabelledPods(namespaceLabels: Labels): boolean {
    return this.match({}, namespaceLabels) >= 0;
  }
}

export const DEFAULT_SELECTORS = new EnablementSelectors(DEFAULT_ENABLEMENT_SELECTORS);

// Label keys and values as Kubernetes validates them (IsQualifiedName, IsValidLabelValue).
const NAME = /^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$/;
const DNS_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;

function labelKeyProblem(key: unknown): string | undefined {
  if (typeof key !== 'string') return `a label key must be a string, not ${JSON.stringify(key)}`;
  const slash = key.lastIndexOf('/');
  const prefix = slash >= 0 ? key.slice(0, slash) : undefined;
  const name = slash >= 0 ? key.slice(slash + 1) : key;
  if (prefix !== undefined && (!DNS_SUBDOMAIN.test(prefix) || prefix.length > 253))
    return `label key "${key}": the prefix must be a DNS subdomain`;
  if (!NAME.test(name) || name.length > 63)
    return `label key "${key}": the name must be 63 characters at most, alphanumeric, '-', '_' or '.', starting and ending alphanumeric`;
  return undefined;
}

function labelValueProblem(key: string, value: unknown): string | undefined {
  if (typeof value !== 'string') return `label ${key}: the value must be a string, not ${JSON.stringify(value)}`;
  if (value !== '' && (!NAME.test(value) || value.length > 63))
    return `label ${key}: "${value}" is not a label value (63 characters at most, alphanumeric, '-', '_' or '.', starting and ending alphanumeric)`;
  return undefined;
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

function checkLabelSelector(v: unknown, where: string): LabelSelector {
  if (v === undefined || v === null) return {};
  if (!isObject(v)) throw new Error(`${where}: must be a label selector (matchLabels, matchExpressions)`);
  for (const k of Object.keys(v))
    if (k !== 'matchLabels' && k !== 'matchExpressions')
      throw new Error(`${where}: unknown field "${k}" (matchLabels, matchExpressions)`);
  const out: LabelSelector = {};
  if (v.matchLabels !== undefined && v.matchLabels !== null) {
    if (!isObject(v.matchLabels)) throw new Error(`${where}.matchLabels: must be a map of label to value`);
    for (const [key, value] of Object.entries(v.matchLabels)) {
      const p = labelKeyProblem(key) ?? labelValueProblem(key, value);
      if (p) throw new Error(`${where}.matchLabels: ${p}`);
    }
    out.matchLabels = { ...(v.matchLabels as Record<string, string>) };
  }
  if (v.matchExpressions !== undefined && v.matchExpressions !== null) {
    if (!Array.isArray(v.matchExpressions)) throw new Error(`${where}.matchExpressions: must be a list`);
    out.matchExpressions = v.matchExpressions.map((r: unknown, i): LabelSelectorRequirement => {
      const at = `${where}.matchExpressions[${i}]`;
      if (!isObject(r)) throw new Error(`${at}: must be {key, operator, values}`);
      for (const k of Object.keys(r))
        if (k !== 'key' && k !== 'operator' && k !== 'values')
          throw new Error(`${at}: unknown field "${k}" (key, operator, values)`);
      const keyProblem = labelKeyProblem(r.key);
      if (keyProblem) throw new Error(`${at}: ${keyProblem}`);
      const key = r.key as string;
      if (typeof r.operator !== 'string' || !OPERATORS.includes(r.operator))
        throw new Error(
          `${at}: "${String(r.operator)}" is not a valid label selector operator (In, NotIn, Exists, DoesNotExist)`,
        );
      const operator = r.operator as Operator;
      const values = r.values ?? [];
      if (!Array.isArray(values)) throw new Error(`${at}.values: must be a list`);
      if ((operator === 'In' || operator === 'NotIn') && values.length === 0)
        throw new Error(`${at}: for 'in', 'notin' operators, values set can't be empty`);
      if ((operator === 'Exists' || operator === 'DoesNotExist') && values.length > 0)
        throw new Error(`${at}: values set must be empty for exists and does not exist`);
      for (const value of values) {
        const p = labelValueProblem(key, value);
        if (p) throw new Error(`${at}.values: ${p}`);
      }
      return { key, operator, ...(values.length ? { values: [...(values as string[])] } : {}) };
    });
  }
  return out;
}

/** The selectors from a flag's text: a JSON or YAML list of {podSelector, namespaceSelector} (as
 * upstream's Helm value gives it). Throws with what is wrong and where. */
export function parseEnablementSelectors(text: string): EnablementSelectors {
  let doc: unknown;
  try {
    doc = parseYaml(text); // YAML 1.2 is a superset of JSON
  } catch (err) {
    throw new Error(`not JSON or YAML: ${(err as Error).message.split('\n')[0]}`);
  }
  if (!Array.isArray(doc)) throw new Error('must be a list of {podSelector, namespaceSelector}');
  if (doc.length === 0) throw new Error('an empty list would select no pod at all');
  return new EnablementSelectors(
    doc.map((e: unknown, i): EnablementSelector => {
      if (!isObject(e)) throw new Error(`[${i}]: must be {podSelector, namespaceSelector}`);
      for (const k of Object.keys(e))
        if (k !== 'podSelector' && k !== 'namespaceSelector')
          throw new Error(`[${i}]: unknown field "${k}" (podSelector, namespaceSelector)`);
      const podSelector = checkLabelSelector(e.podSelector, `[${i}].podSelector`);
      const namespaceSelector = checkLabelSelector(e.namespaceSelector, `[${i}].namespaceSelector`);
      return {
        ...(isEmptySelector(podSelector) && e.podSelector === undefined ? {} : { podSelector }),
        ...(isEmptySelector(namespaceSelector) && e.namespaceSelector === undefined ? {} : { namespaceSelector }),
      };
    }),
  );
}
