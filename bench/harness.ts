// What the benchmarks share: statistics, the machine line, and the native helper (bench/tcpbench.c)
// as a ztunnel-shaped listener.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { cpus, release, totalmem } from 'node:os';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { sh } from '../test/helpers/topology.js';

export const TCPBENCH = fileURLToPath(new URL('../../bench/bin/tcpbench', import.meta.url));

export const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

export const percentile = (xs: number[], p: number): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)] ?? NaN;
};

/** Builds bench/bin/tcpbench. */
export async function buildNativeHelpers(): Promise<void> {
  await promisify(execFile)('make', ['-s', '-C', fileURLToPath(new URL('../../bench', import.meta.url))]);
}

export async function machineLine(): Promise<string> {
  return `machine: ${cpus().length} x ${cpus()[0]?.model ?? '?'}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, Linux ${release()}, ${(await sh('iptables', ['--version'])).trim()}`;
}

/** `tcpbench server PORT NETNS`, resolved once it listens: [::]:PORT with IP_TRANSPARENT,
 * SO_REUSEPORT and ztunnel's mark, a socket in `netnsPath` (/proc/PID/fd/N included) held by a
 * process that stays in the node's netns, as ztunnel's are. */
export async function startListener(netnsPath: string, port = 15001): Promise<ChildProcess> {
  const child = spawn(TCPBENCH, ['server', String(port), netnsPath], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve, reject) => {
    child.stdout.once('data', () => resolve());
    child.once('exit', (code) => reject(new Error(`listener in ${netnsPath} exited (${code})`)));
  });
  return child;
}
