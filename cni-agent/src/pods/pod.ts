// The pods and namespaces every pod source produces and the rest of the agent reads.
import { isIPv6 } from 'node:net';
import type { NamespaceLike, PodLike } from './selection.js';

export interface Pod extends PodLike {
  metadata: NonNullable<PodLike['metadata']> & {
    name: string;
    namespace: string;
    uid: string;
    resourceVersion?: string | undefined;
  };
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
  return ips.map(canonicalIp);
}

/** The RFC 5952 text of an address (as the kernel's listing prints it), so that a hand-written
 * `2001:db8:0:0::2` matches `2001:db8::2`; anything that is not an address is returned as is. */
export function canonicalIp(ip: string): string {
  // (an embedded IPv4 part, as in ::ffff:198.18.0.1, is left as written: URL would rewrite it in hex)
  if (!isIPv6(ip) || ip.includes('.')) return ip;
  return new URL(`http://[${ip}]/`).hostname.slice(1, -1);
}
