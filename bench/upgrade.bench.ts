// Upgrade, rollback and roll-forward of the agent on a node whose pods carry traffic (issue #15's
// target: under 5 s with 200 pods, no bypassed and no broken connection). The node of
// test/upgrade.test.ts at scale: UPGRADE_PODS pods (a netns pair each, the pod's app in its own
// cgroup), every pod's app making new connections at a steady rate and holding long-lived ones that
// exchange a line every UPGRADE_ROUND_MS, all through the ztunnel stand-in (its own process, which
// outlives the agents as ztunnel does). The previous release (test/upgrade/previous-release, built
// once and cached) enrols the pods; then, timed, each from the SIGTERM of the running agent to the
// poll (every UPGRADE_POLL_MS, 100) that sees every pod's tcx links on the next agent's programs and the next agent reporting
// every pod enabled (acked by ztunnel again):
//   upgrade      previous -> this build (this build adopts the previous layout's pins);
//   restart      this build -> this build (baseline: no version change);
//   rollback     this build -> `datapath downgrade --layout 1` -> previous;
//   roll forward previous -> this build again.
// Everything the bench made is removed at the end, on failure and on SIGINT/SIGTERM too.
import type { ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AppCgroup } from '../test/helpers/app.js';
import { CLI, runCli } from '../test/helpers/cli.js';
import { fixedListenPort } from '../test/helpers/ports.js';
import { TEST_PREFIX, testBpffsRoot } from '../test/helpers/kernel.js';
import { removeDatapath } from '../test/helpers/leftovers.js';
import { previousRelease } from '../test/helpers/previous-release.js';
import { StandInProcess } from '../test/helpers/standin-process.js';
import { podWithRemote, Topology, type PodNet } from '../test/helpers/topology.js';
import {
  AgentProcess,
  EchoServer,
  enabledPods,
  linkPrograms,
  podLinks,
  startTraffic,
  type Traffic,
  type TrafficSummary,
} from '../test/helpers/upgrade-node.js';
import { sleep, until } from '../test/helpers/wait.js';
import { machineLine } from './harness.js';

const PODS = Number(process.env.UPGRADE_PODS ?? 200);
const LONG_LIVED = Number(process.env.UPGRADE_LONG_LIVED ?? 1); // per pod
const NEW_EVERY_MS = Number(process.env.UPGRADE_NEW_EVERY_MS ?? 2000); // per pod
const ROUND_MS = Number(process.env.UPGRADE_ROUND_MS ?? 200);
const TARGET_MS = 5000;
const SWITCH_TIMEOUT_MS = 120_000;
// How often a switch is polled: each poll runs `bpftool link show` over every link on the node
// (thousands with 200 pods) on the same 2 CPUs as the agent it times.
const POLL_MS = Number(process.env.UPGRADE_POLL_MS ?? 100);

interface Pod {
  uid: string;
  net: PodNet;
  cgroup: AppCgroup;
  pause: ChildProcess;
  server: EchoServer;
  /** Its pinned tcx links' ids (they stay when an agent swaps the programs in place). */
  links: number[];
}

interface SwitchResult {
  name: string;
  stoppedMs: number;
  downgradeMs?: number;
  /** From the SIGTERM of the running agent. */
  firstSwappedMs: number;
  allSwappedMs: number;
  readyMs: number;
  /** The bench's own polling: how many polls, and the ms they took in all. */
  polls: { count: number; ms: number };
  /** The next agent's log, ms from the SIGTERM: its first line, ZDS served, agent ready (every pod
   * reconciled), ztunnel connected, ztunnel's snapshot acked. */
  log: Record<string, number | undefined>;
  window: [number, number];
}

const LOG_MARKS: [string, string | RegExp][] = [
  ['first log line', /./],
  ['ZDS listening', 'ZDS server listening'],
  ['ztunnel connected', /^ztunnel connected/],
  ['snapshot acked', 'snapshot acknowledged'],
  ['agent ready', 'agent ready'],
];

async function main(): Promise<void> {
  const previous = previousRelease();
  const topo = new Topology();
  const root = testBpffsRoot(topo.id);
  const dir = mkdtempSync(join(tmpdir(), `${TEST_PREFIX}-bench-upgrade-`));
  const socket = join(dir, 'ztunnel.sock');
  const port = await fixedListenPort();
  const agentArgs = [
    '--node-name',
    'node-a',
    '--local-pods',
    join(dir, 'pods.yaml'),
    '--ztunnel-socket',
    socket,
    '--plugin-socket',
    join(dir, 'cni.sock'),
    '--status-socket',
    join(dir, 'status.sock'),
    '--bpffs',
    root,
    '--metrics-addr',
    `127.0.0.1:${port}`,
  ];
  const pods: Pod[] = [];
  const agents: AgentProcess[] = [];
  const traffic: Traffic[] = [];
  let ztunnel: StandInProcess | undefined;

  let cleaning: Promise<void> | undefined;
  const cleanup = (): Promise<void> =>
    (cleaning ??= (async () => {
      for (const a of agents) await a.stop('SIGKILL').catch(() => undefined);
      for (const tr of traffic) tr.child.kill('SIGKILL');
      await ztunnel?.stop();
      for (const p of pods) {
        await p.server.destroy();
        p.pause.kill('SIGKILL');
        await new Promise((r) =>
          p.pause.exitCode === null && p.pause.signalCode === null ? p.pause.once('exit', r) : r(null),
        );
      }
      for (const tr of traffic)
        if (tr.child.exitCode === null && tr.child.signalCode === null)
          await new Promise((r) => tr.child.once('exit', r));
      for (const p of pods) {
        try {
          p.cgroup.remove();
        } catch (err) {
          process.stderr.write(`cannot remove ${p.cgroup.path}: ${(err as Error).message}\n`);
        }
      }
      try {
        if (existsSync(root)) await removeDatapath(root);
      } finally {
        rmSync(root, { recursive: true, force: true });
        await topo.cleanup();
        rmSync(dir, { recursive: true, force: true });
      }
    })());
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      process.stderr.write(`${sig}: cleaning up\n`);
      void cleanup().finally(() => process.exit(130));
    });
  }

  try {
    const setupStart = Date.now();
    for (let i = 0; i < PODS; i += 4) {
      const batch = await Promise.all(
        Array.from({ length: Math.min(4, PODS - i) }, async (_, k) => {
          const n = i + k;
          const net = await podWithRemote(topo, n % 250, String(n));
          return { n, net };
        }),
      );
      for (const { n, net } of batch) {
        const cgroup = new AppCgroup(`${topo.id}-${n}`);
        // Registered at once, so cleanup finds whatever was made.
        const pod: Pod = {
          uid: `upgrade-${n}-${topo.id}`,
          net,
          cgroup,
          pause: cgroup.pause(net.podPath, 3600),
          server: undefined as unknown as EchoServer,
          links: [],
        };
        pods.push(pod);
        pod.server = await EchoServer.start(Topology.netnsPath(net.remote), net.remoteV4);
      }
    }
    writeFileSync(
      join(dir, 'pods.yaml'),
      [
        'apiVersion: v1\nkind: Namespace\nmetadata: { name: shop, labels: { istio.io/dataplane-mode: ambient } }',
        ...pods.map(
          (p, i) =>
            `apiVersion: v1\nkind: Pod\nmetadata: { name: app-${i}, namespace: shop, uid: ${p.uid} }\nstatus: { phase: Running, podIP: ${p.net.podV4} }`,
        ),
      ].join('\n---\n'),
    );
    ztunnel = StandInProcess.start(socket);
    process.stderr.write(`${PODS} pods set up in ${((Date.now() - setupStart) / 1000).toFixed(1)} s\n`);

    // This build routes the apps' sockets over lo with connect hooks; the previous release has none.
    const connectHooked = (p: Pod): boolean => existsSync(join(root, 'pods', p.uid, 'pod_connect4'));
    const readLinks = async (p: Pod): Promise<Map<number, number> | undefined> => {
      try {
        const l = await podLinks(root, p.uid);
        p.links = l.map((x) => x.link);
        return new Map(l.map((x) => [x.link, x.prog]));
      } catch {
        return undefined; // not (yet) on tcx links
      }
    };
    /** The programs every pod's links run now, once they all have links (the previous release
     * attaches tc first and moves to tcx once idle). */
    const allPrograms = async (): Promise<Set<number>> => {
      const links = await linkPrograms();
      const progs = new Set<number>();
      for (const p of pods) {
        let l = p.links.map((id) => links.get(id));
        if (l.some((x) => x === undefined)) l = [...((await readLinks(p))?.values() ?? [])];
        if (!l.length) throw new Error(`pod ${p.uid} has no tcx links`);
        for (const prog of l) progs.add(prog!);
      }
      return progs;
    };

    let agent = AgentProcess.start(previous.cli, agentArgs);
    agents.push(agent);
    const enrolStart = Date.now();
    await until(
      async () => {
        for (const p of pods) if (!p.links.length && !(await readLinks(p))) return false;
        return (await enabledPods(port)) === PODS;
      },
      () => `every pod enrolled by the previous release on tcx links (${agent.stderr()})`,
      600_000,
    );
    process.stderr.write(
      `previous release enrolled ${PODS} pods in ${((Date.now() - enrolStart) / 1000).toFixed(1)} s\n`,
    );

    // Ten apps at a time: 200 Pythons starting at once on 2 CPUs miss their own 3 s timeouts.
    for (let i = 0; i < pods.length; i += 10) {
      const started = pods
        .slice(i, i + 10)
        .map((p) =>
          startTraffic(p.cgroup, p.net, { longLived: LONG_LIVED, newEveryMs: NEW_EVERY_MS, roundMs: ROUND_MS }),
        );
      traffic.push(...started);
      await Promise.all(started.map((tr) => tr.ready));
    }
    await sleep(3000);

    const switchTo = async (name: string, cli: string, current: boolean, downgrade: boolean): Promise<SwitchResult> => {
      const before = await allPrograms();
      const t0 = Date.now();
      await agent.stop();
      const stoppedMs = Date.now() - t0;
      let downgradeMs: number | undefined;
      if (downgrade) {
        const down = await runCli(['datapath', 'downgrade', '--layout', '1', '--bpffs', root]);
        if (down.code !== 0) throw new Error(`downgrade failed: ${down.stderr}`);
        downgradeMs = Date.now() - t0;
      }
      // (v0.1.0 had no plugin policy file; this build's goes in the bench's directory, not the host's)
      agent = AgentProcess.start(
        cli,
        current ? [...agentArgs, '--cni-policy-file', join(dir, 'cni-policy')] : agentArgs,
      );
      agents.push(agent);
      const swappedAt = new Map<string, number>();
      let readyMs: number | undefined;
      const polls = { count: 0, ms: 0 };
      const poll = async (): Promise<boolean> => {
        const links = await linkPrograms();
        for (const p of pods) {
          if (swappedAt.has(p.uid)) continue;
          let progs = p.links.map((id) => links.get(id));
          if (progs.some((x) => x === undefined)) progs = [...((await readLinks(p))?.values() ?? [undefined])]; // links replaced
          if (progs.every((x) => x !== undefined && !before.has(x)) && connectHooked(p) === current)
            swappedAt.set(p.uid, Date.now() - t0);
        }
        if (swappedAt.size < pods.length) return false;
        if ((await enabledPods(port)) !== PODS) return false;
        readyMs = Date.now() - t0;
        return true;
      };
      await until(
        async () => {
          const pollStart = Date.now();
          polls.count++;
          try {
            return await poll();
          } finally {
            polls.ms += Date.now() - pollStart;
          }
        },
        () => `${name}: ${swappedAt.size} of ${PODS} pods on the next programs (${agent.stderr()})`,
        SWITCH_TIMEOUT_MS,
        POLL_MS,
      );
      const times = [...swappedAt.values()];
      const log: Record<string, number | undefined> = {};
      for (const [label, msg] of LOG_MARKS) {
        const at = agent.loggedAt(msg);
        log[label] = at === undefined ? undefined : at - t0;
      }
      log['process spawned'] = agent.startedAt - t0;
      process.stderr.write(
        `${name}: old agent exited ${stoppedMs} ms, ${downgradeMs === undefined ? '' : `downgrade done ${downgradeMs} ms, `}all pods swapped ${Math.max(...times)} ms, ready ${readyMs} ms (${polls.count} polls, ${polls.ms} ms polling)\n`,
      );
      return {
        name,
        stoppedMs,
        ...(downgradeMs === undefined ? {} : { downgradeMs }),
        firstSwappedMs: Math.min(...times),
        allSwappedMs: Math.max(...times),
        readyMs: readyMs!,
        polls,
        log,
        window: [t0, t0 + readyMs!],
      };
    };

    const results: SwitchResult[] = [];
    const settle = (): Promise<void> => sleep(3000);
    results.push(await switchTo('upgrade (previous -> this build)', CLI, true, false));
    await settle();
    results.push(await switchTo('restart, no version change (baseline)', CLI, true, false));
    await settle();
    results.push(await switchTo('rollback (this build -> downgrade -> previous)', previous.cli, false, true));
    await settle();
    results.push(await switchTo('roll forward (previous -> this build)', CLI, true, false));
    await settle();

    for (const tr of traffic) tr.child.kill('SIGTERM');
    // A pod's app that died without its summary is reported, and leaves the others' counts standing.
    const settled = await Promise.allSettled(traffic.map((tr) => tr.summary));
    const lost = settled.flatMap((r) => (r.status === 'rejected' ? [String(r.reason)] : []));
    const summaries: TrafficSummary[] = settled.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
    const stats = await ztunnel.stats();
    await agent.stop();

    // Failures carry their time (Unix seconds): each is counted in the switch whose window (SIGTERM
    // to ready, plus 2 s after) holds it, or as "outside any switch".
    const failedAt = (s: string): number => Number(/(\d+\.\d+)/.exec(s)?.[1] ?? 0) * 1000;
    const inWindow = (at: number, r: SwitchResult): boolean => at >= r.window[0] && at <= r.window[1] + 2000;
    const newFailed = summaries.flatMap((s) => s.new_failed.map(failedAt));
    const broken = summaries.flatMap((s) =>
      s.long_errors.map((e) => Number(/ at (\d+\.\d+)/.exec(e)?.[1] ?? 0) * 1000),
    );
    const bypassed = pods.flatMap((p) => p.server.bypassed().map((h) => h.at));
    const served = pods.flatMap((p) => p.server.hellos.map((h) => h.at));
    const count = (xs: number[], r: SwitchResult): number => xs.filter((at) => inWindow(at, r)).length;
    const outside = (xs: number[]): number => xs.filter((at) => !results.some((r) => inWindow(at, r))).length;
    const newOk = summaries.reduce((n, s) => n + s.new_ok, 0);
    const rounds = summaries.flatMap((s) => s.long_rounds);
    const seen = pods
      .filter((_, i) => settled[i]!.status === 'fulfilled')
      .reduce((n, p) => n + p.server.hellos.length, 0);
    const carried = pods.filter(
      (p) => (stats.find((st) => st.uid === p.uid)?.stats.outbound.connections ?? 0) >= p.server.hellos.length,
    ).length;
    const verdict = (ms: number): string => (ms < TARGET_MS ? 'met' : `MISSED by ${(ms - TARGET_MS).toFixed(0)} ms`);
    const f = (ms: number | undefined): string => (ms === undefined ? '-' : ms.toFixed(0));

    const lines = [
      await machineLine(),
      `upgrade: ${PODS} pods enrolled by the previous release (${previous.commit.slice(0, 12)}); each pod's app (own cgroup) opens a new connection every ${NEW_EVERY_MS} ms (${((PODS * 1000) / NEW_EVERY_MS).toFixed(0)}/s across the node) and holds ${LONG_LIVED} long-lived connection(s) exchanging a line every ${ROUND_MS} ms, all through the ztunnel stand-in; times in ms from the SIGTERM of the running agent`,
      '',
      '| switch | old agent exited | downgrade done | first pod swapped | all pods swapped | ready (all enabled) | target < 5000 ms | new conns served in window | failed new | broken long-lived | bypassed |',
      '|---|---|---|---|---|---|---|---|---|---|---|',
      ...results.map(
        (r) =>
          `| ${r.name} | ${f(r.stoppedMs)} | ${f(r.downgradeMs)} | ${f(r.firstSwappedMs)} | ${f(r.allSwappedMs)} | ${f(r.readyMs)} | ${verdict(r.readyMs)} | ${count(served, r)} | ${count(newFailed, r)} | ${count(broken, r)} | ${count(bypassed, r)} |`,
      ),
      '',
      "where the time goes: the next agent's log, ms from the SIGTERM",
      `| switch | process spawned | ${LOG_MARKS.map(([l]) => l).join(' | ')} | all pods swapped | ready | bench polls (ms spent polling) |`,
      `|---|---|${LOG_MARKS.map(() => '---|').join('')}---|---|---|`,
      ...results.map(
        (r) =>
          `| ${r.name} | ${f(r.log['process spawned'])} | ${LOG_MARKS.map(([l]) => f(r.log[l])).join(' | ')} | ${f(r.allSwappedMs)} | ${f(r.readyMs)} | ${r.polls.count} (${r.polls.ms}) |`,
      ),
      '',
      ...(lost.length
        ? [
            `${lost.length} pods' apps ended without their summary (left out of the counts below): ${lost[0]!.slice(0, 300)}`,
          ]
        : []),
      `whole run: ${newOk} new connections ok, ${newFailed.length} failed (${outside(newFailed)} outside any switch); ${rounds.length} long-lived connections, ${broken.length} broken, fewest rounds ${Math.min(...rounds)}; the servers saw ${seen} connections (expected ${newOk + rounds.length}), ${bypassed.length} from the app's own socket (bypassed ztunnel); ztunnel counted at least the server's connections for ${carried} of ${PODS} pods`,
    ];
    process.stdout.write(lines.join('\n') + '\n');
    const failures = [
      newFailed.length && 'failed new connections',
      broken.length && 'broken long-lived connections',
      bypassed.length && 'bypassed connections',
      seen !== newOk + rounds.length && 'connection counts differ',
      carried !== PODS && "ztunnel's counters",
      lost.length && 'apps without a summary',
    ].filter(Boolean);
    if (failures.length) {
      process.stderr.write(
        `upgrade bench: ${failures.join(', ')}\n${summaries
          .flatMap((s) => [...s.new_failed, ...s.long_errors])
          .slice(0, 10)
          .join('\n')}\n`,
      );
      process.exitCode = 1;
    }
  } finally {
    await cleanup();
  }
}

await main();
