// CNI_NETNS comes from whoever runs the plugin: before the agent acts on it, it must name a pod
// network namespace where runtimes put them, and nothing else (no symlink to another namespace or
// file, no path that climbs out of those directories).
import { lstatSync, realpathSync, statSync } from 'node:fs';
import { basename, dirname, posix } from 'node:path';

/** Where runtimes bind-mount pod network namespaces (containerd, CRI-O, podman); --netns-dir
 * replaces it (minikube's Docker runtime: /var/run/docker/netns). */
export const DEFAULT_NETNS_DIRECTORIES = ['/var/run/netns'];

/** The directories as CNI_NETNS may name them: /var/run is /run on every current distribution
 * (FHS 3.0), and runtimes write either. */
export function netnsDirectoryAliases(dirs: readonly string[]): string[] {
  const out = new Set<string>();
  for (const d of dirs) {
    out.add(d);
    if (d.startsWith('/var/run/')) out.add(d.slice('/var'.length));
    else if (d.startsWith('/run/')) out.add(`/var${d}`);
  }
  return [...out];
}
/** A process's namespace (runtimes that pass /proc/PID/ns/net). */
const PROC_NETNS = /^\/proc\/[1-9]\d{0,9}\/ns\/net$/;

export class NetnsPathError extends Error {
  override readonly name = 'NetnsPathError';
}

/** The agent's view of a CNI_NETNS path (`hostPath` maps it under --host-root), once it is known
 * to be acceptable; throws NetnsPathError saying why not. */
export function checkNetnsPath(
  path: string,
  hostPath: (p: string) => string = (p) => p,
  netnsDirs: readonly string[] = DEFAULT_NETNS_DIRECTORIES,
): string {
  const directories = netnsDirectoryAliases(netnsDirs);
  if (!path.startsWith('/') || posix.normalize(path) !== path || path.endsWith('/')) {
    throw new NetnsPathError(`${JSON.stringify(path)} is not a plain absolute path`);
  }
  if (PROC_NETNS.test(path)) return notTheNodes(path, hostPath(path));
  const dir = dirname(path);
  if (!directories.includes(dir) || basename(path).startsWith('.')) {
    throw new NetnsPathError(`${path} is not in ${directories.join(' or ')} nor /proc/PID/ns/net (--netns-dir)`);
  }
  const local = hostPath(path);
  let isLink: boolean;
  try {
    isLink = lstatSync(local).isSymbolicLink();
  } catch (err) {
    throw new NetnsPathError(`${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  if (isLink) throw new NetnsPathError(`${path} is a symbolic link`);
  // The directory itself must be the real one (not a link swapped in to point elsewhere).
  const real = realpathSync(dirname(local));
  const allowed = directories.map((d) => {
    try {
      return realpathSync(hostPath(d));
    } catch {
      return undefined;
    }
  });
  if (!allowed.includes(real))
    throw new NetnsPathError(`${path} resolves into ${real}, not a network namespace directory`);
  return notTheNodes(path, local);
}

/** The agent runs in the node's network namespace: a pod's is never that one. */
function notTheNodes(path: string, local: string): string {
  let same = false;
  try {
    const a = statSync(local);
    const b = statSync('/proc/self/ns/net');
    same = a.ino === b.ino && a.dev === b.dev;
  } catch (err) {
    throw new NetnsPathError(`${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  if (same) throw new NetnsPathError(`${path} is the node's own network namespace, not a pod's`);
  return local;
}
