// Which pods are ambient: upstream Istio's rules (README, "The node agent": selection), with the
// reason for every decision so logs and status can say why a pod is or is not captured. Which
// labels enrol a pod is upstream's enablement selectors (enablement.ts; --enablement-selectors);
// what is never enrolled (excluded namespaces, host network, sidecars, ztunnel, the agent) is
// checked first, whatever the selectors say.
import {
  DEFAULT_SELECTORS,
  enablementSelectorText,
  isEmptySelector,
  selectorText,
  type EnablementSelectors,
} from './enablement.js';

export const DATAPLANE_MODE_LABEL = 'istio.io/dataplane-mode';
export const SIDECAR_STATUS_ANNOTATION = 'sidecar.istio.io/status';

/** The parts of a v1 Pod / Namespace the rules read (API objects and YAML both fit). */
export interface PodLike {
  metadata?: {
    name?: string;
    namespace?: string;
    labels?: Record<string, string>;
    annotations?: Record<string, string>;
  };
  spec?: { hostNetwork?: boolean };
}

export interface NamespaceLike {
  metadata?: { name?: string; labels?: Record<string, string> };
}

export interface SelectionPolicy {
  /** Namespaces never captured (upstream default: kube-system). */
  excludedNamespaces: string[];
  /** Which pods are ambient (upstream's enablement selectors; default: the dataplane-mode labels). */
  enablementSelectors: EnablementSelectors;
  /** Istio's system namespace, where ztunnel runs. */
  systemNamespace: string;
  /** The agent's own pods: in this namespace with these labels. */
  agentNamespace: string;
  agentLabels: Record<string, string>;
  /** A pod the agent could not see (it was unreachable, or the API did not answer at CNI ADD), in
   * a namespace where no pod is ambient: started as a plain pod ('by-namespace'), or held until
   * the agent can tell ('hold': a pod that opts in by its own label never starts unmeshed). */
  unseenPods: UnseenPods;
}

export const UNSEEN_POD_POLICIES = ['by-namespace', 'hold'] as const;
export type UnseenPods = (typeof UNSEEN_POD_POLICIES)[number];

export const DEFAULT_POLICY: SelectionPolicy = {
  excludedNamespaces: ['kube-system'],
  enablementSelectors: DEFAULT_SELECTORS,
  systemNamespace: 'istio-system',
  agentNamespace: 'istio-system',
  agentLabels: { 'app.kubernetes.io/name': 'ambient-bpf' },
  unseenPods: 'by-namespace',
};

export type Selection = { ambient: boolean; reason: string };

/** Would the selectors enrol this pod, were its namespace not excluded? (A labelled namespace, or
 * a labelled pod, in an excluded namespace is worth a warning; a host-network or sidecar pod,
 * never enrolled anyway, is not.) */
export function excludedButSelected(
  pod: PodLike,
  namespace: NamespaceLike | undefined,
  policy: SelectionPolicy,
): boolean {
  const ns = pod.metadata?.namespace ?? 'default';
  if (
    !policy.excludedNamespaces.includes(ns) ||
    pod.spec?.hostNetwork ||
    pod.metadata?.annotations?.[SIDECAR_STATUS_ANNOTATION] !== undefined
  )
    return false;
  return policy.enablementSelectors.match(pod.metadata?.labels, namespace?.metadata?.labels) >= 0;
}

export function selectPod(
  pod: PodLike,
  namespace: NamespaceLike | undefined,
  policy: SelectionPolicy = DEFAULT_POLICY,
): Selection {
  const ns = pod.metadata?.namespace ?? 'default';
  const labels = pod.metadata?.labels ?? {};
  const podMode = labels[DATAPLANE_MODE_LABEL];

  if (policy.excludedNamespaces.includes(ns)) {
    return excludedButSelected(pod, namespace, policy)
      ? {
          ambient: false,
          reason: `namespace ${ns} is excluded (--exclude-namespaces), although its labels or the pod's select it for ambient`,
        }
      : { ambient: false, reason: `namespace ${ns} is excluded` };
  }
  if (pod.spec?.hostNetwork) return { ambient: false, reason: 'host network pod' };
  if (ns === policy.systemNamespace && labels.app === 'ztunnel') return { ambient: false, reason: 'ztunnel pod' };
  if (ns === policy.agentNamespace && Object.entries(policy.agentLabels).every(([k, v]) => labels[k] === v)) {
    return { ambient: false, reason: 'the node agent’s own pod' };
  }
  if (pod.metadata?.annotations?.[SIDECAR_STATUS_ANNOTATION] !== undefined)
    return { ambient: false, reason: 'sidecar injected' };
  const selectors = policy.enablementSelectors;
  const matched = selectors.match(labels, namespace?.metadata?.labels);
  const entry = selectors.selectors[matched];
  if (entry) {
    // The default selectors say it as before: which label decided.
    if (selectors.isDefault) return { ambient: true, reason: matched === 0 ? 'pod label' : 'namespace label' };
    const podPart = selectorText(entry.podSelector);
    const nsPart = selectorText(entry.namespaceSelector);
    if (isEmptySelector(entry.namespaceSelector))
      return {
        ambient: true,
        reason: isEmptySelector(entry.podSelector) ? 'every pod is selected' : `pod label ${podPart}`,
      };
    return {
      ambient: true,
      reason: `namespace label ${nsPart}${isEmptySelector(entry.podSelector) ? '' : `, pod labels ${podPart}`}`,
    };
  }
  if (selectors.isDefault) {
    if (podMode === 'none') return { ambient: false, reason: `pod label ${DATAPLANE_MODE_LABEL}=none` };
    return { ambient: false, reason: `no ${DATAPLANE_MODE_LABEL}=ambient label on the pod or namespace ${ns}` };
  }
  return {
    ambient: false,
    reason: `no enablement selector matches the pod and namespace ${ns} (${selectors.selectors.map(enablementSelectorText).join('; ')})`,
  };
}
