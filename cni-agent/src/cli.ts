// ambient-bpf command line. Each command family lives in ./commands; this file wires them up and
// turns failures into one line on stderr and a non-zero exit.
import { readFileSync } from 'node:fs';
import yargs, { type CommandModule } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { CliError } from './commands/cli-error.js';

/** Each command's module, loaded only when it runs (or for --help): the agent's modules alone take
 * a second to load on a busy node, which `datapath downgrade` in the middle of a rollback, or a
 * ztunnel stand-in starting, need not wait for. */
const COMMANDS: Record<string, () => Promise<CommandModule>> = {
  agent: async () => (await import('./commands/agent.js')).agentCommand as unknown as CommandModule,
  datapath: async () => (await import('./commands/datapath.js')).datapathCommand,
  demo: async () => (await import('./commands/demo.js')).demoCommand as unknown as CommandModule,
  status: async () => (await import('./commands/status.js')).statusCommand as unknown as CommandModule,
  ztunnel: async () => (await import('./commands/ztunnel.js')).ztunnelCommand as unknown as CommandModule,
  uninstall: async () => (await import('./commands/uninstall.js')).uninstallCommand as unknown as CommandModule,
};

/** "0.1.0 (commit 1a2b3c4...)", from what the build recorded (scripts/build-info.js). */
function versionLine(): string {
  try {
    const info = JSON.parse(readFileSync(new URL('../../build-info.json', import.meta.url), 'utf8')) as {
      version: string;
      commit: string;
    };
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
  const args = hideBin(process.argv);
  const named = args[0] !== undefined && Object.hasOwn(COMMANDS, args[0]) ? [args[0]] : Object.keys(COMMANDS);
  const commands = await Promise.all(named.map((name) => COMMANDS[name]!()));
  await commands
    .reduce(
      (y, command) => y.command(command),
      yargs(args)
        .scriptName('ambient-bpf')
        .usage('$0 <command> [options]\n\nIstio ambient in-pod redirection with BPF instead of iptables.'),
    )
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
