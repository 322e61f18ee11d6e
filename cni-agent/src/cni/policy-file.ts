// The file the CNI plugin reads when it cannot reach the agent: which namespaces and pods are
// ambient, so that it fails closed for those and lets every other pod start. Written atomically
// next to the plugin socket on every change of the pod source.
import { mkdirSync, renameSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import type { ClusterState } from '../pods/pod.js';
import { DATAPLANE_MODE_LABEL, selectPod, type SelectionPolicy } from '../pods/selection.js';

export function policyFilePath(pluginSocket: string): string {
  return join(dirname(pluginSocket), 'cni-policy');
}

/** The policy as text; see the plugin (cni-agent/plugin/ambient-bpf-cni.c) for how it is read. */
export function renderCniPolicy(state: ClusterState, policy: SelectionPolicy): string {
  const lines = ['# ambient-bpf: read by ambient-bpf-cni when the agent is unreachable. Generated; do not edit.'];
  const namespaces = new Set([...state.namespaces.keys(), ...policy.excludedNamespaces]);
  for (const name of [...namespaces].sort()) {
    const mode = policy.excludedNamespaces.includes(name)
      ? 'excluded'
      : state.namespaces.get(name)?.metadata.labels?.[DATAPLANE_MODE_LABEL] === 'ambient'
        ? 'ambient'
        : 'none';
    lines.push(`namespace ${name} ${mode}`);
  }
  for (const pod of state.pods.values()) {
    const { namespace, name } = pod.metadata;
    if (!/^[^\s]+$/.test(name) || !/^[^\s]+$/.test(namespace)) continue;
    lines.push(`pod ${namespace} ${name} ${selectPod(pod, state.namespaces.get(namespace), policy).ambient ? 'ambient' : 'none'}`);
  }
  return lines.join('\n') + '\n';
}

export function writeCniPolicy(path: string, state: ClusterState, policy: SelectionPolicy): void {
  mkdirSync(dirname(path), { recursive: true, mode: 0o750 });
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, renderCniPolicy(state, policy), { mode: 0o644 });
  renameSync(tmp, path);
}
