// The pod datapath: BPF programs loaded once per process and bpffs root, attached to many pods.
// Knows network namespaces, addresses and pins; nothing about Kubernetes.
import { isIP } from 'node:net';
import { addon, BPF_OBJECT_PATH, type DatapathCounters, type NativeHandle, type NativeListedPod } from './native.js';

export type { DatapathCounters } from './native.js';

export const DEFAULT_BPFFS_ROOT = '/sys/fs/bpf/ambient-bpf';

/** How programs are attached: tcx links (Linux 6.6+), or the clsact/cls_bpf fallback; auto: tcx
 * where the kernel has it (the native side falls back to tc when the link is refused). */
export type AttachMode = 'auto' | 'tcx' | 'tc';
const MODE_CODES: Record<AttachMode, number> = { auto: 0, tcx: 1, tc: 2 };
export const ATTACH_MODES: readonly AttachMode[] = ['auto', 'tcx', 'tc'];
export const DEFAULT_ATTACH_MODE: AttachMode = 'auto';

export type DatapathErrorCode =
  | 'EINVALID' // bad argument
  | 'ENETNS' // the netns path is missing or not a network namespace
  | 'EPODIP' // a pod IP is not configured in the netns
  | 'EBPFFS' // no bpffs where pins go
  | 'EKERNEL' // the kernel lacks a needed feature
  | 'ELOAD' // the BPF object did not load
  | 'ELAYOUT' // the pins are of a layout this release cannot adopt (a newer release's)
  | 'ESYSTEM';

export class DatapathError extends Error {
  override readonly name = 'DatapathError';
  constructor(
    readonly code: DatapathErrorCode,
    message: string,
  ) {
    super(message);
  }
}

function wrap(err: unknown): DatapathError {
  if (err instanceof DatapathError) return err;
  const e = err as { code?: string; message?: string };
  return new DatapathError((e.code ?? 'ESYSTEM') as DatapathErrorCode, e.message ?? String(err));
}

function callSync<T>(op: () => T): T {
  try {
    return op();
  } catch (err) {
    throw wrap(err);
  }
}

async function call<T>(op: () => Promise<T>): Promise<T> {
  try {
    return await op();
  } catch (err) {
    throw wrap(err);
  }
}

export interface PodAttachment {
  /** Stable pod identity (the Kubernetes pod UID); names the pin directory. */
  uid: string;
  /** A path that opens the pod's network namespace (/proc/PID/ns/net, /var/run/netns/NAME). */
  netnsPath: string;
  /** The pod's addresses; all must be configured on one interface of the netns. */
  ips: string[];
  /** No inbound capture (ambient.istio.io/bypass-inbound-capture); the return path is kept. */
  bypassInbound?: boolean;
  /** Drop what would leave the pod around ztunnel (UDP but DNS, other protocols). */
  strict?: boolean;
  /** Extra interfaces whose inbound TCP goes to 15001 (istio.io/reroute-virtual-interfaces). */
  rerouteInterfaces?: string[];
  /** The pod's cgroup v2 directory. Hooks there refuse the socket options that would send the
   * apps' packets past the pod's interface hooks (PACKET_QDISC_BYPASS), and, unless dnsCapture is
   * false, send their DNS (port 53, UDP and TCP) to ztunnel's 127.0.0.1:15053. Absent: no hooks
   * there (no DNS capture). */
  podCgroup?: string;
  /** Capture DNS at podCgroup (default true). */
  dnsCapture?: boolean;
  /** The node's netns, where the pod's veth peer is: traffic the node itself opens to the pod
   * (kubelet probes) gets the probe source address there, so the pod does not capture it. */
  hostNetns?: string;
}

/** Which 0x539-marked traffic skips redirection: only ztunnel's own sockets (default), or any
 * (upstream's rule; an app with NET_ADMIN can then bypass the mesh). */
export type ZtunnelExemption = 'ztunnel-sockets' | 'mark';
/** The first is the default. */
export const ZTUNNEL_EXEMPTIONS: readonly [ZtunnelExemption, ...ZtunnelExemption[]] = ['ztunnel-sockets', 'mark'];

/** What strict mode lets out besides TCP (captured) and DNS; port 0 or absent: any port. */
export interface StrictAllowEntry {
  protocol: number;
  port?: number;
}

/** How a SYN reaches ztunnel's listener: bpf_sk_assign in tc (where it accepts SO_REUSEPORT
 * listeners: Linux 6.6+), or an sk_lookup program per pod netns (older kernels; also needs
 * ztunnel's cgroup). Which one the kernel allows is probed (kernel-features.ts). */
export type Steering = 'sk-assign' | 'sk-lookup';
export const STEERINGS: readonly Steering[] = ['sk-assign', 'sk-lookup'];

export interface DatapathSettings {
  ztunnelExemption: ZtunnelExemption;
  strictAllow: StrictAllowEntry[];
  /** Default: sk-assign. */
  steering?: Steering;
}

export interface AttachOptions {
  mode?: AttachMode;
}

export interface AttachResult {
  mode: 'tcx' | 'tc';
  ifindex: number;
  /** The pod was attached in this netns already and was updated in place. */
  updated: boolean;
  /** The node-side device where kubelet probes are handled; 0: none (no veth peer in hostNetns). */
  hostIfindex: number;
  /** An attached pod's interfaces (or addresses) left out of capture (a tun, one too many), each
   * said, `; `-separated; the others are captured all the same. '': none. */
  warning: string;
}

export type AttachedPod = Omit<NativeListedPod, 'attachedAtMs'> & { attachedAt: Date };

export interface VerifyResult {
  found: boolean;
  ok: boolean;
  problems: string[];
}

export interface DetachResult {
  found: boolean;
  warning?: string;
}

export interface DatapathOptions {
  /** bpffs directory for this datapath's maps and per-pod pins. */
  bpffsRoot?: string;
  /** The compiled BPF object (default: the one `npm run build` makes). */
  objectPath?: string;
  /** Whether the tc programs honour a pod_policy entry only in the pod netns it was written for (they
   * read the packet's netns cookie: the probed feature tcNetnsCookie). Default: probed at open. false
   * leaves the check out (what a kernel without it gets); true where the kernel lacks it fails. */
  tcNetnsCookie?: boolean;
}

export class Datapath {
  private closed = false;

  private constructor(
    private readonly handle: NativeHandle,
    readonly bpffsRoot: string,
  ) {}

  /** Loads and verifies the BPF programs once; every attach reuses them. */
  static async open(options: DatapathOptions = {}): Promise<Datapath> {
    const root = options.bpffsRoot ?? DEFAULT_BPFFS_ROOT;
    const objectPath = options.objectPath ?? BPF_OBJECT_PATH;
    const handle = await call(() =>
      options.tcNetnsCookie === undefined
        ? addon().open(root, objectPath)
        : addon().open(root, objectPath, options.tcNetnsCookie),
    );
    return new Datapath(handle, root);
  }

  /** The layout of the node state this release pins (pins of older layouts are adopted at open). */
  static get layout(): number {
    return addon().constants.DATAPATH_LAYOUT;
  }

  /** Hands the node state under a bpffs root to the older release of `layout`: hooks it does not know
   * are detached from every pod (they stay redirected), maps go back to its pins. Stop the agent
   * first. Returns the layout the pins had. */
  static async downgrade(layout: number, options: Pick<DatapathOptions, 'bpffsRoot'> = {}): Promise<number> {
    return call(() => addon().downgrade(options.bpffsRoot ?? DEFAULT_BPFFS_ROOT, layout));
  }

  /** Attaches (or updates in place) the redirection of one pod. On failure nothing is left behind. */
  async attach(pod: PodAttachment, options: AttachOptions = {}): Promise<AttachResult> {
    for (const ip of pod.ips) {
      if (isIP(ip) === 0) throw new DatapathError('EINVALID', `not an IP address: ${ip}`);
    }
    const mode = options.mode ?? 'auto';
    if (!(mode in MODE_CODES)) throw new DatapathError('EINVALID', `unknown attach mode: ${String(mode)}`);
    const { POD_F_BYPASS_INBOUND, POD_F_STRICT, POD_F_DNS_CAPTURE } = addon().constants;
    const flags =
      (pod.bypassInbound ? POD_F_BYPASS_INBOUND : 0) |
      (pod.strict ? POD_F_STRICT : 0) |
      (pod.dnsCapture === false ? 0 : POD_F_DNS_CAPTURE);
    return call(() =>
      addon().attach(
        this.live(),
        pod.uid,
        pod.netnsPath,
        pod.ips,
        MODE_CODES[mode],
        flags,
        pod.rerouteInterfaces ?? [],
        pod.podCgroup ?? '',
        pod.hostNetns ?? '',
      ),
    );
  }

  /** Node-wide settings the programs read (kept in pinned maps: they outlive this process). */
  async configure(settings: DatapathSettings): Promise<void> {
    if (!ZTUNNEL_EXEMPTIONS.includes(settings.ztunnelExemption)) {
      throw new DatapathError('EINVALID', `unknown ztunnel exemption: ${String(settings.ztunnelExemption)}`);
    }
    const steering = settings.steering ?? 'sk-assign';
    if (!STEERINGS.includes(steering)) throw new DatapathError('EINVALID', `unknown steering: ${String(steering)}`);
    const { SETTING_MARK_ONLY_EXEMPTION, SETTING_SK_LOOKUP_STEERING } = addon().constants;
    const flags =
      (settings.ztunnelExemption === 'mark' ? SETTING_MARK_ONLY_EXEMPTION : 0) |
      (steering === 'sk-lookup' ? SETTING_SK_LOOKUP_STEERING : 0);
    const allow = settings.strictAllow.map((e): [number, number] => [e.protocol, e.port ?? 0]);
    return call(() => addon().configure(this.live(), flags, allow));
  }

  /** Marks a cgroup v2 directory as ztunnel's: its sockets' 0x539 traffic skips redirection, and
   * with sk_lookup steering its listeners are learnt there. Configure steering first. */
  trustZtunnelCgroup(cgroupDir: string): void {
    callSync(() => addon().trustZtunnelCgroup(this.live(), cgroupDir));
  }

  /** Counters of traffic the programs could not attribute to a pod. */
  nodeCounters(): DatapathCounters {
    return callSync(() => addon().nodeCounters(this.live()));
  }

  /** Removes a pod's redirection and restores its netns; a pod that is not attached is not an error. */
  async detach(uid: string): Promise<DetachResult> {
    return call(() => addon().detach(this.live(), uid));
  }

  async list(): Promise<AttachedPod[]> {
    const pods = await call(() => addon().list(this.live()));
    return pods.map(({ attachedAtMs, ...p }) => ({ ...p, attachedAt: new Date(attachedAtMs) }));
  }

  /** Checks in the pod's netns that hooks, rules, routes and sysctls are still as attach left them. */
  async verify(uid: string): Promise<VerifyResult> {
    const r = await call(() => addon().verify(this.live(), uid));
    return { found: r.found, ok: r.found && r.problems.length === 0, problems: r.problems };
  }

  /** Removes the pins and records of pods whose netns is gone; returns their uids. */
  async collectGarbage(): Promise<string[]> {
    return call(() => addon().gc(this.live()));
  }

  /** Releases this process's programs; attached pods stay attached (their links are pinned). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    addon().close(this.handle);
  }

  private live(): NativeHandle {
    if (this.closed) throw new DatapathError('EINVALID', 'the datapath is closed');
    return this.handle;
  }
}
