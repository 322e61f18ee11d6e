// The fallback for kernels before 6.6, forced on this one: clsact/cls_bpf hooks, and SYNs steered
// to ztunnel's SO_REUSEPORT listeners by an sk_lookup program (tc's bpf_sk_assign refuses such
// listeners there), with the listeners learnt by a sockops hook on ztunnel's cgroup. End to end with
// the stand-in as its own process in its own cgroup.
import assert from 'node:assert/strict';
import { mkdirSync, openSync, rmSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { ZdsServer } from '../ztunnel-bridge/src/zds-server.js';
import { AppCgroup } from './helpers/app.js';
import { CLI } from './helpers/cli.js';
import { kernelTest, testBpffsRoot, TEST_PREFIX } from './helpers/kernel.js';
import { assertNothingLeft, removeDatapath } from './helpers/leftovers.js';
import { podWithRemote, sh, Topology, type PodNet } from './helpers/topology.js';
import { connectFails, RecordingServer, whoAnswers } from './helpers/traffic.js';
import { until } from './helpers/wait.js';

const APP_PORT = 8080;

after(assertNothingLeft);

describe('sk_lookup steering (the pre-6.6 fallback, forced)', kernelTest(), () => {
  const topo = new Topology();
  const uid = `pod-${topo.id}`;
  const root = testBpffsRoot(topo.id);
  const dir = `/tmp/${TEST_PREFIX}-steer-${topo.id}`;
  let net: PodNet;
  let dp: Datapath;
  let cgroup: AppCgroup;
  let server: ZdsServer;
  let standIn: ReturnType<AppCgroup['spawn']> | undefined;
  let out = '';
  const servers: RecordingServer[] = [];

  /** The stand-in's per-pod counters (it prints them on SIGUSR1). */
  async function standInStats(): Promise<{ outbound: number; inbound: number }> {
    const lines = out.split('\n').filter(Boolean).length;
    standIn!.kill('SIGUSR1');
    await until(() => out.split('\n').filter(Boolean).length > lines, 'stand-in stats');
    const last = JSON.parse(out.split('\n').filter(Boolean).at(-1)!) as {
      pods: { stats: { outbound: { connections: number }; inbound: { connections: number } } }[];
    };
    return {
      outbound: last.pods[0]?.stats.outbound.connections ?? 0,
      inbound: last.pods[0]?.stats.inbound.connections ?? 0,
    };
  }

  before(async () => {
    mkdirSync(dir, { recursive: true });
    net = await podWithRemote(topo, 40);
    dp = await Datapath.open({ bpffsRoot: root });
    await dp.configure({ ztunnelExemption: 'ztunnel-sockets', strictAllow: [], steering: 'sk-lookup' });
    const r = await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] }, { mode: 'tc' });
    assert.equal(r.mode, 'tc');
    cgroup = new AppCgroup(topo.id);
    dp.trustZtunnelCgroup(cgroup.path); // before ztunnel opens its listeners, as the agent does at hello
    server = new ZdsServer({ socketPath: `${dir}/ztunnel.sock` });
    server.start();
    standIn = cgroup.spawn(CLI, ['ztunnel', '--socket', `${dir}/ztunnel.sock`, '--dns-upstream', net.remoteV4], {
      stdio: ['ignore', 'pipe', 'ignore'],
    });
    standIn.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    await until(() => server.connectedCount === 1, 'stand-in connected', 10_000);
    assert.deepEqual(
      await server.enroll({
        uid,
        info: { name: 'p', namespace: 'demo', serviceAccount: 'default' },
        netnsFd: openSync(net.podPath, 'r'),
      }),
      { status: 'acked' },
    );
    servers.push(
      await RecordingServer.start('app', { netns: net.podPath, family: 6, address: '::', port: APP_PORT }),
      await RecordingServer.start('remote', {
        netns: Topology.netnsPath(net.remote),
        family: 6,
        address: '::',
        port: APP_PORT,
      }),
    );
  });

  after(async () => {
    for (const s of servers) await s.close();
    if (standIn && standIn.exitCode === null && standIn.signalCode === null) {
      standIn.kill('SIGKILL');
      await new Promise((r) => standIn!.once('exit', r));
    }
    server?.close();
    dp?.close();
    await removeDatapath(root);
    cgroup?.remove();
    await topo.cleanup();
    rmSync(dir, { recursive: true, force: true });
  });

  it('sends outbound (IPv4 and IPv6) and inbound connections through ztunnel’s reuseport listeners', async () => {
    const before = await standInStats();
    assert.equal(await whoAnswers({ netns: net.podPath, host: net.remoteV4, port: APP_PORT }), 'remote');
    assert.equal(await whoAnswers({ netns: net.podPath, host: net.remoteV6, port: APP_PORT }), 'remote');
    assert.equal(await whoAnswers({ netns: Topology.netnsPath(net.remote), host: net.podV4, port: APP_PORT }), 'app');
    const after = await standInStats();
    assert.deepEqual(
      [after.outbound - before.outbound, after.inbound - before.inbound],
      [2, 1],
      'a connection went around ztunnel',
    );
    // ztunnel's inbound leg reaches the app from the real client's address.
    assert.equal(servers[0]!.accepted.at(-1)!.remoteAddress, net.remoteV4);
    const pod = (await dp.list()).find((p) => p.uid === uid)!;
    assert.deepEqual([pod.counters.outboundRedirected, pod.counters.inboundRedirected], [2, 1]);
    assert.equal((await dp.verify(uid)).ok, true);
  });

  it('fails closed inbound once ztunnel is gone, and detach removes the sk_lookup link', async () => {
    standIn!.kill('SIGKILL');
    await new Promise((r) => standIn!.once('exit', r));
    await connectFails({ netns: Topology.netnsPath(net.remote), host: net.podV4, port: APP_PORT, timeoutMs: 700 });
    assert.equal(servers[0]!.accepted.length, 1, 'the app took a connection without ztunnel');
    await dp.detach(uid);
    const links = JSON.parse(await sh('bpftool', ['-j', 'link', 'show'])) as { type: string; netns_ino?: number }[];
    const podIno = Number((await sh('stat', ['-L', '-c', '%i', net.podPath])).trim());
    assert.equal(
      links.filter((l) => l.type === 'netns' && l.netns_ino === podIno).length,
      0,
      'the sk_lookup link outlived detach',
    );
    assert.equal(await whoAnswers({ netns: Topology.netnsPath(net.remote), host: net.podV4, port: APP_PORT }), 'app');
  });
});
