// `ambient-bpf agent`: the node agent.
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { posix } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { CommandModule } from 'yargs';
import { pino } from 'pino';
import {
  ATTACH_MODES,
  DEFAULT_ATTACH_MODE,
  DEFAULT_BPFFS_ROOT,
  STEERINGS,
  ZTUNNEL_EXEMPTIONS,
  type AttachMode,
  type Steering,
  type ZtunnelExemption,
} from '../../../bpf/src/index.js';
import { DEFAULT_CAPTURE } from '../enrollment/reconciler.js';
import { parseStrictAllow } from '../pods/capture-options.js';
import { parseEnablementSelectors, type EnablementSelectors } from '../pods/enablement.js';
import { DEFAULT_POLICY, UNSEEN_POD_POLICIES, type UnseenPods } from '../pods/selection.js';
import { DEFAULT_ZTUNNEL_SOCKET } from '../../../ztunnel-bridge/src/zds-server.js';
import { Agent, DEFAULT_NODE_NETNS, DEFAULT_POD_LOOKUP_TIMEOUT_MS, DEFAULT_VERIFY_INTERVAL_MS } from '../agent.js';
import { hostPathProblems } from '../ops/host-paths.js';
import { DEFAULT_STATUS_SOCKET } from '../ops/status-api.js';
import { DEFAULT_POLICY_FILE } from '../cni/policy-file.js';
import { DEFAULT_NETNS_DIRECTORIES } from '../cni/netns-path.js';
import { CliError } from './cli-error.js';

interface AgentArgs {
  'node-name': string;
  'local-pods': string | undefined;
  kubeconfig: string | undefined;
  'ztunnel-socket': string;
  'plugin-socket': string;
  'cni-policy-file': string;
  daemonset: string | undefined;
  'keep-pod-redirection': boolean;
  bpffs: string;
  'host-root': string;
  'attach-mode': AttachMode;
  'ztunnel-exemption': ZtunnelExemption;
  steering: Steering | 'auto';
  'strict-mode': boolean;
  'dns-capture': boolean;
  'node-netns': string;
  'strict-allow': string[];
  'enablement-selectors': string | undefined;
  'exclude-namespaces': string[];
  'system-namespace': string;
  'unseen-pods': UnseenPods;
  'install-cni': boolean;
  'cni-bin-dir': string;
  'cni-conf-dir': string;
  'cni-conf-file': string | undefined;
  'netns-dir': string[];
  'status-socket': string;
  'verify-interval': number;
  'pod-lookup-timeout': number;
  'health-addr': string | undefined;
  'metrics-addr': string | undefined;
  'log-level': string;
}

const NAMESPACE_NAME = /^(?=.{1,63}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;

export const DEFAULT_PLUGIN_SOCKET = '/var/run/ambient-bpf/cni.sock';
export const DEFAULT_CNI_BIN_DIR = '/opt/cni/bin';
export const DEFAULT_CNI_CONF_DIR = '/etc/cni/net.d';
/** The plugin binary `npm run build` makes. */
export const PLUGIN_BINARY_PATH = fileURLToPath(new URL('../../../../cni-agent/bin/ambient-bpf-cni', import.meta.url));

/** The capabilities the agent uses (the DaemonSet grants them), and what for. CAP_BPF is not
 * listed: with CAP_SYS_ADMIN (needed for setns) the kernel allows every bpf() use anyway, and
 * without CAP_SYS_ADMIN (or CAP_PERFMON) the verifier refuses the programs even with CAP_BPF. */
export const REQUIRED_CAPABILITIES = [
  {
    name: 'CAP_NET_ADMIN',
    bit: 12,
    why: "attaching to pods' interfaces, and the fwmark rule, local route and accept_local in pod network namespaces",
  },
  {
    name: 'CAP_SYS_ADMIN',
    bit: 21,
    why: 'setns() into pod network namespaces, loading the BPF programs, and the kernel probe’s throwaway netns (unshare) at start',
  },
  {
    name: 'CAP_SYS_PTRACE',
    bit: 19,
    why: "opening other processes' /proc/PID/ns/net (the network namespaces of running pods)",
  },
] as const;

/** Required capabilities missing from the effective set in `status` (/proc/self/status text). */
export function missingCapabilities(status: string): (typeof REQUIRED_CAPABILITIES)[number][] {
  const m = /^CapEff:\s*([0-9a-f]+)$/m.exec(status);
  if (!m) return [];
  const eff = BigInt(`0x${m[1]}`);
  return REQUIRED_CAPABILITIES.filter((c) => (eff & (1n << BigInt(c.bit))) === 0n);
}

/** The flags that place the agent on a platform (README, "Platforms"): each must be a plain
 * absolute path (a relative one would be resolved against the agent's working directory, which
 * on a node means nothing), --cni-conf-file a plain file name. Throws a CliError naming the flag
 * and the value. */
export function checkPlatformPaths(
  args: Pick<
    AgentArgs,
    | 'host-root'
    | 'bpffs'
    | 'plugin-socket'
    | 'cni-policy-file'
    | 'cni-bin-dir'
    | 'cni-conf-dir'
    | 'cni-conf-file'
    | 'netns-dir'
  >,
): void {
  const absolute: [string, string][] = [
    ['host-root', args['host-root']],
    ['bpffs', args.bpffs],
    ['plugin-socket', args['plugin-socket']],
    ['cni-policy-file', args['cni-policy-file']],
    ['cni-bin-dir', args['cni-bin-dir']],
    ['cni-conf-dir', args['cni-conf-dir']],
    ...args['netns-dir'].map((d): [string, string] => ['netns-dir', d]),
  ];
  checkPathFlags(absolute);
  if (args['netns-dir'].length === 0) throw new CliError('--netns-dir: name at least one directory', 2);
  for (const d of args['netns-dir']) {
    if (d === '/' || d === '/proc' || d.startsWith('/proc/'))
      throw new CliError(
        `--netns-dir ${JSON.stringify(d)}: not a directory of network namespaces (CNI_NETNS under it would be accepted)`,
        2,
      );
  }
  const file = args['cni-conf-file'];
  if (Array.isArray(file))
    throw new CliError(
      `--cni-conf-file is given ${file.length} times (${(file as string[]).map((v) => JSON.stringify(v)).join(', ')}): name one`,
      2,
    );
  if (
    file !== undefined &&
    (file === '' || file.includes('/') || file.startsWith('.') || !/\.(conflist|conf|json)$/.test(file))
  ) {
    throw new CliError(
      `--cni-conf-file ${JSON.stringify(file)}: must be a file name in --cni-conf-dir ending in .conflist, .conf or .json (runtimes read no other)`,
      2,
    );
  }
}

/** Each [flag, value] must be a plain absolute path, given once (a repeatable flag comes as one
 * pair per value); throws a CliError naming the flag and the value. */
export function checkPathFlags(flags: [string, string | string[]][]): void {
  for (const [flag, value] of flags) {
    // yargs makes a flag given twice an array: which one was meant is not for the agent to guess.
    if (Array.isArray(value)) {
      throw new CliError(
        `--${flag} is given ${value.length} times (${value.map((v) => JSON.stringify(v)).join(', ')}): name one`,
        2,
      );
    }
    const why = pathProblem(value);
    if (why) throw new CliError(`--${flag} ${JSON.stringify(value)}: ${why}`, 2);
  }
}

/** Why `value` is not a plain absolute path, or undefined. */
function pathProblem(value: string): string | undefined {
  if (value === '') return 'is empty: name an absolute path';
  if (!value.startsWith('/')) return 'is a relative path: name an absolute path';
  if (value.includes('\0')) return 'holds a NUL byte';
  if (value !== '/' && (posix.normalize(value) !== value || value.endsWith('/')))
    return `is not a plain path (say ${JSON.stringify(posix.normalize(value).replace(/(.)\/$/, '$1'))})`;
  return undefined;
}

export const agentCommand: CommandModule<object, AgentArgs> = {
  command: 'agent',
  describe: 'run the node agent: enrol ambient pods of this node (datapath + ztunnel hand-off)',
  builder: (y) =>
    y
      .option('node-name', {
        type: 'string',
        default: process.env.NODE_NAME ?? hostname(),
        describe: 'this node (pods of other nodes are ignored) [default: $NODE_NAME or the hostname]',
      })
      .option('local-pods', {
        type: 'string',
        describe: 'pod source: a YAML file of v1 Namespace and Pod objects, watched for changes',
      })
      .option('kubeconfig', {
        type: 'string',
        describe: 'pod source: the Kubernetes API through this kubeconfig [default, without --local-pods: in-cluster]',
      })
      .option('ztunnel-socket', {
        type: 'string',
        default: DEFAULT_ZTUNNEL_SOCKET,
        describe: 'the ZDS socket ztunnel connects to',
      })
      .option('plugin-socket', {
        type: 'string',
        default: DEFAULT_PLUGIN_SOCKET,
        describe: 'where the CNI plugin reaches the agent (agent_socket in the conflist)',
      })
      .option('cni-policy-file', {
        type: 'string',
        default: DEFAULT_POLICY_FILE,
        describe:
          'what the CNI plugin decides from while the agent is unreachable (policy_file in the conflist); must survive a reboot',
      })
      .option('daemonset', {
        type: 'string',
        describe:
          'NAMESPACE/NAME of the agent’s DaemonSet: on SIGTERM, if it is gone, being deleted or no longer selects this node, ambient-bpf is removed from the node (else everything stays)',
      })
      .option('keep-pod-redirection', {
        type: 'boolean',
        default: false,
        describe: 'when the DaemonSet is deleted, leave running pods redirected (and annotated)',
      })
      .option('bpffs', {
        type: 'string',
        default: DEFAULT_BPFFS_ROOT,
        describe: 'bpffs directory for the datapath maps and per-pod pins',
      })
      .option('host-root', {
        type: 'string',
        default: '/',
        describe: "the host's / (for /proc and /var/run/netns when running in a container)",
      })
      .option('attach-mode', {
        choices: ATTACH_MODES,
        default: DEFAULT_ATTACH_MODE,
        describe:
          'tcx links, the clsact/cls_bpf fallback, or auto (tcx where the kernel has tcx links, probed at start)',
      })
      .option('steering', {
        choices: ['auto', ...STEERINGS] as const,
        default: 'auto' as const,
        describe:
          'how SYNs reach ztunnel’s listeners: bpf_sk_assign in tc (Linux 6.6+), or an sk_lookup program per pod (older kernels); auto: sk-assign where tc’s bpf_sk_assign takes SO_REUSEPORT listeners (probed at start), else sk-lookup',
      })
      .option('ztunnel-exemption', {
        choices: ZTUNNEL_EXEMPTIONS,
        default: ZTUNNEL_EXEMPTIONS[0],
        describe:
          "which 0x539-marked traffic skips redirection: only sockets of ztunnel's cgroup, or any (upstream's rule: an app with NET_ADMIN can then bypass the mesh)",
      })
      .option('dns-capture', {
        type: 'boolean',
        default: DEFAULT_CAPTURE.dnsCapture,
        describe:
          'send ambient pods’ DNS (port 53) to ztunnel’s 15053; per pod: annotation ambient.istio.io/dns-capture=true|false',
      })
      .option('node-netns', {
        type: 'string',
        default: DEFAULT_NODE_NETNS,
        describe:
          'the netns holding the node side of pods’ veths, where connections the node opens to ambient pods (kubelet probes) get the probe source address',
      })
      .option('strict-mode', {
        type: 'boolean',
        default: DEFAULT_CAPTURE.strict,
        describe:
          'drop what ambient pods send around ztunnel: UDP other than DNS, other IP protocols (IPv6 neighbour discovery always passes)',
      })
      .option('strict-allow', {
        type: 'string',
        array: true,
        default: [] as string[],
        describe: 'what strict mode lets out anyway, e.g. udp/123 icmp icmpv6 sctp/5000 (repeatable)',
      })
      .option('enablement-selectors', {
        type: 'string',
        describe:
          'which pods are ambient, as upstream’s ambient.enablementSelectors: a JSON or YAML list of {podSelector, namespaceSelector} label selectors (matchLabels, matchExpressions); a pod is ambient if one entry matches both its labels and its namespace’s [default: pod label istio.io/dataplane-mode=ambient, or namespace label istio.io/dataplane-mode=ambient unless the pod’s is none]',
      })
      .option('exclude-namespaces', {
        type: 'string',
        array: true,
        default: DEFAULT_POLICY.excludedNamespaces,
        describe:
          'namespaces whose pods are never ambient, whatever their labels (repeatable or comma-separated; "" for none)',
      })
      .option('unseen-pods', {
        choices: UNSEEN_POD_POLICIES,
        default: DEFAULT_POLICY.unseenPods,
        describe:
          'a new pod the agent could not see (it is unreachable, or the API does not answer at CNI ADD) in a namespace where no pod is ambient: by-namespace starts it as a plain pod; hold fails its CNI ADD until the agent can tell (a pod that opts in by its own label then never starts unmeshed; no such pod starts meanwhile)',
      })
      .option('system-namespace', {
        type: 'string',
        default: DEFAULT_POLICY.systemNamespace,
        describe: 'Istio’s system namespace, where ztunnel and this agent run (their pods are never ambient)',
      })
      .option('install-cni', {
        type: 'boolean',
        default: false,
        describe: 'install the CNI plugin into the node’s CNI config once ready, and keep it there',
      })
      .option('cni-bin-dir', {
        type: 'string',
        default: DEFAULT_CNI_BIN_DIR,
        describe: 'where runtimes look for CNI plugin binaries',
      })
      .option('cni-conf-dir', {
        type: 'string',
        default: DEFAULT_CNI_CONF_DIR,
        describe: 'the node’s CNI configuration directory',
      })
      .option('cni-conf-file', {
        type: 'string',
        describe:
          'the file in --cni-conf-dir to chain into [default: the one runtimes load, the first *.conf, *.conflist or *.json in lexical order]',
      })
      .option('netns-dir', {
        type: 'string',
        array: true,
        default: DEFAULT_NETNS_DIRECTORIES,
        describe:
          'a node directory where the runtime bind-mounts pod network namespaces: CNI_NETNS must be there (or /proc/PID/ns/net), seen under --host-root; /var/run and /run are one (repeatable)',
      })
      .option('status-socket', {
        type: 'string',
        default: DEFAULT_STATUS_SOCKET,
        describe: 'Unix socket of the status API (ambient-bpf status)',
      })
      .option('verify-interval', {
        type: 'number',
        default: DEFAULT_VERIFY_INTERVAL_MS / 1000,
        describe: 'seconds between drift checks of every redirected pod (0: off)',
      })
      .option('pod-lookup-timeout', {
        type: 'number',
        default: DEFAULT_POD_LOOKUP_TIMEOUT_MS / 1000,
        describe:
          'seconds a CNI ADD waits for the API’s answer about a pod the watch has not brought yet (then it fails closed if the pod may be ambient)',
      })
      .option('health-addr', { type: 'string', describe: 'HOST:PORT for /healthz and /readyz' })
      .option('metrics-addr', { type: 'string', describe: 'HOST:PORT for Prometheus /metrics' })
      .option('log-level', {
        choices: ['debug', 'info', 'warn', 'error'],
        default: 'info',
        describe: 'log level (JSON logs on stderr)',
      })
      .epilog(
        'SIGINT/SIGTERM stop the agent and leave every pod redirected, a restarted agent adopts them; unless --daemonset names a DaemonSet that is gone, being deleted or no longer selects this node: then the CNI entry, the plugin, its policy file, and (without --keep-pod-redirection) the pods’ redirection and annotations are removed.',
      ),
  handler: async (args) => {
    // Platform paths first: a malformed one stops the agent before it touches anything.
    checkPlatformPaths(args);
    if (!Number.isFinite(args['verify-interval']) || args['verify-interval'] < 0)
      throw new CliError('--verify-interval must be 0 (off) or more seconds', 2);
    if (!Number.isFinite(args['pod-lookup-timeout']) || args['pod-lookup-timeout'] <= 0)
      throw new CliError('--pod-lookup-timeout must be more than 0 seconds', 2);
    if (args.kubeconfig !== undefined && args['local-pods'] !== undefined)
      throw new CliError('name one pod source: --local-pods or --kubeconfig', 2);
    if (args.kubeconfig === undefined && args['local-pods'] === undefined && !process.env.KUBERNETES_SERVICE_HOST) {
      throw new CliError(
        'name a pod source: --local-pods FILE or --kubeconfig FILE (in a cluster, the service account is used)',
        2,
      );
    }
    let daemonSet: { namespace: string; name: string; keepPodRedirection: boolean } | undefined;
    if (args.daemonset !== undefined) {
      const m = /^([a-z0-9][a-z0-9.-]*)\/([a-z0-9][a-z0-9.-]*)$/.exec(args.daemonset);
      if (!m) throw new CliError(`--daemonset must be NAMESPACE/NAME, not ${JSON.stringify(args.daemonset)}`, 2);
      if (args['local-pods'] !== undefined)
        throw new CliError('--daemonset needs the Kubernetes pod source (not --local-pods)', 2);
      daemonSet = { namespace: m[1]!, name: m[2]!, keepPodRedirection: args['keep-pod-redirection'] };
    }
    // Checked before anything is touched on the node: a typo must not leave a half-started agent.
    let enablementSelectors: EnablementSelectors | undefined;
    if (args['enablement-selectors'] !== undefined) {
      try {
        enablementSelectors = parseEnablementSelectors(args['enablement-selectors']);
      } catch (err) {
        throw new CliError(
          `--enablement-selectors ${JSON.stringify(args['enablement-selectors'])}: ${(err as Error).message}`,
          2,
        );
      }
    }
    const excludedNamespaces = args['exclude-namespaces']
      .flatMap((v) => String(v).split(','))
      .map((v) => v.trim())
      .filter((v) => v !== '');
    for (const [flag, name] of [
      ...excludedNamespaces.map((n) => ['--exclude-namespaces', n]),
      ['--system-namespace', args['system-namespace']],
    ]) {
      if (!NAMESPACE_NAME.test(name!))
        throw new CliError(
          `${flag} ${JSON.stringify(name)}: not a namespace name (lower-case letters, digits and '-', 63 at most, starting and ending alphanumeric)`,
          2,
        );
    }
    let strictAllow;
    try {
      strictAllow = parseStrictAllow(args['strict-allow']);
    } catch (err) {
      throw new CliError(`--strict-allow: ${(err as Error).message}`, 2);
    }
    // Said up front, by name: without them the agent would start and then fail pod after pod with
    // EPERM from the kernel (or the verifier's EACCES), which names no capability.
    const missing = missingCapabilities(readFileSync('/proc/self/status', 'utf8'));
    if (missing.length) {
      throw new CliError(
        `missing capabilit${missing.length > 1 ? 'ies' : 'y'} ${missing.map((c) => `${c.name} (${c.why})`).join(', ')}: grant ${missing.map((c) => c.name.slice(4)).join(', ')} in the container's securityContext.capabilities.add`,
        1,
      );
    }
    const problems = hostPathProblems({
      hostRoot: args['host-root'],
      bpffs: args.bpffs,
      ztunnelSocket: args['ztunnel-socket'],
      pluginSocket: args['plugin-socket'],
      policyFile: args['cni-policy-file'],
      netnsDirs: args['netns-dir'],
      cni: args['install-cni'] ? { binDir: args['cni-bin-dir'], confDir: args['cni-conf-dir'] } : undefined,
    });
    if (problems.length) throw new CliError(`the node's paths are not all there:\n  ${problems.join('\n  ')}`, 1);
    const log = pino(
      { level: args['log-level'], base: { component: 'agent', node: args['node-name'] } },
      pino.destination({ dest: 2, sync: true }),
    );
    const agent = new Agent({
      nodeName: args['node-name'],
      source: args['local-pods'] !== undefined ? { localPods: args['local-pods'] } : { kubeconfig: args.kubeconfig },
      ztunnelSocket: args['ztunnel-socket'],
      pluginSocket: args['plugin-socket'],
      cniPolicyFile: args['cni-policy-file'],
      daemonSet,
      bpffs: args.bpffs,
      hostRoot: args['host-root'],
      attachMode: args['attach-mode'],
      ztunnelExemption: args['ztunnel-exemption'],
      ...(args.steering !== 'auto' ? { steering: args.steering } : {}),
      capture: { strict: args['strict-mode'], dnsCapture: args['dns-capture'] },
      strictAllow,
      selection: {
        excludedNamespaces,
        systemNamespace: args['system-namespace'],
        unseenPods: args['unseen-pods'],
        ...(enablementSelectors ? { enablementSelectors } : {}),
      },
      nodeNetns: args['node-netns'],
      installCni: args['install-cni']
        ? {
            binDir: args['cni-bin-dir'],
            confDir: args['cni-conf-dir'],
            confFile: args['cni-conf-file'],
            binarySource: PLUGIN_BINARY_PATH,
          }
        : undefined,
      netnsDirs: args['netns-dir'],
      statusSocket: args['status-socket'],
      verifyIntervalMs: Math.round(args['verify-interval'] * 1000),
      podLookupTimeoutMs: Math.round(args['pod-lookup-timeout'] * 1000),
      healthAddr: args['health-addr'],
      metricsAddr: args['metrics-addr'],
      log,
    });
    const stopped = new Promise<void>((resolve) => {
      for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => resolve());
    });
    try {
      await agent.start();
    } catch (err) {
      agent.stop();
      throw err;
    }
    await stopped;
    const { removed } = await agent.shutdown();
    if (!removed) log.info({}, 'stopped; pods stay redirected');
  },
};
