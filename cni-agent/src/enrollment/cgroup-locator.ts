// Which cgroup v2 is a pod's, for DNS capture: kubelet's pod cgroup (named after the pod uid, made
// before the sandbox, so it exists at CNI ADD), else the cgroup the pod's processes share. Never
// the root cgroup, nor one that also holds processes outside the pod: the hooks would capture them.
import { readdirSync, readlinkSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { cgroup2Mount, cgroupDirectory, cgroupPathOfPid, subdirectories } from '../../../bpf/src/index.js';
import { canonicalPodUid, isKubepodsAncestorName, podUidOfCgroupName } from '../pods/pod-cgroup.js';

export class CgroupLocator {
  private mount: string | undefined;

  constructor(
    private readonly hostRoot = '/',
    /** Where kubelet's cgroups are looked for (default: the cgroup v2 mount; tests use a subtree). */
    private readonly kubeletRoot?: string,
  ) {}

  /** The pod's cgroup directory, or undefined while it has none of its own yet. */
  find(uid: string, netnsPath: string): string | undefined {
    this.mount ??= cgroup2Mount(this.hostRoot);
    return kubeletPodCgroup(this.kubeletRoot ?? this.mount, uid) ?? this.fromProcesses(netnsPath);
  }

  private fromProcesses(netnsPath: string): string | undefined {
    const mount = this.mount!;
    const proc = join(this.hostRoot, 'proc');
    const want = `net:[${statSync(netnsPath).ino}]`;
    const inPod: string[] = [];
    const elsewhere = new Set<string>();
    for (const pid of readdirSync(proc).filter((p) => /^\d+$/.test(p))) {
      try {
        const path = cgroupPathOfPid(Number(pid), proc);
        if (readlinkSync(join(proc, pid, 'ns', 'net')) === want) inPod.push(path);
        else elsewhere.add(path);
      } catch {
        // the process exited, or is a kernel thread
      }
    }
    if (inPod.length === 0) return undefined;
    const common = commonAncestor(inPod);
    // The cgroup must be the pod's alone: not the root, and no outside process in it or below it.
    if (common === '/' || [...elsewhere].some((p) => p === common || p.startsWith(`${common}/`))) return undefined;
    return cgroupDirectory(common, mount);
  }
}

/** kubelet's pod cgroup, for both cgroup drivers and every QoS class (names parsed as in
 * pods/pod-cgroup.ts): kubepods/pod<uid>, kubepods/{burstable,besteffort}/pod<uid> (cgroupfs),
 * kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice (systemd), also below
 * kubelet.slice (kubelet's --cgroup-root). */
export function kubeletPodCgroup(root: string, uid: string): string | undefined {
  const want = canonicalPodUid(uid);
  let level = [{ dir: root, underKubepods: false }];
  for (let depth = 0; depth < 5 && level.length > 0; depth++) {
    const next: typeof level = [];
    for (const { dir, underKubepods } of level) {
      for (const entry of subdirectories(dir)) {
        if (podUidOfCgroupName(entry) === want) return join(dir, entry);
        // Descend into kubepods* and the QoS levels below it, and into kubelet.slice's children.
        const kubepods = entry.includes('kubepods');
        if (kubepods || entry === 'kubelet.slice' || (underKubepods && isKubepodsAncestorName(entry))) next.push({ dir: join(dir, entry), underKubepods: underKubepods || kubepods });
      }
    }
    level = next;
  }
  return undefined;
}

function commonAncestor(paths: string[]): string {
  const split = paths.map((p) => p.split('/').filter(Boolean));
  const first = split[0]!;
  let n = 0;
  while (n < first.length && split.every((s) => s[n] === first[n])) n++;
  return `/${first.slice(0, n).join('/')}`;
}
