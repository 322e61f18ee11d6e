// Runs the built CLI launcher as users and external checks do.
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';

export const CLI = fileURLToPath(new URL('../../../cni-agent/bin/ambient-bpf', import.meta.url));

/** A command that runs this long is killed and reported as failed (a hang says so, not the test
 * runner's timeout of the whole file). Generous: a CLI process takes seconds under QEMU's TCG. */
const CLI_TIMEOUT_MS = 180_000;

export function runCli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(CLI, args, { timeout: CLI_TIMEOUT_MS }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
      const killed = err?.killed ? `\n(ambient-bpf ${args.join(' ')}: killed after ${CLI_TIMEOUT_MS} ms)` : '';
      resolve({ code, stdout, stderr: stderr + killed });
    });
  });
}
