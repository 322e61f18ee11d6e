// Chaos: pods churned (created, deleted, namespace labels flipped) through the Kubernetes API test
// server while the agent and the ztunnel stand-in (real processes) are SIGKILLed and restarted at
// random points, pod netns are deleted in the middle of their enrollment, and watch streams break
// or expire (410 Gone). Then every invariant must hold: exactly the pods that should be ambient are
// redirected, known to ztunnel and annotated `enabled`; nothing else is; no pin, fd or process is
// left over. CHAOS_PODS pods in all (npm run soak raises it).
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { CLI, runCli } from './helpers/cli.js';
import { kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { KubeApiTestServer } from './helpers/kube-api-server.js';
import { assertNothingLeft, removeDatapath } from './helpers/leftovers.js';
import { Topology } from './helpers/topology.js';
import { sleep, until } from './helpers/wait.js';

const PODS = Number(process.env.CHAOS_PODS ?? 200);
const MAX_LIVE = 40;
const NODE = 'node-a';
const ANNOTATION = 'ambient.istio.io/redirection';

after(assertNothingLeft);

interface ChaosPod {
  name: string;
  namespace: 'mesh' | 'flip' | 'plain';
  ip: string;
  netns: string;
  netnsGone: boolean;
}

type Proc = { child: ChildProcess; out: () => string };

function start(args: string[]): Proc {
  const child = spawn(CLI, args, { stdio: ['ignore', 'pipe', process.env.CHAOS_LOG ? 'inherit' : 'ignore'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  return { child, out: () => out };
}

async function kill(p: Proc | undefined): Promise<void> {
  if (!p || p.child.exitCode !== null || p.child.signalCode !== null) return;
  const exited = new Promise((r) => p.child.once('exit', r));
  p.child.kill('SIGKILL');
  await exited;
}

describe('chaos', kernelTest(), () => {
  it(
    `${PODS} pods of churn with the agent and ztunnel killed, netns deleted mid-enrollment, watches broken and expired`,
    { timeout: Math.max(170_000, PODS * 600) },
    async (t) => {
      const topo = new Topology();
      const root = testBpffsRoot(topo.id);
      const dir = mkdtempSync(join(tmpdir(), 'abt-chaos-'));
      const zsock = join(dir, 'z.sock');
      const api = new KubeApiTestServer();
      await api.start();
      writeFileSync(join(dir, 'kubeconfig'), api.kubeconfigYaml());
      const node = await topo.netns('node');
      let agent: Proc | undefined;
      let ztunnel: Proc | undefined;
      t.after(async () => {
        await kill(agent);
        await kill(ztunnel);
        await api.close();
        await removeDatapath(root);
        await topo.cleanup();
        rmSync(dir, { recursive: true, force: true });
      });

      const startAgent = (): Proc =>
        (agent = start([
          'agent',
          '--kubeconfig',
          join(dir, 'kubeconfig'),
          '--node-name',
          NODE,
          '--ztunnel-socket',
          zsock,
          '--plugin-socket',
          join(dir, 'cni.sock'),
          '--cni-policy-file',
          join(dir, 'cni-policy'),
          '--status-socket',
          join(dir, 's.sock'),
          '--bpffs',
          root,
          '--attach-mode',
          'tc',
          '--dns-capture=false',
          '--verify-interval',
          '2',
          '--log-level',
          process.env.CHAOS_LOG ?? 'error',
        ]));
      const startZtunnel = (): Proc =>
        (ztunnel = start(['ztunnel', '--socket', zsock, '--log-level', process.env.CHAOS_LOG ?? 'error']));

      let flipAmbient = false;
      const namespace = (name: string, ambient: boolean) =>
        api.upsert('namespaces', {
          apiVersion: 'v1',
          kind: 'Namespace',
          metadata: { name, labels: ambient ? { 'istio.io/dataplane-mode': 'ambient' } : {} },
        });
      namespace('mesh', true);
      namespace('flip', flipAmbient);
      namespace('plain', false);

      const pods = new Map<string, ChaosPod>();
      let created = 0;
      const random = (n: number): number => Math.floor(Math.random() * n);
      const addPod = async (midEnrollmentDelete: boolean): Promise<void> => {
        const i = created++;
        const name = `c${i}`;
        const netns = await topo.netns(name);
        await topo.veth(netns, 'eth0', node, `c${i}`);
        const ip = `198.18.${96 + Math.floor(i / 250)}.${2 + (i % 250)}`;
        await topo.addAddress(netns, 'eth0', `${ip}/16`);
        const pod: ChaosPod = {
          name,
          namespace: (['mesh', 'flip', 'plain'] as const)[i % 3]!,
          ip,
          netns,
          netnsGone: false,
        };
        pods.set(name, pod);
        api.upsert('pods', {
          apiVersion: 'v1',
          kind: 'Pod',
          metadata: { name, namespace: pod.namespace, uid: `uid-${name}` },
          spec: { nodeName: NODE },
          status: { phase: 'Running', podIP: ip, podIPs: [{ ip }] },
        });
        if (midEnrollmentDelete) {
          await sleep(random(30));
          await topo.deleteNetns(netns);
          pod.netnsGone = true;
        }
      };
      const deletePod = async (pod: ChaosPod): Promise<void> => {
        const order = random(2);
        if (order === 0) api.remove('pods', pod.name, pod.namespace);
        if (!pod.netnsGone) await topo.deleteNetns(pod.netns);
        if (order === 1) api.remove('pods', pod.name, pod.namespace);
        pods.delete(pod.name);
      };
      const faults = {
        agent: async () => {
          await kill(agent);
          await sleep(random(200));
          startAgent();
        },
        ztunnel: async () => {
          await kill(ztunnel);
          await sleep(random(200));
          startZtunnel();
        },
        watch: () => Promise.resolve(api.breakWatches()),
        gone: () => {
          api.compact(); // the next watch from an old resourceVersion gets 410 Gone
          api.breakWatches();
          return Promise.resolve();
        },
        none: () => Promise.resolve(),
      };
      const seen: Record<string, number> = {};

      startZtunnel();
      startAgent();
      while (created < PODS) {
        const batch = Math.min(PODS - created, 5 + random(8));
        for (let i = 0; i < batch; i++) await addPod(Math.random() < 0.1);
        for (const pod of [...pods.values()]) if (pods.size > MAX_LIVE || Math.random() < 0.15) await deletePod(pod);
        if (Math.random() < 0.3) namespace('flip', (flipAmbient = !flipAmbient));
        const fault = (['agent', 'ztunnel', 'watch', 'gone', 'none'] as const)[random(5)]!;
        seen[fault] = (seen[fault] ?? 0) + 1;
        await faults[fault]();
        await sleep(random(200));
      }
      t.diagnostic(`${created} pods; faults: ${JSON.stringify(seen)}`);
      // Pods whose sandbox died mid-enrollment are deleted, as the kubelet and the API would.
      for (const pod of [...pods.values()]) if (pod.netnsGone) await deletePod(pod);

      const dp = await Datapath.open({ bpffsRoot: root });
      t.after(() => dp.close());
      const expected = (): string[] =>
        [...pods.values()]
          .filter((p) => p.namespace === 'mesh' || (p.namespace === 'flip' && flipAmbient))
          .map((p) => `uid-${p.name}`)
          .sort();
      const attached = async (): Promise<string[]> => (await dp.list()).map((p) => p.uid).sort();
      const ztunnelPods = async (): Promise<string[]> => {
        // Asked again until it answers: a stand-in that was just restarted may not handle SIGUSR1 yet.
        const lines = ztunnel!.out().split('\n').filter(Boolean).length;
        await until(async () => {
          ztunnel!.child.kill('SIGUSR1');
          await sleep(200);
          return ztunnel!.out().split('\n').filter(Boolean).length > lines;
        }, `stand-in stats (exit ${ztunnel!.child.exitCode} ${ztunnel!.child.signalCode})`);
        const stats = JSON.parse(ztunnel!.out().split('\n').filter(Boolean).at(-1)!) as { pods: { uid: string }[] };
        return stats.pods.map((p) => p.uid).sort();
      };
      const annotated = (): string[] =>
        [...pods.values()]
          .filter(
            (p) =>
              (api.get('pods', p.name, p.namespace)?.metadata as { annotations?: Record<string, string> } | undefined)
                ?.annotations?.[ANNOTATION] === 'enabled',
          )
          .map((p) => `uid-${p.name}`)
          .sort();

      const converged = async (): Promise<void> => {
        const want = expected().join();
        await until(
          async () => (await attached()).join() === want,
          `redirected = should be ambient (${want})`,
          30_000,
        ).catch(async (err: Error) => {
          const status = await runCli(['status', '--json', '--status-socket', join(dir, 's.sock')]);
          throw new Error(`${err.message}; redirected: ${(await attached()).join()}; agent status: ${status.stdout}`);
        });
        await until(async () => (await ztunnelPods()).join() === want, 'ztunnel serves exactly those', 30_000);
        await until(() => annotated().join() === want, 'annotated enabled = those', 30_000).catch((err: Error) => {
          const notes = [...pods.values()].map(
            (p) =>
              `${p.name}=${String((api.get('pods', p.name, p.namespace)?.metadata as { annotations?: Record<string, string> } | undefined)?.annotations?.[ANNOTATION])}`,
          );
          throw new Error(`${err.message}: want ${want}; annotations ${notes.join(' ')}`);
        });
        const pins = readdirSync(join(root, 'pods')).sort().join();
        assert.equal(pins, want, 'pin directories of pods that are not redirected');
        assert.ok(
          (await dp.list()).every((p) => p.state === 'attached' && p.netnsPresent),
          'an attachment half done or on a gone netns',
        );
      };
      await converged();
      assert.ok(expected().length > 0, 'the churn left no ambient pod to check');

      // A quiet phase with the same agent: churn must not leak its file descriptors.
      const agentFds = (): number => readdirSync(`/proc/${agent!.child.pid}/fd`).length;
      const fdsBefore = agentFds();
      const ambientBefore = expected().length;
      for (let i = 0; i < 20; i++) await addPod(false);
      for (const pod of [...pods.values()].slice(0, 20)) await deletePod(pod);
      await converged();
      // The agent holds one netns fd per pod it handed to ztunnel.
      const fdTargets = (): string => {
        const counts: Record<string, number> = {};
        for (const fd of readdirSync(`/proc/${agent!.child.pid}/fd`)) {
          let target = '?';
          try {
            target = readlinkSync(`/proc/${agent!.child.pid}/fd/${fd}`).replace(/\d+/g, 'N');
          } catch {
            // closed meanwhile
          }
          counts[target] = (counts[target] ?? 0) + 1;
        }
        return JSON.stringify(counts);
      };
      assert.ok(
        agentFds() <= fdsBefore + Math.max(0, expected().length - ambientBefore) + 3,
        `agent fds ${fdsBefore} -> ${agentFds()} (ambient ${ambientBefore} -> ${expected().length}): ${fdTargets()}`,
      );

      // Every process the run started is gone once killed (the agent starts none of its own).
      const ours = [agent!.child.pid, ztunnel!.child.pid];
      await kill(agent);
      await kill(ztunnel);
      for (const pid of ours) assert.equal(existsSync(`/proc/${pid}`), false, `process ${pid} outlived its kill`);
    },
  );
});
