// The node's paths the agent works in, checked before it starts: in a container each comes from a
// hostPath volume of the DaemonSet, and one that is missing would otherwise show up much later
// (a pod that cannot be found, a socket ztunnel never sees) with an error that names nothing.
import { accessSync, constants, existsSync, mkdirSync, readFileSync, statfsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { cgroup2Mount, cgroupPathOfPid } from '../../../bpf/src/index.js';
import { DEFAULT_NETNS_DIRECTORIES } from '../cni/netns-path.js';

/** statfs(2)'s f_type of a bpffs. */
const BPF_FS_MAGIC = 0xcafe4a11;

export interface HostPathOptions {
  hostRoot: string;
  /** The bpffs directory of the pins (it need not exist yet; the directory holding it must be on a bpffs). */
  bpffs: string;
  ztunnelSocket: string;
  pluginSocket: string;
  /** The CNI plugin's policy file (its directory must survive a reboot: a hostPath). */
  policyFile: string;
  /** With --install-cni: the node's CNI binary and configuration directories. */
  cni?: { binDir: string; confDir: string } | undefined;
  /** The node's directories of pod network namespaces (--netns-dir), under hostRoot. */
  netnsDirs?: readonly string[];
  /** The agent's own mountinfo (tests). */
  mountinfo?: string;
}

/** What is missing, one line each naming the path, what it is for and where it comes from. */
export function hostPathProblems(o: HostPathOptions): string[] {
  const problems: string[] = [];
  const fromHost = (path: string, nodePath: string, what: string) =>
    `${path}: ${what}; it must be the node's ${nodePath} (hostPath ${nodePath})`;
  const proc = join(o.hostRoot, 'proc');
  if (!existsSync(join(proc, '1', 'ns')))
    problems.push(
      fromHost(
        proc,
        '/proc',
        "missing: the node's processes (running pods' network namespaces, ztunnel's cgroup) are read there",
      ),
    );
  for (const dir of o.netnsDirs ?? DEFAULT_NETNS_DIRECTORIES) {
    const netns = join(o.hostRoot, dir);
    if (!existsSync(netns))
      problems.push(
        fromHost(netns, dir, 'missing: the runtime names pod network namespaces there (CNI_NETNS; --netns-dir)'),
      );
  }
  let bpffsDir = o.bpffs;
  while (!existsSync(bpffsDir) && dirname(bpffsDir) !== bpffsDir) bpffsDir = dirname(bpffsDir);
  if (statfsSync(bpffsDir).type !== BPF_FS_MAGIC)
    problems.push(
      fromHost(
        bpffsDir,
        '/sys/fs/bpf',
        `not a bpffs: the pinned maps and links (redirection that outlives the agent) go under ${o.bpffs}`,
      ),
    );
  for (const [dir, what] of [
    [dirname(o.ztunnelSocket), 'the ZDS socket ztunnel connects to'],
    [dirname(o.pluginSocket), "the CNI plugin's socket, the enrolled sandboxes' IDs"],
    [dirname(o.policyFile), 'what the CNI plugin decides from while the agent is unreachable, kept across reboots'],
  ] as const) {
    try {
      if (!existsSync(dir)) mkdirSync(dir, { recursive: !existsSync(dirname(dir)), mode: 0o750 });
      accessSync(dir, constants.W_OK);
    } catch (err) {
      problems.push(
        fromHost(
          dir,
          dir,
          `cannot be written (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}): it holds ${what}`,
        ),
      );
    }
  }
  for (const [dir, what] of o.cni
    ? ([
        [o.cni.binDir, 'the CNI plugin binary is installed there'],
        [o.cni.confDir, "the node's CNI configuration, where the plugin is chained"],
      ] as const)
    : []) {
    try {
      accessSync(dir, constants.W_OK);
    } catch (err) {
      problems.push(
        fromHost(
          dir,
          dir.startsWith(o.hostRoot) && o.hostRoot !== '/' ? dir.slice(o.hostRoot.replace(/\/$/, '').length) : dir,
          `${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'missing' : 'cannot be written'}: ${what}`,
        ),
      );
    }
  }
  const cgroup = cgroupProblem(o.hostRoot, o.mountinfo);
  if (cgroup) problems.push(cgroup);
  return problems;
}

/** The pods' cgroup hooks need the node's whole cgroup v2 hierarchy: a container's own cgroup
 * mount shows only its own cgroup (its mount root is not the hierarchy's root). */
function cgroupProblem(hostRoot: string, mountinfo = '/proc/self/mountinfo'): string | undefined {
  let mount: string;
  try {
    mount = cgroup2Mount(hostRoot, mountinfo);
  } catch (err) {
    return `/sys/fs/cgroup: ${(err as Error).message}; it must be the node's /sys/fs/cgroup (hostPath /sys/fs/cgroup)`;
  }
  const line = readFileSync(mountinfo, 'utf8')
    .split('\n')
    .find((l) => l.split(' ')[4] === mount.replace(/ /g, '\\040') && l.includes(' - cgroup2 '));
  const root = line?.split(' ')[3];
  let own: string | undefined;
  try {
    own = cgroupPathOfPid(process.pid, '/proc');
  } catch {
    own = undefined;
  }
  if (root !== '/' || (own !== undefined && !existsSync(join(mount, own)))) {
    return `${mount}: shows only part of the cgroup v2 hierarchy (mounted from ${root ?? '?'}): pods' cgroups (DNS capture, the connect and socket-option hooks) are found there; it must be the node's /sys/fs/cgroup (hostPath /sys/fs/cgroup)`;
  }
  return undefined;
}
