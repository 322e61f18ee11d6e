// DNS capture with real resolvers' socket calls: an app in the pod's cgroup asks the server it was
// configured with (UDP connected and unconnected, TCP; IPv4 and IPv6) and gets its answer through
// the ztunnel stand-in's 15053 listeners, seeing the answer come from the address it asked.
import assert from 'node:assert/strict';
import { openSync, rmSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { PodProxy } from '../ztunnel-bridge/src/standin/pod-proxy.js';
import { AppCgroup, testRunnerCgroup } from './helpers/app.js';
import { TestDnsServer } from './helpers/dns-server.js';
import { KERNEL_STEERING, kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { podWithRemote, sh, Topology, type PodNet } from './helpers/topology.js';

const ANSWER = '198.18.99.7';

after(assertNothingLeft);

describe('DNS capture', kernelTest(), () => {
  const topo = new Topology();
  const uid = `pod-${topo.id}`;
  const root = testBpffsRoot(topo.id);
  let net: PodNet;
  let dp: Datapath;
  let app: AppCgroup;
  let proxy: PodProxy;
  let server: TestDnsServer;

  const attach = (dns: boolean) =>
    dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6], ...(dns ? { podCgroup: app.path } : {}) });
  const viaZtunnel = (): number => proxy.recent.filter((c) => c.direction === 'dns').length;

  before(async () => {
    net = await podWithRemote(topo, 8);
    dp = await Datapath.open({ bpffsRoot: root });
    // Steering as the agent picks it for this kernel: before 6.6 tc cannot hand a connection to
    // the stand-in's SO_REUSEPORT listeners (the outbound case below takes that path).
    await dp.configure({ ztunnelExemption: 'ztunnel-sockets', strictAllow: [], steering: KERNEL_STEERING });
    dp.trustZtunnelCgroup(testRunnerCgroup()); // the stand-in runs in the test runner
    app = new AppCgroup(topo.id);
    await attach(true);
    proxy = await PodProxy.open(uid, openSync(net.podPath, 'r'), { host: net.remoteV4, port: 53 }); // owns the fd
    server = await TestDnsServer.start(Topology.netnsPath(net.remote), ANSWER);
  });

  after(async () => {
    proxy?.close();
    await server?.close();
    await dp?.detach(uid);
    dp?.close();
    app?.remove();
    await topo.cleanup();
    rmSync(root, { recursive: true, force: true });
  });

  it('answers the pod’s resolvers through ztunnel’s 15053, from the address they asked', async () => {
    const cases = [
      ['dns-udp', net.remoteV4, 'connected'],
      ['dns-udp', net.remoteV4, 'unconnected'],
      ['dns-tcp', net.remoteV4],
      ['dns-udp', net.remoteV6, 'connected'],
      ['dns-udp', net.remoteV6, 'unconnected'],
      ['dns-tcp', net.remoteV6],
    ] as const;
    for (const [kind, host, how] of cases) {
      const seen = viaZtunnel();
      const queries = server.queries;
      const out = await app.client(net.podPath, kind, host, ...(how ? [how] : []));
      assert.equal(out, `${ANSWER} from ${host}:53`, `${kind} ${host} ${how ?? ''}`);
      assert.equal(viaZtunnel(), seen + 1, `${kind} ${host} ${how ?? ''} did not go through ztunnel`);
      assert.equal(server.queries, queries + 1);
    }
  });

  it('leaves processes outside the pod’s cgroup alone', async () => {
    const seen = viaZtunnel();
    const out = await sh('nsenter', [
      `--net=${net.podPath}`,
      'python3',
      app.clientScript,
      'dns-udp',
      net.remoteV4,
      'connected',
    ]);
    assert.equal(out.trim(), `${ANSWER} from ${net.remoteV4}:53`);
    assert.equal(viaZtunnel(), seen, 'a process in another cgroup was captured');
  });

  it('verify notices a DNS hook detached behind its back; attach repairs it', async () => {
    const pin = `${root}/pods/${uid}/dns_sendmsg4`;
    await sh('bpftool', ['link', 'detach', 'pinned', pin]);
    const v = await dp.verify(uid);
    assert.deepEqual(v.problems, ['the DNS capture hook dns_sendmsg4 is missing or detached (cgroup gone?)']);
    await attach(true);
    assert.equal((await dp.verify(uid)).ok, true);
    const seen = viaZtunnel();
    assert.equal(
      await app.client(net.podPath, 'dns-udp', net.remoteV4, 'unconnected'),
      `${ANSWER} from ${net.remoteV4}:53`,
    );
    assert.equal(viaZtunnel(), seen + 1);
  });

  it('turned off with the pod’s cgroup kept: queries go straight, the socket-option guard stays', async () => {
    const refused = 'ERR PermissionError: [Errno 1] Operation not permitted';
    assert.equal(await app.client(net.podPath, 'qdisc-bypass'), refused);
    await dp.attach({
      uid,
      netnsPath: net.podPath,
      ips: [net.podV4, net.podV6],
      podCgroup: app.path,
      dnsCapture: false,
    });
    const pod = (await dp.list()).find((p) => p.uid === uid);
    assert.deepEqual([pod?.dnsCapture, pod?.podCgroupId !== 0], [false, true]);
    assert.equal((await dp.verify(uid)).ok, true);
    const seen = viaZtunnel();
    assert.equal(
      await app.client(net.podPath, 'dns-udp', net.remoteV4, 'connected'),
      `${ANSWER} from ${net.remoteV4}:53`,
    );
    assert.equal(viaZtunnel(), seen, 'DNS was captured with dnsCapture false');
    assert.equal(await app.client(net.podPath, 'qdisc-bypass'), refused);
    // AF_XDP sends past tc as well: its options (the UMEM first) are refused too.
    assert.equal(await app.client(net.podPath, 'xdp-umem'), refused);
    // The control: outside the pod's cgroup the options are allowed.
    for (const option of ['qdisc-bypass', 'xdp-umem'])
      assert.equal(
        (await sh('nsenter', [`--net=${net.podPath}`, 'python3', app.clientScript, option])).trim(),
        'set',
        option,
      );
    await attach(true);
    assert.equal((await dp.list()).find((p) => p.uid === uid)?.dnsCapture, true);
  });

  it('turned off in place: queries go straight to the server', async () => {
    await attach(false);
    const seen = viaZtunnel();
    const queries = server.queries;
    assert.equal(
      await app.client(net.podPath, 'dns-udp', net.remoteV4, 'connected'),
      `${ANSWER} from ${net.remoteV4}:53`,
    );
    assert.equal(await app.client(net.podPath, 'dns-tcp', net.remoteV4), `${ANSWER} from ${net.remoteV4}:53`);
    assert.equal(viaZtunnel(), seen);
    assert.equal(server.queries, queries + 2);
    await attach(true);
  });
});
