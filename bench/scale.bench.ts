// Scale: SCALE_PODS (1,000) ambient pods on one node, with the agent and the ztunnel stand-in as
// their own processes and the local pod source: how fast the agent enrols them all, its resident
// memory, the datapath's kernel memory (maps and programs), how long a restarted agent takes to
// rebuild its state and give ztunnel its snapshot, and the CPU the agent uses while nothing happens.
// SCALE_CPU_PROF=DIR writes the agents' CPU profiles there.
// SCALE_SOURCE=kube: the pods come from the Kubernetes API instead (an API server double in this
// process; the agent lists, watches and patches pods/status).
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, release, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse } from 'yaml';
import { fetchStatus } from '../cni-agent/src/ops/status-api.js';
import { KubeApiTestServer } from '../test/helpers/kube-api-server.js';
import { CLI } from '../test/helpers/cli.js';
import { testBpffsRoot } from '../test/helpers/kernel.js';
import { removeDatapath } from '../test/helpers/leftovers.js';
import { sh, Topology } from '../test/helpers/topology.js';
import { sleep } from '../test/helpers/wait.js';

const PODS = Number(process.env.SCALE_PODS ?? 1000);
const IDLE_SECONDS = Number(process.env.SCALE_IDLE_SECONDS ?? 40);
const SOURCE = process.env.SCALE_SOURCE === 'kube' ? 'kube' : 'local';
const TICK = 100; // USER_HZ: /proc/PID/stat times are in clock ticks

/** SCALE_CPU_PROF=DIR: V8 CPU profiles of the agents (written when each exits) into DIR. */
const CPU_PROF = process.env.SCALE_CPU_PROF;

const CLI_JS = fileURLToPath(new URL('../cni-agent/src/cli.js', import.meta.url));

function start(args: string[]): { child: ChildProcess; log: () => string } {
  const stdio: ['ignore', 'ignore', 'pipe'] = ['ignore', 'ignore', 'pipe'];
  const child =
    CPU_PROF && args[0] === 'agent'
      ? spawn(process.execPath, ['--cpu-prof', `--cpu-prof-dir=${CPU_PROF}`, CLI_JS, ...args], { stdio })
      : spawn(CLI, args, { stdio });
  let log = '';
  child.stderr.on('data', (d: Buffer) => (log += d.toString()));
  return { child, log: () => log };
}

function rssMiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m?.[1] ?? 0) / 1024;
}

function cpuSeconds(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return (Number(fields[11]) + Number(fields[12])) / TICK; // utime + stime
}

async function waitFor(what: string, cond: () => Promise<boolean> | boolean, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out: ${what}`);
    await sleep(100);
  }
}

async function kernelMemory(root: string): Promise<{ maps: number; progs: number }> {
  const maps = JSON.parse(await sh('bpftool', ['-j', '-f', 'map', 'show'])) as {
    bytes_memlock?: number;
    pinned?: string[];
  }[];
  const ours = maps.filter((m) => m.pinned?.some((p) => p.startsWith(`${root}/`)));
  const progs = JSON.parse(await sh('bpftool', ['-j', 'prog', 'show'])) as { name?: string; bytes_memlock?: number }[];
  const names = new Set([
    'pod_ingress',
    'pod_egress',
    'pod_reroute_ing',
    'dns_connect4',
    'dns_connect6',
    'dns_sendmsg4',
    'dns_sendmsg6',
    'dns_recvmsg4',
    'dns_recvmsg6',
    'dns_getpeername',
    'node_to_pod',
    'pod_to_node',
    'pod_sk_lookup',
    'ztunnel_sockops',
  ]);
  return {
    maps: ours.reduce((s, m) => s + (m.bytes_memlock ?? 0), 0),
    progs: progs.filter((p) => p.name && names.has(p.name)).reduce((s, p) => s + (p.bytes_memlock ?? 0), 0),
  };
}

async function main(): Promise<void> {
  const topo = new Topology();
  const root = testBpffsRoot(topo.id);
  const dir = mkdtempSync(join(tmpdir(), 'abt-bench-scale-'));
  const file = join(dir, 'pods.yaml');
  const statusSocket = join(dir, 's.sock');
  const procs: ChildProcess[] = [];
  const api = SOURCE === 'kube' ? new KubeApiTestServer() : undefined;
  const source = api ? ['--kubeconfig', join(dir, 'kubeconfig')] : ['--local-pods', file];
  const agentArgs = [
    'agent',
    ...source,
    '--node-name',
    'node-a',
    '--ztunnel-socket',
    join(dir, 'z.sock'),
    '--plugin-socket',
    join(dir, 'cni.sock'),
    '--cni-policy-file',
    join(dir, 'cni-policy'),
    '--status-socket',
    statusSocket,
    '--bpffs',
    root,
    '--dns-capture=false',
    '--log-level',
    'info',
  ];
  try {
    process.stderr.write(`making ${PODS} pod sandboxes...\n`);
    const nodes = [
      await topo.netns('node0'),
      await topo.netns('node1'),
      await topo.netns('node2'),
      await topo.netns('node3'),
    ];
    const docs = [
      'apiVersion: v1\nkind: Namespace\nmetadata: { name: scale, labels: { istio.io/dataplane-mode: ambient } }',
    ];
    for (let i = 0; i < PODS; i++) {
      const ns = await topo.netns(`s${i}`);
      await topo.veth(ns, 'eth0', nodes[i % 4]!, `v${i}`);
      const ip = `198.18.${140 + Math.floor(i / 250)}.${2 + (i % 250)}`;
      await topo.addAddress(ns, 'eth0', `${ip}/16`);
      docs.push(
        `apiVersion: v1\nkind: Pod\nmetadata: { name: p${i}, namespace: scale, uid: uid-${i} }\nstatus: { phase: Running, podIP: ${ip} }`,
      );
    }
    writeFileSync(file, docs.join('\n---\n'));
    if (api) {
      await api.start();
      writeFileSync(join(dir, 'kubeconfig'), api.kubeconfigYaml());
      for (const doc of docs.map((d) => parse(d) as { kind: string; metadata: { name: string } })) {
        if (doc.kind === 'Pod') api.upsert('pods', { ...doc, spec: { nodeName: 'node-a' } });
        else api.upsert('namespaces', doc);
      }
    }
    const ztunnel = start(['ztunnel', '--socket', join(dir, 'z.sock'), '--log-level', 'warn']);
    procs.push(ztunnel.child);

    let lastEnabled = 0;
    const enabled = async (): Promise<number> => {
      try {
        return (lastEnabled = (await fetchStatus(statusSocket, 2000)).pods.filter((p) => p.state === 'enabled').length);
      } catch {
        return 0;
      }
    };
    const t0 = performance.now();
    let agent = start(agentArgs);
    procs.push(agent.child);
    await waitFor(
      `${PODS} pods enabled`,
      async () => agent.child.exitCode !== null || (await enabled()) === PODS,
      600_000,
    ).catch((err: Error) => {
      throw new Error(
        `${err.message} (${lastEnabled} enabled); the agent's log ends with:\n${agent.log().slice(-3000)}`,
      );
    });
    if (agent.child.exitCode !== null)
      throw new Error(`the agent exited (${agent.child.exitCode}):\n${agent.log().slice(-3000)}`);
    const enrolSeconds = (performance.now() - t0) / 1000;
    await sleep(3000); // let the tc -> tcx moves start; measure memory after the burst
    await waitFor(
      'all pods on tcx',
      async () => (await fetchStatus(statusSocket)).pods.every((p) => p.hooks === 'tcx'),
      600_000,
    );
    const movedSeconds = (performance.now() - t0) / 1000;
    const rssAfterEnrol = rssMiB(agent.child.pid!);
    const kmem = await kernelMemory(root);

    // Idle: no pod changes; only the periodic drift check (every 30 s) and GC (every 60 s) run.
    const cpu0 = cpuSeconds(agent.child.pid!);
    await sleep(IDLE_SECONDS * 1000);
    const idleCpu = cpuSeconds(agent.child.pid!) - cpu0;
    const rssIdle = rssMiB(agent.child.pid!);

    // Restart: a new agent adopts every pod and gives ztunnel a full snapshot.
    const exited = new Promise((r) => agent.child.once('exit', r));
    agent.child.kill('SIGTERM');
    await exited;
    const t1 = performance.now();
    agent = start(agentArgs);
    procs.push(agent.child);
    await waitFor('snapshot acknowledged', () => /"msg":"snapshot acknowledged"/.test(agent.log()), 120_000);
    const restartSeconds = (performance.now() - t1) / 1000;
    const snapshotPods = /"pods":(\d+),"msg":"snapshot acknowledged"/.exec(agent.log())?.[1];

    const lines = [
      `machine: ${cpus().length} x ${cpus()[0]?.model ?? '?'}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, Linux ${release()}`,
      `${PODS} ambient pods, ${api ? 'Kubernetes API source (pods/status annotated)' : 'local pod source'}, agent and stand-in as processes, attach mode auto`,
      '',
      '| measure | result | target |',
      '|---|---|---|',
      `| all pods enabled, from agent start | ${enrolSeconds.toFixed(1)} s (${(PODS / enrolSeconds).toFixed(0)} pods/s) | |`,
      `| all pods moved to tcx, from agent start | ${movedSeconds.toFixed(1)} s | |`,
      `| agent resident memory after enrolling | ${rssAfterEnrol.toFixed(0)} MiB | < 150 MiB |`,
      `| agent resident memory after ${IDLE_SECONDS} s idle | ${rssIdle.toFixed(0)} MiB | < 150 MiB |`,
      `| datapath kernel memory: pinned maps / programs | ${(kmem.maps / 2 ** 20).toFixed(1)} MiB / ${(kmem.progs / 1024).toFixed(0)} KiB | |`,
      `| restart to ztunnel's snapshot acknowledged (${snapshotPods ?? '?'} pods) | ${restartSeconds.toFixed(2)} s | < 3 s |`,
      `| agent CPU while idle (${IDLE_SECONDS} s, one drift check of every pod included) | ${((idleCpu / IDLE_SECONDS) * 100).toFixed(2)} % of a core (${idleCpu.toFixed(2)} s) | no polling |`,
    ];
    process.stdout.write(lines.join('\n') + '\n');
  } finally {
    const alive = procs.filter((p) => p.exitCode === null && p.signalCode === null);
    alive.forEach((p) => p.kill('SIGTERM')); // a clean exit writes the CPU profiles
    await waitFor(
      'processes exited',
      () => alive.every((p) => p.exitCode !== null || p.signalCode !== null),
      10_000,
    ).catch(() => alive.forEach((p) => p.kill('SIGKILL')));
    await sleep(200);
    await api?.close();
    await removeDatapath(root);
    await topo.cleanup();
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
