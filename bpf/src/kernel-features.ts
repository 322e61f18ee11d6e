// What the running kernel can do, probed (bpf/native/probe.c) rather than read from its version
// string: distribution kernels backport features (or leave them out), so "6.1" or "5.14" says
// little. The datapath's modes (tcx or tc hooks, sk-assign or sk-lookup steering) follow from it.
import { addon } from './native.js';
import { DatapathError, type AttachMode, type Steering } from './datapath.js';

/** Every feature the probe answers, as it names them. */
export const KERNEL_FEATURES = [
  'tcPrograms',
  'tcx',
  'skAssignReuseport',
  'skLookup',
  'netnsCookies',
  'cgroupSockAddr',
  'cgroupSockopt',
  'sockOps',
  'tcNetnsCookie',
] as const;
export type KernelFeature = (typeof KERNEL_FEATURES)[number];

/** Present (true) or not, per feature:
 * - tcPrograms: sched_cls programs with bpf_skc_lookup_tcp, bpf_sk_assign and bpf_redirect (libbpf's
 *   program type and helper probes); without them the datapath does not open.
 * - tcx: tcx links (Linux 6.6+): a link on lo of a netns the probe makes and drops.
 * - skAssignReuseport: tc's bpf_sk_assign takes an SO_REUSEPORT listener (Linux 6.6+; ztunnel's
 *   listeners are such): a SYN on lo of that netns, steered to one, is accepted.
 * - skLookup: sk_lookup programs with bpf_sk_assign (libbpf), and their netns link (Linux 5.9+).
 * - netnsCookies: SO_NETNS_COOKIE and bpf_get_netns_cookie in sockops and cgroup/connect programs
 *   (Linux 5.14/5.15+), which sk-lookup steering keys ztunnel's listeners by.
 * - cgroupSockAddr: cgroup connect, sendmsg, recvmsg and getpeername programs (DNS capture).
 * - cgroupSockopt: cgroup setsockopt programs (the socket-option guard).
 * - sockOps: sockops programs (how sk-lookup steering learns ztunnel's listeners).
 * - tcNetnsCookie: tc programs can read the cookie of the netns they run in (that of the packet's
 *   device: a CO-RE read with bpf_probe_read_kernel from the context, which needs kernel BTF and
 *   CAP_PERFMON; a tc program that does it is loaded). Then a pod_policy entry counts only in the pod
 *   netns it was written for, so a pod holding another pod's address on one of its interfaces never
 *   gets that pod's options (bypass-inbound-capture, strict mode). Without it the agent says so for
 *   each such address (the attach's warning, verify). bpf_get_netns_cookie is no substitute: in tc
 *   it names the netns of the packet's socket, and the initial netns for a packet without one. */
export type KernelFeatures = Record<KernelFeature, boolean>;

export interface KernelProbe {
  features: KernelFeatures;
  /** What was tried for each feature and what the kernel said (or that it was forced). */
  detail: Record<KernelFeature, string>;
  /** How long the probe took. */
  elapsedMs: number;
  /** Features whose result was set by the caller instead of probed. */
  forced: KernelFeature[];
}

/** Probes the running kernel (about 10 ms: a few program loads, and a short-lived thread in a netns
 * of its own that ends with it). Leaves nothing behind. Needs root (CAP_BPF, CAP_NET_ADMIN,
 * CAP_SYS_ADMIN for the netns). */
export async function probeKernel(): Promise<KernelProbe> {
  const r = await addon().probeKernel();
  return { features: { ...r.present }, detail: { ...r.detail }, elapsedMs: r.elapsedMs, forced: [] };
}

/** The probe with some results replaced (tests; what a feature's absence makes the agent do). */
export function forceFeatures(probe: KernelProbe, forced: Partial<KernelFeatures>): KernelProbe {
  const out: KernelProbe = {
    features: { ...probe.features },
    detail: { ...probe.detail },
    elapsedMs: probe.elapsedMs,
    forced: [...probe.forced],
  };
  for (const f of KERNEL_FEATURES) {
    const v = forced[f];
    if (v === undefined) continue;
    out.features[f] = v;
    out.detail[f] = `forced ${v ? 'present' : 'absent'} (probed: ${probe.detail[f]})`;
    if (!out.forced.includes(f)) out.forced.push(f);
  }
  return out;
}

/** How the datapath runs on this kernel, and why. */
export interface DatapathModes {
  /** What attach is asked for: `auto` (tc at enrolment, then tcx once the node is idle) only where
   * the kernel has tcx; tc where it has not. */
  attachMode: AttachMode;
  /** The hooks pods end up with. */
  hooks: 'tcx' | 'tc';
  steering: Steering;
  why: { hooks: string; steering: string };
}

/** The modes the features allow, honouring what was asked. An explicit ask the kernel cannot do is
 * an EKERNEL error (it would fail at every pod's attach otherwise). */
export function chooseModes(
  features: KernelFeatures,
  asked: { attachMode: AttachMode; steering?: Steering | 'auto' | undefined },
): DatapathModes {
  if (!features.tcPrograms)
    throw new DatapathError(
      'EKERNEL',
      'the kernel lacks tc BPF programs with bpf_skc_lookup_tcp, bpf_sk_assign and bpf_redirect (Linux 5.7+)',
    );
  let attachMode: AttachMode;
  let hooks: 'tcx' | 'tc';
  let whyHooks: string;
  if (asked.attachMode === 'tc') {
    [attachMode, hooks, whyHooks] = ['tc', 'tc', 'asked (--attach-mode tc)'];
  } else if (asked.attachMode === 'tcx') {
    if (!features.tcx)
      throw new DatapathError('EKERNEL', '--attach-mode tcx, but the kernel has no tcx links (probed); use auto or tc');
    [attachMode, hooks, whyHooks] = ['tcx', 'tcx', 'asked (--attach-mode tcx)'];
  } else if (features.tcx) {
    [attachMode, hooks, whyHooks] = [
      'auto',
      'tcx',
      'the kernel has tcx links (probed): tc at enrolment, tcx once idle',
    ];
  } else {
    [attachMode, hooks, whyHooks] = ['tc', 'tc', 'the kernel has no tcx links (probed): clsact/cls_bpf hooks'];
  }

  const skLookupNeeds: KernelFeature[] = ['skLookup', 'netnsCookies', 'sockOps'];
  const skLookupMissing = skLookupNeeds.filter((f) => !features[f]);
  let steering: Steering;
  let whySteering: string;
  const askedSteering = asked.steering ?? 'auto';
  if (askedSteering === 'sk-assign') {
    [steering, whySteering] = ['sk-assign', 'asked (--steering sk-assign)'];
  } else if (askedSteering === 'sk-lookup') {
    if (skLookupMissing.length > 0)
      throw new DatapathError(
        'EKERNEL',
        `--steering sk-lookup, but the kernel lacks ${skLookupMissing.join(', ')} (probed)`,
      );
    [steering, whySteering] = ['sk-lookup', 'asked (--steering sk-lookup)'];
  } else if (features.skAssignReuseport) {
    [steering, whySteering] = ['sk-assign', "tc's bpf_sk_assign takes SO_REUSEPORT listeners (probed)"];
  } else if (skLookupMissing.length === 0) {
    [steering, whySteering] = [
      'sk-lookup',
      "tc's bpf_sk_assign refuses SO_REUSEPORT listeners (probed): sk_lookup programs steer instead",
    ];
  } else {
    // Neither steers to ztunnel's SO_REUSEPORT listeners: sk-assign still serves listeners without it.
    [steering, whySteering] = [
      'sk-assign',
      `tc's bpf_sk_assign refuses SO_REUSEPORT listeners and sk-lookup steering needs ${skLookupMissing.join(', ')} (probed): only listeners without SO_REUSEPORT can be reached`,
    ];
  }
  return { attachMode, hooks, steering, why: { hooks: whyHooks, steering: whySteering } };
}

/** A feature's name as a metric label value (tcx, sk_assign_reuseport, ...). */
export function featureLabel(f: KernelFeature): string {
  return f.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
}
