// The embedded default on one machine: a small "node" of pods as network namespaces, an external
// host, the agent (a real child process with the local pod source) and the bundled ztunnel
// stand-in; traffic pod-to-pod and pod-to-external; a table of what went through ztunnel.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import type net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { Datapath, type AttachMode, type DatapathCounters } from '../../../bpf/src/index.js';
import { connectFromNetns, listenInNetns } from '../../../bpf/src/node-netns.js';
import { ZtunnelStandIn } from '../../../ztunnel-bridge/src/standin/ztunnel.js';
import { fetchStatus, type StatusPod } from '../ops/status-api.js';
import { renderTable } from '../table.js';

const run = promisify(execFile);
const CLI_JS = fileURLToPath(new URL('../cli.js', import.meta.url));
const APP_PORT = 8080;

interface DemoPod {
  namespace: string;
  name: string;
  ip: string;
  labels?: Record<string, string>;
  /** What the demo expects: is this pod ambient? */
  ambient: boolean;
  why: string;
}

const PODS: DemoPod[] = [
  { namespace: 'shop', name: 'cart', ip: '198.18.100.10', ambient: true, why: 'namespace shop is labelled ambient' },
  { namespace: 'shop', name: 'web', ip: '198.18.100.11', ambient: true, why: 'namespace shop is labelled ambient' },
  {
    namespace: 'shop',
    name: 'legacy',
    ip: '198.18.100.12',
    labels: { 'istio.io/dataplane-mode': 'none' },
    ambient: false,
    why: 'pod opts out (dataplane-mode=none)',
  },
  { namespace: 'plain', name: 'api', ip: '198.18.100.13', ambient: false, why: 'namespace plain is not ambient' },
];
const EXTERNAL = { name: 'external', ip: '198.18.101.2' };
const FLOWS: [string, string][] = [
  ['shop/cart', 'external'],
  ['shop/cart', 'plain/api'],
  ['shop/web', 'shop/cart'],
  ['shop/legacy', 'external'],
  ['plain/api', 'external'],
  ['plain/api', 'shop/cart'],
];

export interface DemoOptions {
  keep: boolean;
  attachMode: AttachMode;
  progress: (line: string) => void;
  out: (text: string) => void;
}

interface FlowResult {
  from: string;
  to: string;
  answeredBy: string;
  outboundViaZtunnel: boolean | undefined;
  inboundViaZtunnel: boolean | undefined;
  /** What the BPF programs counted for this connection: redirected out of the source, into the destination. */
  datapathOut: number | undefined;
  datapathIn: number | undefined;
  ztunnelSaw: string;
  problems: string[];
}

export class Demo {
  private readonly id = randomBytes(3).toString('hex');
  private readonly dir = mkdtempSync(join(tmpdir(), 'ambient-bpf-demo-'));
  private readonly bpffs = `/sys/fs/bpf/ambient-bpf-demo-${this.id}`;
  private readonly namespaces: string[] = [];
  private readonly servers: net.Server[] = [];
  private agent: ChildProcess | undefined;
  private agentLog = '';
  private standIn: ZtunnelStandIn | undefined;
  private torn = false;

  constructor(private readonly opts: DemoOptions) {}

  private ns(role: string): string {
    return `ambd-${this.id}-${role}`;
  }

  private path(role: string): string {
    return `/var/run/netns/${this.ns(role)}`;
  }

  /** Runs the demo; resolves to the problems found (none: everything behaved as expected). */
  async run(): Promise<string[]> {
    const { progress } = this.opts;
    progress('creating the node: pods as network namespaces behind a bridge, and an external host');
    await this.buildTopology();
    progress('starting the pods’ apps (TCP servers on :8080) and the external server');
    await this.startApps();
    progress('starting the ztunnel stand-in and the agent (local pod source)');
    this.startStandIn();
    this.startAgent();
    progress('waiting for the agent to enrol the ambient pods');
    const pods = await this.waitEnrolled();
    progress('sending traffic');
    const flows: FlowResult[] = [];
    for (const [from, to] of FLOWS) flows.push(await this.flow(from, to));
    flows.push(await this.probeFlow('shop/cart'));
    this.opts.out(renderPods(pods) + '\n' + renderFlows(flows));
    return flows.flatMap((f) => f.problems.map((p) => `${f.from} -> ${f.to}: ${p}`));
  }

  /** Explains how to explore, then waits for Ctrl-C. */
  async keep(): Promise<void> {
    this.opts.out(
      [
        '',
        'Left running. Try:',
        `  cni-agent/bin/ambient-bpf status --status-socket ${join(this.dir, 'status.sock')}`,
        `  edit ${join(this.dir, 'pods.yaml')} (flip istio.io/dataplane-mode labels) and run status again`,
        `  nsenter --net=${this.path('cart')} ip addr    # look inside a pod`,
        'Ctrl-C tears everything down.',
        '',
      ].join('\n'),
    );
    await new Promise<void>((resolve) => {
      for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => resolve());
    });
  }

  /** Removes every namespace, pin, socket and process the demo made. Safe to call twice. */
  async teardown(): Promise<void> {
    if (this.torn) return;
    this.torn = true;
    this.opts.progress('tearing down');
    this.standIn?.stop();
    if (this.agent && this.agent.exitCode === null) {
      const exited = new Promise((r) => this.agent!.once('exit', r));
      this.agent.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 3000))]);
      this.agent.kill('SIGKILL');
    }
    for (const s of this.servers) s.close();
    try {
      const dp = await Datapath.open({ bpffsRoot: this.bpffs });
      for (const p of await dp.list()) await dp.detach(p.uid);
      dp.close();
    } catch {
      // nothing was attached
    }
    rmSync(this.bpffs, { recursive: true, force: true });
    for (const ns of this.namespaces.splice(0).reverse()) await run('ip', ['netns', 'del', ns]).catch(() => undefined);
    rmSync(this.dir, { recursive: true, force: true });
  }

  private async ip(args: string[]): Promise<void> {
    await run('ip', args);
  }

  private async addNetns(role: string): Promise<string> {
    const name = this.ns(role);
    await this.ip(['netns', 'add', name]);
    this.namespaces.push(name);
    await this.ip(['-n', name, 'link', 'set', 'lo', 'up']);
    return name;
  }

  private async buildTopology(): Promise<void> {
    const node = await this.addNetns('node');
    await this.ip(['-n', node, 'link', 'add', 'br0', 'type', 'bridge']);
    await this.ip(['-n', node, 'addr', 'add', '198.18.100.1/24', 'dev', 'br0']);
    await this.ip(['-n', node, 'link', 'set', 'br0', 'up']);
    // Forwarding between pods and the external host, inside the demo's own "node" only.
    await run('nsenter', [`--net=${this.path('node')}`, 'sysctl', '-qw', 'net.ipv4.ip_forward=1']);
    for (const [i, pod] of PODS.entries()) {
      const ns = await this.addNetns(pod.name);
      await this.ip(['link', 'add', 'eth0', 'netns', ns, 'type', 'veth', 'peer', 'name', `p${i}`, 'netns', node]);
      await this.ip(['-n', node, 'link', 'set', `p${i}`, 'master', 'br0', 'up']);
      await this.ip(['-n', ns, 'addr', 'add', `${pod.ip}/24`, 'dev', 'eth0']);
      await this.ip(['-n', ns, 'link', 'set', 'eth0', 'up']);
      await this.ip(['-n', ns, 'route', 'add', 'default', 'via', '198.18.100.1']);
    }
    const ext = await this.addNetns('ext');
    await this.ip(['link', 'add', 'eth0', 'netns', ext, 'type', 'veth', 'peer', 'name', 'ext0', 'netns', node]);
    await this.ip(['-n', node, 'addr', 'add', '198.18.101.1/24', 'dev', 'ext0']);
    await this.ip(['-n', node, 'link', 'set', 'ext0', 'up']);
    await this.ip(['-n', ext, 'addr', 'add', `${EXTERNAL.ip}/24`, 'dev', 'eth0']);
    await this.ip(['-n', ext, 'link', 'set', 'eth0', 'up']);
    await this.ip(['-n', ext, 'route', 'add', 'default', 'via', '198.18.101.1']);
  }

  private async startApps(): Promise<void> {
    const targets = [
      ...PODS.map((p) => ({ path: this.path(p.name), name: `${p.namespace}/${p.name}` })),
      { path: this.path('ext'), name: EXTERNAL.name },
    ];
    for (const t of targets) {
      const server = await listenInNetns({ netns: t.path, family: 6, address: '::', port: APP_PORT });
      server.on('connection', (s) => {
        s.on('error', () => s.destroy());
        s.end(`${t.name}\n`);
      });
      this.servers.push(server);
    }
  }

  private startStandIn(): void {
    this.standIn = new ZtunnelStandIn({ socketPath: join(this.dir, 'ztunnel.sock') });
    this.standIn.start();
  }

  private startAgent(): void {
    const docs = [
      {
        apiVersion: 'v1',
        kind: 'Namespace',
        metadata: { name: 'shop', labels: { 'istio.io/dataplane-mode': 'ambient' } },
      },
      { apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'plain' } },
      ...PODS.map((p) => ({
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: { name: p.name, namespace: p.namespace, uid: `demo-${p.name}-${this.id}`, labels: p.labels ?? {} },
        status: { phase: 'Running', podIP: p.ip, podIPs: [{ ip: p.ip }] },
      })),
    ];
    writeFileSync(join(this.dir, 'pods.yaml'), docs.map((d) => JSON.stringify(d, null, 2)).join('\n---\n') + '\n');
    this.agent = spawn(
      process.execPath,
      [
        CLI_JS,
        'agent',
        '--node-name',
        'demo-node',
        '--local-pods',
        join(this.dir, 'pods.yaml'),
        '--ztunnel-socket',
        join(this.dir, 'ztunnel.sock'),
        '--plugin-socket',
        join(this.dir, 'cni.sock'),
        '--cni-policy-file',
        join(this.dir, 'cni-policy'),
        '--status-socket',
        join(this.dir, 'status.sock'),
        '--bpffs',
        this.bpffs,
        '--attach-mode',
        this.opts.attachMode,
        '--node-netns',
        this.path('node'),
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    this.agent.stderr!.on('data', (d: Buffer) => (this.agentLog = (this.agentLog + d.toString()).slice(-4000)));
  }

  private async waitEnrolled(): Promise<StatusPod[]> {
    const deadline = Date.now() + 20_000;
    let last = 'no answer yet';
    while (Date.now() < deadline) {
      if (this.agent?.exitCode !== null)
        throw new Error(`the agent exited (${this.agent?.exitCode}): ${this.agentLog.trim().split('\n').at(-1) ?? ''}`);
      try {
        const { pods } = await fetchStatus(join(this.dir, 'status.sock'), 1000);
        const want = PODS.filter((p) => p.ambient);
        if (want.every((w) => pods.some((p) => p.name === w.name && p.state === 'enabled'))) return pods;
        last = pods.map((p) => `${p.namespace}/${p.name}: ${p.state}`).join(', ');
      } catch (err) {
        last = (err as Error).message;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`the ambient pods were not enabled within 20 s (${last})`);
  }

  private statsOf(key: string): {
    outbound: number;
    inbound: number;
    lastOutbound?: string | undefined;
    lastInbound?: string | undefined;
  } {
    const [namespace, name] = key.split('/');
    const pod = this.standIn!.stats().find((p) => p.namespace === namespace && p.name === name);
    if (!pod) return { outbound: 0, inbound: 0 };
    const recent = (dir: string) => pod.recent.filter((c) => c.direction === dir).at(-1)?.destination;
    return {
      outbound: pod.stats.outbound.connections,
      inbound: pod.stats.inbound.connections,
      lastOutbound: recent('outbound'),
      lastInbound: recent('inbound'),
    };
  }

  /** The datapath's own counters of a pod (from the agent's status API); undefined if not attached. */
  private async countersOf(): Promise<Map<string, DatapathCounters>> {
    const { pods } = await fetchStatus(join(this.dir, 'status.sock'), 2000);
    return new Map(pods.filter((p) => p.counters).map((p) => [`${p.namespace}/${p.name}`, p.counters!]));
  }

  /** A connection the node itself opens to an ambient pod, as kubelet's probes do: it must reach
   * the app directly (the datapath gives it the probe source address on the node's side). */
  private async probeFlow(to: string): Promise<FlowResult> {
    const dst = PODS.find((p) => `${p.namespace}/${p.name}` === to)!;
    const before = this.statsOf(to).inbound;
    const countersBefore = await this.countersOf();
    const problems: string[] = [];
    const answeredBy = await whoAnswers(this.path('node'), dst.ip, problems);
    await new Promise((r) => setTimeout(r, 50));
    const viaZtunnel = this.statsOf(to).inbound > before;
    const countersAfter = await this.countersOf();
    const delta = (key: 'inboundRedirected' | 'bypassProbe'): number =>
      (countersAfter.get(to)?.[key] ?? 0) - (countersBefore.get(to)?.[key] ?? 0);
    if (!problems.length && answeredBy !== to) problems.push(`answered by ${answeredBy || 'nobody'}, expected ${to}`);
    if (viaZtunnel) problems.push('the node’s own connection went through ztunnel (kubelet probes would)');
    if (delta('bypassProbe') !== 1)
      problems.push(`the datapath counted ${delta('bypassProbe')} probe bypasses, expected 1`);
    return {
      from: 'node (as kubelet)',
      to,
      answeredBy,
      outboundViaZtunnel: undefined,
      inboundViaZtunnel: viaZtunnel,
      datapathOut: undefined,
      datapathIn: delta('inboundRedirected'),
      ztunnelSaw: '-',
      problems,
    };
  }

  private async flow(from: string, to: string): Promise<FlowResult> {
    const src = PODS.find((p) => `${p.namespace}/${p.name}` === from)!;
    const dst = PODS.find((p) => `${p.namespace}/${p.name}` === to);
    const host = dst ? dst.ip : EXTERNAL.ip;
    const before = [this.statsOf(from), dst ? this.statsOf(to) : undefined] as const;
    const countersBefore = await this.countersOf();
    const problems: string[] = [];
    const answeredBy = await whoAnswers(this.path(src.name), host, problems);
    await new Promise((r) => setTimeout(r, 50)); // let the stand-in count the inbound leg
    const after = [this.statsOf(from), dst ? this.statsOf(to) : undefined] as const;
    const outboundViaZtunnel = after[0].outbound > before[0].outbound;
    const inboundViaZtunnel = dst ? after[1]!.inbound > before[1]!.inbound : undefined;
    const countersAfter = await this.countersOf();
    const delta = (pod: string, key: 'outboundRedirected' | 'inboundRedirected'): number | undefined => {
      const a = countersAfter.get(pod)?.[key];
      return a === undefined ? undefined : a - (countersBefore.get(pod)?.[key] ?? 0);
    };
    const datapathOut = delta(from, 'outboundRedirected');
    const datapathIn = dst ? delta(to, 'inboundRedirected') : undefined;
    // The datapath must agree with ztunnel: one connection redirected where ztunnel saw one.
    if ((datapathOut ?? 0) !== (outboundViaZtunnel ? 1 : 0))
      problems.push(
        `the datapath counted ${datapathOut ?? 0} outbound redirections, ztunnel saw ${outboundViaZtunnel ? 1 : 0}`,
      );
    if (dst && (datapathIn ?? 0) !== (inboundViaZtunnel ? 1 : 0))
      problems.push(
        `the datapath counted ${datapathIn ?? 0} inbound redirections, ztunnel saw ${inboundViaZtunnel ? 1 : 0}`,
      );
    const expectedAnswer = dst ? to : EXTERNAL.name;
    if (!problems.length && answeredBy !== expectedAnswer)
      problems.push(`answered by ${answeredBy || 'nobody'}, expected ${expectedAnswer}`);
    if (outboundViaZtunnel !== src.ambient)
      problems.push(`outbound ${outboundViaZtunnel ? 'went' : 'did not go'} through ztunnel (${src.why})`);
    if (dst && inboundViaZtunnel !== dst.ambient)
      problems.push(`inbound ${inboundViaZtunnel ? 'went' : 'did not go'} through ztunnel (${dst.why})`);
    const saw = outboundViaZtunnel ? after[0].lastOutbound : inboundViaZtunnel ? after[1]?.lastInbound : undefined;
    if (saw && saw !== `${host}:${APP_PORT}`)
      problems.push(`ztunnel saw ${saw}, not the original destination ${host}:${APP_PORT}`);
    return {
      from,
      to: dst ? to : `external (${EXTERNAL.ip})`,
      answeredBy,
      outboundViaZtunnel,
      inboundViaZtunnel,
      datapathOut,
      datapathIn,
      ztunnelSaw: saw ?? '-',
      problems,
    };
  }
}

/** Connects from `netns` to host:APP_PORT and returns the name the server answered with ('' and a
 * problem noted if it did not answer). */
async function whoAnswers(netns: string, host: string, problems: string[]): Promise<string> {
  try {
    const socket = await connectFromNetns({ netns, host, port: APP_PORT, timeoutMs: 3000 });
    const answer = await new Promise<string>((resolve, reject) => {
      let buf = '';
      socket.on('data', (d: Buffer) => (buf += d.toString()));
      socket.on('end', () => resolve(buf.trim()));
      socket.on('error', reject);
      setTimeout(() => reject(new Error('no answer')), 3000);
    });
    socket.destroy();
    return answer;
  } catch (err) {
    problems.push(`connection failed: ${(err as Error).message}`);
    return '';
  }
}

function renderPods(pods: StatusPod[]): string {
  const rows = [['POD', 'AMBIENT?', 'STATE', 'HOOKS', 'ZTUNNEL', 'WHY']];
  for (const p of PODS) {
    const s = pods.find((x) => x.name === p.name);
    rows.push([
      `${p.namespace}/${p.name}`,
      p.ambient ? 'yes' : 'no',
      s?.state ?? '?',
      s?.hooks || '-',
      s?.ztunnel ?? '?',
      p.why,
    ]);
  }
  return 'Pods\n' + renderTable(rows);
}

function renderFlows(flows: FlowResult[]): string {
  const yesNo = (b: boolean | undefined) => (b === undefined ? '-' : b ? 'yes' : 'no');
  // "yes (bpf 1)": ztunnel's stand-in took the leg, and the BPF programs counted 1 redirection for it.
  const leg = (viaZtunnel: boolean | undefined, counted: number | undefined) =>
    viaZtunnel === undefined ? '-' : `${yesNo(viaZtunnel)} (bpf ${counted === undefined ? '-' : counted})`;
  const rows = [
    ['FROM', 'TO', 'ANSWERED BY', 'OUT VIA ZTUNNEL', 'IN VIA ZTUNNEL', 'ZTUNNEL SAW DESTINATION', 'AS EXPECTED'],
  ];
  for (const f of flows) {
    rows.push([
      f.from,
      f.to,
      f.answeredBy || '-',
      leg(f.outboundViaZtunnel, f.datapathOut),
      leg(f.inboundViaZtunnel, f.datapathIn),
      f.ztunnelSaw,
      f.problems.length ? 'NO' : 'yes',
    ]);
  }
  return (
    'Traffic\n' +
    renderTable(rows) +
    '(bpf N: connections the datapath’s own counters saw redirected on that leg; - : the pod is not redirected.\n' +
    ' The node’s own connection gets the probe source address on the node’s side of the veth, so it bypasses ztunnel like kubelet’s probes.)\n'
  );
}
