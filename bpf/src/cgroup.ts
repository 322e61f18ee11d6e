// cgroup v2 on this node: where it is mounted, and which cgroup (directory) a process is in.
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';

export class CgroupError extends Error {
  override readonly name = 'CgroupError';
  constructor(
    readonly code: 'ENOCGROUP2' | 'ENOPROC' | 'ENOTFOUND',
    message: string,
  ) {
    super(message);
  }
}

/** The cgroup v2 mount point this process sees (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a
 * hybrid host). In a container, the host's mount under `hostRoot` wins over the container's own
 * (which shows only the container's cgroup). */
export function cgroup2Mount(hostRoot = '/', mountinfo = '/proc/self/mountinfo'): string {
  const mounts: string[] = [];
  for (const line of readFileSync(mountinfo, 'utf8').split('\n')) {
    const [before, after] = line.split(' - ');
    const mountPoint = before?.split(' ')[4];
    if (after?.split(' ')[0] === 'cgroup2' && mountPoint) mounts.push(mountPoint.replace(/\\040/g, ' '));
  }
  const underHost = hostRoot === '/' ? undefined : mounts.find((m) => m.startsWith(`${hostRoot.replace(/\/$/, '')}/`));
  const mount = underHost ?? mounts[0];
  if (!mount)
    throw new CgroupError(
      'ENOCGROUP2',
      'no cgroup v2 mount (cgroup2) on this node: DNS capture and the ztunnel-sockets exemption need cgroup v2',
    );
  return mount;
}

/** The cgroup v2 path of a process, as /proc/PID/cgroup shows it (relative to our cgroup namespace). */
export function cgroupPathOfPid(pid: number, procRoot = '/proc'): string {
  let text: string;
  try {
    text = readFileSync(join(procRoot, String(pid), 'cgroup'), 'utf8');
  } catch (err) {
    throw new CgroupError('ENOPROC', `cannot read the cgroup of process ${pid}: ${(err as Error).message}`);
  }
  const path = cgroupV2PathOfProcText(text);
  if (path === undefined) throw new CgroupError('ENOCGROUP2', `process ${pid} is in no cgroup v2`);
  return path;
}

/** The cgroup v2 path in a /proc/PID/cgroup text (its "0::" line), or undefined if it has none. */
export function cgroupV2PathOfProcText(text: string): string | undefined {
  const line = text.split('\n').find((l) => l.startsWith('0::'));
  return line?.slice(3).replace(/ \(deleted\)$/, '');
}

/**
 * The directory of a cgroup path under the cgroup2 mount. A path shown from another cgroup
 * namespace starts with "/.." (the agent's container has its own): the part after the "..".
 * is looked up under the mount and a few levels below it.
 */
export function cgroupDirectory(cgroupPath: string, mount: string): string {
  const parts = cgroupPath.split('/').filter((p) => p !== '' && p !== '.');
  const climbs = parts.findLastIndex((p) => p === '..');
  if (climbs < 0) return join(mount, ...parts);
  const rest = parts.slice(climbs + 1);
  if (rest.length === 0) throw new CgroupError('ENOTFOUND', `cgroup ${cgroupPath} is above this cgroup namespace`);
  const found = findBelow(mount, rest, 3);
  if (!found) throw new CgroupError('ENOTFOUND', `cgroup ${cgroupPath} is not found under ${mount}`);
  return found;
}

function findBelow(dir: string, rest: string[], depth: number): string | undefined {
  const direct = join(dir, ...rest);
  if (isDirectory(direct)) return direct;
  if (depth === 0) return undefined;
  for (const entry of subdirectories(dir)) {
    const found = findBelow(join(dir, entry), rest, depth - 1);
    if (found) return found;
  }
  return undefined;
}

/** The names of a directory's subdirectories ([] if it cannot be read). */
export function subdirectories(dir: string): string[] {
  try {
    return readdirSync(dir, { withFileTypes: true })
      .filter((e) => e.isDirectory())
      .map((e) => e.name);
  } catch {
    return [];
  }
}

function isDirectory(path: string): boolean {
  try {
    return statSync(path).isDirectory();
  } catch {
    return false;
  }
}
