// The pods and namespaces every pod source produces and the rest of the agent reads.
import type { NamespaceLike, PodLike } from './selection.js';

export interface Pod extends PodLike {
  metadata: NonNullable<PodLike['metadata']> & { name: string; namespace: string; uid: string; resourceVersion?: string | undefined };
  spec?: PodLike['spec'] & { nodeName?: string };
  status?: { podIP?: string; podIPs?: { ip: string }[]; phase?: string };
}

export interface Namespace extends NamespaceLike {
  metadata: NonNullable<NamespaceLike['metadata']> & { name: string; resourceVersion?: string | undefined };
}

/** Written by the agent on pods/status: `enabled` or `pending` (upstream's name and values). */
export const REDIRECTION_ANNOTATION = 'ambient.istio.io/redirection';

export interface ClusterState {
  pods: Map<string, Pod>; // by uid
  namespaces: Map<string, Namespace>; // by name
}

export type SourceChange =
  | { kind: 'pod'; type: 'added' | 'updated' | 'deleted'; pod: Pod }
  | { kind: 'namespace'; type: 'added' | 'updated' | 'deleted'; namespace: Namespace };

/** The pod's IPs from status.podIPs (or status.podIP). */
export function podIPs(pod: Pod): string[] {
  const ips = pod.status?.podIPs?.map((p) => p.ip) ?? [];
  if (ips.length === 0 && pod.status?.podIP) ips.push(pod.status.podIP);
  return ips;
}
