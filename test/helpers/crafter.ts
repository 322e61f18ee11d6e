// craft.py (test/fixtures) as a process: packets crafted with scapy, one JSON request a line in,
// one JSON answer a line out (see the fixture for the requests).
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import type { AppCgroup } from './app.js';
import { scaled } from './wait.js';

export const CRAFT = fileURLToPath(new URL('../../../test/fixtures/craft.py', import.meta.url));
export const PYTHON = '/usr/bin/python3'; // Debian's, where python3-scapy is installed

export interface CraftResult {
  case: string;
  result: string;
  banner?: string;
  iface?: string;
  sport: number;
  seq?: number;
  error?: string;
}

/** A craft.py process: one JSON request a line in, one JSON answer a line out. */
export class Crafter {
  private readonly answers: string[] = [];
  private waiting: ((line: string) => void) | undefined;
  private readonly exited: Promise<unknown>;

  constructor(private readonly proc: ChildProcess) {
    this.exited = new Promise((r) => proc.once('exit', r));
    createInterface({ input: proc.stdout! }).on('line', (line) => {
      const w = this.waiting;
      this.waiting = undefined;
      if (w) w(line);
      else this.answers.push(line);
    });
  }

  private next(timeoutMs: number): Promise<string> {
    const queued = this.answers.shift();
    if (queued !== undefined) return Promise.resolve(queued);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('craft.py did not answer')), timeoutMs);
      this.waiting = (line) => {
        clearTimeout(timer);
        resolve(line);
      };
    });
  }

  async ready(): Promise<this> {
    assert.match(await this.next(scaled(20_000)), /"ready"/);
    return this;
  }

  async send(req: Record<string, unknown>): Promise<CraftResult> {
    this.proc.stdin!.write(`${JSON.stringify(req)}\n`);
    const out = JSON.parse(await this.next(scaled(10_000))) as CraftResult;
    assert.notEqual(out.result, 'error', `craft.py: ${out.error}`);
    return out;
  }

  async stop(): Promise<void> {
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      this.proc.stdin!.end();
      this.proc.kill('SIGTERM');
    }
    await this.exited;
  }
}

/** craft.py serve in a netns (as a process of `cgroup`, if given). */
export function crafter(netns: string, cgroup?: AppCgroup): Promise<Crafter> {
  const args = [`--net=${netns}`, PYTHON, CRAFT, 'serve'];
  const stdio: ['pipe', 'pipe', 'inherit'] = ['pipe', 'pipe', 'inherit'];
  return new Crafter(cgroup ? cgroup.spawn('nsenter', args, { stdio }) : spawn('nsenter', args, { stdio })).ready();
}
