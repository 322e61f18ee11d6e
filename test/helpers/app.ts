// A pod's app as a real process: its own cgroup v2 (as a container has) in the pod's netns. The
// datapath tells ztunnel's sockets from the app's by cgroup, so in-process test sockets (which
// share the test runner's cgroup) cannot play an app that forges ztunnel's mark.
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, mkdirSync, readdirSync, rmdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cgroup2Mount, cgroupDirectory, cgroupPathOfPid, type Datapath } from '../../bpf/src/index.js';
import { KERNEL_STEERING, TEST_PREFIX } from './kernel.js';
import { sh } from './topology.js';

/** test/fixtures/app-client.py, the app's side of the datapath tests. */
export const CLIENT = fileURLToPath(new URL('../../../test/fixtures/app-client.py', import.meta.url));

export class AppCgroup {
  readonly path: string;
  private readonly publicScript: string;

  constructor(id: string) {
    this.publicScript = join(tmpdir(), `${TEST_PREFIX}-app-client-${id}.py`);
    this.path = join(cgroup2Mount(), `${TEST_PREFIX}-app-${id}`);
    mkdirSync(this.path);
  }

  /** The client script, for running it outside this cgroup. */
  readonly clientScript = CLIENT;

  /** Runs the app client (test/fixtures/app-client.py) in this cgroup and `netns`; its answer line. */
  async client(netns: string, ...args: (string | number)[]): Promise<string> {
    const script = `echo $$ > ${join(this.path, 'cgroup.procs')} && exec nsenter --net=${netns} python3 ${CLIENT} "$@"`;
    return (await sh('sh', ['-c', script, 'app', ...args.map(String)])).trim();
  }

  /** The same, as an unprivileged app: uid/gid 65534, no capabilities at all (Debian's python3 on
   * a copy of the script anyone can read). */
  async unprivilegedClient(netns: string, ...args: (string | number)[]): Promise<string> {
    if (!existsSync(this.publicScript)) {
      copyFileSync(CLIENT, this.publicScript);
      chmodSync(this.publicScript, 0o644);
    }
    const drop = 'setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all';
    const script = `echo $$ > ${join(this.path, 'cgroup.procs')} && exec nsenter --net=${netns} ${drop} /usr/bin/python3 ${this.publicScript} "$@"`;
    return (await sh('sh', ['-c', script, 'app', ...args.map(String)])).trim();
  }

  /** A long-lived process in this cgroup and `netns`: the pod's "pause" process, by which the
   * agent finds the pod's cgroup; it ends by itself after `seconds`. Kill it before remove(). */
  pause(netns: string, seconds = 600): ChildProcess {
    return this.spawn('nsenter', [`--net=${netns}`, 'sleep', String(seconds)], { stdio: 'ignore' });
  }

  /** Any command, started in this cgroup (so every socket it makes belongs to the cgroup). */
  spawn(cmd: string, args: string[], options: SpawnOptions = {}): ChildProcess {
    return spawn(
      'sh',
      ['-c', `echo $$ > ${join(this.path, 'cgroup.procs')} && exec "$@"`, 'sh', cmd, ...args],
      options,
    );
  }

  remove(): void {
    rmSync(this.publicScript, { force: true });
    rmdirSync(this.path);
  }
}

/** The cgroup v2 directory of the test runner itself: what a test trusts as ztunnel's
 * (dp.trustZtunnelCgroup) when its own in-process sockets play ztunnel's marked ones. */
export function testRunnerCgroup(): string {
  const mount = cgroup2Mount();
  return cgroupDirectory(cgroupPathOfPid(process.pid), mount);
}

/** Sets a test's datapath to the steering this kernel runs by default (the agent's choice). On a
 * kernel before 6.6 that is sk_lookup, which learns ztunnel's listeners from ztunnel's cgroup: the
 * test runner's, whose in-process listeners play ztunnel's. On 6.6+ nothing changes. */
export async function useKernelSteering(dp: Datapath): Promise<void> {
  if (KERNEL_STEERING === 'sk-assign') return;
  await dp.configure({ ztunnelExemption: 'ztunnel-sockets', strictAllow: [], steering: KERNEL_STEERING });
  dp.trustZtunnelCgroup(testRunnerCgroup());
}

/** Test cgroups still present (a suite asserts there are none). */
export function leftoverCgroups(): string[] {
  return readdirSync(cgroup2Mount()).filter((n) => n.startsWith(`${TEST_PREFIX}-`));
}
