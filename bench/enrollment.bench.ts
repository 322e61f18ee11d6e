// Enrollment through the whole product, against an upstream-equivalent path in the same run: the
// kubelet-side CNI ADD exec of ambient-bpf-cni until it exits with the pod redirected and acked by
// the ztunnel stand-in (a separate process, as ztunnel is), with the agent's real flow (relay,
// CNI handler, reconciler, ZDS); only the redirection backend differs: the BPF datapath (tc or
// tcx), or upstream's iptables-restore + ip. Sequential ADDs (p50/p99), a burst of ADDs at once,
// and the plugin's own exec cost against Debian's bridge plugin.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Datapath } from '../bpf/src/index.js';
import { reserveFileDescriptors } from '../bpf/src/node-netns.js';
import { AGENT_FD_TABLE } from '../cni-agent/src/agent.js';
import { CniHandler, type CniRequest } from '../cni-agent/src/cni/handler.js';
import { serveRelay } from '../cni-agent/src/cni/relay.js';
import { NetnsLocator } from '../cni-agent/src/enrollment/netns-locator.js';
import { Reconciler, type PodRedirector } from '../cni-agent/src/enrollment/reconciler.js';
import type { ClusterState } from '../cni-agent/src/pods/pod.js';
import { DEFAULT_POLICY } from '../cni-agent/src/pods/selection.js';
import { silentLogger } from '../ztunnel-bridge/src/logger.js';
import { ZdsServer } from '../ztunnel-bridge/src/zds-server.js';
import { CLI } from '../test/helpers/cli.js';
import { testBpffsRoot } from '../test/helpers/kernel.js';
import { Topology } from '../test/helpers/topology.js';
import { until } from '../test/helpers/wait.js';
import { buildNativeHelpers, machineLine, percentile } from './harness.js';
import { IptablesRedirector } from './iptables-redirector.js';

const SEQUENTIAL = Number(process.env.BENCH_ENROLL_PODS ?? 100);
const BURST = Number(process.env.BENCH_BURST_PODS ?? 100);
const EXECS = Number(process.env.BENCH_EXECS ?? 200);
const PLUGIN = fileURLToPath(new URL('../../cni-agent/bin/ambient-bpf-cni', import.meta.url));
const KUBELET = fileURLToPath(new URL('./kubelet.js', import.meta.url));
const CNI_PATH = `/usr/lib/cni:${fileURLToPath(new URL('../../cni-agent/bin', import.meta.url))}`;

/** bpf-auto is the product's default: tc on the enrolment path, tcx once the node is idle. */
type Backend = 'bpf-auto' | 'bpf-tc' | 'bpf-tcx' | 'iptables';
const BACKENDS: Backend[] = ['iptables', 'bpf-auto', 'bpf-tc', 'bpf-tcx'];

interface Pod {
  name: string;
  netns: string;
  ip: string;
  ip6: string;
}

/** Pod sandboxes as the primary CNI leaves them: a netns, eth0 on a veth, IPv4 and IPv6. */
async function sandboxes(topo: Topology, count: number, subnet: number, tag: string): Promise<Pod[]> {
  const node = await topo.netns(`n${tag}`);
  const pods: Pod[] = [];
  for (let i = 0; i < count; i++) {
    const name = `${tag}${i}`;
    const ns = await topo.netns(name);
    await topo.veth(ns, 'eth0', node, `v${i}`);
    const ip = `198.18.${subnet + Math.floor(i / 250)}.${2 + (i % 250)}`;
    const ip6 = `2001:db8:${subnet}::${i + 2}`;
    await topo.addAddress(ns, 'eth0', `${ip}/16`);
    await topo.addAddress(ns, 'eth0', `${ip6}/64`);
    pods.push({ name, netns: Topology.netnsPath(ns), ip, ip6 });
  }
  return pods;
}

/** Where each ADD's time goes: instants (performance.now()) by pod uid, marked by the benchmark
 * around the agent flow's steps, and the GC pauses of the process that runs the flow. */
type Mark = 'spawn' | 'request' | 'attach' | 'attached' | 'zds' | 'acked' | 'reply' | 'exit';
const marks = new Map<string, Partial<Record<Mark, number>>>();
const mark = (uid: string, m: Mark): void => {
  const e = marks.get(uid) ?? {};
  e[m] ??= performance.now(); // the first attach or Add of a pod is the one on its ADD path
  marks.set(uid, e);
};
const gcPauses: { start: number; ms: number }[] = [];
new PerformanceObserver((list) =>
  list.getEntries().forEach((e) => gcPauses.push({ start: e.startTime, ms: e.duration })),
).observe({ entryTypes: ['gc'] });

const PHASES: [string, Mark, Mark][] = [
  ['plugin start + relay', 'spawn', 'request'],
  ['agent before attach', 'request', 'attach'],
  ['datapath attach', 'attach', 'attached'],
  ['agent before ZDS', 'attached', 'zds'],
  ['ZDS Add -> Ack', 'zds', 'acked'],
  ['agent after Ack', 'acked', 'reply'],
  ['reply -> plugin exit', 'reply', 'exit'],
];

function phases(uid: string): Record<string, number> & { gc: number } {
  const m = marks.get(uid) ?? {};
  const out: Record<string, number> = {};
  for (const [name, a, b] of PHASES) out[name] = (m[b] ?? NaN) - (m[a] ?? NaN);
  const gc = gcPauses
    .filter((g) => g.start >= (m.spawn ?? 0) && g.start <= (m.exit ?? 0))
    .reduce((t, g) => t + g.ms, 0);
  return Object.assign(out, { gc });
}

/** Wraps the flow's steps with marks. */
function timed(redirector: PodRedirector, zds: ZdsServer): PodRedirector {
  const enroll = zds.enroll.bind(zds);
  zds.enroll = async (pod) => {
    mark(pod.uid, 'zds');
    const r = await enroll(pod);
    mark(pod.uid, 'acked');
    return r;
  };
  return {
    attach: async (pod, options) => {
      mark(pod.uid, 'attach');
      await redirector.attach(pod, options);
      mark(pod.uid, 'attached');
    },
    detach: (uid) => redirector.detach(uid),
    list: () => redirector.list(),
    verify: (uid) => redirector.verify(uid),
  };
}

/** The runtime's CNI ADD of `pod` for our plugin: environment and config. */
function addInvocation(
  pluginSocket: string,
  pod: Pod,
  namespace = 'bench',
): { plugin: string; env: Record<string, string>; stdin: string } {
  const stdin = JSON.stringify({
    cniVersion: '1.0.0',
    name: 'bench',
    type: 'ambient-bpf-cni',
    agent_socket: pluginSocket,
    prevResult: {
      cniVersion: '1.0.0',
      interfaces: [{ name: 'eth0' }],
      ips: [{ address: `${pod.ip}/16` }, { address: `${pod.ip6}/64` }],
    },
  });
  const env = {
    CNI_COMMAND: 'ADD',
    CNI_CONTAINERID: `c-${pod.name}`,
    CNI_NETNS: pod.netns,
    CNI_IFNAME: 'eth0',
    CNI_PATH,
    CNI_ARGS: `K8S_POD_NAMESPACE=${namespace};K8S_POD_NAME=${pod.name};K8S_POD_UID=uid-${pod.name}`,
  };
  return { plugin: PLUGIN, env, stdin };
}

/** One CNI ADD exec of our plugin, from spawn to exit, in milliseconds. */
async function cniAdd(pluginSocket: string, pod: Pod, namespace = 'bench'): Promise<number> {
  const { env, stdin } = addInvocation(pluginSocket, pod, namespace);
  mark(`uid-${pod.name}`, 'spawn');
  try {
    return await exec(PLUGIN, env, stdin);
  } finally {
    mark(`uid-${pod.name}`, 'exit');
  }
}

/** All of `pods`' ADDs at once, spawned by a process of their own (bench/kubelet.ts) as the
 * runtime's are: milliseconds from the first spawn to the last exit. */
function burstOfAdds(pluginSocket: string, pods: Pod[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = execFile(process.execPath, [KUBELET], (err, stdout, stderr) =>
      err ? reject(new Error(`burst: ${stderr || err.message}`)) : resolve(Number(stdout.trim())),
    );
    child.stdin!.end(JSON.stringify(pods.map((pod) => addInvocation(pluginSocket, pod))));
  });
}

function exec(binary: string, env: Record<string, string>, stdin: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const child = execFile(binary, [], { env }, (err, stdout) =>
      err
        ? reject(new Error(`${binary} ${env.CNI_ARGS ?? ''}: ${stdout || err.message}`))
        : resolve(performance.now() - t0),
    );
    child.stdin!.on('error', () => undefined); // a plugin that fails early may not read it
    child.stdin!.end(stdin);
  });
}

interface Result {
  sequential: number[];
  /** Per sequential ADD, in order. */
  phases: ReturnType<typeof phases>[];
  burstMs: number;
  timeline: string;
}

/** When the burst's steps happened in the agent flow, in ms from the start of the runtime's process. */
function burstTimeline(pods: Pod[], start: number): string {
  const all = pods.map((p) => marks.get(`uid-${p.name}`) ?? {});
  const at = (k: Mark, f: (...xs: number[]) => number) => (f(...all.map((m) => m[k] ?? NaN)) - start).toFixed(0);
  return `ADDs reached the agent ${at('request', Math.min)}-${at('request', Math.max)}, attached ${at('attach', Math.min)}-${at('attached', Math.max)}, ZDS Adds (one at a time) ${at('zds', Math.min)}-${at('acked', Math.max)}, replies until ${at('reply', Math.max)}`;
}

const uidOfRequest = (req: CniRequest): string => /K8S_POD_UID=([^;]*)/.exec(req.env.CNI_ARGS ?? '')?.[1] ?? '';

async function enroll(backend: Backend, subnet: number): Promise<Result> {
  const topo = new Topology();
  const dir = mkdtempSync(join(tmpdir(), 'abt-bench-enroll-'));
  const root = testBpffsRoot(topo.id);
  const datapath = backend === 'iptables' ? undefined : await Datapath.open({ bpffsRoot: root });
  const redirector: PodRedirector = datapath ?? new IptablesRedirector();
  marks.clear();
  const zds = new ZdsServer({ socketPath: join(dir, 'z.sock') });
  let standIn: ChildProcess | undefined;
  try {
    const seq = await sandboxes(topo, SEQUENTIAL, subnet, 's');
    const burst = await sandboxes(topo, BURST, subnet + 4, 'b');
    // The stand-in starts once the server listens: however long the sandboxes took on this
    // machine, its first connection attempt succeeds (no reconnect backoff to outwait).
    zds.start();
    standIn = spawn(CLI, ['ztunnel', '--socket', join(dir, 'z.sock'), '--log-level', 'error'], { stdio: 'ignore' });
    await until(() => zds.connectedCount === 1, 'stand-in connected', 60_000);
    const state: ClusterState = {
      pods: new Map(),
      namespaces: new Map([
        ['bench', { metadata: { name: 'bench', labels: { 'istio.io/dataplane-mode': 'ambient' } } }],
      ]),
    };
    const reconciler = new Reconciler({
      datapath: timed(redirector, zds),
      zds,
      netns: new NetnsLocator(),
      log: silentLogger,
      ...(backend === 'iptables'
        ? {}
        : { attachMode: backend === 'bpf-tc' ? 'tc' : backend === 'bpf-tcx' ? 'tcx' : 'auto' }),
      capture: { strict: false, dnsCapture: false },
    });
    await reconciler.start(state);
    const cni = new CniHandler({ reconciler, state: () => state, policy: DEFAULT_POLICY, log: silentLogger });
    const relay = await serveRelay(join(dir, 'cni.sock'), async (req) => {
      mark(uidOfRequest(req), 'request');
      const res = await cni.handle(req);
      mark(uidOfRequest(req), 'reply');
      return res;
    });
    try {
      const sequential: number[] = [];
      for (const pod of seq) sequential.push(await cniAdd(join(dir, 'cni.sock'), pod));
      const start = performance.now();
      const burstMs = await burstOfAdds(join(dir, 'cni.sock'), burst);
      const timeline = burstTimeline(burst, start);
      return { sequential, phases: seq.map((p) => phases(`uid-${p.name}`)), burstMs, timeline };
    } finally {
      relay.close();
      reconciler.stop();
    }
  } finally {
    standIn?.kill('SIGTERM');
    zds.close();
    if (datapath) {
      for (const p of await datapath.list()) await datapath.detach(p.uid);
      datapath.close();
    }
    await topo.cleanup();
    rmSync(root, { recursive: true, force: true });
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The plugin's own cost: VERSION (answered by the binary) and ADD of a non-ambient pod (relayed to
 * the agent and passed through), against Debian's bridge plugin's VERSION. */
async function pluginCost(): Promise<{ ours: number[]; relay: number[]; bridge: number[] }> {
  const dir = mkdtempSync(join(tmpdir(), 'abt-bench-plugin-'));
  const state: ClusterState = { pods: new Map(), namespaces: new Map() };
  const stubReconciler = {} as Reconciler; // a non-ambient ADD never reaches the reconciler
  const cni = new CniHandler({
    reconciler: stubReconciler,
    state: () => state,
    policy: DEFAULT_POLICY,
    log: silentLogger,
  });
  const relay = await serveRelay(join(dir, 'cni.sock'), (req) => cni.handle(req));
  const version = { CNI_COMMAND: 'VERSION', CNI_PATH };
  const conf = (type: string) =>
    JSON.stringify({ cniVersion: '1.0.0', name: 'bench', type, agent_socket: join(dir, 'cni.sock') });
  const out = { ours: [] as number[], relay: [] as number[], bridge: [] as number[] };
  try {
    for (let i = 0; i < EXECS; i++) {
      out.ours.push(await exec(PLUGIN, version, conf('ambient-bpf-cni')));
      out.bridge.push(await exec('/usr/lib/cni/bridge', version, conf('bridge')));
      out.relay.push(
        await cniAdd(
          join(dir, 'cni.sock'),
          { name: `plain${i}`, netns: '/var/run/netns/none', ip: '198.18.1.1', ip6: '2001:db8::1' },
          'plain',
        ),
      );
    }
  } finally {
    relay.close();
    rmSync(dir, { recursive: true, force: true });
  }
  return out;
}

async function main(): Promise<void> {
  await buildNativeHelpers();
  reserveFileDescriptors(AGENT_FD_TABLE); // this process runs the agent flow: sized as the agent sizes its table
  const results = {} as Record<Backend, Result>;
  for (const [i, backend] of BACKENDS.entries()) results[backend] = await enroll(backend, 120 + i * 10);
  const plugin = await pluginCost();
  const p = (b: Backend, q: number) => percentile(results[b].sequential, q);
  const x = (a: number, b: number) => `${(a / b).toFixed(2)}x`;
  const lines = [
    await machineLine(),
    `enrollment: CNI ADD exec -> exit, pod redirected and acked by the stand-in (its own process); ${SEQUENTIAL} sequential pods, then ${BURST} at once; v4+v6 pods`,
    '',
    '| backend | p50 ms | p99 ms | burst of ' + BURST + ', ms |',
    '|---|---|---|---|',
    ...BACKENDS.map(
      (b) => `| ${b} | ${p(b, 50).toFixed(2)} | ${p(b, 99).toFixed(2)} | ${results[b].burstMs.toFixed(0)} |`,
    ),
    '',
    `p50 speed-up vs iptables: auto ${x(p('iptables', 50), p('bpf-auto', 50))}, tc ${x(p('iptables', 50), p('bpf-tc', 50))}, tcx ${x(p('iptables', 50), p('bpf-tcx', 50))} (target >= 3x); p99: auto ${p('bpf-auto', 99).toFixed(2)} ms, tc ${p('bpf-tc', 99).toFixed(2)} ms, tcx ${p('bpf-tcx', 99).toFixed(2)} ms (target < 15 ms)`,
    `burst speed-up vs iptables: auto ${x(results.iptables.burstMs, results['bpf-auto'].burstMs)}, tc ${x(results.iptables.burstMs, results['bpf-tc'].burstMs)}, tcx ${x(results.iptables.burstMs, results['bpf-tcx'].burstMs)} (target >= 5x)`,
    '',
    `where the burst's time goes, ms from the start of the runtime's process (its node start-up, then ${BURST} spawns):`,
    ...BACKENDS.map((b) => `- ${b}: ${results[b].timeline}`),
    '',
    `where the sequential ADDs' time goes, ms: p50 of each step, then the two slowest ADDs of each backend (GC: pauses of the process running the agent flow and spawning the plugins, within that ADD)`,
    `| backend | ADD | ${PHASES.map(([n]) => n).join(' | ')} | GC |`,
    `|---|---|${PHASES.map(() => '---|').join('')}---|`,
    ...BACKENDS.flatMap((b) => {
      const r = results[b];
      const row = (label: string, ph: ReturnType<typeof phases>, total: number) =>
        `| ${b} | ${label} ${total.toFixed(2)} | ${PHASES.map(([n]) => ph[n]!.toFixed(2)).join(' | ')} | ${ph.gc.toFixed(2)} |`;
      const p50 = Object.fromEntries([
        ...PHASES.map(([n]) => [
          n,
          percentile(
            r.phases.map((x) => x[n]!),
            50,
          ),
        ]),
        [
          'gc',
          percentile(
            r.phases.map((x) => x.gc),
            50,
          ),
        ],
      ]) as ReturnType<typeof phases>;
      const slowest = r.sequential
        .map((ms, i) => ({ ms, i }))
        .sort((a, c) => c.ms - a.ms)
        .slice(0, 2);
      return [row('p50', p50, p(b, 50)), ...slowest.map(({ ms, i }) => row(`#${i + 1}`, r.phases[i]!, ms))];
    }),
    '',
    `plugin exec over ${EXECS} runs, ms p50 / p99:`,
    `| ambient-bpf-cni VERSION | ${percentile(plugin.ours, 50).toFixed(2)} / ${percentile(plugin.ours, 99).toFixed(2)} |`,
    `| ambient-bpf-cni ADD, non-ambient pod (relayed to the agent, passed through) | ${percentile(plugin.relay, 50).toFixed(2)} / ${percentile(plugin.relay, 99).toFixed(2)} |`,
    `| bridge VERSION (Debian containernetworking-plugins) | ${percentile(plugin.bridge, 50).toFixed(2)} / ${percentile(plugin.bridge, 99).toFixed(2)} |`,
  ];
  process.stdout.write(lines.join('\n') + '\n');
}

await main();
