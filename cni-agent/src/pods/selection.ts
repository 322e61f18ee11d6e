// Which pods are ambient: upstream Istio's rules (README, "The node agent": selection), with the
// reason for every decision so logs and status can say why a pod is or is not captured.

export const DATAPLANE_MODE_LABEL = 'istio.io/dataplane-mode';
export const SIDECAR_STATUS_ANNOTATION = 'sidecar.istio.io/status';

/** The parts of a v1 Pod / Namespace the rules read (API objects and YAML both fit). */
export interface PodLike {
  metadata?: { name?: string; namespace?: string; labels?: Record<string, string>; annotations?: Record<string, string> };
  spec?: { hostNetwork?: boolean };
}

export interface NamespaceLike {
  metadata?: { name?: string; labels?: Record<string, string> };
}

export interface SelectionPolicy {
  /** Namespaces never captured (upstream default: kube-system). */
  excludedNamespaces: string[];
  /** Istio's system namespace, where ztunnel runs. */
  systemNamespace: string;
  /** The agent's own pods: in this namespace with these labels. */
  agentNamespace: string;
  agentLabels: Record<string, string>;
}

export const DEFAULT_POLICY: SelectionPolicy = {
  excludedNamespaces: ['kube-system'],
  systemNamespace: 'istio-system',
  agentNamespace: 'istio-system',
  agentLabels: { 'app.kubernetes.io/name': 'ambient-bpf' },
};

export type Selection =
  | { ambient: true; reason: 'pod label' | 'namespace label' }
  | { ambient: false; reason: string };

export function selectPod(pod: PodLike, namespace: NamespaceLike | undefined, policy: SelectionPolicy = DEFAULT_POLICY): Selection {
  const ns = pod.metadata?.namespace ?? 'default';
  const labels = pod.metadata?.labels ?? {};
  const podMode = labels[DATAPLANE_MODE_LABEL];
  const nsMode = namespace?.metadata?.labels?.[DATAPLANE_MODE_LABEL];

  if (policy.excludedNamespaces.includes(ns)) return { ambient: false, reason: `namespace ${ns} is excluded` };
  if (pod.spec?.hostNetwork) return { ambient: false, reason: 'host network pod' };
  if (ns === policy.systemNamespace && labels.app === 'ztunnel') return { ambient: false, reason: 'ztunnel pod' };
  if (ns === policy.agentNamespace && Object.entries(policy.agentLabels).every(([k, v]) => labels[k] === v)) {
    return { ambient: false, reason: 'the node agent’s own pod' };
  }
  if (pod.metadata?.annotations?.[SIDECAR_STATUS_ANNOTATION] !== undefined) return { ambient: false, reason: 'sidecar injected' };
  if (podMode === 'none') return { ambient: false, reason: `pod label ${DATAPLANE_MODE_LABEL}=none` };
  if (podMode === 'ambient') return { ambient: true, reason: 'pod label' };
  if (nsMode === 'ambient') return { ambient: true, reason: 'namespace label' };
  return { ambient: false, reason: `no ${DATAPLANE_MODE_LABEL}=ambient label on the pod or namespace ${ns}` };
}
