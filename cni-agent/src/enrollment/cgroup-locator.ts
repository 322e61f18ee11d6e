// Which cgroup v2 is a pod's, for DNS capture: kubelet's pod cgroup (named after the pod uid, made
// before the sandbox, so it exists at CNI ADD), else the cgroup the pod's processes share. Never
// the root cgroup, nor one that also holds processes outside the pod: the hooks would capture them.
// The processes are read from /proc once for every pod looked up around the same time (a restarted
// agent looks up all its pods at once; one scan per pod cost tens of ms each on a busy node).
import { readdirSync, readlinkSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { cgroup2Mount, cgroupDirectory, cgroupPathOfPid, subdirectories } from '../../../bpf/src/index.js';
import { canonicalPodUid, isKubepodsAncestorName, podUidOfCgroupName } from '../pods/pod-cgroup.js';

/** Every process's netns (as its ns/net link reads, "net:[inode]") and cgroup v2 path. */
type ProcessScan = { netns: string; cgroup: string }[];

export class CgroupLocator {
  private mount: string | undefined;
  private last: { at: number; scan: ProcessScan } | undefined;

  constructor(
    private readonly hostRoot = '/',
    private readonly o: {
      /** Where kubelet's cgroups are looked for (default: the cgroup v2 mount; tests use a subtree). */
      kubeletRoot?: string;
      /** The cgroup v2 mount (default: found in mountinfo; the unit tests give a directory). */
      mount?: string;
      /** A scan younger than this is trusted as it is (a pod without processes yet waits anyway). */
      freshMs?: number;
      /** A cgroup found on a scan younger than this is trusted while its directory exists. */
      hitMs?: number;
    } = {},
  ) {
    this.mount = o.mount;
  }

  /** The pod's cgroup directory, or undefined while it has none of its own yet. */
  find(uid: string, netnsPath: string): string | undefined {
    this.mount ??= cgroup2Mount(this.hostRoot);
    return kubeletPodCgroup(this.o.kubeletRoot ?? this.mount, uid) ?? this.fromProcesses(netnsPath);
  }

  private fromProcesses(netnsPath: string): string | undefined {
    const want = `net:[${statSync(netnsPath).ino}]`;
    if (this.last) {
      const age = Date.now() - this.last.at;
      const found = this.sharedCgroup(this.last.scan, want);
      if (age < (this.o.freshMs ?? 100) && found === undefined) return undefined;
      if (age < (this.o.hitMs ?? 1000) && found !== undefined && isDirectory(found)) return found;
    }
    this.last = { at: Date.now(), scan: scanProcesses(join(this.hostRoot, 'proc')) };
    return this.sharedCgroup(this.last.scan, want);
  }

  /** The directory of the cgroup the processes in netns `want` share, if it is theirs alone. */
  private sharedCgroup(scan: ProcessScan, want: string): string | undefined {
    const inPod = scan.filter((p) => p.netns === want).map((p) => p.cgroup);
    if (inPod.length === 0) return undefined;
    const common = commonAncestor(inPod);
    // The cgroup must be the pod's alone: not the root, and no outside process in it or below it.
    if (
      common === '/' ||
      scan.some((p) => p.netns !== want && (p.cgroup === common || p.cgroup.startsWith(`${common}/`)))
    )
      return undefined;
    return cgroupDirectory(common, this.mount!);
  }
}

function scanProcesses(proc: string): ProcessScan {
  const scan: ProcessScan = [];
  for (const pid of readdirSync(proc).filter((p) => /^\d+$/.test(p))) {
    try {
      scan.push({ cgroup: cgroupPathOfPid(Number(pid), proc), netns: readlinkSync(join(proc, pid, 'ns', 'net')) });
    } catch {
      // the process exited, or is a kernel thread
    }
  }
  return scan;
}

function isDirectory(path: string): boolean {
  try {
    return statSync(path).isDirectory();
  } catch {
    return false;
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
        if (kubepods || entry === 'kubelet.slice' || (underKubepods && isKubepodsAncestorName(entry)))
          next.push({ dir: join(dir, entry), underKubepods: underKubepods || kubepods });
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
