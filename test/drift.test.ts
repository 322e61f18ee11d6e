// Drift repair: a pod's redirection broken behind the agent's back (its tcx link detached, its
// fwmark rule deleted) is found by the periodic check, repaired, counted, and traffic is captured
// again.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { Agent } from '../cni-agent/src/agent.js';
import { silentLogger } from '../ztunnel-bridge/src/logger.js';
import { ZtunnelStandIn } from '../ztunnel-bridge/src/standin/ztunnel.js';
import { AppCgroup } from './helpers/app.js';
import { kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft, removeDatapath } from './helpers/leftovers.js';
import { podWithRemote, sh, Topology } from './helpers/topology.js';
import { RecordingServer, whoAnswers } from './helpers/traffic.js';
import { until } from './helpers/wait.js';

after(assertNothingLeft);

describe('drift repair', kernelTest(), () => {
  it('re-attaches a detached link and restores a deleted rule, and counts it', { timeout: 60_000 }, async (t) => {
    const topo = new Topology();
    const root = testBpffsRoot(topo.id);
    const dir = mkdtempSync(join(tmpdir(), 'abt-drift-'));
    const net = await podWithRemote(topo, 97);
    const uid = `drift-${topo.id}`;
    writeFileSync(
      join(dir, 'pods.yaml'),
      `apiVersion: v1\nkind: Pod\nmetadata: { name: p, uid: ${uid}, labels: { istio.io/dataplane-mode: ambient } }\nstatus: { podIP: ${net.podV4} }\n`,
    );
    // The pod has a cgroup of its own from the start (its "pause" process): an agent still waiting
    // for one re-attaches periodically, which would repair too.
    const cgroup = new AppCgroup(topo.id);
    const pause = cgroup.pause(net.podPath);
    const agent = new Agent({
      nodeName: 'n',
      source: { localPods: join(dir, 'pods.yaml') },
      ztunnelSocket: join(dir, 'z.sock'),
      pluginSocket: join(dir, 'cni.sock'),
      cniPolicyFile: join(dir, 'cni-policy'),
      bpffs: root,
      hostRoot: '/',
      attachMode: 'tcx',
      verifyIntervalMs: 200,
      log: silentLogger,
    });
    const standIn = new ZtunnelStandIn({ socketPath: join(dir, 'z.sock') });
    const remote = await RecordingServer.start('remote', {
      netns: Topology.netnsPath(net.remote),
      family: 4,
      address: net.remoteV4,
      port: 8080,
    });
    t.after(async () => {
      standIn.stop();
      agent.stop();
      await remote.close();
      await removeDatapath(root);
      pause.kill();
      await new Promise((r) =>
        pause.exitCode !== null || pause.signalCode !== null ? r(undefined) : pause.once('exit', r),
      );
      cgroup.remove();
      await topo.cleanup();
      rmSync(dir, { recursive: true, force: true });
    });
    standIn.start();
    await agent.start();
    await until(
      () => agent.status()[0]?.state === 'enabled' && agent.status()[0]?.dns === 'on',
      'enabled, with its cgroup hooked',
    );
    const dp = await Datapath.open({ bpffsRoot: root });
    t.after(() => dp.close());
    const outbound = () => standIn.stats()[0]?.stats.outbound.connections ?? 0;

    const repairs = async () => Number(/ambient_bpf_drift_repairs_total (\d+)/.exec(await agent.metrics())?.[1]);
    assert.equal(await repairs(), 0);
    await sh('bpftool', ['link', 'detach', 'pinned', `${root}/pods/${uid}/egress`]);
    await topo.ip(net.pod, 'rule', 'del', 'fwmark', '0x111/0xfff', 'table', '100', 'pref', '32764');
    // (Not asserted broken in between: the agent's 200 ms check may have repaired it already.)
    await until(async () => (await repairs()) >= 1 && (await dp.verify(uid)).ok, 'found and repaired', 10_000);
    const before = outbound();
    assert.equal(await whoAnswers({ netns: net.podPath, host: net.remoteV4, port: 8080 }), 'remote');
    assert.equal(outbound(), before + 1, 'traffic is not captured again');
  });
});
