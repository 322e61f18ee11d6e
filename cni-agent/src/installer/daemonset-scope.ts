// On SIGTERM: is the agent leaving this node for good (its DaemonSet gone, being deleted, or no
// longer scheduling onto this node), or only being replaced (an upgrade, a restart)? Only the
// first takes ambient-bpf off the node; anything the API cannot answer counts as the second, as
// removing on a guess would unredirect every pod of a node that keeps the agent.
import { KubeApiError, type KubeClient } from '../pods/kube-client.js';

interface NodeSelectorRequirement {
  key: string;
  operator: string;
  values?: string[];
}

interface NodeSelectorTerm {
  matchExpressions?: NodeSelectorRequirement[];
  matchFields?: NodeSelectorRequirement[];
}

/** The parts of a pod spec that decide which nodes it may run on (taints aside). */
export interface NodePlacement {
  nodeSelector?: Record<string, string>;
  affinity?: { nodeAffinity?: { requiredDuringSchedulingIgnoredDuringExecution?: { nodeSelectorTerms?: NodeSelectorTerm[] } } };
}

export interface NodeFacts {
  name: string;
  labels: Record<string, string>;
}

function requirementHolds(r: NodeSelectorRequirement, value: string | undefined): boolean {
  const values = r.values ?? [];
  switch (r.operator) {
    case 'In':
      return value !== undefined && values.includes(value);
    case 'NotIn':
      return value === undefined || !values.includes(value);
    case 'Exists':
      return value !== undefined;
    case 'DoesNotExist':
      return value === undefined;
    case 'Gt':
    case 'Lt': {
      if (value === undefined || values.length !== 1 || !/^-?\d+$/.test(value) || !/^-?\d+$/.test(values[0]!)) return false;
      return r.operator === 'Gt' ? BigInt(value) > BigInt(values[0]!) : BigInt(value) < BigInt(values[0]!);
    }
    default:
      return false; // an operator the API server would have refused
  }
}

/** Kubernetes' rule (k8s.io/component-helpers/scheduling/corev1/nodeaffinity): every nodeSelector
 * label equal, and, when required node affinity is set, one of its terms matching, a term
 * matching when all its expressions (labels) and fields (only metadata.name) hold; a term with
 * neither matches no node. */
export function placesOnNode(spec: NodePlacement, node: NodeFacts): boolean {
  for (const [k, v] of Object.entries(spec.nodeSelector ?? {})) if (node.labels[k] !== v) return false;
  const required = spec.affinity?.nodeAffinity?.requiredDuringSchedulingIgnoredDuringExecution;
  if (!required) return true;
  return (required.nodeSelectorTerms ?? []).some((term) => {
    const exprs = term.matchExpressions ?? [];
    const fields = term.matchFields ?? [];
    if (exprs.length === 0 && fields.length === 0) return false;
    return (
      exprs.every((r) => requirementHolds(r, node.labels[r.key])) &&
      fields.every((r) => requirementHolds(r, r.key === 'metadata.name' ? node.name : undefined))
    );
  });
}

/** Why the agent is leaving `nodeName` for good, or undefined when it is only being replaced.
 * Throws when the API cannot say. */
export async function whyLeavingNode(client: KubeClient, namespace: string, name: string, nodeName: string): Promise<string | undefined> {
  let ds: { metadata?: { deletionTimestamp?: string }; spec?: { template?: { spec?: NodePlacement } } };
  try {
    ds = await client.get(`/apis/apps/v1/namespaces/${encodeURIComponent(namespace)}/daemonsets/${encodeURIComponent(name)}`);
  } catch (err) {
    if (err instanceof KubeApiError && err.code === 404) return 'the DaemonSet is gone';
    throw err;
  }
  if (ds.metadata?.deletionTimestamp) return 'the DaemonSet is being deleted';
  const placement = ds.spec?.template?.spec ?? {};
  if (!placement.nodeSelector && !placement.affinity?.nodeAffinity) return undefined;
  // A node the API does not know (deleted meanwhile) throws here too: nothing is removed on a guess.
  const node = await client.get<{ metadata?: { labels?: Record<string, string> } }>(`/api/v1/nodes/${encodeURIComponent(nodeName)}`);
  if (placesOnNode(placement, { name: nodeName, labels: node.metadata?.labels ?? {} })) return undefined;
  return `the DaemonSet no longer selects node ${nodeName} (its nodeSelector or node affinity)`;
}
