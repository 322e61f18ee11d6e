// `ambient-bpf datapath ...`: direct access to the pod datapath, for operators and for checks.
import type { ArgumentsCamelCase, Argv, CommandModule } from 'yargs';
import {
  ATTACH_MODES,
  chooseModes,
  Datapath,
  DEFAULT_ATTACH_MODE,
  DEFAULT_BPFFS_ROOT,
  probeKernel,
  type AttachMode,
  type AttachedPod,
} from '../../../bpf/src/index.js';
import { kernelStatus } from '../ops/status-api.js';
import { formatKernel } from './status.js';
import { renderTable } from '../table.js';
import { CliError } from './cli-error.js';

interface CommonArgs {
  bpffs: string;
}

async function withDatapath<T>(args: CommonArgs, fn: (dp: Datapath) => Promise<T>): Promise<T> {
  const dp = await Datapath.open({ bpffsRoot: args.bpffs });
  try {
    return await fn(dp);
  } finally {
    dp.close();
  }
}

function bpffsOption<T>(y: Argv<T>): Argv<T & CommonArgs> {
  return y.option('bpffs', {
    type: 'string',
    default: DEFAULT_BPFFS_ROOT,
    describe: 'bpffs directory for the datapath maps and per-pod pins',
  });
}

type AttachArgs = CommonArgs & {
  netns: string;
  uid: string;
  'pod-ip': string[];
  'attach-mode': AttachMode;
  'bypass-inbound': boolean;
  strict: boolean;
  reroute: string[];
  'pod-cgroup': string | undefined;
  'dns-capture': boolean;
  'node-netns': string | undefined;
};

const attach: CommandModule<CommonArgs, AttachArgs> = {
  command: 'attach',
  describe: 'redirect a pod netns to ztunnel (idempotent; updates IPs in place)',
  builder: (y) =>
    bpffsOption(y)
      .option('netns', { type: 'string', demandOption: true, describe: 'path of the pod network namespace' })
      .option('uid', { type: 'string', demandOption: true, describe: 'pod UID (names the pins)' })
      .option('pod-ip', { type: 'string', array: true, demandOption: true, describe: 'pod IP (repeat for each)' })
      .option('attach-mode', {
        choices: ATTACH_MODES,
        default: DEFAULT_ATTACH_MODE,
        describe: 'tcx links (Linux 6.6+), the clsact/cls_bpf fallback, or auto (tcx where the kernel has it, probed)',
      })
      .option('bypass-inbound', {
        type: 'boolean',
        default: false,
        describe: 'no inbound capture (ambient.istio.io/bypass-inbound-capture)',
      })
      .option('strict', {
        type: 'boolean',
        default: false,
        describe: 'drop what the pod sends around ztunnel (UDP but DNS, other protocols)',
      })
      .option('reroute', {
        type: 'string',
        array: true,
        default: [] as string[],
        describe: 'an interface whose inbound TCP goes to 15001 (istio.io/reroute-virtual-interfaces; repeat)',
      })
      .option('pod-cgroup', {
        type: 'string',
        describe: "the pod's cgroup v2 directory: refuse PACKET_QDISC_BYPASS there and capture its DNS",
      })
      .option('dns-capture', {
        type: 'boolean',
        default: true,
        describe: 'capture DNS at --pod-cgroup (--no-dns-capture: the guard only)',
      })
      .option('node-netns', {
        type: 'string',
        describe: "the netns of the pod's veth peer: handle kubelet probes there",
      }),
  handler: async (args: ArgumentsCamelCase<AttachArgs>) => {
    // auto: the hooks the probed kernel allows (a one-off attach has no later move to tcx).
    const mode =
      args.attachMode === 'auto'
        ? chooseModes((await probeKernel()).features, { attachMode: 'auto' }).hooks
        : args.attachMode;
    const r = await withDatapath(args, (dp) =>
      dp.attach(
        {
          uid: args.uid,
          netnsPath: args.netns,
          ips: args.podIp,
          bypassInbound: args.bypassInbound,
          strict: args.strict,
          rerouteInterfaces: args.reroute,
          dnsCapture: args.dnsCapture,
          ...(args.podCgroup !== undefined ? { podCgroup: args.podCgroup } : {}),
          ...(args.nodeNetns !== undefined ? { hostNetns: args.nodeNetns } : {}),
        },
        { mode },
      ),
    );
    process.stdout.write(`${r.updated ? 'updated' : 'attached'} ${args.uid}: ${r.mode} on ifindex ${r.ifindex}\n`);
  },
};

const detach: CommandModule<CommonArgs, CommonArgs & { uid: string }> = {
  command: 'detach',
  describe: "remove a pod's redirection and restore its netns",
  builder: (y) => bpffsOption(y).option('uid', { type: 'string', demandOption: true, describe: 'pod UID' }),
  handler: async (args) => {
    const r = await withDatapath(args, (dp) => dp.detach(args.uid));
    if (r.warning) process.stderr.write(`ambient-bpf: warning: ${r.warning}\n`);
    process.stdout.write(r.found ? `detached ${args.uid}\n` : `${args.uid} was not attached\n`);
  },
};

function formatTable(pods: AttachedPod[]): string {
  const rows = [['UID', 'MODE', 'STATE', 'IFINDEX', 'INTERFACES', 'IPS', 'NETNS', 'ATTACHED']];
  for (const p of pods) {
    rows.push([
      p.uid,
      p.mode,
      p.state,
      String(p.ifindex),
      [p.interface || '-', ...p.otherInterfaces.map((i) => i.name)].join(','),
      [...p.ips, ...p.otherAddresses].join(','),
      p.netnsPresent ? p.netnsPath : `${p.netnsPath} (gone)`,
      p.attachedAt.toISOString(),
    ]);
  }
  return renderTable(rows);
}

const list: CommandModule<CommonArgs, CommonArgs & { json: boolean }> = {
  command: 'list',
  describe: 'list attached pods',
  builder: (y) => bpffsOption(y).option('json', { type: 'boolean', default: false, describe: 'print JSON' }),
  handler: async (args) => {
    const pods = await withDatapath(args, (dp) => dp.list());
    process.stdout.write(args.json ? JSON.stringify(pods, null, 2) + '\n' : formatTable(pods));
  },
};

const verify: CommandModule<CommonArgs, CommonArgs & { uid: string }> = {
  command: 'verify',
  describe: "check that a pod's hooks, rules, routes and sysctls are in place",
  builder: (y) => bpffsOption(y).option('uid', { type: 'string', demandOption: true, describe: 'pod UID' }),
  handler: async (args) => {
    const [r, pod] = await withDatapath(
      args,
      async (dp) => [await dp.verify(args.uid), (await dp.list()).find((p) => p.uid === args.uid)] as const,
    );
    if (!r.found) throw new CliError(`${args.uid} is not attached`);
    if (!r.ok) throw new CliError(`${args.uid}: ${r.problems.join('; ')}`);
    const captured = pod ? [pod.interface || `#${pod.ifindex}`, ...pod.otherInterfaces.map((i) => i.name)] : [];
    process.stdout.write(`${args.uid}: ok (captured: ${captured.join(', ')})\n`);
  },
};

const gc: CommandModule<CommonArgs, CommonArgs> = {
  command: 'gc',
  describe: 'remove pins and records of pods whose netns is gone',
  builder: (y) => bpffsOption(y),
  handler: async (args) => {
    const uids = await withDatapath(args, (dp) => dp.collectGarbage());
    process.stdout.write(uids.length ? `collected ${uids.join(' ')}\n` : 'nothing to collect\n');
  },
};

const downgrade: CommandModule<CommonArgs, CommonArgs & { layout: number }> = {
  command: 'downgrade',
  describe: `hand the node's pins to an older release (layout 1: v0.1.0; this release pins layout ${Datapath.layout}); stop the agent first`,
  builder: (y) =>
    bpffsOption(y).option('layout', {
      type: 'number',
      demandOption: true,
      describe: 'the datapath layout of the release to hand over to',
    }),
  handler: async (args) => {
    const from = await Datapath.downgrade(args.layout, { bpffsRoot: args.bpffs });
    process.stdout.write(
      from > args.layout
        ? `pins under ${args.bpffs}: layout ${from} -> ${args.layout}\n`
        : `pins under ${args.bpffs} are layout ${from}: nothing to do\n`,
    );
  },
};

const kernel: CommandModule<object, { json: boolean }> = {
  command: 'kernel',
  describe: 'probe the kernel features the datapath uses and show the modes the agent would choose (auto)',
  builder: (y) => y.option('json', { type: 'boolean', default: false, describe: 'print JSON' }),
  handler: async (args) => {
    const probe = await probeKernel();
    const status = kernelStatus(probe, chooseModes(probe.features, { attachMode: 'auto' }));
    process.stdout.write(args.json ? JSON.stringify(status, null, 2) + '\n' : formatKernel(status, 'now'));
  },
};

export const datapathCommand: CommandModule = {
  command: 'datapath <command>',
  describe:
    'attach, detach, list, verify and collect pod datapaths directly; hand the node to an older release; probe the kernel',
  builder: (y) =>
    y
      .command(attach as unknown as CommandModule)
      .command(detach as unknown as CommandModule)
      .command(list as unknown as CommandModule)
      .command(verify as unknown as CommandModule)
      .command(gc as unknown as CommandModule)
      .command(downgrade as unknown as CommandModule)
      .command(kernel as unknown as CommandModule)
      .demandCommand(1, 'name a datapath command'),
  handler: () => {},
};
