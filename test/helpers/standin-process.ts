// The ztunnel stand-in as its own process (`ambient-bpf ztunnel`), as the demo and a node run it:
// its memory can be measured apart from the test's, and its counters read with SIGUSR1.
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import type { PodStats } from '../../ztunnel-bridge/src/standin/ztunnel.js';
import { CLI } from './cli.js';

export class StandInProcess {
  private readonly lines: string[] = [];
  private waiter: (() => void) | undefined;
  private partial = '';

  private constructor(readonly child: ChildProcess) {
    child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      const parts = (this.partial + d).split('\n');
      this.partial = parts.pop()!;
      this.lines.push(...parts.filter(Boolean));
      this.waiter?.();
    });
    child.stderr!.resume();
  }

  static start(socketPath: string): StandInProcess {
    return new StandInProcess(
      spawn(CLI, ['ztunnel', '--socket', socketPath, '--log-level', 'error'], { stdio: ['ignore', 'pipe', 'pipe'] }),
    );
  }

  get pid(): number {
    return this.child.pid!;
  }

  /** The stand-in's per-pod counters (printed on SIGUSR1). */
  async stats(): Promise<PodStats[]> {
    const before = this.lines.length;
    const got = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no stats from the stand-in')), 5000);
      this.waiter = () => {
        if (this.lines.length > before) {
          clearTimeout(timer);
          resolve();
        }
      };
    });
    this.child.kill('SIGUSR1');
    await got;
    this.waiter = undefined;
    return (JSON.parse(this.lines.at(-1)!) as { pods: PodStats[] }).pods;
  }

  /** Resident memory, in bytes. */
  rss(): number {
    const kib = Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${this.pid}/status`, 'utf8'))?.[1]);
    return kib * 1024;
  }

  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise<void>((r) => this.child.once('exit', () => r()));
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(timer);
  }
}
