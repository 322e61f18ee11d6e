// A node through upgrades (test/upgrade.test.ts, bench/upgrade.bench.ts): pods' apps carrying
// traffic (test/fixtures/upgrade-traffic.py in each pod's cgroup and netns), the servers they
// talk to, and the agents of the releases as real processes on one bpffs root.
import { spawn, type ChildProcess } from 'node:child_process';
import type net from 'node:net';
import { fileURLToPath } from 'node:url';
import { listenInNetns } from '../../bpf/src/index.js';
import type { AppCgroup } from './app.js';
import { sh, type PodNet } from './topology.js';

const TRAFFIC = fileURLToPath(new URL('../../../test/fixtures/upgrade-traffic.py', import.meta.url));

/** Echoes lines; records, per connection, the port its first line claims (the app's local port),
 * the port the connection really came from (ztunnel's own, when it went through ztunnel), and
 * when (Date.now()). */
export class EchoServer {
  readonly hellos: { claimed: number; seen: number; at: number }[] = [];
  private readonly open = new Set<net.Socket>();

  private constructor(private readonly server: net.Server) {
    server.on('connection', (s) => {
      this.open.add(s);
      s.on('close', () => this.open.delete(s));
      s.on('error', () => undefined);
      let buf = '';
      s.on('data', (d: Buffer) => {
        buf += d.toString();
        if (buf === 'ping') {
          // app-client.py's probe of its socket's route
          buf = '';
          s.write('pong\n');
        }
        for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          const hello = /^hello (\d+)$/.exec(line);
          if (hello) this.hellos.push({ claimed: Number(hello[1]), seen: s.remotePort ?? 0, at: Date.now() });
          s.write(`${line}\n`);
        }
      });
    });
  }

  static async start(netns: string, address: string): Promise<EchoServer> {
    return new EchoServer(await listenInNetns({ netns, family: 4, address, port: 8080 }));
  }

  /** Connections that reached this server from the app's own socket: they bypassed ztunnel. */
  bypassed(): { claimed: number; seen: number; at: number }[] {
    return this.hellos.filter((h) => h.claimed === h.seen);
  }

  async destroy(): Promise<void> {
    const closed = new Promise<void>((r) => this.server.close(() => r()));
    for (const s of this.open) s.destroy();
    await closed;
  }
}

/** What upgrade-traffic.py prints when it stops. Failures start with their time (Unix seconds). */
export interface TrafficSummary {
  new_ok: number;
  new_failed: string[];
  long_rounds: number[];
  long_errors: string[];
}

export interface TrafficOptions {
  /** Long-lived connections, each exchanging a line every `roundMs`. */
  longLived: number;
  /** A new connection every this many ms. */
  newEveryMs: number;
  roundMs?: number;
}

export interface Traffic {
  child: ChildProcess;
  ready: Promise<void>;
  summary: Promise<TrafficSummary>;
}

/** The app of one pod: upgrade-traffic.py in the pod's cgroup and netns, talking to the pod's
 * remote on port 8080. */
export function startTraffic(cgroup: AppCgroup, net: PodNet, o: TrafficOptions): Traffic {
  const args = [
    `--net=${net.podPath}`,
    'python3',
    TRAFFIC,
    net.remoteV4,
    '8080',
    String(o.longLived),
    String(o.newEveryMs),
    String(o.roundMs ?? 50),
  ];
  const child = cgroup.spawn('nsenter', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const ready = new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.startsWith('ready\n')) resolve();
    });
    child.on('exit', () => reject(new Error(`traffic ended before it was ready: ${err}`)));
  });
  const summary = new Promise<TrafficSummary>((resolve, reject) =>
    child.on('exit', (code, signal) => {
      try {
        resolve(JSON.parse(out.split('\n').filter(Boolean).at(-1)!) as TrafficSummary);
      } catch {
        reject(new Error(`no summary from the traffic (exit ${code ?? signal}; ${out}; ${err})`));
      }
    }),
  );
  ready.catch(() => undefined); // a caller that stops before awaiting it
  summary.catch(() => undefined);
  return { child, ready, summary };
}

/** One release's agent as its own process (`<cli> agent ...`); its log (stderr) kept. */
export class AgentProcess {
  private err = '';
  readonly startedAt = Date.now();

  private constructor(readonly child: ChildProcess) {
    child.stderr!.on('data', (d: Buffer) => (this.err += d.toString()));
  }

  static start(cli: string, args: string[]): AgentProcess {
    return new AgentProcess(spawn(cli, ['agent', ...args], { stdio: ['ignore', 'ignore', 'pipe'] }));
  }

  get exited(): boolean {
    return this.child.exitCode !== null || this.child.signalCode !== null;
  }

  /** The end of its log, for failure messages. */
  stderr(): string {
    return this.err.slice(-2000);
  }

  /** Its log's JSON lines (pino: `time` in ms since the epoch, `msg`). */
  logLines(): { time: number; msg: string; [k: string]: unknown }[] {
    return this.err.split('\n').flatMap((l) => {
      try {
        return [JSON.parse(l) as { time: number; msg: string }];
      } catch {
        return [];
      }
    });
  }

  /** When it first logged `msg` (ms since the epoch). */
  loggedAt(msg: string | RegExp): number | undefined {
    return this.logLines().find((l) => (typeof msg === 'string' ? l.msg === msg : msg.test(l.msg)))?.time;
  }

  /** SIGTERM (pods stay redirected), resolved once it exited. */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    if (this.exited) return;
    const exited = new Promise((r) => this.child.once('exit', r));
    this.child.kill(signal);
    await exited;
  }
}

/** The agent's metrics: how many pods it reports enabled (redirected and acked by ztunnel). */
export async function enabledPods(metricsPort: number): Promise<number> {
  const body = await fetch(`http://127.0.0.1:${metricsPort}/metrics`)
    .then((r) => r.text())
    .catch(() => '');
  return Number(/ambient_bpf_pods\{state="enabled"\} (\d+)\n/.exec(body)?.[1] ?? 0);
}

/** Every BPF link on the machine, by id: the program it runs. One bpftool call, however many pods. */
export async function linkPrograms(): Promise<Map<number, number>> {
  const links = JSON.parse(await sh('bpftool', ['-j', 'link', 'show'])) as { id: number; prog_id: number }[];
  return new Map(links.map((l) => [l.id, l.prog_id]));
}

/** A pod's pinned tcx links under a datapath root (ingress and egress): link and program ids. An
 * agent that swaps the programs keeps the links (their ids stay). */
export async function podLinks(root: string, uid: string): Promise<{ link: number; prog: number }[]> {
  const out: { link: number; prog: number }[] = [];
  for (const hook of ['ingress', 'egress']) {
    const l = JSON.parse(await sh('bpftool', ['-j', 'link', 'show', 'pinned', `${root}/pods/${uid}/${hook}`])) as {
      id: number;
      prog_id: number;
    };
    out.push({ link: l.id, prog: l.prog_id });
  }
  return out;
}
