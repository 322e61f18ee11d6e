// The Kubernetes pod source: informers (list + watch) through @kubernetes/client-node for the pods
// of this node (field selector spec.nodeName) in all namespaces, and for namespaces. It also writes
// the ambient.istio.io/redirection annotation with a merge patch on pods/status, as upstream does.
import { CoreV1Api, KubeConfig, ListWatch, PatchStrategy, setHeaderOptions, Watch, type V1Namespace, type V1Pod } from '@kubernetes/client-node';
import type { Logger } from '../../../ztunnel-bridge/src/logger.js';
import type { Annotator, RedirectionAnnotation } from '../enrollment/reconciler.js';
import { REDIRECTION_ANNOTATION, type ClusterState, type Namespace, type Pod, type SourceChange } from './pod.js';


export interface KubePodSourceOptions {
  /** A kubeconfig file; absent: the in-cluster service account. Or a ready KubeConfig (tests). */
  kubeconfig?: string | KubeConfig | undefined;
  nodeName: string;
  onChange: (changes: SourceChange[], state: ClusterState) => void;
  log: Logger;
  initialBackoffMs?: number;
  maxBackoffMs?: number;
}

export function loadKubeConfig(kubeconfig: string | KubeConfig | undefined): KubeConfig {
  if (kubeconfig instanceof KubeConfig) return kubeconfig;
  const kc = new KubeConfig();
  if (kubeconfig) kc.loadFromFile(kubeconfig);
  else kc.loadFromCluster();
  return kc;
}

/** A pod as the rest of the agent sees it; undefined for objects without identity. */
function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

function toPod(p: V1Pod): Pod | undefined {
  const m = p.metadata;
  if (!m?.name || !m.namespace || !m.uid) return undefined;
  return p as unknown as Pod;
}

function toNamespace(n: V1Namespace): Namespace | undefined {
  return n.metadata?.name ? (n as unknown as Namespace) : undefined;
}

export class KubePodSource implements Annotator {
  private readonly core: CoreV1Api;
  private readonly pods: ListWatch<V1Pod>;
  private readonly namespaces: ListWatch<V1Namespace>;
  private readonly state: ClusterState = { pods: new Map(), namespaces: new Map() };
  private stopped = false;
  private synced = false;
  private readonly retries = new Map<string, { timer?: NodeJS.Timeout; backoffMs: number }>();
  /** Resolved by each kind's first successful list: until both, the state is not the cluster's. */
  private readonly listed = { pods: deferred(), namespaces: deferred() };

  constructor(private readonly opts: KubePodSourceOptions) {
    const kc = loadKubeConfig(opts.kubeconfig);
    this.core = kc.makeApiClient(CoreV1Api);
    const fieldSelector = `spec.nodeName=${opts.nodeName}`;
    this.pods = new ListWatch<V1Pod>('/api/v1/pods', new Watch(kc), () => this.core.listPodForAllNamespaces({ fieldSelector }), false, undefined, fieldSelector);
    this.namespaces = new ListWatch<V1Namespace>('/api/v1/namespaces', new Watch(kc), () => this.core.listNamespace(), false);
    for (const verb of ['add', 'update'] as const) {
      this.pods.on(verb, (p) => this.pod(verb === 'add' ? 'added' : 'updated', p));
      this.namespaces.on(verb, (n) => this.namespace(verb === 'add' ? 'added' : 'updated', n));
    }
    this.pods.on('delete', (p) => this.pod('deleted', p));
    this.namespaces.on('delete', (n) => this.namespace('deleted', n));
    this.pods.on('error', (err) => this.restart('pods', this.pods, err));
    this.namespaces.on('error', (err) => this.restart('namespaces', this.namespaces, err));
  }

  get current(): ClusterState {
    return this.state;
  }

  get isSynced(): boolean {
    return this.synced;
  }

  /** Lists both kinds and starts watching; resolves with the first state once both lists
   * succeeded (retrying with backoff meanwhile). An agent that took an unreachable API for an
   * empty cluster would unenrol every pod it adopted. */
  async start(): Promise<ClusterState> {
    this.run('namespaces', this.namespaces);
    this.run('pods', this.pods);
    await Promise.all([this.listed.namespaces.promise, this.listed.pods.promise]);
    this.synced = true;
    return this.state;
  }

  /** Starts an informer. A failed list is not an exception (the informer reports it as an error
   * event, which restarts it): only a resourceVersion tells that it listed. */
  private run(kind: 'pods' | 'namespaces', informer: ListWatch<V1Pod> | ListWatch<V1Namespace>): void {
    informer.start().then(
      () => {
        if (!informer.latestResourceVersion()) return;
        this.retries.delete(kind);
        this.listed[kind].resolve();
      },
      (e: unknown) => this.restart(kind, informer, e),
    );
  }

  stop(): void {
    this.stopped = true;
    for (const r of this.retries.values()) clearTimeout(r.timer);
    void this.pods.stop();
    void this.namespaces.stop();
  }

  /** Merge patch on pods/status: set, or remove (null), the redirection annotation. */
  async setRedirection(pod: Pod, value: RedirectionAnnotation): Promise<void> {
    await this.core.patchNamespacedPodStatus(
      { name: pod.metadata.name, namespace: pod.metadata.namespace, body: { metadata: { annotations: { [REDIRECTION_ANNOTATION]: value ?? null } } } },
      setHeaderOptions('Content-Type', PatchStrategy.MergePatch),
    );
  }

  /** A watch that failed other than with 410 (which the informer handles by listing again)
   * stops the informer: start it again, with backoff, for as long as the agent runs. */
  private restart(kind: 'pods' | 'namespaces', informer: ListWatch<V1Pod> | ListWatch<V1Namespace>, err: unknown): void {
    if (this.stopped) return;
    const r = this.retries.get(kind) ?? { backoffMs: this.opts.initialBackoffMs ?? 200 };
    this.retries.set(kind, r);
    this.opts.log.warn({ kind, error: (err as Error | undefined)?.message ?? String(err), retryMs: r.backoffMs }, 'Kubernetes watch failed; restarting');
    clearTimeout(r.timer);
    r.timer = setTimeout(() => this.run(kind, informer), r.backoffMs);
    r.backoffMs = Math.min(r.backoffMs * 2, this.opts.maxBackoffMs ?? 30_000);
  }

  private pod(type: 'added' | 'updated' | 'deleted', p: V1Pod): void {
    const pod = toPod(p);
    if (!pod) return;
    if (type === 'deleted') this.state.pods.delete(pod.metadata.uid);
    else this.state.pods.set(pod.metadata.uid, pod);
    if (this.synced) this.opts.onChange([{ kind: 'pod', type, pod }], this.state);
  }

  private namespace(type: 'added' | 'updated' | 'deleted', n: V1Namespace): void {
    const namespace = toNamespace(n);
    if (!namespace) return;
    if (type === 'deleted') this.state.namespaces.delete(namespace.metadata.name);
    else this.state.namespaces.set(namespace.metadata.name, namespace);
    if (this.synced) this.opts.onChange([{ kind: 'namespace', type, namespace }], this.state);
  }
}
