// kubelet's pod cgroups: which pod (uid) a cgroup v2 path belongs to. kubelet makes one cgroup per
// pod, named after the pod uid, before the sandbox starts; every container of the pod (the pause
// container included) runs in it or below it. Only kubelet and root on the node can create cgroups
// there, so unlike an IP address, a process's pod cgroup is an identity a pod cannot claim for
// another pod.
//
// Path shapes, as /proc/PID/cgroup ("0::<path>") shows them (upstream Istio's
// cni/pkg/nodeagent/podcgroupns.go, after SPIRE, parses the same ones):
//   cgroupfs driver  /kubepods/pod<uid>/<ctr>                       (Guaranteed)
//                    /kubepods/burstable/pod<uid>/<ctr>
//                    /kubepods/besteffort/pod<uid>/<ctr>
//   systemd driver   /kubepods.slice/kubepods-pod<uid_>.slice/cri-containerd-<ctr>.scope
//                    /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/...
//                    /kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/...
//   either, below a leading prefix (/kubelet.slice/..., /docker/<id>/ for kind nodes) or seen from
//   another cgroup namespace (/../../pod<uid>/<ctr>), and with or without a container runtime's
//   directory below the pod cgroup. The systemd driver escapes "-" in the uid as "_".
// As upstream, the kubepods ancestor is not required (from inside a cgroup namespace it may not
// show); unlike upstream, a path naming two pod cgroups is nobody's (a pod that may create cgroups
// below its own cannot pass for another pod by naming one after it).

import { cgroupV2PathOfProcText } from '../../../bpf/src/cgroup.js';

const UUID = '([0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12})';
/** cgroupfs: pod<uid>. */
const CGROUPFS_POD = new RegExp(`^pod${UUID}$`);
/** systemd: kubepods[-<qos>]-pod<uid_>.slice (cgroup v1 with containerd may append ":runtime:id"). */
const SYSTEMD_POD = new RegExp(`^kubepods(?:-(?:besteffort|burstable))?-pod${UUID}\\.slice(?::.*)?$`);

/** A pod uid as Kubernetes writes it: lowercase, "-" between the groups. */
export function canonicalPodUid(uid: string): string {
  return uid.toLowerCase().replace(/_/g, '-');
}

/** The pod uid a cgroup directory name is kubelet's pod cgroup for (either driver), or undefined. */
export function podUidOfCgroupName(name: string): string | undefined {
  const m = CGROUPFS_POD.exec(name) ?? SYSTEMD_POD.exec(name);
  if (!m) return undefined;
  const uid = m[1]!;
  // One separator style throughout: a uid with mixed separators is not kubelet's.
  if (uid.includes('-') && uid.includes('_')) return undefined;
  return canonicalPodUid(uid);
}

/** Is this directory name one kubelet uses above pod cgroups (kubepods, its QoS levels, slices)? */
export function isKubepodsAncestorName(name: string): boolean {
  return name.startsWith('kubepods') || name === 'besteffort' || name === 'burstable';
}

export interface PodCgroupPath {
  /** The pod uid, canonical. */
  uid: string;
  /** The path up to and including the pod cgroup. */
  podCgroup: string;
}

/** The kubelet pod cgroup a cgroup path is in (at or below it), or undefined if it is in none or the
 * path names more than one pod cgroup. */
export function parsePodCgroupPath(path: string): PodCgroupPath | undefined {
  const parts = path.replace(/ \(deleted\)$/, '').split('/');
  let found: PodCgroupPath | undefined;
  for (let i = 0; i < parts.length; i++) {
    const uid = podUidOfCgroupName(parts[i]!);
    if (uid === undefined) continue;
    if (found) return undefined;
    found = { uid, podCgroup: parts.slice(0, i + 1).join('/') || '/' };
  }
  return found;
}

/** The pod uid of a process from its /proc/PID/cgroup text (the cgroup v2 line), or undefined. */
export function podUidOfProcCgroup(text: string): string | undefined {
  const path = cgroupV2PathOfProcText(text);
  return path === undefined ? undefined : parsePodCgroupPath(path)?.uid;
}
