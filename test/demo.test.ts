// `ambient-bpf demo` run as a user runs it: exit 0 with the table, and with --keep a live system
// that `ambient-bpf status` can inspect until Ctrl-C; nothing left behind either way.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { describe, it } from 'node:test';
import { CLI, runCli } from './helpers/cli.js';
import { kernelTest } from './helpers/kernel.js';
import { sh } from './helpers/topology.js';
import { until } from './helpers/wait.js';

async function demoLeftovers(): Promise<string[]> {
  const ns = (await sh('ip', ['netns', 'list'])).split('\n').filter((l) => l.startsWith('ambd-'));
  const pins = readdirSync('/sys/fs/bpf').filter((n) => n.startsWith('ambient-bpf-demo-'));
  const dirs = readdirSync('/tmp').filter((n) => n.startsWith('ambient-bpf-demo-'));
  return [...ns, ...pins, ...dirs];
}

describe('ambient-bpf demo', kernelTest(), () => {
  it(
    'shows ambient pods going through ztunnel and the others going direct, then cleans up',
    { timeout: 90_000 },
    async () => {
      const r = await runCli(['demo']);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /shop\/cart +yes +enabled +tcx? +acked/);
      assert.match(r.stdout, /shop\/legacy +no +not ambient/);
      // Each leg: through ztunnel per the stand-in, and the datapath's own count for it.
      assert.match(
        r.stdout,
        /shop\/cart +external \(198\.18\.101\.2\) +external +yes \(bpf 1\) +- +198\.18\.101\.2:8080 +yes/,
      );
      assert.match(
        r.stdout,
        /shop\/web +shop\/cart +shop\/cart +yes \(bpf 1\) +yes \(bpf 1\) +198\.18\.100\.10:8080 +yes/,
      );
      assert.match(
        r.stdout,
        /plain\/api +shop\/cart +shop\/cart +no \(bpf -\) +yes \(bpf 1\) +198\.18\.100\.10:8080 +yes/,
      );
      assert.match(r.stdout, /Everything behaved as expected/);
      assert.doesNotMatch(r.stdout, / NO\n/);
      assert.match(r.stderr, /• creating the node/);
      assert.deepEqual(await demoLeftovers(), []);
    },
  );

  it('--keep leaves it running for `ambient-bpf status`, and Ctrl-C tears it down', { timeout: 90_000 }, async () => {
    const child = spawn(CLI, ['demo', '--keep', '--attach-mode', 'tc'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', resolve));
    try {
      await until(() => out.includes('Ctrl-C tears everything down'), 'the demo to settle', 60_000);
      const socket = /status --status-socket (\S+)/.exec(out)![1]!;
      const status = await runCli(['status', '--status-socket', socket]);
      assert.match(status.stdout, /shop +cart +enabled +tc +eth0 +acked/);
    } finally {
      // Also when an assertion failed: a demo left running would hold this file open until its timeout.
      child.kill('SIGINT');
    }
    assert.equal(await exited, 0);
    assert.deepEqual(await demoLeftovers(), []);
  });
});
