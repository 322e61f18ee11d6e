// `ambient-bpf ztunnel`: the bundled node-local ztunnel stand-in (one machine, tests, the demo).
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import type { CommandModule } from 'yargs';
import { pino } from 'pino';
import { ZtunnelStandIn } from '../../../ztunnel-bridge/src/standin/ztunnel.js';
import { DEFAULT_ZTUNNEL_SOCKET } from '../../../ztunnel-bridge/src/zds-server.js';
import type { Endpoint } from '../../../ztunnel-bridge/src/standin/pod-proxy.js';
import { CliError } from './cli-error.js';

interface ZtunnelArgs {
  socket: string;
  'dns-upstream': string | undefined;
  'log-level': string;
}

/** HOST:PORT or [V6]:PORT or a bare address (port 53). */
export function parseEndpoint(text: string, defaultPort: number): Endpoint {
  const m = /^\[([^\]]+)\](?::(\d+))?$/.exec(text) ?? /^([^:]+)(?::(\d+))?$/.exec(text);
  const bare = isIP(text) === 6 ? [text, text, undefined] : m;
  const host = bare?.[1];
  const port = Number(bare?.[2] ?? defaultPort);
  if (!host || isIP(host) === 0 || !Number.isInteger(port) || port < 1 || port > 65535) {
    throw new CliError(`not an IP address with optional port: ${text}`, 2);
  }
  return { host, port };
}

function resolvConfNameserver(): Endpoint | undefined {
  try {
    const line = readFileSync('/etc/resolv.conf', 'utf8')
      .split('\n')
      .find((l) => /^\s*nameserver\s+\S+/.test(l));
    const host = line?.trim().split(/\s+/)[1];
    return host && isIP(host) ? { host, port: 53 } : undefined;
  } catch {
    return undefined;
  }
}

export const ztunnelCommand: CommandModule<object, ZtunnelArgs> = {
  command: 'ztunnel',
  describe: 'run the bundled ztunnel stand-in (plain-TCP proxy speaking ZDS like upstream ztunnel)',
  builder: (y) =>
    y
      .option('socket', {
        type: 'string',
        default: DEFAULT_ZTUNNEL_SOCKET,
        describe: "the agent's ZDS socket (ztunnel's INPOD_UDS)",
      })
      .option('dns-upstream', {
        type: 'string',
        describe: 'DNS server for the 15053 listeners [default: first nameserver of /etc/resolv.conf]',
      })
      .option('log-level', {
        choices: ['debug', 'info', 'warn', 'error'],
        default: 'info',
        describe: 'log level (JSON logs on stderr)',
      })
      .epilog('Per-pod connection and byte counters are printed as JSON on stdout on SIGUSR1 and at exit.'),
  handler: async (args) => {
    const dnsUpstream =
      args['dns-upstream'] !== undefined ? parseEndpoint(args['dns-upstream'], 53) : resolvConfNameserver();
    const log = pino(
      { level: args['log-level'], base: { component: 'ztunnel-standin' } },
      pino.destination({ dest: 2, sync: true }),
    );
    const printStats = () => process.stdout.write(JSON.stringify({ pods: standIn.stats() }) + '\n');
    let fatal: string | undefined;
    let finish!: () => void;
    const done = new Promise<void>((resolve) => (finish = resolve));
    const standIn = new ZtunnelStandIn({
      socketPath: args.socket,
      log,
      ...(dnsUpstream ? { dnsUpstream } : {}),
      // Ends the wait directly: a signal to ourselves could arrive after the (now idle) event
      // loop already let the process exit with 0.
      onFatal: (reason) => {
        fatal = reason;
        finish();
      },
    });
    const stop = () => {
      standIn.stop();
      finish();
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
    process.on('SIGUSR1', printStats);
    log.info({ socket: args.socket, dnsUpstream }, 'ztunnel stand-in starting');
    standIn.start();
    await done;
    printStats();
    if (fatal) throw new CliError(`stopped on a ZDS protocol violation: ${fatal}`);
  },
};
