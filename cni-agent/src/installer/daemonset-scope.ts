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
  affinity?: {
    nodeAffinity?: { requiredDuringSchedulingIgnoredDuringExecution?: { nodeSelectorTerms?: NodeSelectorTerm[] } };
  };
}

export interface NodeFacts {
  name: string;
  labels: Record<string, string>;
}

/** Go's strconv.ParseInt(s, 10, 64): an optional sign, digits, within int64. */
function int64(s: string | undefined): bigint | undefined {
  if (s === undefined || !/^[+-]?\d+$/.test(s)) return undefined;
  const n = BigInt(s);
  return n >= -(2n ** 63n) && n < 2n ** 63n ? n : undefined;
}

/** A label's value; a key such as "constructor" is a label like any other, not Object's member. */
function label(labels: Record<string, string>, key: string): string | undefined {
  return Object.hasOwn(labels, key) ? labels[key] : undefined;
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
      const have = int64(value);
      const bound = values.length === 1 ? int64(values[0]) : undefined;
      if (have === undefined || bound === undefined) return false;
      return r.operator === 'Gt' ? have > bound : have < bound;
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
  for (const [k, v] of Object.entries(spec.nodeSelector ?? {})) if (label(node.labels, k) !== v) return false;
  const required = spec.affinity?.nodeAffinity?.requiredDuringSchedulingIgnoredDuringExecution;
  if (!required) return true;
  return (required.nodeSelectorTerms ?? []).some((term) => {
    const exprs = term.matchExpressions ?? [];
    const fields = term.matchFields ?? [];
    if (exprs.length === 0 && fields.length === 0) return false;
    return (
      exprs.every((r) => requirementHolds(r, label(node.labels, r.key))) &&
      fields.every((r) => requirementHolds(r, r.key === 'metadata.name' ? node.name : undefined))
    );
  });
}

/** Why the agent leaves a node for good. `deselected`: the DaemonSet stays but no longer selects
 * the node, which a label change or a selector edit undoes as easily as it did it. */
export interface Leaving {
  why: string;
  deselected: boolean;
}

/** How long a "no longer selects this node" answer must hold before it counts: a selector edit
 * that lands before the labels it needs is corrected within the grace period, not acted on. */
export const DESELECTION_CONFIRM_MS = 3_000;

/** Why the agent is leaving `nodeName` for good, or undefined when it is only being replaced.
 * Throws when the API cannot say. A deselection is asked twice, `confirmMs` apart. */
export async function whyLeavingNode(
  client: KubeClient,
  namespace: string,
  name: string,
  nodeName: string,
  confirmMs = DESELECTION_CONFIRM_MS,
): Promise<Leaving | undefined> {
  const first = await askOnce(client, namespace, name, nodeName);
  if (!first?.deselected) return first;
  await new Promise((r) => setTimeout(r, confirmMs));
  const second = await askOnce(client, namespace, name, nodeName);
  return second?.deselected === false ? second : second && first;
}

async function askOnce(
  client: KubeClient,
  namespace: string,
  name: string,
  nodeName: string,
): Promise<Leaving | undefined> {
  let ds: { metadata?: { deletionTimestamp?: string }; spec?: { template?: { spec?: NodePlacement } } };
  try {
    ds = await client.get(
      `/apis/apps/v1/namespaces/${encodeURIComponent(namespace)}/daemonsets/${encodeURIComponent(name)}`,
    );
  } catch (err) {
    if (err instanceof KubeApiError && err.code === 404) return { why: 'the DaemonSet is gone', deselected: false };
    throw err;
  }
  if (ds.metadata?.deletionTimestamp) return { why: 'the DaemonSet is being deleted', deselected: false };
  const placement = ds.spec?.template?.spec ?? {};
  if (!placement.nodeSelector && !placement.affinity?.nodeAffinity) return undefined;
  // A node the API does not know (deleted meanwhile) throws here too: nothing is removed on a guess.
  const node = await client.get<{ metadata?: { labels?: Record<string, string> } }>(
    `/api/v1/nodes/${encodeURIComponent(nodeName)}`,
  );
  if (placesOnNode(placement, { name: nodeName, labels: node.metadata?.labels ?? {} })) return undefined;
  return {
    why: `the DaemonSet no longer selects node ${nodeName} (its nodeSelector or node affinity)`,
    deselected: true,
  };
}
