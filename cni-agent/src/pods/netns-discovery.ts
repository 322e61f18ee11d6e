// Finding the network namespace of pods that are already running (the agent's start-up scan):
// every netns reachable under the host root, by named mounts (/var/run/netns/*, where CRI runtimes
// and `ip netns` put them) and by processes (/proc/PID/ns/net), matched by the pod's IPs.
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { netnsAddresses } from '../../../bpf/src/node-netns.js';

export interface NetnsCandidate {
  /** A path that opens this netns: a named mount when there is one, else the oldest process's. */
  path: string;
  inode: number;
  addresses: string[];
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
 * that of PID 1 under the host root when readable), with its global addresses. */
export async function scanNetns(hostRoot = '/'): Promise<NetnsCandidate[]> {
  const named = (await readdir(join(hostRoot, 'var/run/netns')).catch(() => [] as string[])).sort().map((n) => join(hostRoot, 'var/run/netns', n));
  const pids = (await readdir(join(hostRoot, 'proc')).catch(() => [] as string[]))
    .filter((p) => /^\d+$/.test(p))
    .map(Number)
    .sort((a, b) => a - b); // lower pids first: roughly the oldest process of each netns
  const hosts = [await inodeOf('/proc/self/ns/net'), await inodeOf(join(hostRoot, 'proc/1/ns/net'))];
  const seen = new Set<string>(hosts.flatMap((h) => (h ? [`${h.dev}:${h.ino}`] : [])));
  const unique: { path: string; inode: number }[] = [];
  for (const path of [...named, ...pids.map((p) => join(hostRoot, 'proc', String(p), 'ns/net'))]) {
    const id = await inodeOf(path);
    if (!id || seen.has(`${id.dev}:${id.ino}`)) continue;
    seen.add(`${id.dev}:${id.ino}`);
    unique.push({ path, inode: id.ino });
  }
  const out: NetnsCandidate[] = [];
  for (let i = 0; i < unique.length; i += SCAN_CONCURRENCY) {
    const batch = await Promise.all(
      unique.slice(i, i + SCAN_CONCURRENCY).map(async (c) => {
        try {
          return { ...c, addresses: await netnsAddresses(c.path) };
        } catch {
          return undefined; // not a netns (a bind mount gone stale) or gone meanwhile
        }
      }),
    );
    for (const c of batch) if (c) out.push(c);
  }
  return out;
}

/** The netns that holds the pod's IPs: all of them if one does, else any of them. */
export function findPodNetns(candidates: NetnsCandidate[], podIPs: string[]): NetnsCandidate | undefined {
  if (podIPs.length === 0) return undefined;
  return (
    candidates.find((c) => podIPs.every((ip) => c.addresses.includes(ip))) ??
    candidates.find((c) => podIPs.some((ip) => c.addresses.includes(ip)))
  );
}
