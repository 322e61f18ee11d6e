// `ambient-bpf status`: what the agent knows about each pod of the node.
import type { CommandModule } from 'yargs';
import { DEFAULT_STATUS_SOCKET, fetchStatus, type StatusKernel, type StatusPod } from '../ops/status-api.js';
import { renderTable } from '../table.js';
import { CliError } from './cli-error.js';

interface StatusArgs {
  json: boolean;
  'status-socket': string;
}

function age(sinceMs: number, now = Date.now()): string {
  const s = Math.max(0, Math.round((now - sinceMs) / 1000));
  return s < 120
    ? `${s}s`
    : s < 7200
      ? `${Math.round(s / 60)}m`
      : s < 172800
        ? `${Math.round(s / 3600)}h`
        : `${Math.round(s / 86400)}d`;
}

export function formatStatusTable(pods: StatusPod[], now = Date.now()): string {
  // REDIRECTED OUT/IN: connections the datapath's own counters sent to ztunnel (`--json` has every counter).
  const rows = [
    ['NAMESPACE', 'POD', 'STATE', 'HOOKS', 'INTERFACES', 'ZTUNNEL', 'DNS', 'REDIRECTED OUT/IN', 'AGE', 'REASON'],
  ];
  const sorted = [...pods].sort((a, b) => `${a.namespace}/${a.name}`.localeCompare(`${b.namespace}/${b.name}`));
  for (const p of sorted) {
    const redirected = p.counters ? `${p.counters.outboundRedirected}/${p.counters.inboundRedirected}` : '-';
    rows.push([
      p.namespace,
      p.name,
      p.state,
      p.hooks || '-',
      p.interfaces.join(',') || '-',
      p.ztunnel,
      p.hooks ? p.dnsCapture : '-',
      redirected,
      age(p.sinceUnixMs, now),
      p.uncaptured ? `${p.reason} (uncaptured: ${p.uncaptured})` : p.reason,
    ]);
  }
  return renderTable(rows);
}

/** The modes the agent chose and why, then each kernel feature as probed. */
export function formatKernel(k: StatusKernel, when = "at the agent's start"): string {
  const lines = [
    `hooks: ${k.hooks} (attach mode ${k.attachMode}): ${k.hooksReason}`,
    `steering: ${k.steering}: ${k.steeringReason}`,
    `kernel features (probed ${when}, in ${k.probeMs.toFixed(1)} ms):`,
  ];
  const rows = k.features.map((f) => [
    `  ${f.name}`,
    f.present ? 'yes' : 'no',
    (f.forced ? '(forced) ' : '') + f.detail,
  ]);
  return lines.join('\n') + '\n' + renderTable(rows);
}

export const statusCommand: CommandModule<object, StatusArgs> = {
  command: 'status',
  describe: 'show each pod of this node: ambient or not, redirected, acked by ztunnel',
  builder: (y) =>
    y.option('json', { type: 'boolean', default: false, describe: 'print JSON' }).option('status-socket', {
      type: 'string',
      default: DEFAULT_STATUS_SOCKET,
      describe: "the agent's status socket",
    }),
  handler: async (args) => {
    let report;
    try {
      report = await fetchStatus(args['status-socket']);
    } catch (err) {
      throw new CliError((err as Error).message);
    }
    if (args.json) return void process.stdout.write(JSON.stringify(report, null, 2) + '\n');
    process.stdout.write(formatStatusTable(report.pods));
    process.stdout.write(`ztunnel connections: ${report.ztunnelConnections}\n`);
    if (report.kernel) process.stdout.write(formatKernel(report.kernel));
  },
};
