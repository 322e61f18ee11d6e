// The Kubernetes pod source: list + watch (kube-client.ts) of the pods of this node (field selector
// spec.nodeName) in all namespaces, and of namespaces, kept as the agent's state; it also writes
// the ambient.istio.io/redirection annotation with a merge patch on pods/status, as upstream does.
// A watch resumes from its last resourceVersion (bookmarks keep it fresh); 410 Gone lists again
// and reports what changed meanwhile; any other failure retries with backoff, forever.
import type { Logger } from '../../../ztunnel-bridge/src/logger.js';
import type { Annotator, RedirectionAnnotation } from '../enrollment/reconciler.js';
import { EventRecorder, type EventType, type PodEventSink } from './events.js';
import {
  KubeApiError,
  KubeClient,
  loadKubeConnection,
  type KubeConnection,
  type WatchEvent,
  type Watching,
} from './kube-client.js';
import { REDIRECTION_ANNOTATION, type ClusterState, type Namespace, type Pod, type SourceChange } from './pod.js';

export interface KubePodSourceOptions {
  /** A kubeconfig file, or a ready connection (tests); absent: the in-cluster service account. */
  kubeconfig?: string | KubeConnection | undefined;
  nodeName: string;
  onChange: (changes: SourceChange[], state: ClusterState) => void;
  log: Logger;
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  /** Repeats of a pod's Event are patched at most this often (default 60 s). */
  eventIntervalMs?: number;
}

type Kind = 'pods' | 'namespaces';
type ApiObject = {
  metadata?: {
    name?: string;
    namespace?: string;
    uid?: string;
    resourceVersion?: string;
    labels?: Record<string, string>;
    annotations?: Record<string, string>;
  };
  spec?: Record<string, unknown>;
  status?: Record<string, unknown>;
};

interface Informer {
  kind: Kind;
  path: string;
  query: Record<string, string>;
  /** Where the next watch starts; undefined: list first. */
  resourceVersion: string | undefined;
  watching: Watching | undefined;
  backoffMs: number;
  retry: { timer: NodeJS.Timeout; wake: () => void } | undefined;
  listed: { promise: Promise<void>; resolve: () => void };
}

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

/** Only what the agent reads (selection, capture options, IPs, ztunnel's workload info): a pod
 * object from the API is mostly container specs the agent never looks at. */
function toPod(o: ApiObject): Pod | undefined {
  const m = o.metadata;
  if (!m?.name || !m.namespace || !m.uid) return undefined;
  const spec = o.spec ?? {};
  const status = o.status ?? {};
  return {
    metadata: {
      name: m.name,
      namespace: m.namespace,
      uid: m.uid,
      resourceVersion: m.resourceVersion,
      labels: m.labels,
      annotations: m.annotations,
    },
    spec: { nodeName: spec.nodeName, hostNetwork: spec.hostNetwork, serviceAccountName: spec.serviceAccountName },
    status: { phase: status.phase, podIP: status.podIP, podIPs: status.podIPs },
  } as Pod;
}

function toNamespace(o: ApiObject): Namespace | undefined {
  const m = o.metadata;
  return m?.name
    ? ({ metadata: { name: m.name, labels: m.labels, resourceVersion: m.resourceVersion } } as Namespace)
    : undefined;
}

export class KubePodSource implements Annotator, PodEventSink {
  private client: KubeClient | undefined;
  /** Events on pods (enrollment failures, ignored annotations), once started. */
  events: EventRecorder | undefined;
  private readonly informers: Record<Kind, Informer>;
  private readonly state: ClusterState = { pods: new Map(), namespaces: new Map() };
  private stopped = false;
  private synced = false;
  /** Uids of pods the watch deleted lately (a lookup's answer must not bring them back). */
  private readonly recentlyDeleted = new Set<string>();
  /** Objects a CNI ADD's lookup read ahead of the watch, by kind/key, with the resourceVersion read:
   * list items and watch events older than that are skipped until the watch catches up, so that a
   * lagging watch cannot take back what the ADD was decided on (an unlabelled version of a pod
   * just enrolled as ambient, say). */
  private readonly readAhead = new Map<string, bigint>();

  constructor(private readonly opts: KubePodSourceOptions) {
    const informer = (kind: Kind, path: string, query: Record<string, string>): Informer => ({
      kind,
      path,
      query,
      resourceVersion: undefined,
      watching: undefined,
      backoffMs: opts.initialBackoffMs ?? 200,
      retry: undefined,
      listed: deferred(),
    });
    this.informers = {
      pods: informer('pods', '/api/v1/pods', { fieldSelector: `spec.nodeName=${opts.nodeName}` }),
      namespaces: informer('namespaces', '/api/v1/namespaces', {}),
    };
  }

  get current(): ClusterState {
    return this.state;
  }

  get isSynced(): boolean {
    return this.synced;
  }

  /** Lists both kinds and starts watching; resolves with the first state once both lists
   * succeeded (retrying with backoff meanwhile). An agent that took an unreachable API for an
   * empty cluster would unenrol every pod it adopted. Rejects only for unusable configuration. */
  async start(): Promise<ClusterState> {
    const k = this.opts.kubeconfig;
    this.client = new KubeClient(typeof k === 'object' ? k : await loadKubeConnection(k));
    this.events = new EventRecorder({
      client: this.client,
      nodeName: this.opts.nodeName,
      log: this.opts.log,
      ...(this.opts.eventIntervalMs !== undefined ? { minIntervalMs: this.opts.eventIntervalMs } : {}),
    });
    void this.run(this.informers.namespaces);
    void this.run(this.informers.pods);
    await Promise.all([this.informers.namespaces.listed.promise, this.informers.pods.listed.promise]);
    this.synced = true;
    return this.state;
  }

  stop(): void {
    this.stopped = true;
    this.events?.stop();
    for (const i of Object.values(this.informers)) {
      i.watching?.stop();
      if (i.retry) {
        clearTimeout(i.retry.timer);
        i.retry.wake();
      }
    }
    this.client?.close();
  }

  /** A pod the watch has not brought yet (its CNI ADD came first): asks the API for the pod and
   * its namespace, as upstream's plugin does at ADD, answering within `timeoutMs` or throwing. What
   * it finds and the cache lacks goes into the cache (and is reported) as the watch's own event
   * would; the later watch event then updates it. Resolves with the pod (undefined: the API has no
   * pod of that name, or one of another node). */
  async lookup(namespace: string, name: string, timeoutMs: number): Promise<Pod | undefined> {
    const client = this.client;
    if (!client) throw new Error('the Kubernetes pod source is not started');
    const get = async (path: string): Promise<ApiObject | undefined> => {
      try {
        return await client.get<ApiObject>(path, timeoutMs);
      } catch (err) {
        if (err instanceof KubeApiError && err.code === 404) return undefined;
        throw err;
      }
    };
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new KubeApiError(0, `the Kubernetes API did not answer within ${timeoutMs} ms`)),
        timeoutMs,
      );
    });
    let found: [ApiObject | undefined, ApiObject | undefined];
    try {
      const ns = encodeURIComponent(namespace);
      found = await Promise.race([
        Promise.all([
          get(`/api/v1/namespaces/${ns}/pods/${encodeURIComponent(name)}`),
          get(`/api/v1/namespaces/${ns}`),
        ]),
        deadline,
      ]);
    } finally {
      clearTimeout(timer);
    }
    if (this.stopped) return undefined;
    const [podObj, nsObj] = found;
    // The namespace as read now, also when the cache has an older version (labelled since).
    const namespaceFound = nsObj ? toNamespace(nsObj) : undefined;
    if (namespaceFound && this.newer('namespaces', namespaceFound.metadata.name, nsObj!))
      this.readAheadOf('namespaces', namespaceFound.metadata.name, nsObj!);
    const pod = podObj ? toPod(podObj) : undefined;
    if (!pod || pod.spec?.nodeName !== this.opts.nodeName) return undefined;
    // (not one the watch deleted while the answer was on its way: that answer is older)
    if (!this.recentlyDeleted.has(pod.metadata.uid) && this.newer('pods', pod.metadata.uid, podObj!))
      this.readAheadOf('pods', pod.metadata.uid, podObj!);
    return this.state.pods.get(pod.metadata.uid);
  }

  /** Is `o` newer than the cached object of that key (or is there none)? resourceVersions are
   * compared as numbers where both are (etcd's revisions); otherwise any other version counts. */
  private newer(kind: Kind, key: string, o: ApiObject): boolean {
    const cached = (kind === 'pods' ? this.state.pods.get(key) : this.state.namespaces.get(key))?.metadata
      .resourceVersion;
    if (cached === undefined) return true;
    const [a, b] = [revision(o.metadata?.resourceVersion), revision(cached)];
    return a !== undefined && b !== undefined ? a > b : o.metadata?.resourceVersion !== cached;
  }

  private readAheadOf(kind: Kind, key: string, o: ApiObject): void {
    const rv = revision(o.metadata?.resourceVersion);
    if (rv !== undefined) this.readAhead.set(`${kind}/${key}`, rv);
    this.apply(kind, o, false);
  }

  /** Should a list item or watch event for this object be skipped, being older than what a lookup
   * read? (Deletions never are.) Once the watch brings that version or a later one, the mark goes. */
  private behindReadAhead(kind: Kind, o: ApiObject): boolean {
    const key = this.keyOf(kind, o);
    const mark = key === undefined ? undefined : this.readAhead.get(`${kind}/${key}`);
    if (mark === undefined) return false;
    const rv = revision(o.metadata?.resourceVersion);
    if (rv !== undefined && rv < mark) return true;
    this.readAhead.delete(`${kind}/${key}`);
    return false;
  }

  podEvent(pod: Pod, type: EventType, reason: string, message: string): void {
    this.events?.podEvent(pod, type, reason, message);
  }

  forgetPod(uid: string): void {
    this.events?.forgetPod(uid);
  }

  /** Merge patch on pods/status: set, or remove (null), the redirection annotation. */
  async setRedirection(pod: Pod, value: RedirectionAnnotation): Promise<void> {
    if (!this.client) throw new Error('the Kubernetes pod source is not started');
    const path = `/api/v1/namespaces/${encodeURIComponent(pod.metadata.namespace)}/pods/${encodeURIComponent(pod.metadata.name)}/status`;
    await this.client.mergePatch(path, { metadata: { annotations: { [REDIRECTION_ANNOTATION]: value ?? null } } });
  }

  private async run(i: Informer): Promise<void> {
    while (!this.stopped) {
      try {
        if (i.resourceVersion === undefined) await this.list(i);
        const began = Date.now();
        let events = 0;
        i.watching = await this.client!.watch<ApiObject>(
          i.path,
          { ...i.query, resourceVersion: i.resourceVersion! },
          (e) => {
            events++;
            this.event(i, e);
          },
        );
        await i.watching.done;
        // The server ends a watch after its timeout; one that ends at once is a failing server.
        if (!this.stopped && events === 0 && Date.now() - began < 1000)
          throw new KubeApiError(0, `watch ${i.path} ended at once`);
        i.backoffMs = this.opts.initialBackoffMs ?? 200;
      } catch (err) {
        if (this.stopped) return;
        if (err instanceof KubeApiError && err.code === 410) {
          this.opts.log.info({ kind: i.kind, error: err.message }, 'Kubernetes watch history expired; listing again');
          i.resourceVersion = undefined;
          continue;
        }
        this.opts.log.warn(
          { kind: i.kind, error: (err as Error).message, retryMs: i.backoffMs },
          'Kubernetes watch failed; restarting',
        );
        await new Promise<void>((wake) => (i.retry = { timer: setTimeout(wake, i.backoffMs), wake }));
        i.retry = undefined;
        i.backoffMs = Math.min(i.backoffMs * 2, this.opts.maxBackoffMs ?? 30_000);
      }
    }
  }

  /** A full list: the state becomes what it says, and what differs from before is reported (after
   * 410 Gone, the changes the lost history held). */
  private async list(i: Informer): Promise<void> {
    const { items, resourceVersion } = await this.client!.list<ApiObject>(i.path, i.query);
    const cache: Map<string, Pod | Namespace> = i.kind === 'pods' ? this.state.pods : this.state.namespaces;
    const seen = new Set<string>();
    for (const item of items) {
      const key = this.keyOf(i.kind, item);
      if (!key) continue;
      seen.add(key);
      if (
        cache.get(key)?.metadata.resourceVersion !== item.metadata?.resourceVersion &&
        !this.behindReadAhead(i.kind, item)
      )
        this.apply(i.kind, item, false);
    }
    // (an object a lookup read after this list's snapshot was taken is not gone)
    const listRv = revision(resourceVersion);
    const readAfter = (key: string) => listRv !== undefined && (this.readAhead.get(`${i.kind}/${key}`) ?? -1n) > listRv;
    for (const [key, old] of [...cache])
      if (!seen.has(key) && !readAfter(key)) this.apply(i.kind, old as ApiObject, true);
    i.resourceVersion = resourceVersion;
    i.listed.resolve();
  }

  private event(i: Informer, e: WatchEvent<ApiObject>): void {
    if (e.object.metadata?.resourceVersion) i.resourceVersion = e.object.metadata.resourceVersion;
    if (e.type === 'BOOKMARK' || (e.type !== 'DELETED' && this.behindReadAhead(i.kind, e.object))) return;
    this.apply(i.kind, e.object, e.type === 'DELETED');
  }

  private keyOf(kind: Kind, o: ApiObject): string | undefined {
    return kind === 'pods' ? o.metadata?.uid : o.metadata?.name;
  }

  /** Puts one object into the state (or takes it out) and reports the change once synced. */
  private apply(kind: Kind, o: ApiObject, deleted: boolean): void {
    const report = (c: SourceChange): void => {
      if (this.synced) this.opts.onChange([c], this.state);
    };
    if (kind === 'pods') {
      const pod = toPod(o);
      if (!pod) return;
      const type = deleted ? 'deleted' : this.state.pods.has(pod.metadata.uid) ? 'updated' : 'added';
      if (deleted) {
        this.state.pods.delete(pod.metadata.uid);
        this.readAhead.delete(`pods/${pod.metadata.uid}`);
        this.recentlyDeleted.add(pod.metadata.uid);
        if (this.recentlyDeleted.size > 1000) this.recentlyDeleted.delete(this.recentlyDeleted.values().next().value!);
      } else this.state.pods.set(pod.metadata.uid, pod);
      return report({ kind: 'pod', type, pod });
    }
    const namespace = toNamespace(o);
    if (!namespace) return;
    const type = deleted ? 'deleted' : this.state.namespaces.has(namespace.metadata.name) ? 'updated' : 'added';
    if (deleted) {
      this.state.namespaces.delete(namespace.metadata.name);
      this.readAhead.delete(`namespaces/${namespace.metadata.name}`);
    } else this.state.namespaces.set(namespace.metadata.name, namespace);
    report({ kind: 'namespace', type, namespace });
  }
}

/** A resourceVersion as a number, where it is one (etcd's revisions are; the API calls them opaque). */
function revision(rv: string | undefined): bigint | undefined {
  return rv !== undefined && /^[0-9]{1,30}$/.test(rv) ? BigInt(rv) : undefined;
}
