// The node agent: wires the pod source, the reconciler, the datapath and the ZDS server together,
// and exposes health and metrics. Stopping it leaves every pod redirected (as upstream's agent
// does during an upgrade): the next agent adopts the attachments; unless its DaemonSet is being
// deleted (shutdown()), then it takes ambient-bpf off the node.
import { join } from 'node:path';
import { cgroup2Mount, cgroupDirectory, cgroupPathOfPid, Datapath, steeringForKernel, type Steering, type AttachMode, type DatapathCounters, type StrictAllowEntry, type ZtunnelExemption } from '../../bpf/src/index.js';
import { reserveFileDescriptors, type PeerCredentials } from '../../bpf/src/node-netns.js';
import type { Logger } from '../../ztunnel-bridge/src/logger.js';
import { ZdsServer } from '../../ztunnel-bridge/src/zds-server.js';
import { CgroupLocator } from './enrollment/cgroup-locator.js';
import { NetnsLocator } from './enrollment/netns-locator.js';
import { SandboxRecords } from './enrollment/sandbox-records.js';
import { DEFAULT_CAPTURE, Reconciler, type Annotator, type PodStatus } from './enrollment/reconciler.js';
import type { CaptureDefaults } from './pods/capture-options.js';
import { KubeClient, loadKubeConnection, type KubeConnection } from './pods/kube-client.js';
import { KubePodSource } from './pods/kube-source.js';
import { LocalPodSource } from './pods/local-source.js';
import type { ClusterState, SourceChange } from './pods/pod.js';
import { DEFAULT_POLICY } from './pods/selection.js';
import { CniHandler } from './cni/handler.js';
import { writeCniPolicy } from './cni/policy-file.js';
import { serveRelay } from './cni/relay.js';
import { CniInstaller } from './installer/installer.js';
import { daemonSetRemoved, removeFromNode } from './installer/removal.js';
import { serveOps } from './ops/http.js';
import { Counter, Histogram, samples } from './ops/metrics.js';
import { serveStatus, type StatusReport } from './ops/status-api.js';

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
  /** The agent's own DaemonSet (Kubernetes source): shutdown() while it is gone or being deleted
   * takes ambient-bpf off the node (removeFromNode; running pods stay redirected and annotated with
   * keepPodRedirection); otherwise (an upgrade, a restart) everything stays. */
  daemonSet?: { namespace: string; name: string; keepPodRedirection: boolean } | undefined;
  bpffs: string;
  hostRoot: string;
  attachMode: AttachMode;
  /** How SYNs reach ztunnel's listeners (default: by kernel, steeringForKernel()). */
  steering?: Steering | undefined;
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
  installCni?: { binDir: string; confDir: string; binarySource: string } | undefined;
  /** The status API's Unix socket (`ambient-bpf status`). */
  statusSocket?: string | undefined;
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

export const AGENT_FD_TABLE = 4096;

export class Agent {
  private datapath: Datapath | undefined;
  private zds: ZdsServer | undefined;
  private source: PodSource | undefined;
  private reconciler: Reconciler | undefined;
  private readonly servers: { close(): void }[] = [];
  private gcTimer: NodeJS.Timeout | undefined;
  private verifyTimer: NodeJS.Timeout | undefined;
  private installer: CniInstaller | undefined;
  private synced = false;
  private readonly enrollSeconds = new Histogram('ambient_bpf_enroll_duration_seconds', 'From the start of enrolling a pod to ztunnel’s ack.', [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]);
  private readonly cniRequests = new Counter('ambient_bpf_cni_requests_total', 'CNI requests relayed by the plugin, by command and result (ok or the CNI error code).');

  private readonly steering: Steering;

  constructor(private readonly opts: AgentOptions) {
    this.steering = opts.steering ?? steeringForKernel();
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
    this.datapath = await Datapath.open({ bpffsRoot: this.opts.bpffs });
    const steering = this.steering;
    await this.datapath.configure({ ztunnelExemption: this.opts.ztunnelExemption ?? 'ztunnel-sockets', strictAllow: this.opts.strictAllow ?? [], steering });
    log.info({ steering }, steering === 'sk-lookup' ? 'SYNs reach ztunnel through sk_lookup programs (kernel before 6.6, or asked)' : 'SYNs reach ztunnel through bpf_sk_assign');
    await this.collectGarbage();
    const onChange = (changes: SourceChange[], state: ClusterState): void => {
      log.debug({ changes: changes.length }, 'pod source changed');
      this.writePolicy(state);
      this.reconciler?.applyChanges(changes, state);
    };
    let annotator: Annotator | undefined;
    if ('localPods' in this.opts.source) {
      const file = this.opts.source.localPods;
      this.source = new LocalPodSource({
        file,
        nodeName: this.opts.nodeName,
        onChange,
        onError: (err) => log.error({ file, error: err.message }, 'ignoring an edit that does not parse; the last good state stays in force'),
      });
    } else {
      const kube = new KubePodSource({ kubeconfig: this.opts.source.kubeconfig, nodeName: this.opts.nodeName, onChange, log });
      this.source = kube;
      annotator = kube;
    }
    this.reconciler = new Reconciler({
      datapath: this.datapath,
      zds: this.zds,
      netns: new NetnsLocator(this.opts.hostRoot),
      cgroups: new CgroupLocator(this.opts.hostRoot),
      sandboxes: new SandboxRecords(this.opts.pluginSocket),
      log,
      attachMode: this.opts.attachMode,
      capture: this.opts.capture ?? DEFAULT_CAPTURE,
      nodeNetns: this.opts.nodeNetns ?? DEFAULT_NODE_NETNS,
      ...(annotator ? { annotator } : {}),
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
    const cni = new CniHandler({ reconciler: this.reconciler, state: () => source.current, policy: DEFAULT_POLICY, log, onResult: (command, result) => this.cniRequests.inc({ command, result }), hostPath: (p) => (this.opts.hostRoot === '/' ? p : join(this.opts.hostRoot, p)) });
    this.servers.push(await serveRelay(this.opts.pluginSocket, (req) => cni.handle(req)));
    this.synced = true;
    if (this.opts.installCni) {
      // Last, as upstream: new pods only wait for an agent that can serve them.
      this.installer = new CniInstaller({ ...this.opts.installCni, agentSocket: this.opts.pluginSocket, policyFile: this.opts.cniPolicyFile, log });
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
          sinceUnixMs: s.since.getTime(),
          ...(a ? { counters: a.counters } : {}),
        };
      }),
    };
  }

  /** ztunnel said hello over ZDS: its cgroup's sockets are the only ones whose 0x539 mark lets
   * traffic skip redirection. Without it ztunnel's own traffic would be redirected: fail loudly. */
  private trustZtunnel(peer: PeerCredentials): void {
    if ((this.opts.ztunnelExemption ?? 'ztunnel-sockets') === 'mark' && this.steering === 'sk-assign') return;
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

  /** Stops the agent because SIGTERM came: if its DaemonSet is gone or being deleted, takes
   * ambient-bpf off the node; otherwise leaves everything for the next agent. Returns what was
   * decided and what could not be done. */
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
      let removed: boolean;
      try {
        client = new KubeClient(typeof k === 'object' ? k : await loadKubeConnection(k));
        removed = await daemonSetRemoved(client, ds.namespace, ds.name);
      } catch (err) {
        log.warn({ daemonSet: `${ds.namespace}/${ds.name}`, error: (err as Error).message }, 'cannot tell whether the DaemonSet is being deleted; leaving everything in place');
        removed = false;
      }
      this.stop();
      if (!removed || !client) return { removed: false, failed: [] };
      const api = client;
      const { keepPodRedirection } = ds;
      log.info({ daemonSet: `${ds.namespace}/${ds.name}`, keepPodRedirection }, 'the DaemonSet is being deleted: removing ambient-bpf from the node');
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
      return { removed, failed };
    } finally {
      client?.close();
    }
  }

  notReady(): string[] {
    const reasons: string[] = [];
    if (!this.synced) reasons.push('pod source not synced');
    if (!this.zds) reasons.push('ZDS server not started');
    if (this.opts.installCni && !this.installer?.entryInPlace) reasons.push('the CNI entry is not in the primary conflist');
    return reasons;
  }

  async metrics(): Promise<string> {
    const status = this.status();
    const byState = new Map<string, number>([['enabled', 0], ['pending', 0], ['failed', 0]]);
    for (const s of status) if (byState.has(s.state)) byState.set(s.state, byState.get(s.state)! + 1);
    return [
      await this.datapathMetrics(status),
      samples('ambient_bpf_pods', 'Pods by enrollment state.', 'gauge', [...byState].map(([state, n]) => [{ state }, n])),
      samples('ambient_bpf_ztunnel_connections', 'ztunnel connections past their hello.', 'gauge', [[{}, this.zds?.connectedCount ?? 0]]),
      samples('ambient_bpf_reconcile_errors_total', 'Failed reconcile passes.', 'counter', [[{}, this.reconciler?.reconcileErrors ?? 0]]),
      samples('ambient_bpf_drift_repairs_total', 'Redirections found changed behind the agent’s back and repaired.', 'counter', [[{}, this.reconciler?.driftRepairs ?? 0]]),
      this.enrollSeconds.render(),
      this.cniRequests.render(),
      this.upstreamMetrics(),
    ].join('\n') + '\n';
  }

  /** Upstream istio-cni's node agent metrics, same names and meanings, so its dashboards and
   * alerts carry over. */
  private upstreamMetrics(): string {
    const installer = this.installer;
    return [
      samples('ztunnel_connected', 'number of connections to ztunnel', 'gauge', [[{}, this.zds?.connectedCount ?? 0]]),
      samples('nodeagent_reconcile_events_total', 'The total number of node agent reconcile events.', 'counter', Object.entries(this.reconciler?.podEvents ?? {}).map(([type, n]) => [{ type }, n])),
      ...(this.opts.installCni
        ? [
            samples('istio_cni_install_ready', 'Whether the CNI plugin installation is ready or not', 'gauge', [[{}, installer?.entryInPlace ? 1 : 0]]),
            samples('istio_cni_installs_total', 'Total number of CNI plugins installed by the Istio CNI installer', 'counter', [...(installer?.installs ?? [])].map(([result, n]) => [{ result }, n])),
          ]
        : []),
    ].join('\n');
  }

  /** The programs' own counters, per pod (by namespace/name) and node-wide. */
  private async datapathMetrics(status: PodStatus[]): Promise<string> {
    if (!this.datapath) return '';
    const names = new Map(status.map((s) => [s.uid, s]));
    const rows: [Record<string, string>, number][] = [];
    const add = (labels: Record<string, string>, c: DatapathCounters): void => {
      for (const [name, value] of Object.entries(c) as [string, number][]) rows.push([{ ...labels, counter: name }, value]);
    };
    for (const p of await this.datapath.list()) {
      const s = names.get(p.uid);
      add({ namespace: s?.namespace ?? '', pod: s?.name ?? '', uid: p.uid }, p.counters);
    }
    add({ namespace: '', pod: '', uid: '' }, this.datapath.nodeCounters());
    return samples('ambient_bpf_datapath_events_total', 'What the BPF programs did, per pod (empty pod: not attributable to one): connections redirected, bypassed (and why), dropped; strictDropped, unclassifiedDropped and spoofedDropped count packets.', 'counter', rows);
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
      writeCniPolicy(this.opts.cniPolicyFile, state, DEFAULT_POLICY);
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
