// The datapath benchmark inside the full product: the same traffic (new connections/s, bulk
// throughput, through a native ztunnel-shaped listener) on pods that a real `ambient-bpf agent`
// process enrolled with its defaults (per-pod policy and counters, DNS capture with the pod's
// cgroup hooks, the node-side probe hooks, the ztunnel cgroup check, tc first and tcx once the node
// is idle), handed to ztunnel over ZDS; against upstream's in-pod iptables rules (with its default
// DNS capture) and the no-redirection floor, interleaved in one run. The app runs as its own
// process in the pod's own cgroup, as a container does.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fetchStatus, type StatusPod } from '../cni-agent/src/ops/status-api.js';
import { AppCgroup } from '../test/helpers/app.js';
import { CLI } from '../test/helpers/cli.js';
import { testBpffsRoot } from '../test/helpers/kernel.js';
import { removeDatapath } from '../test/helpers/leftovers.js';
import { Topology } from '../test/helpers/topology.js';
import { sleep, until } from '../test/helpers/wait.js';
import { buildNativeHelpers, machineLine, median, startListener, TCPBENCH } from './harness.js';
import { IptablesRedirector } from './iptables-redirector.js';
import { SinkZtunnel } from './sink-ztunnel.js';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 3);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 7); // bulk varies 2x between rounds on these shared machines

/** agent-auto is the product's default (tc at enrolment, measured once the agent moved the pod to
 * tcx); agent-tc is `--attach-mode tc` (and what kernels before 6.6 get). */
type Path = 'none' | 'iptables' | 'agent-auto' | 'agent-tc';
const PATHS: Path[] = ['none', 'iptables', 'agent-auto', 'agent-tc'];
const LABEL: Record<Path, string> = {
  none: '(a) no redirection (app -> 127.0.0.1:15001)',
  iptables: '(b) upstream iptables rules, DNS capture on (baseline)',
  'agent-auto': '(c) agent-enrolled pod, defaults (tcx after the idle move)',
  'agent-tc': "(c') agent-enrolled pod, --attach-mode tc",
};

interface Pod {
  name: string;
  netns: string;
  netnsPath: string;
  ip: string;
  ip6: string;
  /** The node side of the pod's veth: the destination, which has no listener on 8080, so only a
   * redirected connection succeeds. */
  gateway: string;
}

/** A pod sandbox as a primary CNI leaves it: eth0 on a veth to the node netns, v4 + v6, routes. */
async function sandbox(topo: Topology, node: string, subnet: number): Promise<Pod> {
  const name = `p${subnet}`;
  const netns = await topo.netns(name);
  await topo.veth(netns, 'eth0', node, `v${subnet}`);
  const pod = {
    name,
    netns,
    netnsPath: Topology.netnsPath(netns),
    ip: `198.18.${subnet}.2`,
    ip6: `2001:db8:${subnet}::2`,
    gateway: `198.18.${subnet}.1`,
  };
  await topo.addAddress(netns, 'eth0', `${pod.ip}/24`);
  await topo.addAddress(netns, 'eth0', `${pod.ip6}/64`);
  await topo.addAddress(node, `v${subnet}`, `${pod.gateway}/24`);
  await topo.addAddress(node, `v${subnet}`, `2001:db8:${subnet}::1/64`);
  await topo.ip(netns, 'route', 'add', 'default', 'via', pod.gateway);
  return pod;
}

/** A real agent process with the local pod source, and the sink ztunnel connected to it. */
class Agent {
  private readonly dir = mkdtempSync(join(tmpdir(), 'abt-bench-product-'));
  readonly bpffs: string;
  private readonly child: ChildProcess;
  private stderr = '';
  private ztunnel: SinkZtunnel | undefined;
  private readonly pods = new Map<string, Pod>();

  constructor(id: string, nodeNetns: string, extraArgs: string[]) {
    this.bpffs = testBpffsRoot(id);
    this.writePods();
    this.child = spawn(
      CLI,
      [
        'agent',
        '--local-pods',
        this.file('pods.yaml'),
        '--node-name',
        'bench-node',
        '--ztunnel-socket',
        this.file('z.sock'),
        '--plugin-socket',
        this.file('cni.sock'),
        '--cni-policy-file',
        this.file('cni-policy'),
        '--status-socket',
        this.file('status.sock'),
        '--bpffs',
        this.bpffs,
        '--node-netns',
        nodeNetns,
        '--log-level',
        'warn',
        ...extraArgs,
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    this.child.stderr!.on('data', (d: Buffer) => (this.stderr += d.toString()));
  }

  async ready(): Promise<void> {
    await until(
      () => {
        try {
          this.ztunnel ??= new SinkZtunnel(this.file('z.sock'));
          return true;
        } catch {
          return false; // not listening yet
        }
      },
      `the agent's ZDS socket (agent log: ${this.stderr})`,
      20_000,
    );
  }

  /** Enrols `pod` through the pods file; resolves once it is redirected, acked by ztunnel, its
   * DNS capture is on and its hooks are `hooks`. */
  async enrol(pod: Pod, hooks: 'tc' | 'tcx'): Promise<void> {
    this.pods.set(pod.name, pod);
    this.writePods();
    await until(
      async () => {
        const s = await this.status(pod.name);
        return s?.state === 'enabled' && s.dnsCapture === 'on' && s.hooks === hooks;
      },
      `${pod.name} enabled with DNS capture on ${hooks} (agent log: ${this.stderr})`,
      60_000,
    );
  }

  async unenrol(pod: Pod): Promise<void> {
    this.pods.delete(pod.name);
    this.writePods();
    await until(async () => (await this.status(pod.name)) === undefined, `${pod.name} gone from the agent`, 30_000);
  }

  async status(name: string): Promise<StatusPod | undefined> {
    return (await fetchStatus(this.file('status.sock'), 2000).catch(() => ({ pods: [] as StatusPod[] }))).pods.find(
      (p) => p.name === name,
    );
  }

  async stop(): Promise<void> {
    this.ztunnel?.close();
    const exited = new Promise((r) => this.child.once('exit', r));
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGTERM');
    await Promise.race([exited, sleep(10_000)]);
    await removeDatapath(this.bpffs);
    rmSync(this.dir, { recursive: true, force: true });
  }

  private file(name: string): string {
    return join(this.dir, name);
  }

  private writePods(): void {
    const docs = [
      'apiVersion: v1\nkind: Namespace\nmetadata: { name: bench, labels: { istio.io/dataplane-mode: ambient } }',
    ];
    for (const p of this.pods.values()) {
      docs.push(
        `apiVersion: v1\nkind: Pod\nmetadata: { name: ${p.name}, namespace: bench, uid: uid-${p.name} }\nstatus: { phase: Running, podIP: ${p.ip}, podIPs: [{ ip: ${p.ip} }, { ip: ${p.ip6} }] }`,
      );
    }
    writeFileSync(this.file('pods.yaml.tmp'), docs.join('\n---\n'));
    renameSync(this.file('pods.yaml.tmp'), this.file('pods.yaml')); // never a half-written file
  }
}

/** `tcpbench MODE HOST PORT SECONDS` as the pod's app: in the pod's cgroup and netns. */
function appRun(app: AppCgroup, pod: Pod, mode: 'connrate' | 'bulk', host: string, port: string): Promise<number> {
  const child = app.spawn('nsenter', [`--net=${pod.netnsPath}`, TCPBENCH, mode, host, port, String(SECONDS)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  return new Promise((resolve, reject) => {
    child.once('exit', (code) =>
      code === 0
        ? resolve(Number(out.trim()))
        : reject(new Error(`${mode} to ${host}:${port} in ${pod.name} exited ${code}`)),
    );
  });
}

interface Sample {
  cps: number;
  gbps: number;
  /** Outbound connections the agent's datapath counted as redirected in this pod. */
  counted?: number;
}

/** One measurement of one path, in a fresh pod (netns, veth, cgroup with its pause process). */
async function measure(
  topo: Topology,
  node: string,
  agents: Record<'agent-auto' | 'agent-tc', Agent>,
  path: Path,
  subnet: number,
): Promise<Sample> {
  const pod = await sandbox(topo, node, subnet);
  const app = new AppCgroup(`bench-${topo.id}-${subnet}`);
  const pause = app.pause(pod.netnsPath);
  const iptables = new IptablesRedirector({ dns: true });
  const agent = path === 'agent-auto' || path === 'agent-tc' ? agents[path] : undefined;
  let listener: ChildProcess | undefined;
  try {
    if (path === 'none' || path === 'iptables') listener = await startListener(pod.netnsPath);
    if (path === 'iptables') await iptables.attach({ uid: pod.name, netnsPath: pod.netnsPath, ips: [pod.ip, pod.ip6] });
    if (agent) await agent.enrol(pod, path === 'agent-auto' ? 'tcx' : 'tc');
    const [host, port] = path === 'none' ? ['127.0.0.1', '15001'] : [pod.gateway, '8080'];
    const cps = await appRun(app, pod, 'connrate', host, port);
    const gbps = await appRun(app, pod, 'bulk', host, port);
    const counted = agent ? (await agent.status(pod.name))?.counters?.outboundRedirected : undefined;
    return { cps, gbps, ...(counted === undefined ? {} : { counted }) };
  } finally {
    if (agent) await agent.unenrol(pod);
    listener?.kill();
    const gone = new Promise((r) => pause.once('exit', r));
    pause.kill();
    await gone;
    app.remove();
    await topo.deleteNetns(pod.netns);
  }
}

async function main(): Promise<void> {
  await buildNativeHelpers();
  const topo = new Topology();
  const node = await topo.netns('node');
  const nodePath = Topology.netnsPath(node);
  const agents = {
    'agent-auto': new Agent(`${topo.id}-auto`, nodePath, []),
    'agent-tc': new Agent(`${topo.id}-tc`, nodePath, ['--attach-mode', 'tc']),
  };
  const samples = Object.fromEntries(PATHS.map((p) => [p, [] as Sample[]])) as Record<Path, Sample[]>;
  try {
    await agents['agent-auto'].ready();
    await agents['agent-tc'].ready();
    let subnet = 10;
    for (let round = 0; round < ROUNDS; round++) {
      for (const path of PATHS) {
        const s = await measure(topo, node, agents, path, subnet++);
        samples[path].push(s);
        process.stderr.write(
          `round ${round + 1}/${ROUNDS} ${path}: ${s.cps} conn/s, ${s.gbps} Gbit/s${s.counted === undefined ? '' : `, ${s.counted} counted as redirected`}\n`,
        );
      }
    }
  } finally {
    for (const a of Object.values(agents)) await a.stop();
    await topo.cleanup();
  }
  const m = (p: Path, k: 'cps' | 'gbps') => median(samples[p].map((s) => s[k]));
  const x = (a: number, b: number) => `${(a / b).toFixed(2)}x`;
  const lines = [
    await machineLine(),
    `traffic: ${ROUNDS} rounds x ${SECONDS} s per path, interleaved, medians; the app (bench/tcpbench) in the pod's own cgroup and netns, a fresh pod per measurement; ztunnel = a native listener handed each pod over ZDS`,
    '',
    '| path | new connections/s | bulk Gbit/s |',
    '|---|---|---|',
    ...PATHS.map((p) => `| ${LABEL[p]} | ${m(p, 'cps').toFixed(0)} | ${m(p, 'gbps').toFixed(2)} |`),
    '',
    `connection rate vs iptables: agent defaults ${x(m('agent-auto', 'cps'), m('iptables', 'cps'))}, tc ${x(m('agent-tc', 'cps'), m('iptables', 'cps'))} (target >= 1.10x); vs the floor: ${x(m('agent-auto', 'cps'), m('none', 'cps'))}, iptables ${x(m('iptables', 'cps'), m('none', 'cps'))}`,
    `bulk throughput vs iptables: agent defaults ${x(m('agent-auto', 'gbps'), m('iptables', 'gbps'))}, tc ${x(m('agent-tc', 'gbps'), m('iptables', 'gbps'))} (target >= 1.00x); vs the floor: ${x(m('agent-auto', 'gbps'), m('none', 'gbps'))}, iptables ${x(m('iptables', 'gbps'), m('none', 'gbps'))}`,
  ];
  process.stdout.write(lines.join('\n') + '\n');
}

await main();
