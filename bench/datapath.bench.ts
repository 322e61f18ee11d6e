// Datapath benchmark (npm run bench). In one run, on one topology, with a fast native listener
// standing in for ztunnel on 15001: new connections/s and bulk throughput for
//   (a) no redirection: the client connects straight to 127.0.0.1:15001,
//   (b) upstream's in-pod iptables rules (iptables-restore --noflush), the baseline,
//   (c) this project's BPF datapath: the app's sockets routed over the pod's lo at connect (the
//       default for a pod with a cgroup of its own), in both attach modes, and (c'') with no pod
//       cgroup, each packet looped through the pod's interface by the tc programs;
// and per-pod attach latency: this datapath against iptables-restore (alone, and with the rest of
// upstream's per-pod set-up). Prints ratios against the baseline measured in the same run.
import { execFile } from 'node:child_process';
import { performance } from 'node:perf_hooks';
import { rmSync } from 'node:fs';
import { Datapath } from '../bpf/src/index.js';
import { AppCgroup, testRunnerCgroup } from '../test/helpers/app.js';
import { testBpffsRoot } from '../test/helpers/kernel.js';
import { podWithRemote, Topology } from '../test/helpers/topology.js';
import { buildNativeHelpers, machineLine, median, percentile, startListener, TCPBENCH } from './harness.js';
import { upstreamInpodRules, upstreamRouteCommands } from './upstream-rules.js';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 3);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const PODS = Number(process.env.BENCH_PODS ?? 50);

type Path = 'none' | 'iptables' | 'bpf' | 'bpf-tc' | 'bpf-loop';

const PATHS: Path[] = ['none', 'iptables', 'bpf', 'bpf-tc', 'bpf-loop'];

async function inNetns(ns: string, args: string[], input?: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = execFile(TCPBENCH, ['spawn', Topology.netnsPath(ns), ...args], (err, stdout) =>
      err ? reject(new Error(`${args.join(' ')}: ${err.message}`)) : resolve(stdout),
    );
    child.stdin?.on('error', () => undefined); // the command may exit without reading it
    child.stdin?.end(input ?? '');
  });
}

/** tcpbench as the pod's app: in the pod's cgroup and netns. */
async function tcpbench(app: AppCgroup, ns: string, ...args: string[]): Promise<number> {
  const child = app.spawn('nsenter', [`--net=${Topology.netnsPath(ns)}`, TCPBENCH, ...args], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  const code = await new Promise((resolve) => child.once('exit', resolve));
  if (code !== 0) throw new Error(`tcpbench ${args.join(' ')} exited ${String(code)}`);
  return Number(out.trim());
}

/** One measurement of one path, in a pod/remote pair of its own: state a path leaves behind (such
 * as the conntrack hooks iptables' nat table keeps after a flush) cannot tax the next path. */
async function measurePath(
  topo: Topology,
  dp: Datapath,
  app: AppCgroup,
  path: Path,
  tag: string,
): Promise<{ cps: number; gbps: number }> {
  const net = await podWithRemote(topo, 9, tag);
  const listener = await startListener(net.podPath);
  const uid = `bench-${tag}-${topo.id}`;
  try {
    // The remote has no listener on 8080: a connection only succeeds when it is redirected.
    const target = path === 'none' ? ['127.0.0.1', '15001'] : [net.remoteV4, '8080'];
    if (path === 'iptables') {
      await inNetns(net.pod, ['iptables-restore', '--noflush'], upstreamInpodRules(4));
      for (const cmd of upstreamRouteCommands(4)) await inNetns(net.pod, cmd);
    }
    if (path.startsWith('bpf')) {
      const podCgroup = path === 'bpf-loop' ? {} : { podCgroup: app.path, dnsCapture: false };
      await dp.attach(
        { uid, netnsPath: net.podPath, ips: [net.podV4], ...podCgroup },
        { mode: path === 'bpf-tc' ? 'tc' : 'tcx' },
      );
    }
    const cps = await tcpbench(app, net.pod, 'connrate', target[0]!, target[1]!, String(SECONDS));
    const gbps = await tcpbench(app, net.pod, 'bulk', target[0]!, target[1]!, String(SECONDS));
    return { cps, gbps };
  } finally {
    listener.kill();
    await dp.detach(uid);
    await topo.deleteNetns(net.pod);
    await topo.deleteNetns(net.remote);
  }
}

async function trafficBenchmark(
  topo: Topology,
  dp: Datapath,
  app: AppCgroup,
): Promise<Record<Path, { cps: number[]; gbps: number[] }>> {
  const results = Object.fromEntries(PATHS.map((p) => [p, { cps: [] as number[], gbps: [] as number[] }])) as Record<
    Path,
    { cps: number[]; gbps: number[] }
  >;
  for (let round = 0; round < ROUNDS; round++) {
    // Each round starts with another path: no path always runs first (or after the same one).
    for (let i = 0; i < PATHS.length; i++) {
      const path = PATHS[(round + i) % PATHS.length]!;
      const r = await measurePath(topo, dp, app, path, `${round}${i}`);
      results[path].cps.push(r.cps);
      results[path].gbps.push(r.gbps);
      process.stderr.write(`round ${round + 1}/${ROUNDS} ${path}: ${r.cps} conn/s, ${r.gbps} Gbit/s\n`);
    }
  }
  return results;
}

async function freshPods(
  topo: Topology,
  count: number,
  label: string,
): Promise<{ ns: string; ip: string; ip6: string }[]> {
  const node = await topo.netns(`n${label}`);
  const pods = [];
  for (let i = 0; i < count; i++) {
    const ns = await topo.netns(`${label}${i}`);
    await topo.veth(ns, 'eth0', node, `v${i}`);
    const ip = `198.18.200.${i + 2}`;
    const ip6 = `2001:db8:200::${i + 2}`;
    await topo.addAddress(ns, 'eth0', `${ip}/24`);
    await topo.addAddress(ns, 'eth0', `${ip6}/64`);
    pods.push({ ns, ip, ip6 });
  }
  return pods;
}

interface Latencies {
  tcx: number[];
  tc: number[];
  restore: number[];
  upstream: number[];
}

async function attachLatency(topo: Topology, dp: Datapath): Promise<Latencies> {
  const out: Latencies = { tcx: [], tc: [], restore: [], upstream: [] };
  for (const mode of ['tcx', 'tc'] as const) {
    for (const [i, p] of (await freshPods(topo, PODS, mode === 'tcx' ? 'x' : 'c')).entries()) {
      const t0 = performance.now();
      await dp.attach(
        { uid: `lat-${mode}-${i}-${topo.id}`, netnsPath: Topology.netnsPath(p.ns), ips: [p.ip, p.ip6] },
        { mode },
      );
      out[mode].push((performance.now() - t0) * 1000);
    }
  }
  for (const p of await freshPods(topo, PODS, 'i')) {
    const r4 = Number(await inNetns(p.ns, ['iptables-restore', '--noflush'], upstreamInpodRules(4)));
    let total = r4 + Number(await inNetns(p.ns, ['ip6tables-restore', '--noflush'], upstreamInpodRules(6)));
    for (const cmd of [...upstreamRouteCommands(4), ...upstreamRouteCommands(6)])
      total += Number(await inNetns(p.ns, cmd));
    out.restore.push(r4);
    out.upstream.push(total);
  }
  return out;
}

async function main(): Promise<void> {
  await buildNativeHelpers();
  const topo = new Topology();
  const root = testBpffsRoot(topo.id);
  const dp = await Datapath.open({ bpffsRoot: root });
  // The listeners play ztunnel: started by this process, in its cgroup, trusted before they listen.
  dp.trustZtunnelCgroup(testRunnerCgroup());
  const app = new AppCgroup(`bench-${topo.id}`);
  try {
    const traffic = await trafficBenchmark(topo, dp, app);
    const latency = await attachLatency(topo, dp);
    const m = (p: Path, k: 'cps' | 'gbps') => median(traffic[p][k]);
    const ratio = (a: number, b: number) => (a / b).toFixed(2);
    const lines = [
      await machineLine(),
      `traffic: ${ROUNDS} rounds x ${SECONDS}s per path, order rotated each round, medians; client (in a pod cgroup) and listener in the pod netns, a fresh pod/remote pair per measurement`,
      '',
      '| path | new connections/s | bulk Gbit/s |',
      '|---|---|---|',
      `| (a) no redirection (127.0.0.1:15001) | ${m('none', 'cps').toFixed(0)} | ${m('none', 'gbps').toFixed(2)} |`,
      `| (b) upstream iptables rules (baseline) | ${m('iptables', 'cps').toFixed(0)} | ${m('iptables', 'gbps').toFixed(2)} |`,
      `| (c) ambient-bpf datapath, tcx (sockets routed over lo) | ${m('bpf', 'cps').toFixed(0)} | ${m('bpf', 'gbps').toFixed(2)} |`,
      `| (c') ambient-bpf datapath, tc fallback (sockets routed over lo) | ${m('bpf-tc', 'cps').toFixed(0)} | ${m('bpf-tc', 'gbps').toFixed(2)} |`,
      `| (c'') ambient-bpf datapath, tcx, no pod cgroup (packets looped through eth0) | ${m('bpf-loop', 'cps').toFixed(0)} | ${m('bpf-loop', 'gbps').toFixed(2)} |`,
      '',
      `connection rate, bpf / iptables: tcx ${ratio(m('bpf', 'cps'), m('iptables', 'cps'))}x, tc ${ratio(m('bpf-tc', 'cps'), m('iptables', 'cps'))}x (target >= 1.10x); no pod cgroup ${ratio(m('bpf-loop', 'cps'), m('iptables', 'cps'))}x; tcx / no redirection: ${ratio(m('bpf', 'cps'), m('none', 'cps'))}x`,
      `bulk throughput, bpf / iptables: tcx ${ratio(m('bpf', 'gbps'), m('iptables', 'gbps'))}x, tc ${ratio(m('bpf-tc', 'gbps'), m('iptables', 'gbps'))}x (target >= 1.00x); no pod cgroup ${ratio(m('bpf-loop', 'gbps'), m('iptables', 'gbps'))}x; tcx / no redirection: ${ratio(m('bpf', 'gbps'), m('none', 'gbps'))}x`,
      '',
      `attach latency over ${PODS} fresh pod netns (v4+v6), microseconds:`,
      '| path | p50 | p99 |',
      '|---|---|---|',
      `| ambient-bpf attach, tcx (links, rules, routes, sysctl; from JS) | ${median(latency.tcx).toFixed(0)} | ${percentile(latency.tcx, 99).toFixed(0)} |`,
      `| ambient-bpf attach, tc fallback (from JS) | ${median(latency.tc).toFixed(0)} | ${percentile(latency.tc, 99).toFixed(0)} |`,
      `| iptables-restore --noflush (v4 rules only) | ${median(latency.restore).toFixed(0)} | ${percentile(latency.restore, 99).toFixed(0)} |`,
      `| upstream per-pod set-up (iptables-restore v4+v6, ip rule/route v4+v6) | ${median(latency.upstream).toFixed(0)} | ${percentile(latency.upstream, 99).toFixed(0)} |`,
      '',
      `attach p50 speed-up vs iptables-restore alone (target >= 5x): tcx ${ratio(median(latency.restore), median(latency.tcx))}x, tc ${ratio(median(latency.restore), median(latency.tc))}x; vs upstream's whole set-up: tcx ${ratio(median(latency.upstream), median(latency.tcx))}x, tc ${ratio(median(latency.upstream), median(latency.tc))}x`,
    ];
    process.stdout.write(lines.join('\n') + '\n');
  } finally {
    for (const p of await dp.list()) await dp.detach(p.uid);
    dp.close();
    app.remove();
    await topo.cleanup();
    rmSync(root, { recursive: true, force: true });
  }
}

await main();
