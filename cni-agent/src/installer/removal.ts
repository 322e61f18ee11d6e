// Taking ambient-bpf off a node: what `ambient-bpf uninstall` does, and what the agent does when
// it stops because it leaves the node for good (daemonset-scope.ts).
// The order is what makes an interrupted removal safe and a repeated one converge: the conflist
// entry goes first (new pods no longer call the plugin), then the binary, then the plugin's
// decision data (the plugin fails closed without it, so only once nothing calls it), then the
// pods' redirection and the annotations that say the pods are redirected.
import { rmSync } from 'node:fs';
import { Datapath } from '../../../bpf/src/index.js';
import type { Logger } from '../../../ztunnel-bridge/src/logger.js';
import { removeCniPolicy } from '../cni/policy-file.js';
import { KubeApiError, type KubeClient } from '../pods/kube-client.js';
import { REDIRECTION_ANNOTATION } from '../pods/pod.js';
import { CniInstaller } from './installer.js';

export interface RemovalOptions {
  /** Where the plugin binary and the conflist entry are; undefined: not installed by us. */
  cni: { binDir: string; confDir: string } | undefined;
  policyFile: string;
  bpffs: string;
  /** Leave running pods redirected (and their annotations, which then still tell the truth). */
  keepPodRedirection: boolean;
  /** The API, to remove the redirection annotations of this node's pods; undefined: none known.
   * Connected only then, so that a configuration that fails stops nothing else. */
  kube: { connect: () => Promise<KubeClient>; nodeName: string } | undefined;
  /** One line per thing done, and warnings. */
  report: (line: string) => void;
  warn: (line: string) => void;
  log: Logger;
}

/** Removes what `opts` names, in the order above; returns what could not be done (empty: all). */
export async function removeFromNode(opts: RemovalOptions): Promise<string[]> {
  const failed: string[] = [];
  if (opts.cni) {
    const installer = new CniInstaller({
      ...opts.cni,
      binarySource: '',
      agentSocket: '',
      policyFile: opts.policyFile,
      log: opts.log,
    });
    for (const file of installer.uninstall()) opts.report(`removed the ambient-bpf-cni entry from ${file}`);
  }
  removeCniPolicy(opts.policyFile);
  opts.report(`removed ${opts.policyFile}`);
  if (opts.keepPodRedirection) return failed;
  const dp = await Datapath.open({ bpffsRoot: opts.bpffs });
  try {
    for (const pod of await dp.list()) {
      const r = await dp.detach(pod.uid);
      if (r.warning) opts.warn(r.warning);
      opts.report(`removed the redirection of pod ${pod.uid}`);
    }
  } finally {
    dp.close();
  }
  // No pod left: the maps and the hook on ztunnel's cgroup go too (unpinning detaches).
  rmSync(opts.bpffs, { recursive: true, force: true });
  opts.report(`removed ${opts.bpffs}`);
  if (!opts.kube) {
    // A node without the API (the local pod source) has no annotations; on a cluster node, say so.
    opts.warn(
      `did not remove the ${REDIRECTION_ANNOTATION} annotations of this node's pods: no Kubernetes API (pass --kubeconfig, or run in the cluster)`,
    );
    return failed;
  }
  try {
    const n = await removeRedirectionAnnotations(await opts.kube.connect(), opts.kube.nodeName);
    opts.report(
      `removed the ${REDIRECTION_ANNOTATION} annotation from ${n} pod${n === 1 ? '' : 's'} of node ${opts.kube.nodeName}`,
    );
  } catch (err) {
    failed.push(
      `could not remove the ${REDIRECTION_ANNOTATION} annotations of node ${opts.kube.nodeName}'s pods: ${(err as Error).message}`,
    );
  }
  return failed;
}

/** Removes the redirection annotation from every pod of the node that has one; returns how many. */
export async function removeRedirectionAnnotations(client: KubeClient, nodeName: string): Promise<number> {
  type PodMeta = { metadata?: { name?: string; namespace?: string; annotations?: Record<string, string> } };
  const { items } = await client.list<PodMeta>('/api/v1/pods', { fieldSelector: `spec.nodeName=${nodeName}` });
  let removed = 0;
  for (const { metadata: m } of items) {
    if (!m?.name || !m.namespace || m.annotations?.[REDIRECTION_ANNOTATION] === undefined) continue;
    const path = `/api/v1/namespaces/${encodeURIComponent(m.namespace)}/pods/${encodeURIComponent(m.name)}/status`;
    try {
      await client.mergePatch(path, { metadata: { annotations: { [REDIRECTION_ANNOTATION]: null } } });
      removed++;
    } catch (err) {
      if (!(err instanceof KubeApiError && err.code === 404)) throw err; // a pod deleted meanwhile needs nothing
    }
  }
  return removed;
}
