// Finding the network namespace of pods that are already running (the agent's start-up scan):
// every netns reachable under the host root, by named mounts (/var/run/netns/*, where CRI runtimes
// and `ip netns` put them) and by processes (/proc/PID/ns/net), with its addresses and the kubelet
// pod cgroups its processes are in. Which one is a pod's is decided in pod-identity.ts.
import { readdir, readFile, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { netnsAddressesAndOwner } from '../../../bpf/src/node-netns.js';
import { podUidOfProcCgroup } from './pod-cgroup.js';
import { DEFAULT_NETNS_DIRECTORIES } from '../cni/netns-path.js';

export interface NetnsCandidate {
  /** A path that opens this netns: a named mount when there is one, else the oldest process's. */
  path: string;
  inode: number;
  addresses: string[];
  /** The uids of the kubelet pod cgroups the netns's processes are in (none for a netns only a
   * mount holds, or whose processes are in no pod cgroup). */
  podUids: string[];
  /** Owned by the node's user namespace (the agent's). A netns a process made in a user namespace
   * of its own (an unprivileged `unshare -Un`) is not: no runtime made it for a sandbox. */
  nodeOwned: boolean;
}

export interface NetnsScan {
  candidates: NetnsCandidate[];
  /** The uids of kubelet pod cgroups that have processes in netns that are not candidates (the
   * node's own: host-network pods). */
  hostPodUids: Set<string>;
}

const SCAN_CONCURRENCY = 8;

async function inodeOf(path: string): Promise<{ ino: number; dev: number } | undefined> {
  try {
    const st = await stat(path);
    return { ino: st.ino, dev: st.dev };
  } catch {
    return undefined; // gone meanwhile, or not ours to see
  }
}

/** Every netns other than the host's (the agent's own, as it runs with the host network, and
 * that of PID 1 under the host root when readable), with its global addresses and the pod cgroups
 * of its processes. */
export async function scanNetns(
  hostRoot = '/',
  netnsDirs: readonly string[] = DEFAULT_NETNS_DIRECTORIES,
): Promise<NetnsScan> {
  const named: string[] = [];
  for (const dir of netnsDirs)
    named.push(
      ...(await readdir(join(hostRoot, dir)).catch(() => [] as string[])).sort().map((n) => join(hostRoot, dir, n)),
    );
  const pids = (await readdir(join(hostRoot, 'proc')).catch(() => [] as string[]))
    .filter((p) => /^\d+$/.test(p))
    .map(Number)
    .sort((a, b) => a - b); // lower pids first: roughly the oldest process of each netns
  const hosts = [await inodeOf('/proc/self/ns/net'), await inodeOf(join(hostRoot, 'proc/1/ns/net'))];
  const seen = new Set<string>(hosts.flatMap((h) => (h ? [`${h.dev}:${h.ino}`] : [])));
  const hostIds = new Set(seen);
  const unique: { path: string; inode: number; podUids: Set<string> }[] = [];
  const byId = new Map<string, (typeof unique)[number]>();
  const hostPodUids = new Set<string>();
  for (const path of [...named, ...pids.map((p) => join(hostRoot, 'proc', String(p), 'ns/net'))]) {
    const id = await inodeOf(path);
    if (!id) continue;
    const key = `${id.dev}:${id.ino}`;
    if (!seen.has(key)) {
      seen.add(key);
      const c = { path, inode: id.ino, podUids: new Set<string>() };
      unique.push(c);
      byId.set(key, c);
    }
    if (!path.endsWith('/ns/net')) continue; // a named mount: no process
    // The process's pod cgroup (read after its netns: a pid reused in between is a process that
    // started after the scan began, whose cgroup is then attributed to the wrong netns at worst
    // for this one scan; the pod's own processes stay where they are).
    const uid = podUidOfProcCgroup(await readFile(join(dirname(path), '..', 'cgroup'), 'utf8').catch(() => ''));
    if (uid === undefined) continue;
    if (hostIds.has(key)) hostPodUids.add(uid);
    else byId.get(key)?.podUids.add(uid);
  }
  const nodeUserns = (await inodeOf('/proc/self/ns/user'))?.ino;
  const candidates: NetnsCandidate[] = [];
  for (let i = 0; i < unique.length; i += SCAN_CONCURRENCY) {
    const batch = await Promise.all(
      unique.slice(i, i + SCAN_CONCURRENCY).map(async (c) => {
        try {
          const { addresses, ownerUserns } = await netnsAddressesAndOwner(c.path);
          // (an owner the kernel cannot tell, 0, counts as the node's, as before this check)
          const nodeOwned = ownerUserns === 0 || nodeUserns === undefined || ownerUserns === nodeUserns;
          return { path: c.path, inode: c.inode, podUids: [...c.podUids].sort(), addresses, nodeOwned };
        } catch {
          return undefined; // not a netns (a bind mount gone stale) or gone meanwhile
        }
      }),
    );
    for (const c of batch) if (c) candidates.push(c);
  }
  return { candidates, hostPodUids };
}
