// An upgrade from the previous release (test/upgrade/previous-release) to this build, a rollback and
// an upgrade again, on a node whose pods carry traffic throughout: new connections at a steady rate
// and long-lived connections exchanging data, from the pods' own apps (their cgroups: the connect
// hooks route them over lo). Each release runs as a real agent process on the same bpffs root with
// the same ztunnel (the stand-in, which outlives the agents as ztunnel does).
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { connectFromNetns, Datapath, DatapathError } from '../bpf/src/index.js';
import { AppCgroup } from './helpers/app.js';
import { CLI, runCli } from './helpers/cli.js';
import { fixedListenPort } from './helpers/ports.js';
import { kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft, podProgramIds, removeDatapath } from './helpers/leftovers.js';
import { previousRelease } from './helpers/previous-release.js';
import { StandInProcess } from './helpers/standin-process.js';
import { podWithRemote, sh, Topology, type PodNet } from './helpers/topology.js';
import {
  AgentProcess,
  EchoServer,
  enabledPods,
  startTraffic as startPodTraffic,
  type Traffic,
} from './helpers/upgrade-node.js';
import { sleep, until } from './helpers/wait.js';

after(assertNothingLeft);

// Pods the previous release enrols; one more is enrolled by this release (ztunnel's listeners in it
// are learnt, so its apps' sockets take the lo route), and rolled back with the others.
const PODS = 3;
const LONG_LIVED = 4; // per pod
const NEW_EVERY_MS = 25; // per pod
const startTraffic = (cgroup: AppCgroup, net: PodNet): Traffic =>
  startPodTraffic(cgroup, net, { longLived: LONG_LIVED, newEveryMs: NEW_EVERY_MS });

describe('upgrade from the previous release', kernelTest(), () => {
  it(
    'adopts its pods under traffic, rolls back to it and forward again: nothing bypasses ztunnel, nothing breaks',
    { timeout: 900_000 },
    async (t) => {
      const previous = previousRelease();
      const topo = new Topology();
      const root = testBpffsRoot(topo.id);
      const dir = mkdtempSync(join(tmpdir(), 'abt-upgrade-'));
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
      const pods: { uid: string; net: PodNet; cgroup: AppCgroup; pause: ChildProcess; server: EchoServer }[] = [];
      const agents: AgentProcess[] = [];
      const traffic: Traffic[] = [];
      const ztunnel = StandInProcess.start(socket);
      t.after(async () => {
        for (const a of agents) a.child.kill('SIGKILL');
        for (const tr of traffic) tr.child.kill('SIGKILL');
        await ztunnel.stop();
        for (const p of pods) {
          await p.server.destroy();
          p.pause.kill('SIGKILL');
          await new Promise((r) =>
            p.pause.exitCode === null && p.pause.signalCode === null ? p.pause.once('exit', r) : r(null),
          );
          p.cgroup.remove();
        }
        try {
          if (existsSync(root)) await removeDatapath(root);
        } finally {
          await topo.cleanup();
          rmSync(dir, { recursive: true, force: true });
        }
      });

      for (let i = 0; i <= PODS; i++) {
        const net = await podWithRemote(topo, 171 + i, String(i));
        const cgroup = new AppCgroup(`${topo.id}-${i}`);
        pods.push({
          uid: `upgrade-${i}-${topo.id}`,
          net,
          cgroup,
          pause: cgroup.pause(net.podPath),
          server: await EchoServer.start(Topology.netnsPath(net.remote), net.remoteV4),
        });
      }
      let listed = PODS;
      const writePods = (): void =>
        writeFileSync(
          join(dir, 'pods.yaml'),
          [
            'apiVersion: v1\nkind: Namespace\nmetadata: { name: shop, labels: { istio.io/dataplane-mode: ambient } }',
            ...pods
              .slice(0, listed)
              .map(
                (p, i) =>
                  `apiVersion: v1\nkind: Pod\nmetadata: { name: app-${i}, namespace: shop, uid: ${p.uid} }\nstatus: { phase: Running, podIP: ${p.net.podV4} }`,
              ),
          ].join('\n---\n'),
        );
      writePods();

      const startAgent = (cli: string): AgentProcess => {
        // (v0.1.0 had no plugin policy file; this build's goes in the test's directory, not the host's)
        const agent = AgentProcess.start(
          cli,
          cli === previous.cli ? agentArgs : [...agentArgs, '--cni-policy-file', join(dir, 'cni-policy')],
        );
        agents.push(agent);
        return agent;
      };
      const stopAgent = (a: AgentProcess): Promise<void> => a.stop();
      const programs = async (uid: string): Promise<Set<number> | undefined> =>
        podProgramIds(root, uid).catch(() => undefined);
      // This build routes the apps' sockets over lo with connect hooks; the previous release has none.
      const connectHooked = (uid: string): boolean => existsSync(join(root, 'pods', uid, 'pod_connect4'));
      const enabled = async (): Promise<boolean> => (await enabledPods(port)) === listed;
      /** Waits until every pod's tcx links run programs other than `before`'s (this release's when
       * `current`), then until the agent reports every pod enabled (ztunnel reconnected with its
       * backoff and acked); returns the programs and how long each took from the agent's start. */
      const switched = async (
        agent: AgentProcess,
        before: Map<string, Set<number>>,
        current: boolean,
      ): Promise<{ ids: Map<string, Set<number>>; swappedMs: number; enabledMs: number }> => {
        const started = Date.now();
        const ids = new Map<string, Set<number>>();
        const release = current ? 'current' : 'previous';
        await until(
          async () => {
            for (const p of pods.slice(0, listed)) {
              const now = await programs(p.uid);
              if (!now || [...now].some((id) => before.get(p.uid)?.has(id)) || connectHooked(p.uid) !== current)
                return false;
              ids.set(p.uid, now);
            }
            return true;
          },
          () => `every pod on the ${release} release's programs (${agent.stderr()})`,
          30_000,
        );
        const swappedMs = Date.now() - started;
        await until(enabled, () => `every pod enabled by the ${release} release (${agent.stderr()})`, 30_000);
        return { ids, swappedMs, enabledMs: Date.now() - started };
      };

      // The previous release enrols the pods (tc hooks first, tcx once idle).
      let agent = startAgent(previous.cli);
      let { ids } = await switched(agent, new Map(), false);

      for (const p of pods.slice(0, PODS)) traffic.push(startTraffic(p.cgroup, p.net));
      await Promise.all(traffic.map((tr) => tr.ready));
      await sleep(1000);

      // Upgrade: the new agent adopts the previous release's pins and swaps every pod's programs.
      await stopAgent(agent);
      agent = startAgent(CLI);
      const upgrade = await switched(agent, ids, true);
      t.diagnostic(
        `upgrade: every pod on this release's programs ${upgrade.swappedMs} ms after the agent started, enabled after ${upgrade.enabledMs} ms`,
      );

      // A pod enrolled by this release: ztunnel opens its listeners after this release hooked ztunnel's
      // cgroup, so they are known and its apps' sockets are routed over lo (mark 0x111).
      listed = PODS + 1;
      writePods();
      const late = pods[PODS]!;
      const enrolled = await switched(agent, new Map(), true);
      assert.match(await late.cgroup.client(late.net.podPath, 'route', late.net.remoteV4, 8080), /^pong mark=0x111 /);
      traffic.push(startTraffic(late.cgroup, late.net));
      await traffic.at(-1)!.ready;
      await sleep(1000);

      // Rollback: this release hands the pins back, then the previous release adopts them.
      await stopAgent(agent);
      const down = await runCli(['datapath', 'downgrade', '--layout', '1', '--bpffs', root]);
      assert.equal(down.code, 0, down.stderr);
      agent = startAgent(previous.cli);
      const rollback = await switched(agent, enrolled.ids, false);
      t.diagnostic(
        `rollback: every pod on the previous release's programs ${rollback.swappedMs} ms after its agent started, enabled after ${rollback.enabledMs} ms`,
      );
      await sleep(1000);

      // Forward again, the first new agent killed half-way: as soon as it re-attached a pod (the
      // attaches are serialized on the root's lock, so usually before the others).
      await stopAgent(agent);
      const killed = startAgent(CLI);
      await until(
        () => pods.slice(0, listed).some((p) => connectHooked(p.uid)),
        () => `a pod re-attached (${killed.stderr()})`,
        30_000,
      );
      await killed.stop('SIGKILL');
      t.diagnostic(`killed with ${pods.filter((p) => connectHooked(p.uid)).length} of ${listed} pods re-attached`);
      agent = startAgent(CLI);
      const again = await switched(agent, rollback.ids, true);
      t.diagnostic(`upgrade again: swapped after ${again.swappedMs} ms, enabled after ${again.enabledMs} ms`);
      ids = again.ids;
      await sleep(1000);

      for (const tr of traffic) tr.child.kill('SIGTERM');
      const summaries = await Promise.all(traffic.map((tr) => tr.summary));
      const stats = await ztunnel.stats();
      for (const [i, s] of summaries.entries()) {
        const p = pods[i]!;
        assert.deepEqual(s.new_failed, [], `pod ${i}: new connections failed`);
        assert.deepEqual(s.long_errors, [], `pod ${i}: long-lived connections broke`);
        // Each exchanged data all along: at 20 rounds a second, for well over the 3 s this asks.
        for (const rounds of s.long_rounds)
          assert.ok(rounds > 60, `pod ${i}: a long-lived connection exchanged only ${rounds} rounds`);
        assert.ok(s.new_ok > 100, `pod ${i}: only ${s.new_ok} new connections`);
        // The receiving sockets: every connection came from ztunnel's socket, never the app's own.
        assert.equal(p.server.hellos.length, s.new_ok + LONG_LIVED, `pod ${i}: connections the server saw`);
        assert.deepEqual(p.server.bypassed(), [], `pod ${i}: connections that bypassed ztunnel`);
        // ztunnel's counters: it carried at least as many as the server saw.
        const outbound = stats.find((st) => st.uid === p.uid)?.stats.outbound.connections ?? 0;
        assert.ok(
          outbound >= p.server.hellos.length,
          `pod ${i}: ztunnel counted ${outbound} outbound connections, the server saw ${p.server.hellos.length}`,
        );
      }
      assert.equal(ids.size, PODS + 1);
      await stopAgent(agent);
    },
  );

  it("carries the previous release's counters over, and refuses pins of a newer layout without touching them", async (t) => {
    const previous = previousRelease();
    const topo = new Topology();
    const root = testBpffsRoot(topo.id);
    const net = await podWithRemote(topo, 174);
    const uid = `layout-${topo.id}`;
    t.after(async () => {
      try {
        if (existsSync(root)) await removeDatapath(root);
      } finally {
        await topo.cleanup();
      }
    });
    const old = await sh(previous.cli, [
      'datapath',
      'attach',
      '--netns',
      net.podPath,
      '--uid',
      uid,
      '--pod-ip',
      net.podV4,
      '--bpffs',
      root,
    ]);
    assert.match(old, /attached/);
    // No ztunnel: the previous release's programs refuse the connection and count it in their map.
    await assert.rejects(connectFromNetns({ netns: net.podPath, host: net.remoteV4, port: 8080, timeoutMs: 2000 }));
    const oldCount = async (): Promise<number> =>
      (
        JSON.parse(await sh(previous.cli, ['datapath', 'list', '--json', '--bpffs', root])) as {
          counters: { outboundNoZtunnel: number };
        }[]
      )[0]!.counters.outboundNoZtunnel;
    const counted = await oldCount();
    assert.ok(counted > 0);

    assert.equal(Datapath.layout, 4);
    let dp = await Datapath.open({ bpffsRoot: root });
    const [pod] = await dp.list();
    assert.equal(pod?.uid, uid);
    assert.equal(
      pod.counters.outboundNoZtunnel,
      counted,
      "the previous release's count, carried into this layout's map",
    );
    dp.close();
    const stamp = async (): Promise<number> =>
      (
        JSON.parse(
          await sh('bpftool', ['-j', 'map', 'lookup', 'pinned', `${root}/maps/layout`, 'key', '0', '0', '0', '0']),
        ) as { value: string[] }
      ).value
        .map((b) => parseInt(b, 16))
        .reduce((a, b, i) => a + b * 256 ** i, 0);
    assert.equal(await stamp(), 4);

    // A newer release's pins: refused, named, left alone.
    await sh('bpftool', [
      'map',
      'update',
      'pinned',
      `${root}/maps/layout`,
      'key',
      '0',
      '0',
      '0',
      '0',
      'value',
      '7',
      '0',
      '0',
      '0',
    ]);
    const before = readdirSync(join(root, 'maps')).sort();
    const refused = await Datapath.open({ bpffsRoot: root }).then(
      (d) => (d.close(), undefined),
      (e: unknown) => e,
    );
    assert.ok(refused instanceof DatapathError && refused.code === 'ELAYOUT', `open: ${String(refused)}`);
    assert.match(refused.message, /layout 7, written by a newer ambient-bpf; this release knows layouts 1 to 4/);
    assert.match(refused.message, /datapath downgrade --layout 4/);
    const cli = await runCli(['datapath', 'downgrade', '--layout', '1', '--bpffs', root]);
    assert.notEqual(cli.code, 0);
    assert.match(cli.stderr, /layout 7/);
    assert.deepEqual(readdirSync(join(root, 'maps')).sort(), before);
    assert.equal(await stamp(), 7);
    assert.ok(existsSync(join(root, 'pods', uid, 'ingress')), "the pod's links are still pinned");

    // Back to this layout, then handed to the previous release, which adopts the pod.
    await sh('bpftool', [
      'map',
      'update',
      'pinned',
      `${root}/maps/layout`,
      'key',
      '0',
      '0',
      '0',
      '0',
      'value',
      '4',
      '0',
      '0',
      '0',
    ]);
    const down = await runCli(['datapath', 'downgrade', '--layout', '1', '--bpffs', root]);
    assert.equal(down.code, 0, down.stderr);
    assert.ok(
      !existsSync(join(root, 'maps', 'layout')) &&
        !existsSync(join(root, 'maps', 'pod_counters_v2')) &&
        !existsSync(join(root, 'maps', 'pod_counters_v4')) &&
        !existsSync(join(root, 'maps', 'pod_ifaces')) &&
        !existsSync(join(root, 'maps', 'captured_ifaces')) &&
        !existsSync(join(root, 'maps', 'gated_netns')),
      "layouts 2, 3 and 4's own pins removed",
    );
    assert.match(await sh(previous.cli, ['datapath', 'verify', '--uid', uid, '--bpffs', root]), /ok/);
    assert.equal(await oldCount(), counted, "the count went back into the previous release's map");
    dp = await Datapath.open({ bpffsRoot: root });
    assert.equal((await dp.list())[0]?.counters.outboundNoZtunnel, counted, 'and came again');
    dp.close();
  });
});
