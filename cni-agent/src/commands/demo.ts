// `ambient-bpf demo`: the product on one machine, in one command.
import type { CommandModule } from 'yargs';
import { statfsSync } from 'node:fs';
import { ATTACH_MODES, DEFAULT_ATTACH_MODE, type AttachMode } from '../../../bpf/src/index.js';
import { Demo } from '../demo/demo.js';
import { CliError } from './cli-error.js';

interface DemoArgs {
  keep: boolean;
  'attach-mode': AttachMode;
}

export const demoCommand: CommandModule<object, DemoArgs> = {
  command: 'demo',
  describe: 'run the embedded default: pods as network namespaces, the agent and the ztunnel stand-in, with traffic',
  builder: (y) =>
    y
      .option('keep', { type: 'boolean', default: false, describe: 'leave it running for exploration until Ctrl-C' })
      .option('attach-mode', {
        choices: ATTACH_MODES,
        default: DEFAULT_ATTACH_MODE,
        describe: 'how the datapath attaches',
      })
      .epilog('Needs root. Everything it makes (namespaces, pins, sockets, processes) is removed at the end.'),
  handler: async (args) => {
    if (process.getuid?.() !== 0) throw new CliError('the demo needs root (network namespaces and BPF)');
    try {
      if (statfsSync('/sys/fs/bpf').type !== 0xcafe4a11) throw new Error();
    } catch {
      throw new CliError('no bpffs at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf, or run scripts/demo.sh)');
    }
    const demo = new Demo({
      keep: args.keep,
      attachMode: args['attach-mode'],
      progress: (line) => process.stderr.write(`• ${line}…\n`),
      out: (text) => process.stdout.write(text),
    });
    const interrupted = () => void demo.teardown().then(() => process.exit(130));
    if (!args.keep) process.once('SIGINT', interrupted);
    let problems: string[];
    try {
      problems = await demo.run();
      if (args.keep) await demo.keep();
    } catch (err) {
      await demo.teardown();
      throw new CliError(`demo failed: ${(err as Error).message}`);
    }
    await demo.teardown();
    process.off('SIGINT', interrupted);
    if (problems.length) throw new CliError(`not as expected: ${problems.join('; ')}`);
    process.stdout.write(
      '\nEverything behaved as expected: ambient pods went through ztunnel with their original destinations; the others went direct.\n',
    );
  },
};
