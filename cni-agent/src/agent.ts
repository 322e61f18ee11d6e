// The node agent: wires the pod source, the reconciler, the datapath and the ZDS server together,
// and exposes health and metrics. Stopping it leaves every pod redirected (as upstream's agent
// does during an upgrade): the next agent adopts the attachments; unless its DaemonSet is being
// deleted (shutdown()), then it takes ambient-bpf off the node.
import { join } from 'node:path';
import {
  cgroup2Mount,
  cgroupDirectory,
  cgroupPathOfPid,
  chooseModes,
  Datapath,
  featureLabel,
  forceFeatures,
  KERNEL_FEATURES,
  probeKernel,
  type DatapathModes,
  type KernelFeatures,
  type KernelProbe,
  type Steering,
  type AttachMode,
  type DatapathCounters,
  type StrictAllowEntry,
  type ZtunnelExemption,
  watchNetns,
} from '../../bpf/src/index.js';
import { reserveFileDescriptors, type PeerCredentials } from '../../bpf/src/node-netns.js';
import type { Logger } from '../../ztunnel-bridge/src/logger.js';
import { ZdsServer } from '../../ztunnel-bridge/src/zds-server.js';
import { CgroupLocator } from './enrollment/cgroup-locator.js';
import { NetnsLocator } from './enrollment/netns-locator.js';
import { SandboxRecords } from './enrollment/sandbox-records.js';
import { DEFAULT_CAPTURE, Reconciler, type Annotator, type PodStatus } from './enrollment/reconciler.js';
import type { CaptureDefaults } from './pods/capture-options.js';
import type { PodEventSink } from './pods/events.js';
import { KubeClient, loadKubeConnection, type KubeConnection } from './pods/kube-client.js';
import { KubePodSource } from './pods/kube-source.js';
import { LocalPodSource } from './pods/local-source.js';
import type { ClusterState, SourceChange } from './pods/pod.js';
import { DEFAULT_POLICY, type SelectionPolicy } from './pods/selection.js';
import { CniHandler } from './cni/handler.js';
import { writeCniPolicy } from './cni/policy-file.js';
import { serveRelay } from './cni/relay.js';
import { CniInstaller } from './installer/installer.js';
import { whyLeavingNode, type Leaving } from './installer/daemonset-scope.js';
import { removeFromNode } from './installer/removal.js';
import { serveOps } from './ops/http.js';
import { Counter, Histogram, samples } from './ops/metrics.js';
import { kernelStatus, serveStatus, type StatusReport } from './ops/status-api.js';

/** Where pods come from: a local file, or the Kubernetes API (a kubeconfig file, a connection, or
 * the in-cluster service account when undefined). */
export type PodSourceOption = { localPods: string } | { kubeconfig: string | KubeConnection | undefined };

interface PodSource {
  start(): Promise<ClusterState>;
  stop(): void;
  readonly current: ClusterState;
}

export interface AgentOptions {
  nodeName: string;
  source: PodSourceOption;
  ztunnelSocket: string;
  /** Where the CNI plugin reaches the agent (the conflist entry's agent_socket). */
  pluginSocket: string;
  /** What the plugin decides from while the agent is unreachable (the entry's policy_file): on a
   * real node a path that survives a reboot. */
  cniPolicyFile: string;
  /** The agent's own DaemonSet (Kubernetes source): shutdown() while it is gone, being deleted or
   * no longer selecting this node takes ambient-bpf off the node (removeFromNode; running pods stay redirected and annotated with
   * keepPodRedirection); otherwise (an upgrade, a restart) everything stays. */
  daemonSet?: { namespace: string; name: string; keepPodRedirection: boolean } | undefined;
  /** Which pods are ambient: enablement selectors, excluded namespaces, the system namespace
   * (where ztunnel and the agent run); unset parts are upstream's defaults (DEFAULT_POLICY). */
  selection?:
    | Partial<Pick<SelectionPolicy, 'enablementSelectors' | 'excludedNamespaces' | 'systemNamespace' | 'unseenPods'>>
    | undefined;
  /** Repeats of a pod's Kubernetes Event are patched at most this often (default 60 s). */
  eventIntervalMs?: number | undefined;
  bpffs: string;
  hostRoot: string;
  /** auto: tcx where the kernel has tcx links (probed), else tc. */
  attachMode: AttachMode;
  /** How SYNs reach ztunnel's listeners (default: what the probed kernel allows, chooseModes()). */
  steering?: Steering | undefined;
  /** Kernel features taken as given instead of probed (tests: what a kernel without them gets). */
  kernelFeatures?: Partial<KernelFeatures> | undefined;
  /** Which 0x539-marked traffic skips redirection (default: only ztunnel's own sockets). */
  ztunnelExemption?: ZtunnelExemption | undefined;
  /** Node-wide capture defaults (strict mode, DNS capture) that pod annotations refine. */
  capture?: CaptureDefaults | undefined;
  /** What strict mode lets out besides TCP and DNS. */
  strictAllow?: StrictAllowEntry[] | undefined;
  /** The node's netns, where pods' veth peers are: kubelet probes are handled there (default: the
   * agent's own, as in a hostNetwork pod). */
  nodeNetns?: string | undefined;
  /** Install the CNI plugin (binary + conflist entry) once the agent is up, and keep it there. */
  installCni?: { binDir: string; confDir: string; binarySource: string; confFile?: string | undefined } | undefined;
  /** The node's directories of pod network namespaces: where CNI_NETNS may point, and named
   * namespaces are scanned (default: /var/run/netns). */
  netnsDirs?: readonly string[] | undefined;
  /** The status API's Unix socket (`ambient-bpf status`). */
  statusSocket?: string | undefined;
  /** How long a CNI ADD for a pod the watch has not brought yet waits for the API's answer about
   * it (Kubernetes source; default 2 s): past that the ADD fails closed if the pod may be ambient. */
  podLookupTimeoutMs?: number | undefined;
  /** How often every redirected pod is verified and repaired (ms); 0 turns it off. */
  verifyIntervalMs?: number | undefined;
  healthAddr?: string | undefined;
  metricsAddr?: string | undefined;
  log: Logger;
}

const GC_INTERVAL_MS = 60_000;
/** The agent's own netns: the node's, in a hostNetwork pod. */
export const DEFAULT_NODE_NETNS = '/proc/self/ns/net';
export const DEFAULT_VERIFY_INTERVAL_MS = 30_000;
export const DEFAULT_POD_LOOKUP_TIMEOUT_MS = 2_000;

export const AGENT_FD_TABLE = 4096;

export class Agent {
  private datapath: Datapath | undefined;
  private zds: ZdsServer | undefined;
  private source: PodSource | undefined;
  private kube: KubePodSource | undefined;
  private reconciler: Reconciler | undefined;
  private readonly servers: { close(): void }[] = [];
  private gcTimer: NodeJS.Timeout | undefined;
  private verifyTimer: NodeJS.Timeout | undefined;
  private installer: CniInstaller | undefined;
  private synced = false;
  private readonly enrollSeconds = new Histogram(
    'ambient_bpf_enroll_duration_seconds',
    'From the start of enrolling a pod to ztunnel’s ack.',
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
  );
  private readonly cniRequests = new Counter(
    'ambient_bpf_cni_requests_total',
    'CNI requests relayed by the plugin, by command and result (ok or the CNI error code).',
  );

  private kernel: KernelProbe | undefined;
  private modes: DatapathModes | undefined;
  private readonly policy: SelectionPolicy;

  constructor(private readonly opts: AgentOptions) {
    const s = opts.selection ?? {};
    const systemNamespace = s.systemNamespace ?? DEFAULT_POLICY.systemNamespace;
    // The agent runs where Istio's system components do (as istio-cni does).
    this.policy = { ...DEFAULT_POLICY, ...s, systemNamespace, agentNamespace: systemNamespace };
  }

  /** The kernel's features (probed at start) and the modes chosen from them. */
  get datapathModes(): { kernel: KernelProbe; modes: DatapathModes } | undefined {
    return this.kernel && this.modes ? { kernel: this.kernel, modes: this.modes } : undefined;
  }

  async start(): Promise<void> {
    const { log } = this.opts;
    // A burst of CNI ADDs holds a relay connection and a netns fd per pod at once.
    reserveFileDescriptors(AGENT_FD_TABLE);
    this.zds = new ZdsServer({
      socketPath: this.opts.ztunnelSocket,
      log,
      onStatus: (uid, r) => this.reconciler?.ztunnelStatus(uid, r),
      onZtunnelHello: (peer) => this.trustZtunnel(peer),
    });
    // The socket first (served only once the pods are known, below): ztunnel retries with a
    // doubling backoff while no agent listens, so during an upgrade each ms the socket is missing
    // can cost two before ztunnel is back.
    this.zds.listen();
    // What the kernel can do decides the modes, not its version string (backports).
    const kernel = forceFeatures(await probeKernel(), this.opts.kernelFeatures ?? {});
    const modes = chooseModes(kernel.features, { attachMode: this.opts.attachMode, steering: this.opts.steering });
    this.kernel = kernel;
    this.modes = modes;
    log.info(
      { features: kernel.features, forced: kernel.forced, probeMs: Math.round(kernel.elapsedMs * 10) / 10 },
      'kernel features probed',
    );
    log.info(
      { hooks: modes.hooks, attachMode: modes.attachMode, why: modes.why.hooks },
      `pods get ${modes.hooks} hooks`,
    );
    log.info(
      { steering: modes.steering, why: modes.why.steering },
      modes.steering === 'sk-lookup'
        ? 'SYNs reach ztunnel through sk_lookup programs'
        : 'SYNs reach ztunnel through bpf_sk_assign',
    );
    if (!kernel.features.tcNetnsCookie)
      log.warn(
        { detail: kernel.detail.tcNetnsCookie },
        'tc programs cannot read the netns cookie: a pod holding another pod’s address on one of its interfaces gets that pod’s options for it (each said at attach)',
      );
    this.datapath = await Datapath.open({ bpffsRoot: this.opts.bpffs, tcNetnsCookie: kernel.features.tcNetnsCookie });
    await this.datapath.configure({
      ztunnelExemption: this.opts.ztunnelExemption ?? 'ztunnel-sockets',
      strictAllow: this.opts.strictAllow ?? [],
      steering: modes.steering,
    });
    await this.collectGarbage();
    const onChange = (changes: SourceChange[], state: ClusterState): void => {
      log.debug({ changes: changes.length }, 'pod source changed');
      this.writePolicy(state);
      this.reconciler?.applyChanges(changes, state);
    };
    let annotator: (Annotator & PodEventSink) | undefined;
    if ('localPods' in this.opts.source) {
      const file = this.opts.source.localPods;
      this.source = new LocalPodSource({
        file,
        nodeName: this.opts.nodeName,
        onChange,
        onError: (err) =>
          log.error(
            { file, error: err.message },
            'ignoring an edit that does not parse; the last good state stays in force',
          ),
      });
    } else {
      const kube = new KubePodSource({
        kubeconfig: this.opts.source.kubeconfig,
        nodeName: this.opts.nodeName,
        onChange,
        log,
        ...(this.opts.eventIntervalMs !== undefined ? { eventIntervalMs: this.opts.eventIntervalMs } : {}),
      });
      this.source = kube;
      this.kube = kube;
      annotator = kube;
    }
    this.reconciler = new Reconciler({
      datapath: this.datapath,
      zds: this.zds,
      netns: new NetnsLocator(this.opts.hostRoot, undefined, undefined, this.opts.netnsDirs),
      cgroups: new CgroupLocator(this.opts.hostRoot),
      interfaces: { watch: watchNetns },
      sandboxes: new SandboxRecords(this.opts.pluginSocket),
      log,
      attachMode: modes.attachMode,
      capture: this.opts.capture ?? DEFAULT_CAPTURE,
      nodeNetns: this.opts.nodeNetns ?? DEFAULT_NODE_NETNS,
      policy: this.policy,
      ...(annotator ? { annotator, events: annotator } : {}),
    });
    this.reconciler.onEnrolled = (seconds) => this.enrollSeconds.observe(seconds);
    const state = await this.source.start();
    this.writePolicy(state);
    // As upstream: ztunnel is served only once the pods already redirected are known, so its first
    // snapshot is complete (it drains every pod a snapshot leaves out).
    await this.reconciler.adopt(state);
    this.zds.start();
    await this.reconciler.reconcileAll();
    const source = this.source;
    const kube = this.kube;
    const lookupMs = this.opts.podLookupTimeoutMs ?? DEFAULT_POD_LOOKUP_TIMEOUT_MS;
    const cni = new CniHandler({
      reconciler: this.reconciler,
      state: () => source.current,
      policy: this.policy,
      log,
      onResult: (command, result) => this.cniRequests.inc({ command, result }),
      hostPath: (p) => (this.opts.hostRoot === '/' ? p : join(this.opts.hostRoot, p)),
      netnsDirs: this.opts.netnsDirs,
      ...(kube ? { lookup: (namespace: string, name: string) => kube.lookup(namespace, name, lookupMs) } : {}),
    });
    this.servers.push(await serveRelay(this.opts.pluginSocket, (req) => cni.handle(req)));
    this.synced = true;
    if (this.opts.installCni) {
      // Last, as upstream: new pods only wait for an agent that can serve them.
      this.installer = new CniInstaller({
        ...this.opts.installCni,
        agentSocket: this.opts.pluginSocket,
        policyFile: this.opts.cniPolicyFile,
        log,
      });
      this.installer.start();
    }
    this.gcTimer = setInterval(() => void this.collectGarbage(), GC_INTERVAL_MS);
    const verifyMs = this.opts.verifyIntervalMs ?? DEFAULT_VERIFY_INTERVAL_MS;
    if (verifyMs > 0) this.scheduleVerify(verifyMs);
    if (this.opts.statusSocket) this.servers.push(await serveStatus(this.opts.statusSocket, () => this.report()));
    const health = { notReady: () => this.notReady() };
    const metrics = { metrics: () => this.metrics() };
    if (this.opts.healthAddr && this.opts.healthAddr === this.opts.metricsAddr) {
      this.servers.push(await serveOps(this.opts.healthAddr, { health, metrics }));
    } else {
      if (this.opts.healthAddr) this.servers.push(await serveOps(this.opts.healthAddr, { health }));
      if (this.opts.metricsAddr) this.servers.push(await serveOps(this.opts.metricsAddr, { metrics }));
    }
    log.info({ node: this.opts.nodeName, pods: state.pods.size, bpffs: this.opts.bpffs }, 'agent ready');
  }

  status(): PodStatus[] {
    return this.reconciler?.status() ?? [];
  }

  /** The status API's answer: every pod with how its datapath is attached and what it counted. */
  async report(): Promise<StatusReport> {
    const attached = new Map((await this.datapath?.list())?.map((p) => [p.uid, p]) ?? []);
    return {
      ztunnelConnections: this.zds?.connectedCount ?? 0,
      ...(this.kernel && this.modes ? { kernel: kernelStatus(this.kernel, this.modes) } : {}),
      pods: this.status().map((s) => {
        const a = s.attached ? attached.get(s.uid) : undefined;
        return {
          uid: s.uid,
          name: s.name,
          namespace: s.namespace,
          state: s.state,
          reason: s.reason,
          hooks: a?.mode ?? '',
          ztunnel: s.ztunnel,
          netnsPath: s.netnsPath ?? '',
          dnsCapture: s.dns,
          interfaces: a ? [a.interface || `#${a.ifindex}`, ...a.otherInterfaces.map((i) => i.name)] : [],
          ...(s.uncaptured ? { uncaptured: s.uncaptured } : {}),
          sinceUnixMs: s.since.getTime(),
          ...(a ? { counters: a.counters } : {}),
        };
      }),
    };
  }

  /** ztunnel said hello over ZDS: its cgroup's sockets are the only ones whose 0x539 mark lets
   * traffic skip redirection. Without it ztunnel's own traffic would be redirected: fail loudly. */
  private trustZtunnel(peer: PeerCredentials): void {
    if ((this.opts.ztunnelExemption ?? 'ztunnel-sockets') === 'mark' && this.modes?.steering !== 'sk-lookup') return;
    try {
      const procRoot = join(this.opts.hostRoot, 'proc');
      const mount = cgroup2Mount(this.opts.hostRoot);
      const cgroup = cgroupDirectory(cgroupPathOfPid(peer.pid, procRoot), mount);
      this.datapath?.trustZtunnelCgroup(cgroup);
      if (cgroup === mount) {
        this.opts.log.warn(
          { pid: peer.pid, cgroup },
          "ztunnel runs in the root cgroup v2 (pods on this node do not use cgroup v2): any socket there carrying ztunnel's mark skips redirection, as with upstream's mark-only rule",
        );
      } else {
        this.opts.log.info({ pid: peer.pid, cgroup }, "ztunnel's cgroup trusted: its marked sockets skip redirection");
      }
    } catch (err) {
      this.opts.log.error(
        { pid: peer.pid, error: (err as Error).message },
        "cannot find ztunnel's cgroup; its traffic will be redirected back to it (is the agent in the host PID namespace? --ztunnel-exemption=mark trusts the mark alone)",
      );
    }
  }

  /** Stops the agent; pods stay redirected. */
  stop(): void {
    clearInterval(this.gcTimer);
    clearTimeout(this.verifyTimer);
    this.installer?.stop();
    this.source?.stop();
    this.reconciler?.stop();
    this.zds?.close();
    this.datapath?.close();
    this.datapath = undefined;
    for (const s of this.servers) s.close();
  }

  /** Stops the agent because SIGTERM came: if it is leaving the node for good (its DaemonSet gone,
   * being deleted, or no longer selecting this node: daemonset-scope.ts), takes ambient-bpf off
   * the node; otherwise leaves everything for the next agent. Returns what was decided and what
   * could not be done. */
  async shutdown(): Promise<{ removed: boolean; failed: string[] }> {
    const { log } = this.opts;
    const ds = this.opts.daemonSet;
    const source = this.opts.source;
    if (!ds || !('kubeconfig' in source)) {
      this.stop();
      return { removed: false, failed: [] };
    }
    const k = source.kubeconfig;
    let client: KubeClient | undefined;
    try {
      let leaving: Leaving | undefined;
      try {
        client = new KubeClient(typeof k === 'object' ? k : await loadKubeConnection(k));
        leaving = await whyLeavingNode(client, ds.namespace, ds.name, this.opts.nodeName);
        if (!leaving)
          log.info(
            { daemonSet: `${ds.namespace}/${ds.name}` },
            'the DaemonSet still runs on this node (an upgrade or a restart): leaving everything in place',
          );
      } catch (err) {
        log.warn(
          { daemonSet: `${ds.namespace}/${ds.name}`, error: (err as Error).message },
          'cannot tell whether the DaemonSet is being deleted or leaves this node; leaving everything in place',
        );
        leaving = undefined;
      }
      this.stop();
      if (!leaving || !client) return { removed: false, failed: [] };
      const api = client;
      // A deselection keeps the pods redirected whatever the option: it is undone as easily as it
      // was done (a label, a selector edit), and unredirecting on it would unmesh every pod of
      // the node for that while. `ambient-bpf uninstall` finishes the job when it is for good.
      const keepPodRedirection = ds.keepPodRedirection || leaving.deselected;
      log.info(
        { daemonSet: `${ds.namespace}/${ds.name}`, keepPodRedirection },
        `${leaving.why}: removing ambient-bpf from the node${leaving.deselected ? ' (the pods stay redirected; ambient-bpf uninstall removes their redirection)' : ''}`,
      );
      const failed = await removeFromNode({
        cni: this.opts.installCni,
        policyFile: this.opts.cniPolicyFile,
        bpffs: this.opts.bpffs,
        keepPodRedirection,
        kube: { connect: () => Promise.resolve(api), nodeName: this.opts.nodeName },
        report: (line) => log.info({}, line),
        warn: (line) => log.warn({}, line),
        log,
      });
      for (const f of failed) log.error({}, f);
      return { removed: true, failed };
    } finally {
      client?.close();
    }
  }

  notReady(): string[] {
    const reasons: string[] = [];
    if (!this.synced) reasons.push('pod source not synced');
    if (!this.zds) reasons.push('ZDS server not started');
    if (this.opts.installCni && !this.installer?.entryInPlace)
      reasons.push('the CNI entry is not in the primary conflist');
    return reasons;
  }

  async metrics(): Promise<string> {
    const status = this.status();
    const byState = new Map<string, number>([
      ['enabled', 0],
      ['pending', 0],
      ['failed', 0],
    ]);
    for (const s of status) if (byState.has(s.state)) byState.set(s.state, byState.get(s.state)! + 1);
    return (
      [
        await this.datapathMetrics(status),
        this.kernelMetrics(),
        samples(
          'ambient_bpf_pods',
          'Pods by enrollment state.',
          'gauge',
          [...byState].map(([state, n]) => [{ state }, n]),
        ),
        samples('ambient_bpf_ztunnel_connections', 'ztunnel connections past their hello.', 'gauge', [
          [{}, this.zds?.connectedCount ?? 0],
        ]),
        samples('ambient_bpf_reconcile_errors_total', 'Failed reconcile passes.', 'counter', [
          [{}, this.reconciler?.reconcileErrors ?? 0],
        ]),
        samples(
          'ambient_bpf_drift_repairs_total',
          'Redirections found changed behind the agent’s back and repaired.',
          'counter',
          [[{}, this.reconciler?.driftRepairs ?? 0]],
        ),
        this.enrollSeconds.render(),
        this.cniRequests.render(),
        this.upstreamMetrics(),
      ].join('\n') + '\n'
    );
  }

  /** Upstream istio-cni's node agent metrics, same names and meanings, so its dashboards and
   * alerts carry over. */
  private upstreamMetrics(): string {
    const installer = this.installer;
    return [
      samples('ztunnel_connected', 'number of connections to ztunnel', 'gauge', [[{}, this.zds?.connectedCount ?? 0]]),
      samples(
        'nodeagent_reconcile_events_total',
        'The total number of node agent reconcile events.',
        'counter',
        Object.entries(this.reconciler?.podEvents ?? {}).map(([type, n]) => [{ type }, n]),
      ),
      ...(this.opts.installCni
        ? [
            samples('istio_cni_install_ready', 'Whether the CNI plugin installation is ready or not', 'gauge', [
              [{}, installer?.entryInPlace ? 1 : 0],
            ]),
            samples(
              'istio_cni_installs_total',
              'Total number of CNI plugins installed by the Istio CNI installer',
              'counter',
              [...(installer?.installs ?? [])].map(([result, n]) => [{ result }, n]),
            ),
          ]
        : []),
    ].join('\n');
  }

  /** The probed kernel features and the modes chosen from them. */
  private kernelMetrics(): string {
    if (!this.kernel || !this.modes) return '';
    const { features, forced } = this.kernel;
    return [
      samples(
        'ambient_bpf_kernel_feature',
        'Kernel features the datapath uses, as probed at start (1 present, 0 not); forced="true": set by the agent\'s options, not probed.',
        'gauge',
        KERNEL_FEATURES.map((f) => [
          { feature: featureLabel(f), forced: String(forced.includes(f)) },
          features[f] ? 1 : 0,
        ]),
      ),
      samples(
        'ambient_bpf_datapath_mode',
        'The modes chosen from the kernel features (and the options): hooks tcx or tc, steering sk-assign or sk-lookup; always 1.',
        'gauge',
        [[{ hooks: this.modes.hooks, attach_mode: this.modes.attachMode, steering: this.modes.steering }, 1]],
      ),
    ].join('\n');
  }

  /** The programs' own counters, per pod (by namespace/name) and node-wide. */
  private async datapathMetrics(status: PodStatus[]): Promise<string> {
    if (!this.datapath) return '';
    const names = new Map(status.map((s) => [s.uid, s]));
    const rows: [Record<string, string>, number][] = [];
    const add = (labels: Record<string, string>, c: DatapathCounters): void => {
      for (const [name, value] of Object.entries(c) as [string, number][])
        rows.push([{ ...labels, counter: name }, value]);
    };
    for (const p of await this.datapath.list()) {
      const s = names.get(p.uid);
      add({ namespace: s?.namespace ?? '', pod: s?.name ?? '', uid: p.uid }, p.counters);
    }
    add({ namespace: '', pod: '', uid: '' }, this.datapath.nodeCounters());
    return samples(
      'ambient_bpf_datapath_events_total',
      'What the BPF programs did, per pod (empty pod: not attributable to one): connections redirected, bypassed (and why), dropped; strictDropped, unclassifiedDropped and spoofedDropped count packets.',
      'counter',
      rows,
    );
  }

  /** One verify pass after another, never two at once. */
  private scheduleVerify(ms: number): void {
    this.verifyTimer = setTimeout(() => {
      this.reconciler
        ?.verifyAll()
        .catch((err: Error) => this.opts.log.warn({ error: err.message }, 'drift check failed'))
        .finally(() => this.scheduleVerify(ms));
    }, ms);
  }

  /** What the CNI plugin decides from while the agent is unreachable. */
  private writePolicy(state: ClusterState): void {
    try {
      writeCniPolicy(this.opts.cniPolicyFile, state, this.policy);
    } catch (err) {
      this.opts.log.error({ error: (err as Error).message }, 'cannot write the CNI policy file');
    }
  }

  private async collectGarbage(): Promise<void> {
    try {
      const collected = (await this.datapath?.collectGarbage()) ?? [];
      if (collected.length) this.opts.log.info({ uids: collected }, 'collected pins of pods whose netns is gone');
    } catch (err) {
      this.opts.log.warn({ error: (err as Error).message }, 'garbage collection failed');
    }
  }
}
