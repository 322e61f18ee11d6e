// `ambient-bpf uninstall`: removes the CNI entry, the plugin binary and its policy file and, unlike
// upstream, the redirection of running pods and their redirection annotations (when the API is
// reachable), so nothing of ambient-bpf stays on the node. What it could not do is said on stderr
// and makes it exit non-zero; running it again finishes the job.
import { hostname } from 'node:os';
import type { CommandModule } from 'yargs';
import { DEFAULT_BPFFS_ROOT } from '../../../bpf/src/index.js';
import { silentLogger } from '../../../ztunnel-bridge/src/logger.js';
import { DEFAULT_POLICY_FILE } from '../cni/policy-file.js';
import { removeFromNode } from '../installer/removal.js';
import { KubeClient, loadKubeConnection } from '../pods/kube-client.js';
import { CliError } from './cli-error.js';
import { checkPathFlags, DEFAULT_CNI_BIN_DIR, DEFAULT_CNI_CONF_DIR } from './agent.js';

interface UninstallArgs {
  'cni-bin-dir': string;
  'cni-conf-dir': string;
  'cni-policy-file': string;
  bpffs: string;
  'keep-pod-redirection': boolean;
  kubeconfig: string | undefined;
  'node-name': string;
}

export const uninstallCommand: CommandModule<object, UninstallArgs> = {
  command: 'uninstall',
  describe:
    'remove the CNI plugin, its entry and policy file, and the redirection of running pods and their annotations (stop the agent first)',
  builder: (y) =>
    y
      .option('cni-bin-dir', {
        type: 'string',
        default: DEFAULT_CNI_BIN_DIR,
        describe: 'where the plugin binary was installed',
      })
      .option('cni-conf-dir', {
        type: 'string',
        default: DEFAULT_CNI_CONF_DIR,
        describe: 'the node’s CNI configuration directory',
      })
      .option('cni-policy-file', {
        type: 'string',
        default: DEFAULT_POLICY_FILE,
        describe: 'the plugin’s policy file (the agent’s --cni-policy-file)',
      })
      .option('bpffs', {
        type: 'string',
        default: DEFAULT_BPFFS_ROOT,
        describe: 'bpffs directory of the datapath pins',
      })
      .option('keep-pod-redirection', {
        type: 'boolean',
        default: false,
        describe: 'leave running pods redirected and annotated (as upstream does)',
      })
      .option('kubeconfig', {
        type: 'string',
        describe:
          'the Kubernetes API, to remove the pods’ ambient.istio.io/redirection annotations [default: in-cluster when there]',
      })
      .option('node-name', {
        type: 'string',
        default: process.env.NODE_NAME ?? hostname(),
        describe: 'this node (whose pods lose the annotation) [default: $NODE_NAME or the hostname]',
      }),
  handler: async (args) => {
    // A relative or malformed path would remove things relative to the working directory.
    checkPathFlags([
      ['cni-bin-dir', args['cni-bin-dir']],
      ['cni-conf-dir', args['cni-conf-dir']],
      ['cni-policy-file', args['cni-policy-file']],
      ['bpffs', args.bpffs],
    ]);
    let client: KubeClient | undefined;
    const hasApi = args.kubeconfig !== undefined || !!process.env.KUBERNETES_SERVICE_HOST;
    const connect = async () => (client = new KubeClient(await loadKubeConnection(args.kubeconfig)));
    try {
      const failed = await removeFromNode({
        cni: { binDir: args['cni-bin-dir'], confDir: args['cni-conf-dir'] },
        policyFile: args['cni-policy-file'],
        bpffs: args.bpffs,
        keepPodRedirection: args['keep-pod-redirection'],
        kube: hasApi ? { connect, nodeName: args['node-name'] } : undefined,
        report: (line) => process.stdout.write(`${line}\n`),
        warn: (line) => process.stderr.write(`ambient-bpf: warning: ${line}\n`),
        log: silentLogger,
      });
      if (failed.length) throw new CliError(failed.join('; '), 1);
    } finally {
      client?.close();
    }
  },
};
