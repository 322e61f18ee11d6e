// The file the CNI plugin decides from when it cannot reach the agent: which namespaces and pods
// are ambient. It lives where a reboot does not erase it (default under /var/lib/ambient-bpf),
// because after a reboot pods are created again before the agent is back. Written atomically and
// synced on every change of the pod source; the plugin treats a file without its first and last
// lines as lost and fails closed (cni-agent/plugin/ambient-bpf-cni.c, decide()).
import { closeSync, fsyncSync, mkdirSync, openSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import type { ClusterState } from '../pods/pod.js';
import { selectPod, type SelectionPolicy } from '../pods/selection.js';

export const DEFAULT_POLICY_FILE = '/var/lib/ambient-bpf/cni-policy';
const MAGIC = 'ambient-bpf-cni-policy 1';
const END = 'end';

/** How the plugin treats a namespace's pods it has no line for. */
type NamespaceMode = 'excluded' | 'ambient' | 'pod-label' | 'held' | 'none';

function namespaceMode(
  name: string,
  state: ClusterState,
  policy: SelectionPolicy,
  podSelected: Set<string>,
): NamespaceMode {
  if (policy.excludedNamespaces.includes(name)) return 'excluded';
  // A pod with no labels would be selected here (with the default selectors: the namespace is
  // labelled ambient): a pod the plugin never saw is ambient unless its own labels opt out.
  if (policy.enablementSelectors.selectsUnlabelledPods(state.namespaces.get(name)?.metadata.labels)) return 'ambient';
  // A pod's own labels make it ambient, and the plugin cannot see labels: where some pod is
  // selected by its labels, a pod the agent never saw may be ambient.
  if (podSelected.has(name)) return 'pod-label';
  return policy.unseenPods === 'hold' ? 'held' : 'none';
}

/** How a pod of `name` that the agent has not seen is judged without its labels (the plugin's
 * rule 4, README "Agent unreachable"): only `none` means it cannot be ambient as far as the agent
 * knows; a namespace the agent does not know is `unknown`. */
export function namespaceModeOf(name: string, state: ClusterState, policy: SelectionPolicy): NamespaceMode | 'unknown' {
  if (!policy.excludedNamespaces.includes(name) && !state.namespaces.has(name)) return 'unknown';
  return namespaceMode(name, state, policy, namespacesWithSelectedPods(state, policy));
}

/** Namespaces where some pod the agent knows is selected (by its labels and its namespace's). */
function namespacesWithSelectedPods(state: ClusterState, policy: SelectionPolicy): Set<string> {
  const selectors = policy.enablementSelectors;
  return new Set(
    [...state.pods.values()]
      .filter(
        (p) => selectors.match(p.metadata.labels, state.namespaces.get(p.metadata.namespace)?.metadata.labels) >= 0,
      )
      .map((p) => p.metadata.namespace),
  );
}

/** The policy as text; see the plugin for how it is read. */
export function renderCniPolicy(state: ClusterState, policy: SelectionPolicy): string {
  const lines = [
    '# ambient-bpf: read by ambient-bpf-cni when the agent is unreachable. Generated; do not edit.',
    MAGIC,
  ];
  const podSelected = namespacesWithSelectedPods(state, policy);
  const namespaces = new Set([...state.namespaces.keys(), ...policy.excludedNamespaces]);
  for (const name of [...namespaces].sort())
    lines.push(`namespace ${name} ${namespaceMode(name, state, policy, podSelected)}`);
  for (const pod of state.pods.values()) {
    const { namespace, name } = pod.metadata;
    if (!/^[^\s]+$/.test(name) || !/^[^\s]+$/.test(namespace)) continue;
    // The uid last: a plugin of the previous release reads the first four fields only.
    const uid = /^[^\s]+$/.test(pod.metadata.uid) ? ` ${pod.metadata.uid}` : '';
    lines.push(
      `pod ${namespace} ${name} ${selectPod(pod, state.namespaces.get(namespace), policy).ambient ? 'ambient' : 'none'}${uid}`,
    );
  }
  lines.push(END);
  return lines.join('\n') + '\n';
}

export function writeCniPolicy(path: string, state: ClusterState, policy: SelectionPolicy): void {
  mkdirSync(dirname(path), { recursive: true, mode: 0o755 });
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, renderCniPolicy(state, policy), { mode: 0o644 });
  syncPath(tmp);
  renameSync(tmp, path);
  syncPath(dirname(path)); // the rename itself survives a crash or power loss
}

/** Removes the policy: the plugin then fails closed, so only once it is out of the conflist. */
export function removeCniPolicy(path: string): void {
  rmSync(path, { force: true });
}

function syncPath(path: string): void {
  const fd = openSync(path, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}
