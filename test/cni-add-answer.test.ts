// When a CNI ADD of an ambient pod answers: once the pod is redirected and ztunnel acked it, not
// later. The annotation that follows in the same pass (an API round trip) and the passes that the
// pod's own watch events ask for meanwhile must not hold the pod's start.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { NetnsLocator } from '../cni-agent/src/enrollment/netns-locator.js';
import { Reconciler, type RedirectionAnnotation } from '../cni-agent/src/enrollment/reconciler.js';
import type { Pod } from '../cni-agent/src/pods/pod.js';
import { silentLogger } from '../ztunnel-bridge/src/logger.js';
import { ZtunnelStandIn } from '../ztunnel-bridge/src/standin/ztunnel.js';
import { ZdsServer } from '../ztunnel-bridge/src/zds-server.js';
import { kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft, removeDatapath } from './helpers/leftovers.js';
import { podWithRemote, Topology } from './helpers/topology.js';
import { until } from './helpers/wait.js';

after(assertNothingLeft);

describe('CNI ADD of an ambient pod', kernelTest(), () => {
  it(
    'answers once redirected and acked, without waiting for the annotation or for later passes',
    { timeout: 60_000 },
    async (t) => {
      const topo = new Topology();
      const root = testBpffsRoot(topo.id);
      const dir = mkdtempSync(join(tmpdir(), 'abt-cniadd-'));
      const net = await podWithRemote(topo, 93);
      const dp = await Datapath.open({ bpffsRoot: root });
      const zds = new ZdsServer({ socketPath: join(dir, 'z.sock') });
      const standIn = new ZtunnelStandIn({ socketPath: join(dir, 'z.sock') });
      // An API server that takes the annotation but never answers (until the test ends).
      const patches: RedirectionAnnotation[] = [];
      let release!: () => void;
      const held = new Promise<void>((r) => (release = r));
      const reconciler = new Reconciler({
        datapath: dp,
        zds,
        netns: new NetnsLocator(),
        log: silentLogger,
        annotator: { setRedirection: (_pod, value) => (patches.push(value), held) },
      });
      t.after(async () => {
        release();
        reconciler.stop();
        standIn.stop();
        zds.close();
        dp.close();
        await removeDatapath(root);
        await topo.cleanup();
        rmSync(dir, { recursive: true, force: true });
      });
      zds.start();
      standIn.start();
      await until(() => zds.connectedCount === 1, 'the stand-in connected');
      const pod: Pod = {
        metadata: {
          name: 'cart',
          namespace: 'shop',
          uid: `uid-cart-${topo.id}`,
          labels: { 'istio.io/dataplane-mode': 'ambient' },
        },
        spec: {},
        status: {},
      };
      reconciler.applyChanges([], { pods: new Map(), namespaces: new Map() });

      const add = reconciler.cniAdd(pod, net.podPath, [net.podV4]);
      // The pod's watch event arrives during the ADD: it asks for another pass.
      reconciler.applyChanges([{ kind: 'pod', type: 'added', pod: { ...pod, status: { phase: 'Pending' } } }], {
        pods: new Map([[pod.metadata.uid, pod]]),
        namespaces: new Map(),
      });
      const answer = await Promise.race([add, new Promise<'held'>((r) => setTimeout(() => r('held'), 10_000))]);
      assert.deepEqual(answer, { ok: true }, 'the ADD answered while the annotation is still held');
      assert.deepEqual(patches, ['enabled'], 'the annotation was asked for');
      assert.equal(standIn.stats()[0]?.name, 'cart', 'ztunnel has the pod');
      assert.equal((await dp.list())[0]?.uid, pod.metadata.uid, 'the pod is redirected');
    },
  );
});
