// Typed binding to the project's native addon (bpf/native, built by node-gyp): the
// "bpf-native-addon" and "node-netns" of the design, in one shared object.
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import type { KernelFeature } from './kernel-features.js';

/** Files the addon and the BPF programs are built to, relative to this module (dist/bpf/src). */
export const ADDON_PATH = fileURLToPath(new URL('../../../bpf/build/Release/ambient_bpf.node', import.meta.url));
export const BPF_OBJECT_PATH = fileURLToPath(new URL('../../../bpf/progs/datapath.bpf.o', import.meta.url));

declare const handleBrand: unique symbol;
export type NativeHandle = { readonly [handleBrand]: true };

export interface NativeListedPod {
  uid: string;
  netnsPath: string;
  netnsInode: number;
  ifindex: number;
  mode: 'tcx' | 'tc' | 'none';
  state: 'attached' | 'attaching';
  attachedAtMs: number;
  /** The netns path still names the namespace the pod was attached in. */
  netnsPresent: boolean;
  /** tcx: both link pins are present. */
  linksPinned: boolean;
  ips: string[];
  counters: DatapathCounters;
  bypassInbound: boolean;
  strict: boolean;
  rerouteInterfaces: string[];
  /** The name of the pod's own interface (ifindex), as last attached ('' from a pod attached by an
   * older release). */
  interface: string;
  /** The pod netns's other interfaces (all but lo and the reroute ones), captured like its own. */
  otherInterfaces: { name: string; ifindex: number }[];
  /** Their addresses (and any other on the pod's own interface) that are not among its IPs: the
   * pod's too, wherever the programs look a pod up. */
  otherAddresses: string[];
  /** The pod's cgroup the socket-option guard (and DNS capture) is hooked to; 0: none. */
  podCgroupId: number;
  /** DNS is captured at that cgroup. */
  dnsCapture: boolean;
  /** The node-side device where kubelet probes are handled; 0: none. */
  hostIfindex: number;
  steering: 'sk-assign' | 'sk-lookup';
}

export interface NativeSocketOptions {
  netns?: string;
  family?: 4 | 6;
  type?: 'tcp' | 'udp';
  mark?: number;
  transparent?: boolean;
  freebind?: boolean;
  reuseport?: boolean;
  v6only?: boolean;
  bindAddress?: string;
  bindPort?: number;
  listen?: number;
}

export interface PeerCredentials {
  pid: number;
  uid: number;
  gid: number;
}

/** Per-pod counters kept by the programs (enum pod_counter); connections (SYNs) unless noted. */
export interface DatapathCounters {
  outboundRedirected: number;
  outboundNoZtunnel: number;
  inboundRedirected: number;
  inboundNoZtunnel: number;
  bypassZtunnel: number;
  bypassHbone: number;
  bypassProbe: number;
  bypassInboundAnnotation: number;
  forgedMark: number;
  /** packets */
  strictDropped: number;
  rerouted: number;
  /** packets that may carry TCP but cannot be classified (fragments, odd headers): dropped */
  unclassifiedDropped: number;
  /** packets from outside with one of the pod's own addresses as source: dropped */
  spoofedDropped: number;
  /** looped outbound packets the pod netns's socket lookup refused: a SYN tc did not hand to
   * ztunnel, or a late segment of a connection whose ztunnel socket is gone */
  lookupRefused: number;
  /** packets that may carry TCP sent by the pod's sockets out through an interface without the
   * pod's egress hook (bound to it, or routed there past the connect hook): dropped */
  uncapturedDropped: number;
}

export interface NativeWatcher {
  /** events: 1 readable, 2 writable; the callback gets a bitmask (4 = peer hung up) or a negative errno. */
  start(events: number): void;
  close(): void;
}

export interface NativeSeqpacket {
  listen(path: string, mode: number): number;
  connect(path: string): number;
  /** -1 when no connection is pending. */
  accept(fd: number): number;
  /** false when the socket buffer is full (wait for writable). */
  send(fd: number, data: Buffer, pass: number | number[]): boolean;
  /** null when nothing is pending. */
  recv(fd: number, maxLength: number): { data: Buffer; fds: number[] } | { eof: true } | null;
  close(fd: number): void;
  dup(fd: number): number;
  reserveFds(count: number): number;
  peerCredentials(fd: number): PeerCredentials;
  Watcher: new (fd: number, callback: (events: number) => void) => NativeWatcher;
}

export interface NativeAddon {
  /** tcNetnsCookie: whether the tc programs check pod_policy entries' netns cookies; absent: probed. */
  open(bpffsRoot: string, objectPath: string, tcNetnsCookie?: boolean): Promise<NativeHandle>;
  /** Resolves with the layout the pins had. */
  downgrade(bpffsRoot: string, layout: number): Promise<number>;
  close(handle: NativeHandle): void;
  attach(
    handle: NativeHandle,
    uid: string,
    netnsPath: string,
    ips: string[],
    mode: number,
    flags: number,
    reroute: string[],
    podCgroup: string,
    hostNetns: string,
  ): Promise<{ mode: 'tcx' | 'tc'; ifindex: number; updated: boolean; hostIfindex: number; warning: string }>;
  detach(handle: NativeHandle, uid: string): Promise<{ found: boolean; warning?: string }>;
  verify(handle: NativeHandle, uid: string): Promise<{ found: boolean; problems: string[] }>;
  list(handle: NativeHandle): Promise<NativeListedPod[]>;
  gc(handle: NativeHandle): Promise<string[]>;
  configure(handle: NativeHandle, flags: number, allow: [protocol: number, port: number][]): Promise<void>;
  trustZtunnelCgroup(handle: NativeHandle, cgroupDir: string): void;
  nodeCounters(handle: NativeHandle): DatapathCounters;
  socket(options: NativeSocketOptions): Promise<number>;
  sockets(netns: string, requests: NativeSocketOptions[]): Promise<({ fd: number } | { error: string })[]>;
  seqpacket: NativeSeqpacket;
  netnsAddresses(path: string): Promise<{ inode: number; device: number; ownerUserns: number; addresses: string[] }>;
  /** A rtnetlink socket made in that netns, readable on every link or address change there, and the
   * interfaces it had once subscribed. */
  netnsWatch(path: string): Promise<{ fd: number; ifindexes: number[] }>;
  /** The kernel feature probe (probe.c), keyed by KERNEL_FEATURES. */
  probeKernel(): Promise<{
    present: Record<KernelFeature, boolean>;
    detail: Record<KernelFeature, string>;
    elapsedMs: number;
  }>;
  constants: {
    DATAPATH_LAYOUT: number;
    ZTUNNEL_OUTBOUND_PORT: number;
    ZTUNNEL_INBOUND_PORT: number;
    ZTUNNEL_HBONE_PORT: number;
    ZTUNNEL_DNS_PORT: number;
    ZTUNNEL_MARK: number;
    REDIRECT_MARK: number;
    MARK_MASK: number;
    REDIRECT_ROUTE_TABLE: number;
    REDIRECT_RULE_PRIORITY: number;
    MAX_POD_IPS: number;
    TC_FILTER_HANDLE: number;
    TC_FILTER_PRIORITY: number;
    POD_F_BYPASS_INBOUND: number;
    POD_F_STRICT: number;
    POD_F_DNS_CAPTURE: number;
    SETTING_MARK_ONLY_EXEMPTION: number;
    SETTING_SK_LOOKUP_STEERING: number;
    MAX_REROUTE_IFACES: number;
  };
}

let loaded: NativeAddon | undefined;

export function addon(): NativeAddon {
  if (!loaded) {
    const require = createRequire(import.meta.url);
    try {
      loaded = require(ADDON_PATH) as NativeAddon;
    } catch (err) {
      throw new Error(`cannot load the native addon ${ADDON_PATH} (run \`npm run build\`): ${(err as Error).message}`);
    }
  }
  return loaded;
}
