// The in-pod datapath with real packets: every behaviour of upstream's in-pod iptables rules,
// asserted on the socket that took the connection and its local address. Runs for tcx and for the
// clsact/cls_bpf fallback.
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { testRunnerCgroup, useKernelSteering } from './helpers/app.js';
import { kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { podWithRemote, Topology, type PodNet } from './helpers/topology.js';
import { connectFails, RecordingServer, whoAnswers, ztunnelListener } from './helpers/traffic.js';

const PROBE_V4 = '169.254.7.127';
const PROBE_V6 = 'fd16:9254:7127:1337:ffff:ffff:ffff:ffff';
const APP_PORT = 8080;

after(assertNothingLeft);

for (const [mode, subnet] of [
  ['tcx', 1],
  ['tc', 2],
] as const) {
  describe(`datapath with ${mode}`, kernelTest({ name: `datapath with ${mode}`, tcx: mode === 'tcx' }), () => {
    const topo = new Topology();
    const uid = `pod-${topo.id}`;
    const root = testBpffsRoot(topo.id);
    let net: PodNet;
    let dp: Datapath;
    let outbound: RecordingServer, inbound: RecordingServer, hbone: RecordingServer;
    let app: RecordingServer, remote: RecordingServer;

    const attach = (ips = [net.podV4, net.podV6]) => dp.attach({ uid, netnsPath: net.podPath, ips }, { mode });

    before(async () => {
      net = await podWithRemote(topo, subnet);
      // Probe addresses live on the remote side, reachable on-link from the pod.
      await topo.addAddress(net.remote, 'eth0', `${PROBE_V4}/32`);
      await topo.addAddress(net.remote, 'eth0', `${PROBE_V6}/128`);
      await topo.ip(net.pod, 'route', 'add', PROBE_V4, 'dev', 'eth0');
      await topo.ip(net.pod, '-6', 'route', 'add', PROBE_V6, 'dev', 'eth0');
      dp = await Datapath.open({ bpffsRoot: root });
      await useKernelSteering(dp);
      dp.trustZtunnelCgroup(testRunnerCgroup()); // the test's own marked sockets play ztunnel's
      const r = await attach();
      assert.equal(r.mode, mode);
      outbound = await ztunnelListener(net.podPath, 15001);
      inbound = await ztunnelListener(net.podPath, 15006);
      hbone = await ztunnelListener(net.podPath, 15008);
      app = await RecordingServer.start('app', { netns: net.podPath, family: 6, address: '::', port: APP_PORT });
      remote = await RecordingServer.start('remote', {
        netns: Topology.netnsPath(net.remote),
        family: 6,
        address: '::',
        port: APP_PORT,
      });
    });

    after(async () => {
      for (const s of [outbound, inbound, hbone, app, remote]) await s?.close();
      await dp?.detach(uid);
      dp?.close();
      await topo.cleanup();
      rmSync(root, { recursive: true, force: true });
    });

    it('sends outbound TCP (IPv4 and IPv6) to 15001 with the original destination as local address', async () => {
      for (const [host, src] of [
        [net.remoteV4, net.podV4],
        [net.remoteV6, net.podV6],
      ] as const) {
        assert.equal(await whoAnswers({ netns: net.podPath, host, port: APP_PORT }, 'hello'), 'ztunnel-15001');
        const got = outbound.accepted.at(-1)!;
        assert.deepEqual([got.localAddress, got.localPort, got.remoteAddress], [host, APP_PORT, src]);
      }
      assert.equal(remote.accepted.length, 0, 'the remote host saw a connection that should have gone to ztunnel');
    });

    it('sends inbound TCP to 15006 with local address = pod IP:port', async () => {
      for (const [host, src] of [
        [net.podV4, net.remoteV4],
        [net.podV6, net.remoteV6],
      ] as const) {
        assert.equal(
          await whoAnswers({ netns: Topology.netnsPath(net.remote), host, port: APP_PORT }),
          'ztunnel-15006',
        );
        const got = inbound.accepted.at(-1)!;
        assert.deepEqual([got.localAddress, got.localPort, got.remoteAddress], [host, APP_PORT, src]);
      }
      assert.equal(app.accepted.length, 0, 'the app took an inbound connection directly');
    });

    it('leaves HBONE (15008) to its own listener', async () => {
      const before = inbound.accepted.length;
      for (const host of [net.podV4, net.podV6]) {
        assert.equal(await whoAnswers({ netns: Topology.netnsPath(net.remote), host, port: 15008 }), 'ztunnel-15008');
        assert.equal(hbone.accepted.at(-1)!.localAddress, host);
      }
      assert.equal(inbound.accepted.length, before);
    });

    it("never redirects ztunnel's own (0x539-marked) traffic", async () => {
      const before = outbound.accepted.length;
      for (const host of [net.remoteV4, net.remoteV6]) {
        assert.equal(await whoAnswers({ netns: net.podPath, host, port: APP_PORT, mark: 0x539 }), 'remote');
      }
      assert.deepEqual(
        remote.accepted.map((a) => a.remoteAddress),
        [net.podV4, net.podV6],
      );
      assert.equal(outbound.accepted.length, before);
    });

    it('leaves loopback and the pod’s own IPs alone', async () => {
      const before = outbound.accepted.length;
      for (const host of ['127.0.0.1', '::1', net.podV4, net.podV6]) {
        assert.equal(await whoAnswers({ netns: net.podPath, host, port: APP_PORT }), 'app', host);
      }
      assert.equal(outbound.accepted.length, before);
    });

    it('leaves kubelet probe traffic alone in both directions', async () => {
      const inBefore = inbound.accepted.length;
      for (const [host, probe] of [
        [net.podV4, PROBE_V4],
        [net.podV6, PROBE_V6],
      ] as const) {
        const answer = await whoAnswers({
          netns: Topology.netnsPath(net.remote),
          host,
          port: APP_PORT,
          localAddress: probe,
        });
        assert.equal(answer, 'app');
        assert.equal(app.accepted.at(-1)!.remoteAddress, probe);
      }
      assert.equal(inbound.accepted.length, inBefore);
      const outBefore = outbound.accepted.length;
      for (const probe of [PROBE_V4, PROBE_V6]) {
        assert.equal(await whoAnswers({ netns: net.podPath, host: probe, port: APP_PORT }), 'remote');
      }
      assert.equal(outbound.accepted.length, outBefore);
    });

    it("returns the app's replies to ztunnel's spoofed-source connections", async () => {
      for (const [host, client] of [
        [net.podV4, net.remoteV4],
        [net.podV6, net.remoteV6],
      ] as const) {
        const answer = await whoAnswers(
          {
            netns: net.podPath,
            host,
            port: APP_PORT,
            localAddress: client,
            transparent: true,
            freebind: true,
            mark: 0x539,
          },
          'from-ztunnel',
        );
        assert.equal(answer, 'app');
        assert.equal(app.accepted.at(-1)!.remoteAddress, client);
      }
      assert.equal(
        remote.accepted.filter((a) => a.localAddress === net.remoteV4).length,
        1,
        'only the marked test reached the remote',
      );
    });

    it('verifies the attachment and reports what was removed behind its back; re-attach repairs it', async () => {
      assert.deepEqual(await dp.verify(uid), { found: true, ok: true, problems: [] });
      await topo.ip(net.pod, 'rule', 'del', 'fwmark', '0x111/0xfff', 'table', '100', 'pref', '32764');
      const broken = await dp.verify(uid);
      assert.equal(broken.ok, false);
      assert.match(broken.problems.join('\n'), /IPv4 fwmark rule/);
      const again = await attach();
      assert.equal(again.updated, true);
      assert.deepEqual(await dp.verify(uid), { found: true, ok: true, problems: [] });
    });

    it('is idempotent and updates the pod IPs in place', async () => {
      assert.equal((await attach()).updated, true);
      assert.equal((await attach([net.podV4])).updated, true);
      assert.deepEqual(
        (await dp.list()).map((p) => [p.uid, p.ips, p.state]),
        [[uid, [net.podV4], 'attached']],
      );
      assert.equal((await attach()).updated, true);
      assert.deepEqual((await dp.list())[0]!.ips, [net.podV4, net.podV6]);
      assert.equal(await whoAnswers({ netns: net.podPath, host: net.remoteV4, port: APP_PORT }), 'ztunnel-15001');
    });

    it('fails closed inbound when ztunnel is not listening on 15006: the client is refused at once', async () => {
      await inbound.close();
      const appBefore = app.accepted.length;
      for (const host of [net.podV4, net.podV6]) {
        const err = await connectFails({
          netns: Topology.netnsPath(net.remote),
          host,
          port: APP_PORT,
          timeoutMs: 1000,
        });
        assert.match(err.message, /ECONNREFUSED/, host);
      }
      assert.equal(app.accepted.length, appBefore, 'inbound reached the app without ztunnel');
      inbound = await ztunnelListener(net.podPath, 15006);
    });

    it('refuses outbound at once when ztunnel is not listening on 15001, never handing it to the app', async () => {
      await outbound.close();
      const appBefore = app.accepted.length;
      const remoteBefore = remote.accepted.length;
      try {
        // The app listens on the remote's port: a looped SYN must not reach it either.
        for (const host of [net.remoteV4, net.remoteV6]) {
          const started = Date.now();
          const err = await connectFails({ netns: net.podPath, host, port: APP_PORT, timeoutMs: 1000 });
          assert.match(err.message, /ECONNREFUSED/, host);
          assert.ok(Date.now() - started < 1000, `${host}: refused after ${Date.now() - started} ms`);
        }
        assert.equal(app.accepted.length, appBefore, 'a looped SYN reached the app');
        assert.equal(remote.accepted.length, remoteBefore, 'a refused connection reached the remote');
        assert.ok((await dp.list())[0]!.counters.outboundNoZtunnel >= 2);
      } finally {
        outbound = await ztunnelListener(net.podPath, 15001);
      }
    });

    it('detach restores direct connectivity and leaves the netns as it was', async () => {
      assert.deepEqual(await dp.detach(uid), { found: true });
      assert.equal(await whoAnswers({ netns: net.podPath, host: net.remoteV4, port: APP_PORT }), 'remote');
      assert.equal(await whoAnswers({ netns: net.podPath, host: net.remoteV6, port: APP_PORT }), 'remote');
      assert.equal(await whoAnswers({ netns: Topology.netnsPath(net.remote), host: net.podV4, port: APP_PORT }), 'app');
      // Without the return path, ztunnel's spoofed connection never completes.
      await connectFails({
        netns: net.podPath,
        host: net.podV4,
        port: APP_PORT,
        localAddress: net.remoteV4,
        transparent: true,
        freebind: true,
        mark: 0x539,
        timeoutMs: 700,
      });
      assert.doesNotMatch(await topo.ip(net.pod, 'rule'), /0x111/);
      assert.doesNotMatch(await topo.ip(net.pod, '-6', 'rule'), /0x111/);
      for (const family of ['-4', '-6']) {
        assert.equal(await topo.ip(net.pod, family, 'route', 'show', 'table', '100').catch(() => ''), '');
      }
      assert.equal((await topo.exec(net.pod, 'sysctl', '-n', 'net.ipv4.conf.eth0.accept_local')).trim(), '0');
      assert.doesNotMatch(await topo.exec(net.pod, 'tc', 'qdisc', 'show', 'dev', 'eth0'), /clsact/);
      assert.deepEqual(await dp.list(), []);
      assert.deepEqual(await dp.verify(uid), { found: false, ok: false, problems: [] });
      assert.deepEqual(await dp.detach(uid), { found: false });
    });
  });
}
