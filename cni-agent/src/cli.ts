// ambient-bpf command line. Each command family lives in ./commands; this file wires them up and
// turns failures into one line on stderr and a non-zero exit.
import { readFileSync } from 'node:fs';
import yargs, { type CommandModule } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { agentCommand } from './commands/agent.js';
import { datapathCommand } from './commands/datapath.js';
import { demoCommand } from './commands/demo.js';
import { statusCommand } from './commands/status.js';
import { uninstallCommand } from './commands/uninstall.js';
import { ztunnelCommand } from './commands/ztunnel.js';
import { CliError } from './commands/cli-error.js';

/** "0.1.0 (commit 1a2b3c4...)", from what the build recorded (scripts/build-info.js). */
function versionLine(): string {
  try {
    const info = JSON.parse(readFileSync(new URL('../../build-info.json', import.meta.url), 'utf8')) as { version: string; commit: string };
    return `ambient-bpf ${info.version} (commit ${info.commit})`;
  } catch {
    return 'ambient-bpf (version unknown: dist/build-info.json is missing; run npm run build:ts)';
  }
}

function fail(message: string, exitCode: number): never {
  process.stderr.write(`ambient-bpf: ${message.replace(/\s*\n\s*/g, ' ')}\n`);
  process.exit(exitCode);
}

async function main(): Promise<void> {
  await yargs(hideBin(process.argv))
    .scriptName('ambient-bpf')
    .usage('$0 <command> [options]\n\nIstio ambient in-pod redirection with BPF instead of iptables.')
    .command(agentCommand as unknown as CommandModule)
    .command(datapathCommand)
    .command(demoCommand as unknown as CommandModule)
    .command(statusCommand as unknown as CommandModule)
    .command(ztunnelCommand as unknown as CommandModule)
    .command(uninstallCommand as unknown as CommandModule)
    .demandCommand(1, 'name a command')
    .strict()
    .help()
    .alias('h', 'help')
    .version('version', 'print the version and the commit built', versionLine())
    .wrap(Math.min(110, process.stdout.columns || 110))
    .fail((msg, err) => {
      if (err) throw err;
      fail(`${msg} (see --help)`, 2);
    })
    .parseAsync();
}

main().catch((err: unknown) => {
  if (err instanceof CliError) fail(err.message, err.exitCode);
  const e = err as { code?: string; message?: string };
  fail(e.message ?? String(err), 1);
});
