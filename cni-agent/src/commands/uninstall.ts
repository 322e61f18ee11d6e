// `ambient-bpf uninstall`: removes the CNI entry and binary and, unlike upstream, the redirection of
// running pods, so nothing of ambient-bpf stays on the node.
import { rmSync } from 'node:fs';
import type { CommandModule } from 'yargs';
import { Datapath, DEFAULT_BPFFS_ROOT } from '../../../bpf/src/index.js';
import { silentLogger } from '../../../ztunnel-bridge/src/logger.js';
import { CniInstaller } from '../installer/installer.js';
import { DEFAULT_CNI_BIN_DIR, DEFAULT_CNI_CONF_DIR, DEFAULT_PLUGIN_SOCKET, PLUGIN_BINARY_PATH } from './agent.js';

interface UninstallArgs {
  'cni-bin-dir': string;
  'cni-conf-dir': string;
  bpffs: string;
  'keep-pod-redirection': boolean;
}

export const uninstallCommand: CommandModule<object, UninstallArgs> = {
  command: 'uninstall',
  describe: 'remove the CNI plugin and entry, and the redirection of running pods (stop the agent first)',
  builder: (y) =>
    y
      .option('cni-bin-dir', { type: 'string', default: DEFAULT_CNI_BIN_DIR, describe: 'where the plugin binary was installed' })
      .option('cni-conf-dir', { type: 'string', default: DEFAULT_CNI_CONF_DIR, describe: 'the node’s CNI configuration directory' })
      .option('bpffs', { type: 'string', default: DEFAULT_BPFFS_ROOT, describe: 'bpffs directory of the datapath pins' })
      .option('keep-pod-redirection', { type: 'boolean', default: false, describe: 'leave running pods redirected (as upstream does)' }),
  handler: async (args) => {
    const installer = new CniInstaller({ binDir: args['cni-bin-dir'], confDir: args['cni-conf-dir'], binarySource: PLUGIN_BINARY_PATH, agentSocket: DEFAULT_PLUGIN_SOCKET, log: silentLogger });
    for (const file of installer.uninstall()) process.stdout.write(`removed the ambient-bpf-cni entry from ${file}\n`);
    if (args['keep-pod-redirection']) return;
    const dp = await Datapath.open({ bpffsRoot: args.bpffs });
    try {
      for (const pod of await dp.list()) {
        const r = await dp.detach(pod.uid);
        if (r.warning) process.stderr.write(`ambient-bpf: warning: ${r.warning}\n`);
        process.stdout.write(`removed the redirection of pod ${pod.uid}\n`);
      }
    } finally {
      dp.close();
    }
    // No pod left: the maps and the hook on ztunnel's cgroup go too (unpinning detaches).
    rmSync(args.bpffs, { recursive: true, force: true });
    process.stdout.write(`removed ${args.bpffs}\n`);
  },
};
