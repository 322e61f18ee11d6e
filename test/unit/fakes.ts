// Fakes of what the reconciler drives (the datapath, the ZDS server, the netns and cgroup lookups,
// the sandbox records, the annotator), recording what they were asked, with injectable failures
// and delays. Nothing here needs root or the kernel: only types come from bpf/src.
import { closeSync } from 'node:fs';
import type { AttachOptions, PodAttachment } from '../../bpf/src/index.js';
import type {
  Annotator,
  CgroupFinder,
  NetnsFinder,
  PodRedirector,
  RedirectionAnnotation,
  ZdsPort,
} from '../../cni-agent/src/enrollment/reconciler.js';
import type { SandboxStore } from '../../cni-agent/src/enrollment/sandbox-records.js';
import type { Pod } from '../../cni-agent/src/pods/pod.js';
import type { Logger } from '../../ztunnel-bridge/src/logger.js';
import type { PodEnrollment, ZtunnelResult } from '../../ztunnel-bridge/src/zds-server.js';

/** A failure to inject: an Error (with an optional `code`, as the datapath's errors have). */
export function failure(message: string, code?: string): Error & { code?: string } {
  return Object.assign(new Error(message), code ? { code } : {});
}

/** A gate that holds whoever waits on it until opened. */
export class Gate {
  private opened = false;
  private waiters: (() => void)[] = [];

  wait(): Promise<void> {
    return this.opened ? Promise.resolve() : new Promise((resolve) => this.waiters.push(resolve));
  }

  open(): void {
    this.opened = true;
    for (const w of this.waiters.splice(0)) w();
  }
}

export interface RedirectorCall {
  op: 'attach' | 'detach' | 'verify' | 'list';
  uid?: string;
  /** attach: what was asked. */
  pod?: PodAttachment;
  mode?: string;
  at: number;
}

interface FakeAttachment {
  pod: PodAttachment;
  mode: string;
  netnsPresent: boolean;
}

/** A datapath that keeps its attachments in a map. attach/detach can be made to fail (a queue of
 * errors, one per call) or to wait (a Gate, or a delay); overlapping calls for one pod are counted. */
export class FakeRedirector implements PodRedirector {
  readonly calls: RedirectorCall[] = [];
  readonly attachments = new Map<string, FakeAttachment>();
  /** Errors the next attach calls throw, in order (undefined: that call succeeds). */
  readonly attachFailures: (Error | undefined)[] = [];
  readonly detachFailures: (Error | undefined)[] = [];
  /** attach calls wait on this while it is set. */
  gate: Gate | undefined;
  delayMs = 0;
  /** Pods verify reports broken. */
  readonly broken = new Set<string>();
  /** What attach says it left out, per pod (its warning), and verify's problems when set. */
  readonly attachWarnings = new Map<string, string>();
  readonly problems = new Map<string, string[]>();
  /** The most attach/detach calls in progress at once for any one pod. */
  maxConcurrentPerPod = 0;
  private readonly inProgress = new Map<string, number>();

  /** An attachment made before (by an earlier agent). */
  preload(pod: PodAttachment, mode = 'tcx', netnsPresent = true): void {
    this.attachments.set(pod.uid, { pod, mode, netnsPresent });
  }

  attachCalls(uid?: string): RedirectorCall[] {
    return this.calls.filter((c) => c.op === 'attach' && (uid === undefined || c.uid === uid));
  }

  detachCalls(uid?: string): RedirectorCall[] {
    return this.calls.filter((c) => c.op === 'detach' && (uid === undefined || c.uid === uid));
  }

  async attach(pod: PodAttachment, options?: AttachOptions): Promise<unknown> {
    const mode = options?.mode ?? 'default';
    this.calls.push({ op: 'attach', uid: pod.uid, pod, mode, at: performance.now() });
    return this.busy(pod.uid, () => {
      const error = this.attachFailures.shift();
      if (error) throw error;
      this.attachments.set(pod.uid, { pod, mode, netnsPresent: true });
      const warning = this.attachWarnings.get(pod.uid);
      return warning === undefined ? { uid: pod.uid } : { uid: pod.uid, warning };
    });
  }

  async detach(uid: string): Promise<{ warning?: string }> {
    this.calls.push({ op: 'detach', uid, at: performance.now() });
    return this.busy(uid, () => {
      const error = this.detachFailures.shift();
      if (error) throw error;
      this.attachments.delete(uid);
      return {};
    });
  }

  list(): Promise<{ uid: string; netnsPath: string; netnsPresent: boolean; mode?: string }[]> {
    this.calls.push({ op: 'list', at: performance.now() });
    return Promise.resolve(
      [...this.attachments.values()].map((a) => ({
        uid: a.pod.uid,
        netnsPath: a.pod.netnsPath,
        netnsPresent: a.netnsPresent,
        mode: a.mode,
      })),
    );
  }

  verify(uid: string): Promise<{ found: boolean; ok: boolean; problems: string[] }> {
    this.calls.push({ op: 'verify', uid, at: performance.now() });
    const found = this.attachments.has(uid);
    const ok = !this.broken.has(uid);
    const problems = this.problems.get(uid);
    if (problems) return Promise.resolve({ found, ok: problems.length === 0, problems });
    return Promise.resolve({ found, ok, problems: ok ? [] : ['a hook was removed'] });
  }

  private async busy<T>(uid: string, work: () => T): Promise<T> {
    const n = (this.inProgress.get(uid) ?? 0) + 1;
    this.inProgress.set(uid, n);
    this.maxConcurrentPerPod = Math.max(this.maxConcurrentPerPod, n);
    try {
      if (this.gate) await this.gate.wait();
      if (this.delayMs > 0) await new Promise((r) => setTimeout(r, this.delayMs));
      return work();
    } finally {
      this.inProgress.set(uid, this.inProgress.get(uid)! - 1);
    }
  }
}

/** A ZDS server without a socket: records what it was asked; answers each enroll at once with
 * `answer`, or (hold = true) only when `answerPending` is called. Closes the netns fds it gets. */
export class FakeZds implements ZdsPort {
  readonly enrolled: PodEnrollment[] = [];
  readonly remembered: PodEnrollment[] = [];
  readonly removed: string[] = [];
  /** Pods it would put in a snapshot. */
  readonly known = new Set<string>();
  answer: ZtunnelResult = { status: 'acked' };
  hold = false;
  private pending: { uid: string; resolve: (r: ZtunnelResult) => void }[] = [];

  async enroll(pod: PodEnrollment): Promise<ZtunnelResult> {
    this.take(pod);
    this.enrolled.push(pod);
    if (!this.hold) return this.answer;
    return new Promise((resolve) => this.pending.push({ uid: pod.uid, resolve }));
  }

  remember(pod: PodEnrollment): void {
    this.take(pod);
    this.remembered.push(pod);
  }

  remove(uid: string): Promise<void> {
    this.known.delete(uid);
    this.removed.push(uid);
    for (const p of this.pending.filter((w) => w.uid === uid))
      p.resolve({ status: 'unreachable', reason: 'pod removed' });
    this.pending = this.pending.filter((w) => w.uid !== uid);
    return Promise.resolve();
  }

  /** Answers the enrolls waiting (all, or those of one pod). */
  answerPending(result: ZtunnelResult = this.answer, uid?: string): number {
    const due = this.pending.filter((w) => uid === undefined || w.uid === uid);
    this.pending = this.pending.filter((w) => !due.includes(w));
    for (const w of due) w.resolve(result);
    return due.length;
  }

  get waiting(): number {
    return this.pending.length;
  }

  private take(pod: PodEnrollment): void {
    this.known.add(pod.uid);
    if (pod.netnsFd !== undefined) closeSync(pod.netnsFd);
  }
}

/** Pod uid → netns path (a file the test made: the reconciler opens it for ZDS). */
export class FakeNetns implements NetnsFinder {
  readonly paths = new Map<string, string>();
  /** Pods whose netns cannot be told (find throws this message). */
  readonly refused = new Map<string, string>();
  finds = 0;

  find(uid: string): Promise<string | undefined> {
    this.finds++;
    const refused = this.refused.get(uid);
    if (refused) return Promise.reject(new Error(refused));
    return Promise.resolve(this.paths.get(uid));
  }

  holds(path: string): Promise<boolean> {
    return Promise.resolve([...this.paths.values()].includes(path));
  }
}

/** Pod uid → cgroup directory (the reconciler checks it exists before reusing it). */
export class FakeCgroups implements CgroupFinder {
  readonly paths = new Map<string, string>();

  find(uid: string): string | undefined {
    return this.paths.get(uid);
  }
}

export class MemorySandboxStore implements SandboxStore {
  readonly records = new Map<string, string>();

  get(uid: string): string | undefined {
    return this.records.get(uid);
  }

  set(uid: string, containerId: string): void {
    this.records.set(uid, containerId);
  }

  delete(uid: string): void {
    this.records.delete(uid);
  }
}

/** Records every annotation write; the next `failures` writes throw. */
export class RecordingAnnotator implements Annotator {
  readonly writes: { pod: string; value: RedirectionAnnotation }[] = [];
  failures = 0;

  setRedirection(pod: Pod, value: RedirectionAnnotation): Promise<void> {
    if (this.failures > 0) {
      this.failures--;
      return Promise.reject(new Error('the API server refused the patch'));
    }
    this.writes.push({ pod: pod.metadata.name, value });
    return Promise.resolve();
  }

  values(name?: string): RedirectionAnnotation[] {
    return this.writes.filter((w) => name === undefined || w.pod === name).map((w) => w.value);
  }
}

/** A logger that keeps every line (level, fields, message). */
export class RecordingLogger implements Logger {
  readonly lines: { level: string; obj: Record<string, unknown>; msg: string }[] = [];
  debug(obj: object, msg: string): void {
    this.lines.push({ level: 'debug', obj: obj as Record<string, unknown>, msg });
  }
  info(obj: object, msg: string): void {
    this.lines.push({ level: 'info', obj: obj as Record<string, unknown>, msg });
  }
  warn(obj: object, msg: string): void {
    this.lines.push({ level: 'warn', obj: obj as Record<string, unknown>, msg });
  }
  error(obj: object, msg: string): void {
    this.lines.push({ level: 'error', obj: obj as Record<string, unknown>, msg });
  }
}
