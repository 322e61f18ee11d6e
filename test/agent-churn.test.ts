// The agent killed (SIGKILL) and restarted during pod churn: pods created and deleted (with their
// namespaces), labels flipped. Afterwards exactly the pods that should be ambient are redirected
// and known to ztunnel, and nothing of deleted pods is left.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { ZtunnelStandIn } from '../ztunnel-bridge/src/standin/ztunnel.js';
import { CLI } from './helpers/cli.js';
import { kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft, removeDatapath } from './helpers/leftovers.js';
import { Topology } from './helpers/topology.js';
import { sleep, until } from './helpers/wait.js';

after(assertNothingLeft);

interface ChurnPod {
  name: string;
  ns: 'mesh' | 'flip';
  ip: string;
  netns: string;
}

describe('agent restarts during pod churn', kernelTest(), () => {
  it('converges to exactly the ambient pods after SIGKILLs at random points', { timeout: 120_000 }, async (t) => {
    const topo = new Topology();
    const root = testBpffsRoot(topo.id);
    const dir = mkdtempSync(join(tmpdir(), 'abt-churn-'));
    const file = join(dir, 'pods.yaml');
    const socket = join(dir, 'z.sock');
    const node = await topo.netns('node');
    const standIn = new ZtunnelStandIn({ socketPath: socket });
    let agent: ChildProcess | undefined;
    t.after(async () => {
      agent?.kill('SIGKILL');
      standIn.stop();
      await removeDatapath(root);
      await topo.cleanup();
      rmSync(dir, { recursive: true, force: true });
    });

    let next = 0;
    let flipAmbient = false;
    const pods = new Map<string, ChurnPod>();
    const addPod = async () => {
      const i = next++;
      const name = `c${i}`;
      const netns = await topo.netns(name);
      await topo.veth(netns, 'eth0', node, `v${i}`);
      const ip = `198.18.95.${i + 2}`;
      await topo.addAddress(netns, 'eth0', `${ip}/24`);
      pods.set(name, { name, ns: i % 2 ? 'flip' : 'mesh', ip, netns });
    };
    const removePod = async (name: string) => {
      await topo.deleteNetns(pods.get(name)!.netns);
      pods.delete(name);
    };
    const writeFile = () =>
      writeFileSync(
        file,
        [
          JSON.stringify({
            apiVersion: 'v1',
            kind: 'Namespace',
            metadata: { name: 'mesh', labels: { 'istio.io/dataplane-mode': 'ambient' } },
          }),
          JSON.stringify({
            apiVersion: 'v1',
            kind: 'Namespace',
            metadata: { name: 'flip', labels: flipAmbient ? { 'istio.io/dataplane-mode': 'ambient' } : {} },
          }),
          ...[...pods.values()].map((p) =>
            JSON.stringify({
              apiVersion: 'v1',
              kind: 'Pod',
              metadata: { name: p.name, namespace: p.ns, uid: `uid-${p.name}` },
              status: { phase: 'Running', podIP: p.ip },
            }),
          ),
        ].join('\n---\n'),
      );
    const expected = () =>
      [...pods.values()]
        .filter((p) => p.ns === 'mesh' || flipAmbient)
        .map((p) => `uid-${p.name}`)
        .sort();
    const startAgent = () => {
      agent = spawn(
        CLI,
        [
          'agent',
          '--local-pods',
          file,
          '--ztunnel-socket',
          socket,
          '--plugin-socket',
          join(dir, 'cni.sock'),
          '--cni-policy-file',
          join(dir, 'cni-policy'),
          '--status-socket',
          join(dir, 's.sock'),
          '--bpffs',
          root,
          '--log-level',
          'warn',
        ],
        { stdio: 'ignore' },
      );
    };

    for (let i = 0; i < 8; i++) await addPod();
    writeFile();
    standIn.start();
    const random = (n: number) => Math.floor(Math.random() * n);
    for (let round = 0; round < 4; round++) {
      startAgent();
      await sleep(150 + random(400));
      // Churn while the agent runs: pods go (netns and all), new ones come, a namespace flips.
      for (const name of [...pods.keys()].sort(() => Math.random() - 0.5).slice(0, 2)) await removePod(name);
      await addPod();
      await addPod();
      flipAmbient = !flipAmbient;
      writeFile();
      await sleep(random(300));
      agent!.kill('SIGKILL');
      await new Promise((r) => agent!.once('exit', r));
    }
    startAgent();
    const dp = await Datapath.open({ bpffsRoot: root });
    t.after(() => dp.close());
    const attached = async () => (await dp.list()).map((p) => p.uid).sort();
    await until(
      async () => (await attached()).join() === expected().join(),
      `attached = expected (${expected().join()})`,
      20_000,
    );
    await until(
      () =>
        standIn
          .stats()
          .map((p) => p.uid)
          .sort()
          .join() === expected().join(),
      'ztunnel serves exactly the ambient pods',
      20_000,
    );
    assert.ok(expected().length > 0);
    assert.ok((await dp.list()).every((p) => p.state === 'attached' && p.netnsPresent));
  });
});
