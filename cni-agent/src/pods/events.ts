// Kubernetes Events on pods (core v1, what `kubectl describe pod` shows): why a pod could not be
// enrolled, and what in its annotations was ignored. As client-go's recorder does, a repeat of the
// same event (same pod, reason and message) is not a new object: the existing one's count and
// lastTimestamp are patched, at most once per `minIntervalMs` (repeats in between are counted and
// go with the next patch), so a pod failing on every retry makes one Event, not one per retry.
// Recording never blocks nor fails the caller: calls are queued (bounded; beyond, dropped) and
// API errors are only logged.
import type { Logger } from '../../../ztunnel-bridge/src/logger.js';
import { KubeApiError, type KubeClient } from './kube-client.js';
import type { Pod } from './pod.js';

/** Upstream-style reasons (CamelCase) the agent records. */
export const EVENT_REASONS = {
  /** Enrolling the pod failed (the message says why); the agent retries with backoff. */
  enrollmentFailed: 'AmbientEnrollmentFailed',
  /** Removing the pod's redirection failed; retried. */
  unenrollmentFailed: 'AmbientUnenrollmentFailed',
  /** A capture annotation was malformed or over its limit, and ignored (its default applies). */
  annotationInvalid: 'AmbientAnnotationInvalid',
  /** The selectors pick the pod, but its namespace is excluded (--exclude-namespaces). */
  namespaceExcluded: 'AmbientNamespaceExcluded',
} as const;

export type EventType = 'Normal' | 'Warning';

/** Where the reconciler reports events (the Kubernetes source records them; the local one not). */
export interface PodEventSink {
  podEvent(pod: Pod, type: EventType, reason: string, message: string): void;
  /** The pod is gone: its events are not repeated any more. */
  forgetPod(uid: string): void;
}

export interface EventRecorderOptions {
  client: KubeClient;
  /** source.host and reportingInstance: the node. */
  nodeName: string;
  log: Logger;
  /** At most one API call per event this often (default 60 s). */
  minIntervalMs?: number;
  /** Calls waiting beyond this are dropped (default 100). */
  maxQueued?: number;
  /** Events remembered for deduplication (default 2048; the oldest is forgotten first). */
  maxRemembered?: number;
}

export const EVENT_COMPONENT = 'ambient-bpf';
const MAX_MESSAGE = 1024;

interface Recorded {
  key: string;
  uid: string;
  namespace: string;
  name: string | undefined;
  pod: Pod;
  type: EventType;
  reason: string;
  message: string;
  count: number;
  /** The count the API has (or was last sent). */
  sent: number;
  first: string;
  last: string;
  sentAt: number;
  timer: NodeJS.Timeout | undefined;
  queued: boolean;
}

export class EventRecorder implements PodEventSink {
  private readonly recorded = new Map<string, Recorded>();
  private queue: Promise<void> = Promise.resolve();
  private queued = 0;
  private seq = 0;
  private stopped = false;
  /** API calls made and dropped (for tests and logs). */
  readonly stats = { created: 0, patched: 0, failed: 0, dropped: 0 };

  constructor(private readonly opts: EventRecorderOptions) {}

  podEvent(pod: Pod, type: EventType, reason: string, message: string): void {
    if (this.stopped) return;
    const uid = pod.metadata.uid;
    const text = message.length > MAX_MESSAGE ? `${message.slice(0, MAX_MESSAGE - 1)}…` : message;
    const key = `${uid}\n${reason}\n${text}`;
    const now = new Date().toISOString().replace(/\.\d+Z$/, 'Z'); // metav1.Time: seconds
    const r = this.recorded.get(key);
    if (!r) {
      const max = this.opts.maxRemembered ?? 2048;
      for (const [k, old] of this.recorded) {
        if (this.recorded.size < max) break;
        clearTimeout(old.timer);
        this.recorded.delete(k);
      }
      const fresh: Recorded = {
        key,
        uid,
        namespace: pod.metadata.namespace,
        name: undefined,
        pod,
        type,
        reason,
        message: text,
        count: 1,
        sent: 0,
        first: now,
        last: now,
        sentAt: 0,
        timer: undefined,
        queued: false,
      };
      this.recorded.set(key, fresh);
      this.enqueue(fresh);
      return;
    }
    r.count++;
    r.last = now;
    r.pod = pod;
    this.schedule(r);
  }

  /** Sends the record's unsent repeats: now, or once its interval since the last call is over. */
  private schedule(r: Recorded): void {
    if (r.timer || r.queued || this.stopped || r.sent >= r.count) return; // the next call carries them
    const wait = r.sentAt + (this.opts.minIntervalMs ?? 60_000) - Date.now();
    if (wait <= 0) return this.enqueue(r);
    r.timer = setTimeout(() => {
      r.timer = undefined;
      this.enqueue(r);
    }, wait);
    r.timer.unref();
  }

  forgetPod(uid: string): void {
    for (const [k, r] of this.recorded) {
      if (r.uid !== uid) continue;
      clearTimeout(r.timer);
      this.recorded.delete(k);
    }
  }

  stop(): void {
    this.stopped = true;
    for (const r of this.recorded.values()) clearTimeout(r.timer);
    this.recorded.clear();
  }

  /** Resolves once every queued call is done (tests). */
  idle(): Promise<void> {
    return this.queue;
  }

  private enqueue(r: Recorded): void {
    if (this.queued >= (this.opts.maxQueued ?? 100)) {
      this.stats.dropped++;
      this.opts.log.debug(
        { reason: r.reason, pod: `${r.namespace}/${r.pod.metadata.name}` },
        'too many Kubernetes events waiting; dropping one',
      );
      return;
    }
    this.queued++;
    r.queued = true;
    this.queue = this.queue.then(async () => {
      r.queued = false;
      r.sentAt = Date.now(); // repeats while the call is on its way wait for the next interval
      try {
        if (!this.stopped) await this.send(r);
      } catch (err) {
        this.stats.failed++;
        this.opts.log.warn(
          { reason: r.reason, pod: `${r.namespace}/${r.pod.metadata.name}`, error: (err as Error).message },
          'cannot record a Kubernetes event on the pod',
        );
      } finally {
        r.sentAt = Date.now();
        this.queued--;
      }
      // Repeats that came while the call was on its way go with the next one.
      if (this.recorded.get(r.key) === r && r.sent > 0) this.schedule(r);
    });
  }

  private async send(r: Recorded): Promise<void> {
    const base = `/api/v1/namespaces/${encodeURIComponent(r.namespace)}/events`;
    const count = r.count;
    if (r.name) {
      try {
        await this.opts.client.mergePatch(`${base}/${encodeURIComponent(r.name)}`, { count, lastTimestamp: r.last });
        r.sent = count;
        this.stats.patched++;
        return;
      } catch (err) {
        // Events expire (an hour, by default): record it anew.
        if (!(err instanceof KubeApiError && err.code === 404)) throw err;
      }
    }
    const name = `${r.pod.metadata.name}.${(BigInt(Date.now()) * 1_000_000n + BigInt(this.seq++ % 1_000_000)).toString(16)}`;
    const { pod } = r;
    await this.opts.client.create(base, {
      apiVersion: 'v1',
      kind: 'Event',
      metadata: { name, namespace: r.namespace },
      involvedObject: {
        apiVersion: 'v1',
        kind: 'Pod',
        name: pod.metadata.name,
        namespace: pod.metadata.namespace,
        uid: pod.metadata.uid,
        ...(pod.metadata.resourceVersion ? { resourceVersion: pod.metadata.resourceVersion } : {}),
      },
      type: r.type,
      reason: r.reason,
      message: r.message,
      source: { component: EVENT_COMPONENT, host: this.opts.nodeName },
      reportingComponent: EVENT_COMPONENT,
      reportingInstance: this.opts.nodeName,
      firstTimestamp: r.first,
      lastTimestamp: r.last,
      count,
    });
    r.name = name;
    r.sent = count;
    this.stats.created++;
  }
}
