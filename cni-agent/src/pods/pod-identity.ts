// Which netns is a running pod's, outside CNI ADD (a label flip on a running pod, an agent restart),
// decided by the pod's identity rather than by who holds its IPs: any pod with NET_ADMIN can put
// another pod's IP on an interface of its own netns, but only kubelet puts processes in a pod's
// cgroup (pod-cgroup.ts). Upstream istio-cni finds pods' netns the same way (by the pod uid in the
// cgroups of the processes in each netns); the IPs are the cross-check here.
//
// - Some process in the pod's kubelet cgroup (a Kubernetes node): the pod's netns is the one
//   netns its processes are in, and it must hold all of the pod's IPs. Processes of the pod in two
//   netns, or a netns without the pod's IPs, are refused: nothing is enrolled on a guess.
// - No process in a cgroup of that pod anywhere (the embedded/local mode: pods are plain named
//   netns, no kubelet; or a pod whose sandbox has no process yet): by IPs, strictly. Exactly one
//   netns must hold all of them, no other netns may hold any of them (refused as ambiguous), and it
//   must not be another pod's (its processes in another pod's kubelet cgroup).
// Netns that a process made in a user namespace of its own (no runtime made them for a sandbox) are
// left out while a netns the node owns is among the candidates: an app that may unshare its own
// user and network namespaces (unprivileged user namespaces, seccomp Unconfined) cannot make its
// pod's enrolment ambiguous and so keep itself out of capture.
// A refusal is an error for that pod (its reason shows in the pod's status) and is retried.
import type { NetnsCandidate, NetnsScan } from './netns-discovery.js';
import { canonicalPodUid } from './pod-cgroup.js';

export type PodNetnsAnswer = { found: NetnsCandidate } | { refused: string } | { missing: string };

export function resolvePodNetns(scan: NetnsScan, uid: string, ips: string[]): PodNetnsAnswer {
  if (ips.length === 0) return { missing: 'the pod has no IPs yet' };
  const want = canonicalPodUid(uid);
  const holdsAll = (c: NetnsCandidate): boolean => ips.every((ip) => c.addresses.includes(ip));
  const ofPod = preferNodeOwned(scan.candidates.filter((c) => c.podUids.includes(want)));
  if (ofPod.length > 1) {
    return {
      refused: `the pod’s processes are in ${ofPod.length} network namespaces (${ofPod.map((c) => c.path).join(', ')}); refusing to pick one`,
    };
  }
  if (ofPod.length === 1) {
    const c = ofPod[0]!;
    const others = c.podUids.filter((u) => u !== want);
    if (others.length > 0)
      return { refused: `the pod’s network namespace ${c.path} also has processes of pod ${others.join(', ')}` };
    if (!holdsAll(c))
      return {
        refused: `the pod’s network namespace ${c.path} does not hold its IPs ${ips.join(', ')} (has ${c.addresses.join(', ') || 'none'})`,
      };
    return { found: c };
  }
  if (scan.hostPodUids.has(want)) return { refused: 'the pod’s processes are in the node’s network namespace' };
  // No process in this pod's cgroup: by IPs, strictly.
  const any = preferNodeOwned(scan.candidates.filter((c) => ips.some((ip) => c.addresses.includes(ip))));
  const all = any.filter(holdsAll);
  if (any.length > 1) {
    return {
      refused: `ambiguous: ${any.length} network namespaces hold the pod’s IPs (${any.map((c) => c.path).join(', ')})`,
    };
  }
  if (all.length === 0) {
    return any.length === 1
      ? { refused: `the network namespace ${any[0]!.path} holds only some of the pod IPs ${ips.join(', ')}` }
      : { missing: `no network namespace holds the pod IPs ${ips.join(', ')} (not started yet?)` };
  }
  const c = all[0]!;
  if (c.podUids.length > 0)
    return { refused: `the network namespace holding the pod IPs (${c.path}) belongs to pod ${c.podUids.join(', ')}` };
  return { found: c };
}

function preferNodeOwned(candidates: NetnsCandidate[]): NetnsCandidate[] {
  return candidates.some((c) => c.nodeOwned) ? candidates.filter((c) => c.nodeOwned) : candidates;
}
