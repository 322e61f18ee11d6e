// Pod start cost under the real CRI runtime (issue #14): RunPodSandbox, timed around the CRI call
// to the node's containerd (it makes the netns, runs the CNI chain — bridge + host-local, then the
// chained ambient-bpf-cni — and starts the pause process with runc), for ambient pods against
// plain pods in the same run, on the node of test/deployed.test.ts: the product's image run from
// manifests/base/daemonset.yaml, the ztunnel stand-in in its pod. An ambient pod's ADD answers once the
// pod is redirected and ztunnel acked it; a plain pod goes through the same chain and the plugin
// passes it through. Sequential starts (ambient and plain interleaved ABBA, so that noise and the
// wake of the previous pod's removal hit both alike), then bursts of pods started at once
// (alternating which kind goes first). Every sandbox is removed after it is timed.
import { execFileSync } from 'node:child_process';
import { performance } from 'node:perf_hooks';
import { leftoverCgroupsAnyHierarchy, type K8sPod } from '../test/helpers/cri.js';
import {
  AMBIENT_NAMESPACE,
  appPod,
  DeployedNode,
  missingRuntime,
  PLAIN_NAMESPACE,
} from '../test/helpers/deployed-node.js';
import { kernelTest } from '../test/helpers/kernel.js';
import { assertNothingLeft } from '../test/helpers/leftovers.js';
import { sleep } from '../test/helpers/wait.js';
import { machineLine, percentile } from './harness.js';

const SEQUENTIAL = Number(process.env.BENCH_POD_START_SEQUENTIAL ?? 50);
const PARALLEL = Number(process.env.BENCH_POD_START_PARALLEL ?? 20);
const ROUNDS = Number(process.env.BENCH_POD_START_ROUNDS ?? 3);
const WARMUP = 2;
/** Targets: what ambient may add to RunPodSandbox, ms. */
const TARGET_P50 = 5;
const TARGET_P99 = 20;

type Kind = 'ambient' | 'plain';
const NAMESPACE: Record<Kind, string> = { ambient: AMBIENT_NAMESPACE, plain: PLAIN_NAMESPACE };

let interrupted = false;
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.once(sig, () => {
    interrupted = true;
    process.stderr.write(
      `pod-start: ${sig}, stopping after the current step and cleaning up (again to kill without cleaning up)\n`,
    );
  });
}
const checkInterrupted = (): void => {
  if (interrupted) throw new Error('interrupted');
};

/** Sandboxes running now, by ID: whatever happens, each is removed. */
const live = new Map<string, K8sPod>();
let seq = 0;

/** Starts one sandbox of `kind` (its API object first, as kubelet does); the RunPodSandbox time in
 * ms. Retries only when `retryUntil` is set (the warm-up, while the agent and ztunnel come up). */
async function startSandbox(
  d: DeployedNode,
  kind: Kind,
  retryUntil?: number,
): Promise<{ ms: number; id: string; pod: K8sPod }> {
  const kubelet = d.kubelet!;
  const pod = appPod(`ps-${kind[0]}${seq++}`, NAMESPACE[kind]);
  const { sandboxConfig } = kubelet.prepareSandbox(pod);
  for (;;) {
    const t0 = performance.now();
    try {
      const { pod_sandbox_id } = await d.node!.cri.call<{ pod_sandbox_id: string }>('RunPodSandbox', {
        config: sandboxConfig,
      });
      const ms = performance.now() - t0;
      live.set(pod_sandbox_id, pod);
      return { ms, id: pod_sandbox_id, pod };
    } catch (err) {
      if (retryUntil === undefined || Date.now() > retryUntil || interrupted) {
        d.api!.remove('pods', pod.metadata.name, pod.metadata.namespace);
        throw err;
      }
      process.stderr.write(`warm-up: ${kind} pod: ${(err as Error).message}; retrying\n`);
      await sleep(1000);
    }
  }
}

async function removeSandbox(d: DeployedNode, id: string): Promise<void> {
  await d.kubelet!.removeSandbox(live.get(id)!, id);
  live.delete(id);
}

/** The agent's enrolment histogram (start of enrolling to ztunnel's ack): sum (s) and count. */
async function enrollHistogram(d: DeployedNode): Promise<{ sum: number; count: number }> {
  const port = d.kubelet!.containerPort(d.agent!.pod.spec.containers[0]!, 'metrics');
  const { body } = await d.kubelet!.httpGetFromNode('127.0.0.1', port, '/metrics');
  const value = (name: string) => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(body)?.[1] ?? NaN);
  return {
    sum: value('ambient_bpf_enroll_duration_seconds_sum'),
    count: value('ambient_bpf_enroll_duration_seconds_count'),
  };
}
const meanEnrollMs = (a: { sum: number; count: number }, b: { sum: number; count: number }) =>
  `${(((b.sum - a.sum) / (b.count - a.count)) * 1000).toFixed(1)} ms over ${b.count - a.count} pods`;

/** Where the agent's time in each sequential ambient ADD went: the median ms of each phase its
 * 'CNI ADD: pod redirected' log line reports (handler.ts), over the pods named `names`. */
function addPhases(d: DeployedNode, names: Set<string>): string {
  const byPhase = new Map<string, number[]>();
  for (const line of d.kubelet!.containerLog(d.agent!, 'agent').split('\n')) {
    if (!line.includes('CNI ADD: pod redirected')) continue;
    const entry = JSON.parse(line) as { pod: string; ms: Record<string, number> };
    if (!names.has(entry.pod)) continue;
    let total = 0;
    for (const [phase, ms] of Object.entries(entry.ms)) {
      byPhase.set(phase, [...(byPhase.get(phase) ?? []), ms]);
      total += ms;
    }
    byPhase.set('total', [...(byPhase.get('total') ?? []), total]);
  }
  return [...byPhase].map(([phase, xs]) => `${phase} ${percentile(xs, 50).toFixed(2)}`).join(', ');
}

interface Results {
  sequential: Record<Kind, number[]>;
  parallel: Record<Kind, number[]>;
  /** Per burst: first call to last answer, ms. */
  bursts: Record<Kind, number[]>;
  enrollSequential: string;
  enrollParallel: string;
  addPhases: string;
}

async function measure(d: DeployedNode): Promise<Results> {
  const r: Results = {
    sequential: { ambient: [], plain: [] },
    parallel: { ambient: [], plain: [] },
    bursts: { ambient: [], plain: [] },
    enrollSequential: '',
    enrollParallel: '',
    addPhases: '',
  };
  const sequentialAmbient = new Set<string>();
  // Warm-up (untimed): the first ambient ADD waits for the agent to be serving and ztunnel
  // connected; first runs of runc, the CNI plugins and the agent's code paths.
  const warmUntil = Date.now() + 10 * 60_000;
  for (let i = 0; i < WARMUP; i++) {
    for (const kind of ['ambient', 'plain'] as const) {
      checkInterrupted();
      await removeSandbox(d, (await startSandbox(d, kind, warmUntil)).id);
    }
  }
  const h0 = await enrollHistogram(d);
  for (let i = 0; i < SEQUENTIAL; i++) {
    for (const kind of i % 2 === 0 ? (['ambient', 'plain'] as const) : (['plain', 'ambient'] as const)) {
      checkInterrupted();
      const s = await startSandbox(d, kind);
      r.sequential[kind].push(s.ms);
      if (kind === 'ambient') sequentialAmbient.add(`${s.pod.metadata.namespace}/${s.pod.metadata.name}`);
      await removeSandbox(d, s.id);
    }
  }
  const h1 = await enrollHistogram(d);
  r.addPhases = addPhases(d, sequentialAmbient);
  for (let round = 0; round < ROUNDS; round++) {
    for (const kind of round % 2 === 0 ? (['ambient', 'plain'] as const) : (['plain', 'ambient'] as const)) {
      checkInterrupted();
      const t0 = performance.now();
      const started = await Promise.allSettled(Array.from({ length: PARALLEL }, () => startSandbox(d, kind)));
      r.bursts[kind].push(performance.now() - t0);
      for (const s of started) if (s.status === 'fulfilled') await removeSandbox(d, s.value.id);
      const failed = started.find((s): s is PromiseRejectedResult => s.status === 'rejected');
      if (failed) throw failed.reason;
      for (const s of started) if (s.status === 'fulfilled') r.parallel[kind].push(s.value.ms);
      process.stderr.write(
        `round ${round + 1}/${ROUNDS}: ${PARALLEL} ${kind} pods at once, ${r.bursts[kind].at(-1)!.toFixed(0)} ms\n`,
      );
    }
  }
  const h2 = await enrollHistogram(d);
  r.enrollSequential = meanEnrollMs(h0, h1);
  r.enrollParallel = meanEnrollMs(h1, h2);
  return r;
}

function report(r: Results): string[] {
  const p = (xs: number[], q: number) => percentile(xs, q);
  const f = (x: number) => x.toFixed(1);
  const diff = (set: Record<Kind, number[]>, q: number, target: number) => {
    const d = p(set.ambient, q) - p(set.plain, q);
    return `p${q} ${d >= 0 ? '+' : ''}${f(d)} ms (target <= ${target} ms: ${d <= target ? 'met' : `MISSED by ${f(d - target)} ms`})`;
  };
  const row = (label: string, set: Record<Kind, number[]>, kind: Kind) =>
    `| ${label} | ${kind} | ${set[kind].length} | ${f(p(set[kind], 50))} | ${f(p(set[kind], 99))} |`;
  const burst = (kind: Kind) => `${f(p(r.bursts[kind], 50))} ms`;
  return [
    '| start | kind | pods | p50 ms | p99 ms |',
    '|---|---|---|---|---|',
    row('sequential', r.sequential, 'plain'),
    row('sequential', r.sequential, 'ambient'),
    row(`${PARALLEL} at once`, r.parallel, 'plain'),
    row(`${PARALLEL} at once`, r.parallel, 'ambient'),
    '',
    `ambient - plain, sequential: ${diff(r.sequential, 50, TARGET_P50)}, ${diff(r.sequential, 99, TARGET_P99)}`,
    `ambient - plain, ${PARALLEL} at once: ${diff(r.parallel, 50, TARGET_P50)}, ${diff(r.parallel, 99, TARGET_P99)}`,
    `burst of ${PARALLEL}, first call to last answer, median of ${ROUNDS}: plain ${burst('plain')}, ambient ${burst('ambient')}`,
    `the agent's enrolment inside an ambient ADD (ambient_bpf_enroll_duration_seconds: start of enrolling to ztunnel's ack), mean: sequential ${r.enrollSequential}; at once ${r.enrollParallel}`,
    `the agent's handling of a sequential ambient ADD by phase (its log), median ms: ${r.addPhases}`,
  ];
}

/** Removes every sandbox still running, then the node, and checks that nothing of the run is left
 * (network namespaces, bpffs directories, cgroups); errors are added to `errors`. */
async function cleanUp(d: DeployedNode, errors: unknown[]): Promise<void> {
  for (const id of [...live.keys()]) {
    try {
      await removeSandbox(d, id);
    } catch (err) {
      errors.push(err);
    }
  }
  try {
    await d.stop();
  } catch (err) {
    errors.push(err);
  }
  try {
    await assertNothingLeft();
    const cgroups = leftoverCgroupsAnyHierarchy();
    if (cgroups.length) throw new Error(`cgroups left behind: ${cgroups.join(' ')}`);
  } catch (err) {
    errors.push(err);
  }
}

async function main(): Promise<void> {
  const missing = kernelTest().skip ?? missingRuntime();
  if (missing) throw new Error(`pod-start bench: ${missing}`);
  const containerd = execFileSync('containerd', ['--version'], { encoding: 'utf8' }).trim().split(' ').slice(-1)[0];
  // The agent's start is waited for generously: a slow machine is slow, not broken.
  const d = new DeployedNode({ agentStartTimeoutMs: 10 * 60_000 });
  const errors: unknown[] = [];
  let results: Results | undefined;
  try {
    await d.start();
    checkInterrupted();
    results = await measure(d);
  } catch (err) {
    errors.push(err);
  }
  // Whatever happened above (every error is caught there).
  await cleanUp(d, errors);
  for (const e of errors.slice(1)) process.stderr.write(`pod-start: also: ${(e as Error).message}\n`);
  if (errors.length) throw errors[0];
  const lines = [
    await machineLine(),
    `pod start: RunPodSandbox through containerd ${containerd}'s CRI (runc; CNI bridge + host-local, v4+v6, then ambient-bpf-cni chained by the agent run from manifests/base/daemonset.yaml), ambient pods (redirected and acked by the ztunnel stand-in's pod within the call) against plain pods (same chain, passed through), same run; ${SEQUENTIAL} of each sequential, interleaved; then ${ROUNDS} rounds of ${PARALLEL} of one kind at once, kinds alternating; each sandbox removed after it is timed; below 100 samples, p99 is the slowest one`,
    '',
    ...report(results!),
  ];
  process.stdout.write(lines.join('\n') + '\n');
}

await main();
