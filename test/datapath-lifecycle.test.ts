// Attach/detach lifecycle with real namespaces: scale, surviving the attaching process, garbage
// collection of deleted namespaces, bad input, and rollback of a failure half-way.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, readdirSync, rmSync } from 'node:fs';
import { after, describe, it } from 'node:test';
import { Datapath, DatapathError } from '../bpf/src/index.js';
import { useKernelSteering } from './helpers/app.js';
import { KERNEL_STEERING, kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft, linksOfPrograms, podProgramIds } from './helpers/leftovers.js';
import { podWithRemote, Topology } from './helpers/topology.js';
import { whoAnswers, ztunnelListener } from './helpers/traffic.js';
import { runCli } from './helpers/cli.js';

after(assertNothingLeft);

/** A topology and a datapath on a fresh bpffs root, both removed after the test. */
async function fixture(t: {
  after: (fn: () => Promise<void>) => void;
}): Promise<{ topo: Topology; dp: Datapath; root: string }> {
  const topo = new Topology();
  const root = testBpffsRoot(topo.id);
  const dp = await Datapath.open({ bpffsRoot: root });
  await useKernelSteering(dp);
  t.after(async () => {
    for (const p of await dp.list()) await dp.detach(p.uid);
    dp.close();
    await topo.cleanup();
    rmSync(root, { recursive: true, force: true });
  });
  return { topo, dp, root };
}

describe('datapath lifecycle', kernelTest(), () => {
  for (const mode of ['tcx', 'tc'] as const) {
    const name = `attaches and detaches 50 pods (${mode}) leaving no pins, links, rules or filters`;
    it(name, kernelTest({ name, tcx: mode === 'tcx' }), async (t) => {
      const { topo, dp, root } = await fixture(t);
      const node = await topo.netns('node');
      const pods: { ns: string; ip: string; uid: string }[] = [];
      for (let i = 0; i < 50; i++) {
        const ns = await topo.netns(`p${i}`);
        await topo.veth(ns, 'eth0', node, `veth${i}`);
        const ip = `198.18.100.${i + 2}`;
        await topo.addAddress(ns, 'eth0', `${ip}/24`);
        pods.push({ ns, ip, uid: `pod-${i}-${topo.id}` });
      }
      for (const p of pods) await dp.attach({ uid: p.uid, netnsPath: Topology.netnsPath(p.ns), ips: [p.ip] }, { mode });
      assert.equal((await dp.list()).length, 50);
      for (const p of pods.slice(0, 5)) assert.equal((await dp.verify(p.uid)).ok, true);
      const ours = mode === 'tcx' ? await podProgramIds(root, pods[0]!.uid) : new Set<number>();
      if (mode === 'tcx') assert.equal((await linksOfPrograms(ours)).length, 100);
      for (const p of pods) assert.equal((await dp.detach(p.uid)).found, true);
      assert.deepEqual(await dp.list(), []);
      assert.deepEqual(readdirSync(`${root}/pods`), []);
      assert.deepEqual(await linksOfPrograms(ours), []);
      for (const p of pods) {
        assert.doesNotMatch(await topo.ip(p.ns, 'rule'), /0x111/);
        assert.equal(await topo.exec(p.ns, 'tc', 'filter', 'show', 'dev', 'eth0', 'ingress'), '');
      }
    });
  }

  it('keeps redirecting after the attaching process is killed; another process lists and detaches it', async (t) => {
    const { topo, root } = await fixture(t);
    const net = await podWithRemote(topo, 3);
    const uid = `pod-${topo.id}`;
    const zt = await ztunnelListener(net.podPath, 15001);
    t.after(() => zt.close());
    // A process that attaches, says so, and then waits to be killed.
    const child = spawn(
      process.execPath,
      [
        '--input-type=module',
        '-e',
        `
      const { Datapath } = await import(${JSON.stringify(new URL('../bpf/src/index.js', import.meta.url).href)});
      const dp = await Datapath.open({ bpffsRoot: ${JSON.stringify(root)} });
      if (${JSON.stringify(KERNEL_STEERING)} !== 'sk-assign') await dp.configure({ ztunnelExemption: 'ztunnel-sockets', strictAllow: [], steering: ${JSON.stringify(KERNEL_STEERING)} });
      await dp.attach({ uid: ${JSON.stringify(uid)}, netnsPath: ${JSON.stringify(net.podPath)}, ips: [${JSON.stringify(net.podV4)}] });
      console.log('attached');
      setInterval(() => {}, 1000);
    `,
      ],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    await new Promise<void>((resolve, reject) => {
      child.stdout.on('data', (d: Buffer) => d.toString().includes('attached') && resolve());
      child.on('exit', (code) => reject(new Error(`attacher exited early (${code})`)));
    });
    child.removeAllListeners('exit');
    const exited = new Promise((resolve) => child.on('exit', resolve));
    child.kill('SIGKILL');
    await exited;

    assert.equal(await whoAnswers({ netns: net.podPath, host: net.remoteV4, port: 80 }), 'ztunnel-15001');
    const listed = await runCli(['datapath', 'list', '--json', '--bpffs', root]);
    assert.equal(listed.code, 0);
    assert.deepEqual(
      (JSON.parse(listed.stdout) as { uid: string }[]).map((p) => p.uid),
      [uid],
    );
    assert.equal((await runCli(['datapath', 'verify', '--uid', uid, '--bpffs', root])).code, 0);
    assert.equal((await runCli(['datapath', 'detach', '--uid', uid, '--bpffs', root])).code, 0);
    await assert.rejects(whoAnswers({ netns: net.podPath, host: net.remoteV4, port: 80, timeoutMs: 1000 }));
  });

  const switching = 'switches attach mode in place without a moment in which traffic escapes';
  it(switching, { timeout: 60_000, ...kernelTest({ name: switching, tcx: true }) }, async (t) => {
    const { topo, dp } = await fixture(t);
    const net = await podWithRemote(topo, 8);
    const uid = `pod-${topo.id}`;
    const zt = await ztunnelListener(net.podPath, 15001);
    t.after(() => zt.close());
    await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4] }, { mode: 'tc' });
    // Nothing listens on the remote: a connection that is not redirected is refused.
    let running = true;
    let redirected = 0;
    const escaped: string[] = [];
    const load = (async () => {
      while (running) {
        try {
          assert.equal(await whoAnswers({ netns: net.podPath, host: net.remoteV4, port: 9 }), 'ztunnel-15001');
          redirected++;
        } catch (err) {
          escaped.push((err as Error).message);
        }
      }
    })();
    for (const mode of ['tcx', 'tc', 'tcx'] as const) {
      const before = redirected;
      assert.equal((await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4] }, { mode })).mode, mode);
      for (let i = 0; i < 1000 && redirected < before + 20; i++) await new Promise((r) => setTimeout(r, 5));
      assert.ok(
        redirected >= before + 20,
        `only ${redirected - before} connections redirected after switching to ${mode}`,
      );
    }
    running = false;
    await load;
    assert.deepEqual(escaped, []);
    assert.deepEqual(
      (await dp.list()).map((p) => p.mode),
      ['tcx'],
    );
    assert.equal((await dp.verify(uid)).ok, true);
    assert.equal(await topo.exec(net.pod, 'tc', 'filter', 'show', 'dev', 'eth0', 'ingress'), '');
    assert.doesNotMatch(await topo.exec(net.pod, 'tc', 'qdisc', 'show', 'dev', 'eth0'), /clsact/);
  });

  for (const mode of ['tcx', 'tc'] as const) {
    const name = `collects the pins and record of a pod whose netns was deleted (${mode})`;
    it(name, kernelTest({ name, tcx: mode === 'tcx' }), async (t) => {
      const { topo, dp, root } = await fixture(t);
      const net = await podWithRemote(topo, 4);
      const uid = `pod-${topo.id}`;
      await dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4] }, { mode });
      assert.deepEqual(await dp.collectGarbage(), [], 'a live pod was collected');
      await topo.deleteNetns(net.pod);
      // The kernel tears a netns down asynchronously; the link reports it once its device is gone.
      let collected: string[] = [];
      for (let i = 0; i < 50 && collected.length === 0; i++) {
        collected = await dp.collectGarbage();
        if (collected.length === 0) await new Promise((r) => setTimeout(r, 100));
      }
      assert.deepEqual(collected, [uid]);
      assert.deepEqual(await dp.list(), []);
      assert.deepEqual(readdirSync(`${root}/pods`), []);
    });
  }

  it('rejects bad input with a clear error and leaves nothing behind', async (t) => {
    const { topo, dp } = await fixture(t);
    const net = await podWithRemote(topo, 5);
    const cases: [Parameters<Datapath['attach']>[0], string, RegExp][] = [
      [{ uid: 'a', netnsPath: '/etc/hostname', ips: [net.podV4] }, 'ENETNS', /not a network namespace/],
      [{ uid: 'a', netnsPath: '/var/run/netns/none-such', ips: [net.podV4] }, 'ENETNS', /does not exist/],
      [{ uid: 'a', netnsPath: net.podPath, ips: ['198.18.5.99'] }, 'EPODIP', /198\.18\.5\.99 is not configured/],
      [{ uid: 'a', netnsPath: net.podPath, ips: [net.podV4, '127.0.0.1'] }, 'EPODIP', /loopback/],
      [{ uid: '../escape', netnsPath: net.podPath, ips: [net.podV4] }, 'EINVALID', /pod uid/],
      [{ uid: 'a', netnsPath: net.podPath, ips: [] }, 'EINVALID', /1 to 8 IPs/],
      [{ uid: 'a', netnsPath: net.podPath, ips: ['not-an-ip'] }, 'EINVALID', /not an IP address/],
      // The node's own namespace is never a pod's (this test runs in it, as the agent does).
      [
        { uid: 'a', netnsPath: '/proc/self/ns/net', ips: [net.podV4] },
        'ENETNS',
        /own network namespace \(the node's\)/,
      ],
      [
        { uid: 'a', netnsPath: net.podPath, ips: [net.podV4], rerouteInterfaces: ['bad/name'] },
        'EINVALID',
        /not an interface name/,
      ],
      [
        { uid: 'a', netnsPath: net.podPath, ips: [net.podV4], rerouteInterfaces: ['eth0'] },
        'EINVALID',
        /is the pod's own interface/,
      ],
      [
        { uid: 'a', netnsPath: net.podPath, ips: [net.podV4], podCgroup: '/sys/fs/cgroup/none-such' },
        'EINVALID',
        /cannot open the pod's cgroup/,
      ],
      // One past the longest: a uid of 64 characters, an interface name of 16 bytes.
      [
        { uid: 'u'.repeat(64), netnsPath: net.podPath, ips: [net.podV4] },
        'EINVALID',
        /pod uid \(at most 63 characters\)/,
      ],
      [
        { uid: 'a', netnsPath: net.podPath, ips: [net.podV4], rerouteInterfaces: ['abcdefghijklmnop'] },
        'EINVALID',
        /interface name \(at most 15 characters\)/,
      ],
    ];
    for (const [pod, code, message] of cases) {
      await assert.rejects(dp.attach(pod), (err: DatapathError) => {
        assert.equal(err.code, code, err.message);
        assert.match(err.message, message);
        return true;
      });
    }
    assert.deepEqual(await dp.list(), []);
    assert.doesNotMatch(await topo.ip(net.pod, 'rule'), /0x111/);
    // The longest of each fits: a 63-character uid, a 15-character interface name.
    const longest = 'u'.repeat(63);
    await dp.attach({ uid: longest, netnsPath: net.podPath, ips: [net.podV4], rerouteInterfaces: ['abcdefghijklmno'] });
    assert.deepEqual(
      (await dp.list()).map((p) => [p.uid, p.rerouteInterfaces]),
      [[longest, ['abcdefghijklmno']]],
    );
    assert.equal((await dp.detach(longest)).found, true);
    await assert.rejects(Datapath.open({ bpffsRoot: '/tmp/not-bpffs' }), (err: DatapathError) => err.code === 'EBPFFS');
  });

  const rollback = 'rolls back a failure half-way: no links, rules, routes or sysctl changes remain';
  it(rollback, kernelTest({ name: rollback, tcx: true }), async (t) => {
    const { topo, dp, root } = await fixture(t);
    const net = await podWithRemote(topo, 6);
    const uid = `pod-${topo.id}`;
    // A pod attached first names the programs whose links are counted.
    const first = await podWithRemote(topo, 98, 'first');
    await dp.attach({ uid: `first-${topo.id}`, netnsPath: first.podPath, ips: [first.podV4] }, { mode: 'tcx' });
    const ours = await podProgramIds(root, `first-${topo.id}`);
    const linksBefore = await linksOfPrograms(ours);
    assert.equal(linksBefore.length, 2);
    // Something already occupies the egress pin path: the links attach, then pinning fails.
    mkdirSync(`${root}/pods/${uid}/egress`, { recursive: true });
    await assert.rejects(
      dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] }, { mode: 'tcx' }),
      /cannot attach tcx links/,
    );
    assert.deepEqual(await linksOfPrograms(ours), linksBefore);
    assert.doesNotMatch(await topo.ip(net.pod, 'rule'), /0x111/);
    assert.doesNotMatch(await topo.ip(net.pod, '-6', 'rule'), /0x111/);
    assert.equal(await topo.ip(net.pod, 'route', 'show', 'table', '100').catch(() => ''), '');
    assert.equal((await topo.exec(net.pod, 'sysctl', '-n', 'net.ipv4.conf.eth0.accept_local')).trim(), '0');
    assert.deepEqual(
      (await dp.list()).map((p) => p.uid),
      [`first-${topo.id}`],
    );
    await dp.detach(`first-${topo.id}`);
    rmSync(`${root}/pods/${uid}`, { recursive: true });
  });
});
