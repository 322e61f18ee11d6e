// Enrollment: one record per pod, desired state (policy) against actual state (datapath attached,
// ztunnel's answer, annotation), reconciled one pod at a time and retried with backoff until they
// agree. Inputs: the pod source (state and changes), ztunnel's answers, and the datapath's own
// records (so a restarted agent adopts what it attached before instead of attaching twice).
import { existsSync, openSync, statSync } from 'node:fs';
import { type AttachMode, type AttachOptions, type NetnsChange, type PodAttachment } from '../../../bpf/src/index.js';
import type { Logger } from '../../../ztunnel-bridge/src/logger.js';
import type { PodEnrollment, ZtunnelResult } from '../../../ztunnel-bridge/src/zds-server.js';
import {
  podIPs,
  REDIRECTION_ANNOTATION,
  type ClusterState,
  type Namespace,
  type Pod,
  type SourceChange,
} from '../pods/pod.js';
import { excludedButSelected, selectPod, DEFAULT_POLICY, type SelectionPolicy } from '../pods/selection.js';
import { EVENT_REASONS, type PodEventSink } from '../pods/events.js';
import { captureOptions, type CaptureDefaults, type CaptureOptions } from '../pods/capture-options.js';
import type { SandboxStore } from './sandbox-records.js';

/** The `ambient.istio.io/redirection` annotation value; undefined removes it. */
export type RedirectionAnnotation = 'enabled' | 'pending' | undefined;

/** Writes the redirection annotation (the Kubernetes source does; the local source does not). */
export interface Annotator {
  setRedirection(pod: Pod, value: RedirectionAnnotation): Promise<void>;
}

/** Upstream's defaults: DNS capture on (Istio 1.25+); strict mode is this product's, off. */
export const DEFAULT_CAPTURE: CaptureDefaults = { strict: false, dnsCapture: true };

/** Pod events from the source by upstream's event type names (nodeagent_reconcile_events_total). */
const EVENT_TYPE = { added: 'add', updated: 'update', deleted: 'delete' } as const;

export type EnrollmentState = 'enabled' | 'pending' | 'failed' | 'not ambient';

export interface PodStatus {
  uid: string;
  name: string;
  namespace: string;
  state: EnrollmentState;
  /** Why the pod is or is not ambient, or what went wrong. */
  reason: string;
  attached: boolean;
  ztunnel: ZtunnelResult['status'] | 'not sent';
  netnsPath: string | undefined;
  since: Date;
  /** DNS capture: on, off, or waiting for the pod's cgroup. */
  dns: 'on' | 'off' | 'waiting for the pod’s cgroup';
  /** Interfaces (or addresses) of the pod's netns the last attach left out of capture (a tun, one
   * too many), each said; the others are captured. Absent: none. */
  uncaptured?: string;
}

interface Entry {
  uid: string;
  pod: Pod | undefined;
  netnsPath: string | undefined;
  attached: boolean;
  ztunnel: ZtunnelResult | undefined;
  /** The annotation value last written, and the pod object it was written over (a newer object
   * from the source replaces it; until then the patch may simply not have come back yet). */
  annotation: { value: RedirectionAnnotation; over: Pod } | undefined;
  error: string | undefined;
  since: Date;
  /** Reconcile runs for this pod one at a time; `again` asks for one more pass. */
  running: Promise<void> | undefined;
  again: boolean;
  /** The next pass moves the pod's hooks from tc to tcx (attach mode auto, once the node is idle). */
  moveToTcx: boolean;
  retry: NodeJS.Timeout | undefined;
  backoffMs: number;
  /** IPs from the CNI ADD, before the pod source reports them. */
  cniIps: string[] | undefined;
  /** CNI DEL tore the sandbox down: wait for a new one (CNI ADD, or new IPs from the source). */
  sandboxGone: boolean;
  /** netnsPath came from a CNI ADD and was not used yet. */
  netnsFromCni: boolean;
  /** CNI_CONTAINERID of the sandbox the last CNI ADD enrolled (also persisted, see SandboxStore). */
  sandboxId: string | undefined;
  /** When the pending enrollment started (performance.now()), until ztunnel acks it. */
  enrollStarted: number | undefined;
  /** The hooks on the pod's cgroup (the socket-option guard, DNS capture): on this cgroup, none
   * (no cgroup locator), or waiting for the pod to have a cgroup. */
  cgroup: { state: 'on'; path: string } | { state: 'off' } | { state: 'waiting' };
  /** DNS capture was asked for at the last attach. */
  dnsCapture: boolean;
  /** The watch on the netns's interfaces (interfaces option), while the pod is redirected. */
  interfaceWatch: { path: string; close(): void } | undefined;
  /** What the last attach ignored in the pod's annotations (malformed values). */
  annotationWarnings: string[];
  /** What the last attach left out of the pod's interfaces (its warning); '': nothing. */
  interfaceWarning: string;
  /** The pod was told (an Event) that its namespace is excluded although selected. */
  excludedWarned: boolean;
  /** Reconcile passes started so far (a CNI ADD waits for one that starts after it). */
  passes: number;
  /** CNI ADDs waiting for the pod to be redirected and acked, with the first pass that counts. */
  addWaiters: { fromPass: number; resolve: (v: AddVerdict) => void }[];
  /** Where the time of the CNI ADD in progress goes (ms by phase), while one is. */
  addPhases: PhaseClock | undefined;
}

/** A CNI ADD's answer: redirected and acked, or why not. */
export type AddVerdict = { ok: true } | { ok: false; reason: string };

/** Milliseconds spent per named phase, each from the previous mark. */
export class PhaseClock {
  private at = performance.now();
  readonly ms: Record<string, number> = {};

  mark(phase: string): void {
    const now = performance.now();
    this.ms[phase] = Math.round(((this.ms[phase] ?? 0) + now - this.at) * 100) / 100;
    this.at = now;
  }
}

/** How a pod's traffic is redirected in its netns: the BPF datapath, or (for the benchmark's
 * baseline) upstream's iptables rules. What must happen to a pod is decided here; how is theirs. */
export interface PodRedirector {
  /** Idempotent: updates an attached pod in place. */
  attach(pod: PodAttachment, options?: AttachOptions): Promise<unknown>;
  detach(uid: string): Promise<{ warning?: string }>;
  list(): Promise<{ uid: string; netnsPath: string; netnsPresent: boolean; mode?: string }[]>;
  verify(uid: string): Promise<{ found: boolean; ok: boolean; problems: string[] }>;
}

/** What the reconciler asks of the ZDS server (ZdsServer; a fake in the unit tests). */
export interface ZdsPort {
  /** Hands the pod to ztunnel; resolves with its answer. Takes ownership of netnsFd. */
  enroll(pod: PodEnrollment): Promise<ZtunnelResult>;
  /** Knows the pod (for snapshots) without sending anything. Takes ownership of netnsFd. */
  remember(pod: PodEnrollment): void;
  remove(uid: string): Promise<void>;
}

/** Where a pod's netns is (NetnsLocator; a fake in the unit tests). */
export interface NetnsFinder {
  /** The pod's netns path; undefined while none holds its IPs; throws when it cannot tell. */
  find(uid: string, ips: string[]): Promise<string | undefined>;
  /** Does the netns at `path` (still) hold all these IPs? */
  holds(path: string, ips: string[]): Promise<boolean>;
}

/** Tells when interfaces or addresses appear in a netns (watchNetns). */
export interface InterfaceWatcher {
  /** onChange's interfaces: an interface appeared or left (a pass at once); reason, when given:
   * the watch lost messages or failed (and was reopened, or is being retried): a pass looks all the
   * same. */
  watch(netnsPath: string, onChange: (change: NetnsChange) => void): Promise<{ close(): void }>;
}

/** Which cgroup is a pod's (CgroupLocator; a fake in the unit tests). */
export interface CgroupFinder {
  /** The pod's cgroup directory, or undefined while it has none of its own yet. */
  find(uid: string, netnsPath: string): string | undefined;
}

export interface ReconcilerOptions {
  datapath: PodRedirector;
  zds: ZdsPort;
  netns: NetnsFinder;
  /** Finds pods' cgroups for their cgroup hooks: DNS capture, the socket-option guard (without it,
   * neither). */
  cgroups?: CgroupFinder;
  /** Watches each redirected pod's netns: an interface or address that appears there gets a pass
   * (which captures it) at once; without it only the drift check finds them. */
  interfaces?: InterfaceWatcher;
  /** Persists which sandbox of each pod CNI ADD enrolled, across agent restarts. */
  sandboxes?: SandboxStore;
  log: Logger;
  annotator?: Annotator;
  /** Kubernetes Events on pods: enrollment failures, ignored annotations (never awaited). */
  events?: PodEventSink;
  policy?: SelectionPolicy;
  /** `auto` (tc at enrolment, tcx once idle) only where the kernel has tcx links: the agent gives
   * tc where the probe found none (chooseModes). */
  attachMode?: AttachMode;
  /** Node-wide capture settings that pod annotations refine. */
  capture?: CaptureDefaults;
  /** The node's netns, where pods' veth peers are (kubelet probes); undefined: not handled. */
  nodeNetns?: string;
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  /** An interface that appears in or leaves a pod's netns gets a pass at once (up to INTERFACE_URGENT_PASSES per
   * INTERFACE_URGENT_WINDOW_MS; beyond, as other changes). Other changes (addresses) wait this long (ms, default 50), so that a burst gets one pass; it doubles, up to
   * interfaceMaxDelayMs (default 2000), while changes keep coming, and is back to the start after
   * a quiet interfaceMaxDelayMs. */
  interfaceDebounceMs?: number;
  interfaceMaxDelayMs?: number;
}

/** The netns watch's log lines per pod at most this often (the others counted into the next). */
export const INTERFACE_LOG_INTERVAL_MS = 10_000;

/** A new interface can carry traffic as soon as it is up, and a departed one's index can come back
 * on a device without hooks while its captured_ifaces entry stands: their pass is not debounced,
 * but a pod that keeps changing interfaces gets no more than this many immediate passes per window
 * (the rest debounced like address changes), so it cannot keep the agent busy. */
export const INTERFACE_URGENT_PASSES = 10;
export const INTERFACE_URGENT_WINDOW_MS = 10_000;

/** How long no pod must have been enrolled before pods move from tc to tcx. */
export const UPGRADE_IDLE_MS = 1000;

export class Reconciler {
  private readonly entries = new Map<string, Entry>();
  private readonly upgrades = new Set<string>();
  private upgradeTimer: NodeJS.Timeout | undefined;
  private lastEnrollAt = 0;
  private tcxUnavailable = false;
  private namespaces = new Map<string, Namespace>();
  /** Excluded namespaces the selectors enable (labelled ambient), already warned about. */
  private readonly excludedLabelled = new Set<string>();
  private stopped = false;
  /** Failed reconcile passes since start (a metric). */
  reconcileErrors = 0;
  /** Attachments found broken behind the agent's back and repaired (a metric). */
  driftRepairs = 0;
  /** Pod events from the source, by type (a metric). */
  readonly podEvents = { add: 0, update: 0, delete: 0 };
  /** Called with the seconds from the start of enrolling a pod to ztunnel's ack. */
  onEnrolled: (seconds: number) => void = () => undefined;

  constructor(private readonly opts: ReconcilerOptions) {}

  /** Adopts, then reconciles every pod (see adopt and reconcileAll). */
  async start(state: ClusterState): Promise<void> {
    await this.adopt(state);
    await this.reconcileAll();
  }

  /** Adopts the datapath's existing attachments and takes the source's first state. Pods that are
   * attached and still ambient are made known to the ZDS server without sending anything, so the
   * first snapshot a (re)connecting ztunnel gets is complete: ztunnel drains every pod missing
   * from a snapshot. Start the ZDS server after this. */
  async adopt(state: ClusterState): Promise<void> {
    this.podEvents.add += state.pods.size; // the source's first list (upstream's informer adds)
    for (const attached of await this.opts.datapath.list()) {
      const e = this.entry(attached.uid);
      e.attached = true;
      e.netnsPath = attached.netnsPresent ? attached.netnsPath : undefined;
      if (this.opts.attachMode === 'auto' && attached.mode === 'tc') this.queueUpgrade(attached.uid);
    }
    this.setNamespaces(state);
    for (const pod of state.pods.values()) this.entry(pod.metadata.uid).pod = pod;
    for (const e of this.entries.values()) {
      if (!e.attached || !e.netnsPath || !e.pod || !this.desired(e)) continue;
      try {
        this.opts.zds.remember({ uid: e.uid, info: workloadInfo(e.pod), netnsFd: openSync(e.netnsPath, 'r') });
      } catch (err) {
        this.opts.log.warn({ uid: e.uid, error: (err as Error).message }, 'cannot reopen an adopted pod’s netns');
      }
    }
  }

  /** Reconciles every pod known; resolves when that pass is done. */
  async reconcileAll(): Promise<void> {
    await Promise.all([...this.entries.keys()].map((uid) => this.reconcile(uid)));
  }

  /** Stops retrying; attachments stay in place (a restarted agent adopts them). */
  stop(): void {
    this.stopped = true;
    clearTimeout(this.upgradeTimer);
    for (const e of this.entries.values()) {
      clearTimeout(e.retry);
      this.unwatchInterfaces(e);
    }
  }

  /** What the datapath is asked to attach for a pod (its capture options included). */
  private attachment(
    e: Entry,
    capture: CaptureOptions,
    netnsPath: string,
    ips: string[],
    podCgroup: string | undefined,
  ): PodAttachment {
    return {
      uid: e.uid,
      netnsPath,
      ips,
      bypassInbound: capture.bypassInbound,
      strict: capture.strict,
      rerouteInterfaces: capture.rerouteInterfaces,
      dnsCapture: capture.dnsCapture,
      ...(podCgroup ? { podCgroup } : {}),
      ...(this.opts.nodeNetns ? { hostNetns: this.opts.nodeNetns } : {}),
    };
  }

  /** Pods attached with tc on the enrolment fast path, moved to tcx one at a time once no pod has
   * been enrolled for UPGRADE_IDLE_MS, so the slow link creation never delays a pod start. */
  private queueUpgrade(uid: string): void {
    this.upgrades.add(uid);
    this.lastEnrollAt = performance.now();
    clearTimeout(this.upgradeTimer);
    this.upgradeTimer = setTimeout(() => void this.upgradeOne(), UPGRADE_IDLE_MS);
  }

  private async upgradeOne(): Promise<void> {
    const idleFor = performance.now() - this.lastEnrollAt;
    if (this.stopped || this.upgrades.size === 0) return;
    if (idleFor < UPGRADE_IDLE_MS) {
      this.upgradeTimer = setTimeout(() => void this.upgradeOne(), UPGRADE_IDLE_MS - idleFor);
      return;
    }
    const uid = this.upgrades.values().next().value as string;
    this.upgrades.delete(uid);
    const e = this.entries.get(uid);
    if (e && e.attached && !e.running && !this.tcxUnavailable) {
      // A pass like any other (one at a time per pod), whose attach asks for tcx.
      e.moveToTcx = true;
      await this.reconcile(uid);
    } else if (e?.running) {
      this.upgrades.add(uid); // in a reconcile pass: later
      this.upgradeTimer = setTimeout(() => void this.upgradeOne(), UPGRADE_IDLE_MS);
      return;
    }
    this.upgradeTimer = setTimeout(() => void this.upgradeOne(), 0);
  }

  /** Takes the source's namespaces; warns (once) about excluded namespaces the selectors enable. */
  private setNamespaces(state: ClusterState): void {
    this.namespaces = new Map(state.namespaces);
    const policy = this.policy;
    for (const name of [...this.excludedLabelled]) {
      if (!policy.enablementSelectors.matchesNamespace(this.namespaces.get(name)?.metadata.labels))
        this.excludedLabelled.delete(name);
    }
    for (const name of policy.excludedNamespaces) {
      const ns = this.namespaces.get(name);
      if (!ns || this.excludedLabelled.has(name) || !policy.enablementSelectors.matchesNamespace(ns.metadata.labels))
        continue;
      this.excludedLabelled.add(name);
      this.opts.log.warn(
        { namespace: name, labels: ns.metadata.labels ?? {} },
        'namespace is labelled for ambient but excluded (--exclude-namespaces): its pods are not enrolled',
      );
    }
  }

  applyChanges(changes: SourceChange[], state: ClusterState): void {
    this.setNamespaces(state);
    const touched = new Set<string>();
    for (const c of changes) {
      if (c.kind === 'pod') {
        this.podEvents[EVENT_TYPE[c.type]]++;
        const e = this.entry(c.pod.metadata.uid);
        if (e.sandboxGone && e.pod && podIPs(c.pod).join() !== podIPs(e.pod).join()) e.sandboxGone = false;
        const before = e.pod;
        e.pod = c.type === 'deleted' ? undefined : c.pod;
        // Our own annotation coming back changes nothing to reconcile (a pass would attach again).
        if (c.type === 'updated' && before && e.annotation && onlyAnnotationBecame(before, c.pod, e.annotation.value))
          continue;
        touched.add(c.pod.metadata.uid);
      } else {
        // A namespace label changes the fate of every pod in it.
        for (const e of this.entries.values())
          if (e.pod?.metadata.namespace === c.namespace.metadata.name) touched.add(e.uid);
      }
    }
    for (const uid of touched) void this.reconcile(uid);
  }

  /** CNI ADD: the runtime made the pod's sandbox. Resolves once the pod is redirected and ztunnel
   * acked it, or with the reason it is not (the runtime then fails the ADD and retries). It does
   * not wait for what follows in the same pass (the annotation) nor for passes that other changes
   * ask for meanwhile (the pod's own watch events): they do not make the pod more redirected.
   * `phases` collects where the time went. */
  async cniAdd(
    pod: Pod,
    netnsPath: string,
    ips: string[],
    containerId?: string,
    phases?: PhaseClock,
  ): Promise<AddVerdict> {
    const e = this.entry(pod.metadata.uid);
    if (containerId && e.sandboxId !== containerId) {
      e.sandboxId = containerId;
      try {
        this.opts.sandboxes?.set(e.uid, containerId);
      } catch (err) {
        this.opts.log.warn(
          { uid: e.uid, error: (err as Error).message },
          'cannot record the pod’s sandbox; a stale DEL after an agent restart is judged by its netns',
        );
      }
    }
    e.pod ??= pod;
    e.netnsPath = netnsPath;
    e.netnsFromCni = true;
    e.cniIps = ips;
    e.sandboxGone = false;
    e.addPhases = phases;
    const verdict = new Promise<AddVerdict>((resolve) => e.addWaiters.push({ fromPass: e.passes + 1, resolve }));
    const pass = this.reconcile(e.uid).then(() => addVerdict(e));
    try {
      return await Promise.race([verdict, pass]);
    } finally {
      if (e.addPhases === phases) e.addPhases = undefined;
    }
  }

  /** Answers the CNI ADDs waiting since this pass or earlier. */
  private answerAdds(e: Entry, verdict: AddVerdict): void {
    const due = e.addWaiters.filter((w) => w.fromPass <= e.passes);
    if (due.length === 0) return;
    e.addWaiters = e.addWaiters.filter((w) => w.fromPass > e.passes);
    for (const w of due) w.resolve(verdict);
  }

  /** CNI DEL: the sandbox is going away; unenrol until a new one appears. A DEL for another sandbox
   * than the enrolled one (runtimes retry DEL for earlier sandboxes of the same pod, with the same
   * K8S_POD_UID) changes nothing. Returns whether the DEL was acted on. */
  async cniDel(uid: string, containerId?: string, netnsPath?: string): Promise<boolean> {
    const e = this.entries.get(uid);
    if (!e) return false;
    const stale = this.staleDel(e, containerId, netnsPath);
    if (stale) {
      this.opts.log.info(
        {
          uid,
          pod: e.pod ? `${e.pod.metadata.namespace}/${e.pod.metadata.name}` : undefined,
          containerId,
          enrolled: e.sandboxId ?? e.netnsPath,
        },
        `CNI DEL for another sandbox of the pod ignored: ${stale}`,
      );
      return false;
    }
    e.sandboxGone = true;
    e.cniIps = undefined;
    await this.reconcile(uid);
    if (!e.attached) this.forgetSandbox(e);
    return true;
  }

  /** Why a DEL is for another sandbox than the enrolled one, or undefined if it may be for it. The
   * container ID recorded at ADD decides (read back after an agent restart). Without a record (the
   * pod was enrolled while running, not through ADD), a DEL that names another netns, or none (a
   * retried DEL for a sandbox whose netns is gone), while the enrolled netns still exists, is
   * stale too: the pod stays captured until its own sandbox's DEL or its deletion. */
  private staleDel(e: Entry, containerId: string | undefined, netnsPath: string | undefined): string | undefined {
    if (!e.attached && !e.ztunnel) return undefined;
    e.sandboxId ??= this.opts.sandboxes?.get(e.uid);
    if (e.sandboxId && containerId)
      return containerId === e.sandboxId ? undefined : `the enrolled sandbox is ${e.sandboxId}`;
    if (!e.netnsPath) return undefined;
    const enrolled = inodeOf(e.netnsPath);
    if (enrolled === undefined) return undefined;
    if (!netnsPath) return `it names no netns while the enrolled ${e.netnsPath} still exists`;
    return inodeOf(netnsPath) === enrolled ? undefined : `its netns ${netnsPath} is not the enrolled ${e.netnsPath}`;
  }

  private forgetSandbox(e: Entry): void {
    if (e.sandboxId === undefined && !this.opts.sandboxes) return;
    e.sandboxId = undefined;
    try {
      this.opts.sandboxes?.delete(e.uid);
    } catch (err) {
      this.opts.log.warn({ uid: e.uid, error: (err as Error).message }, 'cannot remove the pod’s sandbox record');
    }
  }

  /** The uid of a pod known by namespace and name (runtimes that pass no K8S_POD_UID). */
  uidOf(namespace: string, name: string): string | undefined {
    for (const e of this.entries.values())
      if (e.pod?.metadata.namespace === namespace && e.pod.metadata.name === name) return e.uid;
    return undefined;
  }

  /** Is the pod redirected and acked by ztunnel? (CNI CHECK) */
  isEnabled(uid: string): boolean {
    const e = this.entries.get(uid);
    return !!e && stateOf(e) === 'enabled';
  }

  /** Drift repair: verifies every redirected pod in its netns (hooks attached and ours, rules,
   * routes, sysctls, IPs) and repairs what was changed behind the agent's back. */
  async verifyAll(): Promise<void> {
    for (const e of [...this.entries.values()]) {
      if (!e.attached || e.running || this.stopped) continue;
      const r = await this.opts.datapath.verify(e.uid);
      if (!r.found || r.ok) continue;
      // What the last attach said it cannot capture (a tun device, an interface past the limit)
      // stays a problem for verify; attaching again would change nothing but the repair count.
      if (r.problems.length > 0 && r.problems.every((p) => e.interfaceWarning.includes(p))) continue;
      this.driftRepairs++;
      this.opts.log.warn(
        {
          uid: e.uid,
          pod: e.pod ? `${e.pod.metadata.namespace}/${e.pod.metadata.name}` : undefined,
          problems: r.problems,
        },
        'redirection changed behind our back; repairing',
      );
      await this.reconcile(e.uid);
    }
  }

  /** ztunnel's answer about a pod, also those to snapshots after ztunnel (re)connects. It only
   * updates the record and the annotation: a full pass would hand the pod over again. */
  ztunnelStatus(uid: string, result: ZtunnelResult): void {
    const e = this.entries.get(uid);
    if (!e || !e.attached) return;
    e.ztunnel = result;
    if (result.status === 'acked') this.enrolled(e);
    if (e.running) return; // the pass in progress annotates with its own answer
    this.annotate(e, result.status === 'acked' ? 'enabled' : 'pending').catch((err: Error) => {
      this.opts.log.warn({ uid, error: err.message }, 'cannot annotate pod');
      void this.reconcile(uid);
    });
  }

  status(): PodStatus[] {
    return [...this.entries.values()]
      .filter((e) => e.pod || e.attached)
      .map((e) => {
        const selection = e.pod
          ? selectPod(e.pod, this.namespaces.get(e.pod.metadata.namespace), this.policy)
          : undefined;
        const state = stateOf(e);
        const reason = [
          e.error ??
            (e.attached && e.ztunnel && e.ztunnel.status !== 'acked'
              ? describe(e.ztunnel)
              : (selection?.reason ?? 'pod is gone')),
          ...(e.attached ? e.annotationWarnings : []),
        ].join('; ');
        return {
          uid: e.uid,
          name: e.pod?.metadata.name ?? '',
          namespace: e.pod?.metadata.namespace ?? '',
          state,
          reason,
          attached: e.attached,
          ztunnel: e.ztunnel?.status ?? 'not sent',
          netnsPath: e.netnsPath,
          since: e.since,
          dns:
            !e.dnsCapture || e.cgroup.state === 'off'
              ? 'off'
              : e.cgroup.state === 'waiting'
                ? 'waiting for the pod’s cgroup'
                : 'on',
          ...(e.interfaceWarning ? { uncaptured: e.interfaceWarning } : {}),
        };
      });
  }

  /** Resolves once the pod's record agrees with its desired state (or the attempt failed). */
  reconcile(uid: string): Promise<void> {
    const e = this.entries.get(uid);
    if (!e || this.stopped) return Promise.resolve();
    if (e.running) {
      e.again = true;
      return e.running;
    }
    e.running = (async () => {
      do {
        e.again = false;
        await this.reconcileOnce(e);
      } while (e.again && !this.stopped);
      e.running = undefined;
    })();
    return e.running;
  }

  private get policy(): SelectionPolicy {
    return this.opts.policy ?? DEFAULT_POLICY;
  }

  private entry(uid: string): Entry {
    let e = this.entries.get(uid);
    if (!e) {
      e = {
        uid,
        pod: undefined,
        netnsPath: undefined,
        attached: false,
        ztunnel: undefined,
        annotation: undefined,
        error: undefined,
        since: new Date(),
        running: undefined,
        again: false,
        moveToTcx: false,
        retry: undefined,
        backoffMs: this.opts.initialBackoffMs ?? 200,
        cniIps: undefined,
        sandboxGone: false,
        netnsFromCni: false,
        sandboxId: undefined,
        enrollStarted: undefined,
        cgroup: { state: 'off' },
        dnsCapture: false,
        annotationWarnings: [],
        interfaceWarning: '',
        excludedWarned: false,
        passes: 0,
        addWaiters: [],
        addPhases: undefined,
        interfaceWatch: undefined,
      };
      this.entries.set(uid, e);
    }
    return e;
  }

  /** The pod's cgroup for its cgroup hooks (the last one while it exists), or undefined for now. */
  private podCgroup(e: Entry, netnsPath: string): string | undefined {
    if (!this.opts.cgroups) return undefined;
    if (e.cgroup.state === 'on' && existsSync(e.cgroup.path)) return e.cgroup.path;
    try {
      return this.opts.cgroups.find(e.uid, netnsPath);
    } catch (err) {
      this.opts.log.warn(
        { uid: e.uid, error: (err as Error).message },
        'cannot look for the pod’s cgroup; its cgroup hooks (socket-option guard, DNS capture) wait',
      );
      return undefined;
    }
  }

  private ipsOf(e: Entry): string[] {
    const fromSource = e.pod ? podIPs(e.pod) : [];
    return fromSource.length ? fromSource : (e.cniIps ?? []);
  }

  private desired(e: Entry): boolean {
    const pod = e.pod;
    if (
      !pod ||
      e.sandboxGone ||
      pod.status?.phase === 'Succeeded' ||
      pod.status?.phase === 'Failed' ||
      this.ipsOf(e).length === 0
    )
      return false;
    return selectPod(pod, this.namespaces.get(pod.metadata.namespace), this.policy).ambient;
  }

  private async reconcileOnce(e: Entry): Promise<void> {
    const log = { uid: e.uid, pod: e.pod ? `${e.pod.metadata.namespace}/${e.pod.metadata.name}` : undefined };
    clearTimeout(e.retry);
    e.passes++;
    e.addPhases?.mark('queued');
    const wanted = this.desired(e);
    // Asked of this pass only, whatever becomes of it.
    const moveToTcx = e.moveToTcx;
    e.moveToTcx = false;
    try {
      if (wanted) await this.enroll(e, moveToTcx);
      else {
        this.warnExcluded(e);
        await this.unenroll(e);
      }
      if (e.error) this.opts.log.info(log, 'pod reconciled after earlier failures');
      e.error = undefined;
      if (e.attached && e.cgroup.state === 'waiting' && !this.stopped) {
        // Redirected, but the cgroup hooks (the socket-option guard, DNS capture) need the pod's
        // cgroup, which appears with its processes.
        if (e.backoffMs === (this.opts.initialBackoffMs ?? 200))
          this.opts.log.info(log, 'the pod’s cgroup hooks (socket-option guard, DNS capture) wait for its cgroup');
        e.retry = setTimeout(() => void this.reconcile(e.uid), e.backoffMs);
        e.backoffMs = Math.min(e.backoffMs * 2, this.opts.maxBackoffMs ?? 30_000);
      } else {
        e.backoffMs = this.opts.initialBackoffMs ?? 200;
      }
    } catch (err) {
      const message = (err as Error).message;
      this.reconcileErrors++;
      if (e.error !== message)
        this.opts.log.warn({ ...log, error: message, retryMs: e.backoffMs }, 'cannot reconcile pod; will retry');
      // Every failed pass: the recorder counts repeats into one Event.
      if (e.pod)
        this.opts.events?.podEvent(
          e.pod,
          'Warning',
          wanted ? EVENT_REASONS.enrollmentFailed : EVENT_REASONS.unenrollmentFailed,
          `${wanted ? 'cannot enrol the pod in ambient' : 'cannot remove the pod’s ambient redirection'} (retrying): ${message}`,
        );
      e.error = message;
      e.since = new Date();
      if (!this.stopped) {
        e.retry = setTimeout(() => void this.reconcile(e.uid), e.backoffMs);
        e.backoffMs = Math.min(e.backoffMs * 2, this.opts.maxBackoffMs ?? 30_000);
      }
    }
    // A failed pass answers only if no other pass follows (it may still succeed).
    if (!e.again) this.answerAdds(e, addVerdict(e));
    if (!e.pod && !e.attached && !e.error) {
      this.opts.events?.forgetPod(e.uid);
      this.forgetSandbox(e);
      this.entries.delete(e.uid);
    }
  }

  /** `tcx`: move an attached pod's hooks from tc to tcx (its netns unchanged). */
  private async enroll(e: Entry, tcx = false): Promise<void> {
    const pod = e.pod!;
    const ips = this.ipsOf(e);
    if (!e.attached || e.ztunnel?.status !== 'acked') e.enrollStarted ??= performance.now();
    // The runtime named the netns (CNI ADD): the attach checks the IPs are there. Otherwise the
    // netns last used must still hold them, or one that does is looked for.
    const trusted = e.netnsFromCni && e.netnsPath;
    e.netnsFromCni = false;
    // find() goes by the pod's identity (its kubelet cgroup), not by who holds its IPs, and throws
    // with the reason when it cannot tell for sure (an error for this pod, retried with backoff).
    const netnsPath =
      trusted || (e.netnsPath && (await this.opts.netns.holds(e.netnsPath, ips)))
        ? e.netnsPath
        : await this.opts.netns.find(e.uid, ips);
    if (!netnsPath) throw new Error(`no network namespace holds the pod IPs ${ips.join(', ')} (not started yet?)`);
    e.addPhases?.mark('netns');
    const moved = netnsPath !== e.netnsPath;
    const capture = captureOptions(pod, this.opts.capture ?? DEFAULT_CAPTURE);
    if (capture.warnings.join('\n') !== e.annotationWarnings.join('\n') && capture.warnings.length > 0) {
      this.opts.log.warn(
        { uid: e.uid, pod: `${pod.metadata.namespace}/${pod.metadata.name}`, warnings: capture.warnings },
        'pod annotations ignored',
      );
      for (const w of capture.warnings) this.opts.events?.podEvent(pod, 'Warning', EVENT_REASONS.annotationInvalid, w);
    }
    e.annotationWarnings = capture.warnings;
    const podCgroup = this.podCgroup(e, netnsPath);
    e.addPhases?.mark('cgroup');
    // With `auto`, a new pod gets the tc hooks (well under a millisecond) and moves to tcx once the
    // node is idle (a tcx link waits for RCU grace periods under rtnl_lock: tens of ms per pod).
    const fastPath = this.opts.attachMode === 'auto' && (!e.attached || moved) && !this.tcxUnavailable;
    await this.watchInterfaces(e, netnsPath);
    // Idempotent: also repairs rules or hooks removed behind our back, and updates IPs and the
    // pod's capture options in place.
    const moveToTcx = tcx && e.attached && !moved;
    const mode = moveToTcx ? 'tcx' : fastPath ? 'tc' : this.opts.attachMode;
    let attached: unknown;
    try {
      attached = await this.opts.datapath.attach(
        this.attachment(e, capture, netnsPath, ips, podCgroup),
        mode ? { mode } : {},
      );
    } catch (err) {
      if (!moveToTcx) throw err;
      // A failed update leaves the previous attachment in place (the pod stays redirected with
      // its tc hooks); one more pass, in the configured mode, retries whatever else failed.
      if ((err as { code?: string }).code === 'EKERNEL') this.tcxUnavailable = true;
      this.opts.log.warn({ uid: e.uid, error: (err as Error).message }, 'cannot move the pod to tcx; it stays on tc');
      e.again = true;
      return;
    }
    if (moveToTcx) this.opts.log.debug({ uid: e.uid }, 'moved to tcx');
    const warning = (attached as { warning?: unknown } | undefined)?.warning;
    const interfaceWarning = typeof warning === 'string' ? warning : '';
    // Said when it changes, not on every pass: the interfaces it names stay until the pod drops them.
    if (interfaceWarning && interfaceWarning !== e.interfaceWarning) {
      this.opts.log.warn(
        { uid: e.uid, netns: netnsPath, uncaptured: interfaceWarning },
        'some of the pod’s interfaces cannot be captured, or carry another pod’s address; the others are captured',
      );
    }
    e.interfaceWarning = interfaceWarning;
    e.addPhases?.mark('attach');
    if (fastPath) this.queueUpgrade(e.uid);
    e.cgroup = podCgroup
      ? { state: 'on', path: podCgroup }
      : this.opts.cgroups
        ? { state: 'waiting' }
        : { state: 'off' };
    e.dnsCapture = capture.dnsCapture;
    if (!e.attached || moved) {
      e.since = new Date();
      this.opts.log.info(
        { uid: e.uid, pod: `${pod.metadata.namespace}/${pod.metadata.name}`, netns: netnsPath },
        'pod redirected',
      );
    }
    e.attached = true;
    e.netnsPath = netnsPath;
    if (!e.ztunnel || e.ztunnel.status !== 'acked' || moved) {
      e.ztunnel = await this.opts.zds.enroll({
        uid: e.uid,
        info: workloadInfo(pod),
        netnsFd: openSync(netnsPath, 'r'),
      });
      if (e.ztunnel.status === 'acked') this.enrolled(e);
      e.addPhases?.mark('ztunnel');
    }
    // Redirected and acked: a CNI ADD waiting for this pass answers now, before the annotation.
    if (e.ztunnel.status === 'acked') this.answerAdds(e, { ok: true });
    await this.annotate(e, e.ztunnel.status === 'acked' ? 'enabled' : 'pending');
    // ztunnel retries a nacked pod itself; ask again later too, in case it lost it.
    if (e.ztunnel.status === 'nacked') throw new Error(`ztunnel refused the pod: ${e.ztunnel.error}`);
  }

  /** A pod the selectors pick in an excluded namespace: one Event saying so (and the status
   * reason); the namespace itself gets a log warning (setNamespaces). */
  private warnExcluded(e: Entry): void {
    const pod = e.pod;
    const excluded = !!pod && excludedButSelected(pod, this.namespaces.get(pod.metadata.namespace), this.policy);
    if (excluded && !e.excludedWarned) {
      this.opts.events?.podEvent(
        pod,
        'Warning',
        EVENT_REASONS.namespaceExcluded,
        `not enrolled in ambient: namespace ${pod.metadata.namespace} is excluded (--exclude-namespaces), although the enablement selectors pick the pod`,
      );
    }
    e.excludedWarned = excluded;
  }

  /** ztunnel acked: report how long it took since the enrollment started (also when the ack came
   * with a later snapshot because ztunnel was away). */
  private enrolled(e: Entry): void {
    if (e.enrollStarted === undefined) return;
    this.onEnrolled((performance.now() - e.enrollStarted) / 1000);
    e.enrollStarted = undefined;
  }

  /** Watches the pod netns for interfaces and addresses that appear: each gets a pass, which
   * captures it. Opened before the attach looks at the netns, so that nothing appears unseen in
   * between. Without a watch (it could not be opened) the drift check finds them. */
  private async watchInterfaces(e: Entry, netnsPath: string): Promise<void> {
    const watcher = this.opts.interfaces;
    if (!watcher || e.interfaceWatch?.path === netnsPath) return;
    this.unwatchInterfaces(e);
    try {
      const first = this.opts.interfaceDebounceMs ?? 50;
      const max = this.opts.interfaceMaxDelayMs ?? 2000;
      let delay = first;
      let timer: NodeJS.Timeout | undefined;
      let lastEvent = -Infinity;
      let loggedAt = -Infinity;
      let unlogged = 0;
      let reasons: string[] = [];
      let urgent: number[] = [];
      // One pass per burst, later under a storm (a pod churning its links must not keep the agent
      // busy), and a log line per pod at most every INTERFACE_LOG_INTERVAL_MS with what it left out.
      const pass = () => {
        timer = undefined;
        if (this.stopped) return;
        const t = performance.now();
        if (t - loggedAt >= INTERFACE_LOG_INTERVAL_MS) {
          const fields = { uid: e.uid, netns: netnsPath, changes: unlogged, ...(reasons.length ? { reasons } : {}) };
          if (reasons.length)
            this.opts.log.warn(fields, 'the watch on the pod’s interfaces lost track; looking at them again');
          else this.opts.log.info(fields, 'the pod’s interfaces or addresses changed; capturing them');
          loggedAt = t;
          unlogged = 0;
          reasons = [];
        }
        void this.reconcile(e.uid);
      };
      const changed = ({ interfaces, reason }: NetnsChange) => {
        const now = performance.now();
        if (reason && reasons.length < 4) reasons.push(reason);
        unlogged++;
        urgent = urgent.filter((at) => now - at < INTERFACE_URGENT_WINDOW_MS);
        if (interfaces && urgent.length < INTERFACE_URGENT_PASSES) {
          urgent.push(now);
          clearTimeout(timer);
          lastEvent = now;
          return pass();
        }
        if (now - lastEvent > max) delay = first;
        else if (!timer) delay = Math.min(delay * 2, max);
        lastEvent = now;
        if (timer) return;
        timer = setTimeout(pass, delay);
      };
      const w = await watcher.watch(netnsPath, changed);
      const close = () => {
        clearTimeout(timer);
        timer = undefined;
        w.close();
      };
      if (this.stopped) close();
      else e.interfaceWatch = { path: netnsPath, close };
    } catch (err) {
      this.opts.log.warn(
        { uid: e.uid, error: (err as Error).message },
        'cannot watch the pod’s interfaces; the drift check captures new ones',
      );
    }
  }

  private unwatchInterfaces(e: Entry): void {
    e.interfaceWatch?.close();
    e.interfaceWatch = undefined;
  }

  private async unenroll(e: Entry): Promise<void> {
    this.unwatchInterfaces(e);
    if (e.attached || e.ztunnel) {
      await this.opts.zds.remove(e.uid);
      const r = await this.opts.datapath.detach(e.uid);
      if (r.warning) this.opts.log.warn({ uid: e.uid, warning: r.warning }, 'detached with a warning');
      this.opts.log.info(
        { uid: e.uid, pod: e.pod ? `${e.pod.metadata.namespace}/${e.pod.metadata.name}` : undefined },
        'pod no longer redirected',
      );
      e.attached = false;
      e.ztunnel = undefined;
      e.enrollStarted = undefined;
      e.cgroup = { state: 'off' };
      e.since = new Date();
    }
    if (e.pod) await this.annotate(e, undefined);
  }

  /** Makes the pod's annotation `value`. Judged by the pod as the source shows it, not by what this
   * process remembers: an agent killed between detaching and unannotating, then restarted, must
   * still remove the annotation. */
  private async annotate(e: Entry, value: RedirectionAnnotation): Promise<void> {
    const pod = e.pod;
    if (!this.opts.annotator || !pod) return;
    if ((pod.metadata.annotations?.[REDIRECTION_ANNOTATION] ?? undefined) === value) return;
    if (e.annotation && e.annotation.value === value && e.annotation.over === pod) return; // written; not back yet
    await this.opts.annotator.setRedirection(pod, value);
    e.annotation = { value, over: pod };
  }
}

function inodeOf(path: string): number | undefined {
  try {
    return statSync(path).ino;
  } catch {
    return undefined;
  }
}

/** Is `after` the pod `before` with only the redirection annotation changed, to `value`? */
function onlyAnnotationBecame(before: Pod, after: Pod, value: RedirectionAnnotation): boolean {
  if (after.metadata.annotations?.[REDIRECTION_ANNOTATION] !== value) return false;
  const rest = (p: Pod) => {
    const annotations = { ...p.metadata.annotations };
    delete annotations[REDIRECTION_ANNOTATION];
    return JSON.stringify({ ...p, metadata: { ...p.metadata, resourceVersion: undefined, annotations } });
  };
  return rest(before) === rest(after);
}

function addVerdict(e: Entry): AddVerdict {
  if (e.error) return { ok: false, reason: e.error };
  if (!e.attached) return { ok: false, reason: 'the pod was not redirected' };
  if (e.ztunnel?.status !== 'acked')
    return { ok: false, reason: e.ztunnel ? describe(e.ztunnel) : 'ztunnel not asked' };
  return { ok: true };
}

function stateOf(e: Entry): EnrollmentState {
  return e.error ? 'failed' : !e.attached ? 'not ambient' : e.ztunnel?.status === 'acked' ? 'enabled' : 'pending';
}

function workloadInfo(pod: Pod): { name: string; namespace: string; serviceAccount: string } {
  const serviceAccount = (pod.spec as { serviceAccountName?: string } | undefined)?.serviceAccountName ?? 'default';
  return { name: pod.metadata.name, namespace: pod.metadata.namespace, serviceAccount };
}

function describe(r: ZtunnelResult): string {
  return r.status === 'nacked'
    ? `ztunnel refused: ${r.error}`
    : r.status === 'unreachable'
      ? `ztunnel unreachable: ${r.reason}`
      : 'acked';
}
