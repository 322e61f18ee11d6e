// Switching the node's steering (sk-assign <-> sk-lookup) with pods attached: every pod carries its
// sk_lookup link whatever the steering, so the switch needs no re-attach and traffic stays captured
// both ways; a pod without the link (attached by an earlier version under sk-assign) is reported by
// verify in either mode, and re-attaching repairs it.
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { Datapath, type Steering } from '../bpf/src/index.js';
import { testRunnerCgroup } from './helpers/app.js';
import { kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { podWithRemote, Topology, type PodNet } from './helpers/topology.js';
import { RecordingServer, whoAnswers, ztunnelListener } from './helpers/traffic.js';

const APP_PORT = 8080;

after(assertNothingLeft);

for (const [mode, subnet] of [
  ['tcx', 44],
  ['tc', 45],
] as const) {
  describe(`switching steering with a pod attached (${mode})`, kernelTest(), () => {
    const topo = new Topology();
    const uid = `pod-${topo.id}`;
    const root = testBpffsRoot(topo.id);
    let net: PodNet;
    let dp: Datapath;
    const servers: RecordingServer[] = [];

    const steer = (steering: Steering) =>
      dp.configure({ ztunnelExemption: 'ztunnel-sockets', strictAllow: [], steering });
    const attach = () => dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] }, { mode });

    async function assertCaptured(): Promise<void> {
      for (const host of [net.podV4, net.podV6])
        assert.equal(
          await whoAnswers({ netns: Topology.netnsPath(net.remote), host, port: APP_PORT }),
          'ztunnel-15006',
        );
      for (const host of [net.remoteV4, net.remoteV6])
        assert.equal(await whoAnswers({ netns: net.podPath, host, port: APP_PORT }), 'ztunnel-15001');
    }

    before(async () => {
      net = await podWithRemote(topo, subnet);
      dp = await Datapath.open({ bpffsRoot: root });
      await steer('sk-lookup');
      // The test's own marked sockets play ztunnel's; its listeners are learnt as they open.
      dp.trustZtunnelCgroup(testRunnerCgroup());
      servers.push(
        await ztunnelListener(net.podPath, 15001),
        await ztunnelListener(net.podPath, 15006),
        await RecordingServer.start('app', { netns: net.podPath, family: 6, address: '::', port: APP_PORT }),
        await RecordingServer.start('remote', {
          netns: Topology.netnsPath(net.remote),
          family: 6,
          address: '::',
          port: APP_PORT,
        }),
      );
      await steer('sk-assign');
      assert.equal((await attach()).mode, mode);
    });

    after(async () => {
      for (const s of servers) await s.destroy();
      await dp?.detach(uid);
      dp?.close();
      await topo.cleanup();
      rmSync(root, { recursive: true, force: true });
    });

    it('stays captured and verified through sk-assign -> sk-lookup -> sk-assign, without a re-attach', async () => {
      for (const steering of ['sk-assign', 'sk-lookup', 'sk-assign', 'sk-lookup'] as const) {
        await steer(steering);
        assert.deepEqual((await dp.verify(uid)).problems, [], steering);
        await assertCaptured();
      }
    });

    it('reports a pod without its sk_lookup link in either steering; re-attach repairs it', async () => {
      // What an earlier version left on a pod attached under sk-assign: no sk_lookup link.
      rmSync(`${root}/pods/${uid}/sk_lookup`);
      for (const steering of ['sk-assign', 'sk-lookup'] as const) {
        await steer(steering);
        assert.deepEqual((await dp.verify(uid)).problems, ['the sk_lookup link is missing or detached'], steering);
      }
      await attach();
      assert.deepEqual((await dp.verify(uid)).problems, []);
      await assertCaptured();
    });
  });
}
