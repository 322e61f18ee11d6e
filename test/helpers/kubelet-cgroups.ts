// A kubelet-shaped cgroup v2 tree for tests (kubepods/besteffort/pod<uid>/<ctr>, systemd slices...)
// under <cgroup2 mount>/<TEST_PREFIX>-kubelet-<id>, with real processes in it, each in a netns of the
// test's. cleanup() kills the processes it started and removes every directory it made.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync, rmdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { cgroup2Mount } from '../../bpf/src/index.js';
import { TEST_PREFIX } from './kernel.js';
import { until } from './wait.js';

export class KubeletCgroups {
  readonly root: string;
  private readonly children: ChildProcess[] = [];

  constructor(id: string) {
    this.root = join(cgroup2Mount(), `${TEST_PREFIX}-kubelet-${id}`);
    mkdirSync(this.root);
  }

  /** Makes the directory (relative to the root) and returns its path. */
  mkdir(relative: string): string {
    const dir = join(this.root, relative);
    mkdirSync(dir, { recursive: true });
    return dir;
  }

  /** A sleeping process in the cgroup `relative` and the netns `netnsPath`; resolves once it is in
   * both (its /proc/PID/cgroup names the cgroup). */
  async sleeper(relative: string, netnsPath: string): Promise<ChildProcess> {
    const dir = this.mkdir(relative);
    const child = spawn(
      'sh',
      ['-c', `echo $$ > ${join(dir, 'cgroup.procs')} && exec nsenter --net=${netnsPath} sleep 600`],
      { stdio: 'ignore' },
    );
    this.children.push(child);
    const netnsIno = statSync(netnsPath).ino;
    await until(() => {
      try {
        return statSync(`/proc/${child.pid}/ns/net`).ino === netnsIno;
      } catch {
        return false;
      }
    }, `process in ${relative}`);
    return child;
  }

  /** A process in the cgroup `relative` that makes its own user and network namespaces (as an
   * unprivileged app may) and puts `addresses` on a veth there (a user namespace may not load the
   * dummy module); resolves once it runs in a netns owned by its own user namespace. */
  async ownNetns(relative: string, addresses: string[]): Promise<ChildProcess> {
    const dir = this.mkdir(relative);
    const setup = [
      'ip link add v0 type veth peer name v1',
      'ip link set v0 up',
      ...addresses.map((a) => `ip addr add ${a} dev v0${a.includes(':') ? ' nodad' : ''}`),
    ].join(' && ');
    const child = spawn(
      'sh',
      [
        '-c',
        `echo $$ > ${join(dir, 'cgroup.procs')} && exec unshare --user --map-root-user --net sh -c '${setup} && exec sleep 600'`,
      ],
      { stdio: 'ignore' },
    );
    this.children.push(child);
    const hostUserns = statSync('/proc/self/ns/user').ino;
    await until(() => {
      try {
        // the final sleep: in a user namespace of its own, its addresses set
        return (
          statSync(`/proc/${child.pid}/ns/user`).ino !== hostUserns &&
          readFileSync(`/proc/${child.pid}/comm`, 'utf8').trim() === 'sleep'
        );
      } catch {
        return false;
      }
    }, `process with its own netns in ${relative}`);
    return child;
  }

  async cleanup(): Promise<void> {
    for (const child of this.children.splice(0)) {
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGKILL');
        await exited;
      }
    }
    removeTree(this.root);
  }
}

function removeTree(dir: string): void {
  let entries: string[];
  try {
    entries = readdirSync(dir, { withFileTypes: true })
      .filter((e) => e.isDirectory())
      .map((e) => e.name);
  } catch {
    return;
  }
  for (const e of entries) removeTree(join(dir, e));
  rmdirSync(dir);
}
