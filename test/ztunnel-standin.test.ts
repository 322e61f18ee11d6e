// The bundled ztunnel stand-in: listeners opened inside real pod namespaces, ZDS strictness like
// upstream ztunnel, reconnect and drain; and end to end with the datapath: real traffic through
// the stand-in with the original destination and the original source right.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, openSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { after, describe, it } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { listenInNetns, connectFromNetns } from '../bpf/src/node-netns.js';
import { ZtunnelStandIn } from '../ztunnel-bridge/src/standin/ztunnel.js';
import { ZdsServer, type ZtunnelResult } from '../ztunnel-bridge/src/zds-server.js';
import { CLI } from './helpers/cli.js';
import { kernelTest, TEST_PREFIX, testBpffsRoot, uniqueSuffix } from './helpers/kernel.js';
import { testRunnerCgroup } from './helpers/app.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { podWithRemote, Topology, type PodNet } from './helpers/topology.js';
import { RecordingServer, udpInNetns, whoAnswers } from './helpers/traffic.js';
import { FakeAgent } from './helpers/zds-peer.js';
import { sleep, until } from './helpers/wait.js';

const info = (name: string) => ({ name, namespace: 'demo', serviceAccount: 'default' });

after(async () => {
  await assertNothingLeft();
  assert.deepEqual(
    readdirSync('/tmp').filter((n) => n.startsWith(`${TEST_PREFIX}-zt-`)),
    [],
  );
});

/** ztunnel's ports listening in a netns, as `ss` reports them ("tcp 15001", "udp 15053", ...). */
async function listening(topo: Topology, ns: string): Promise<string[]> {
  const out = await topo.exec(ns, 'ss', '-Hltun');
  return out
    .trim()
    .split('\n')
    .filter(Boolean)
    .map((l) => {
      const cols = l.trim().split(/\s+/);
      return `${cols[0]} ${cols[4]!.split(':').at(-1)}`;
    })
    .filter((l) => /\s150(01|06|08|53)$/.test(l))
    .sort();
}

describe('ztunnel stand-in', kernelTest(), () => {
  function setup(t: { after: (fn: () => Promise<void> | void) => void }) {
    const topo = new Topology();
    const dir = `/tmp/${TEST_PREFIX}-zt-${uniqueSuffix()}`;
    const socketPath = `${dir}/ztunnel.sock`;
    const statuses: [string, ZtunnelResult][] = [];
    const server = new ZdsServer({ socketPath, onStatus: (uid, r) => statuses.push([uid, r]) });
    const standIns: ZtunnelStandIn[] = [];
    const makeStandIn = (options: Partial<ConstructorParameters<typeof ZtunnelStandIn>[0]> = {}) => {
      const standIn = new ZtunnelStandIn({ socketPath, ...options });
      standIns.push(standIn);
      return standIn;
    };
    t.after(async () => {
      standIns.forEach((s) => s.stop());
      server.close();
      await topo.cleanup();
      rmSync(dir, { recursive: true, force: true });
    });
    return { topo, dir, socketPath, server, makeStandIn, statuses };
  }

  it('opens ztunnel’s listeners inside the pod netns before acking, and closes them on Del', async (t) => {
    const { topo, server, makeStandIn } = setup(t);
    const standIn = makeStandIn();
    const net = await podWithRemote(topo, 20);
    server.start();
    standIn.start();
    await until(() => server.connectedCount === 1, 'stand-in connected');
    const result = await server.enroll({ uid: 'pod-a', info: info('a'), netnsFd: openSync(net.podPath, 'r') });
    assert.deepEqual(result, { status: 'acked' });
    // DNS on 127.0.0.1 and [::1], like ztunnel when the pod's lo has IPv6.
    assert.deepEqual(await listening(topo, net.pod), [
      'tcp 15001',
      'tcp 15006',
      'tcp 15008',
      'tcp 15053',
      'tcp 15053',
      'udp 15053',
      'udp 15053',
    ]);
    assert.deepEqual(
      standIn.stats().map((p) => [p.uid, p.name, p.namespace]),
      [['pod-a', 'a', 'demo']],
    );
    await server.remove('pod-a');
    assert.deepEqual(await listening(topo, net.pod), []);
    assert.deepEqual(standIn.stats(), []);
  });

  it('leaks no file descriptors or listeners over repeated add/del of a real pod', async (t) => {
    const { topo, server, makeStandIn } = setup(t);
    const standIn = makeStandIn();
    const net = await podWithRemote(topo, 26);
    server.start();
    standIn.start();
    await until(() => server.connectedCount === 1, 'stand-in connected');
    const openFds = () => readdirSync('/proc/self/fd').length;
    const cycle = async (i: number) => {
      assert.deepEqual(
        await server.enroll({ uid: `pod-${i}`, info: info(`p${i}`), netnsFd: openSync(net.podPath, 'r') }),
        { status: 'acked' },
      );
      await server.remove(`pod-${i}`);
    };
    await cycle(0);
    await sleep(50);
    const before = openFds();
    for (let i = 1; i <= 200; i++) await cycle(i);
    await until(() => openFds() === before, `fd count back to ${before} (now ${openFds()})`);
    assert.deepEqual(await listening(topo, net.pod), []);
  });

  it('nacks an Add whose listeners cannot open, with the reason', async (t) => {
    const { topo, server, makeStandIn } = setup(t);
    const standIn = makeStandIn();
    const net = await podWithRemote(topo, 21);
    const blocker = await listenInNetns({ netns: net.podPath, family: 4, address: '127.0.0.1', port: 15053 });
    t.after(() => void blocker.close());
    server.start();
    standIn.start();
    await until(() => server.connectedCount === 1, 'stand-in connected');
    const result = await server.enroll({ uid: 'pod-b', info: info('b'), netnsFd: openSync(net.podPath, 'r') });
    assert.equal(result.status, 'nacked');
    assert.match((result as { error: string }).error, /cannot start the proxy for demo\/b: .*address already in use/i);
    assert.deepEqual(await listening(topo, net.pod), ['tcp 15053'], 'a failed Add left listeners behind');
  });

  it('falls back to 0.0.0.0 where [::] cannot listen, and skips [::1] when the pod’s lo has no IPv6', async (t) => {
    const { topo, server, makeStandIn } = setup(t);
    const standIn = makeStandIn();
    const net = await podWithRemote(topo, 27);
    await topo.exec(net.pod, 'sysctl', '-qw', 'net.ipv6.conf.lo.disable_ipv6=1');
    // A v6-only socket holds [::]:15001: the dual-stack bind fails there, 0.0.0.0:15001 is free.
    const blocker = await listenInNetns({ netns: net.podPath, family: 6, address: '::', port: 15001, v6only: true });
    t.after(() => void blocker.close());
    server.start();
    standIn.start();
    await until(() => server.connectedCount === 1, 'stand-in connected');
    assert.deepEqual(await server.enroll({ uid: 'pod-c', info: info('c'), netnsFd: openSync(net.podPath, 'r') }), {
      status: 'acked',
    });
    const sockets = (await topo.exec(net.pod, 'ss', '-Hltun'))
      .trim()
      .split('\n')
      .map((l) => l.trim().split(/\s+/))
      .map((c) => `${c[0]} ${c[4]}`)
      .filter((l) => /:150(01|06|08|53)$/.test(l))
      .sort();
    assert.deepEqual(sockets, [
      'tcp *:15006',
      'tcp *:15008',
      'tcp 0.0.0.0:15001',
      'tcp 127.0.0.1:15053',
      'tcp [::]:15001',
      'udp 127.0.0.1:15053',
    ]);
    await server.remove('pod-c');
    assert.deepEqual(await listening(topo, net.pod), ['tcp 15001'], 'only the blocker is left');
  });

  it('reconnects when the agent restarts, and drains pods missing from the new snapshot', async (t) => {
    const { topo, socketPath, server, makeStandIn, statuses } = setup(t);
    const standIn = makeStandIn();
    const a = await podWithRemote(topo, 22, 'a');
    const b = await podWithRemote(topo, 23, 'b');
    server.start();
    standIn.start();
    await until(() => server.connectedCount === 1, 'stand-in connected');
    for (const [uid, net] of [
      ['pod-a', a],
      ['pod-b', b],
    ] as const) {
      assert.deepEqual(await server.enroll({ uid, info: info(uid), netnsFd: openSync(net.podPath, 'r') }), {
        status: 'acked',
      });
    }
    server.close();
    // The restarted agent only knows pod-a (pod-b went away while it was down).
    const restarted = new ZdsServer({ socketPath, onStatus: (uid, r) => statuses.push([uid, r]) });
    t.after(() => restarted.close());
    await restarted.enroll({ uid: 'pod-a', info: info('pod-a'), netnsFd: openSync(a.podPath, 'r') });
    restarted.start();
    await until(() => standIn.stats().length === 1, 'pod-b drained');
    assert.deepEqual(
      standIn.stats().map((p) => p.uid),
      ['pod-a'],
    );
    assert.deepEqual(restarted.status('pod-a'), { status: 'acked' });
    assert.deepEqual(await listening(topo, b.pod), []);
    assert.equal((await listening(topo, a.pod)).length, 7, 'the same netns again is a no-op: listeners kept');
  });

  it('is as strict as ztunnel: protocol misuse is nacked and stops it', async (t) => {
    const { topo, dir } = setup(t);
    const net = await podWithRemote(topo, 24);
    const add = (uid: string) => ({ add: { uid, workloadInfo: info(uid) } });
    const cases: [
      string,
      (agent: typeof FakeAgent, inbox: Awaited<ReturnType<FakeAgent['accept']>>) => Promise<void> | void,
      RegExp,
    ][] = [
      ['Add without fd', (A, ib) => A.send(ib, add('x')), /Add without a netns fd/],
      [
        'Add with two fds',
        (A, ib) => A.send(ib, add('x'), [openSync(net.podPath, 'r'), openSync(net.podPath, 'r')]),
        /Add with 2 fds/,
      ],
      [
        'Add without workload info',
        (A, ib) => A.send(ib, { add: { uid: 'x' } }, [openSync(net.podPath, 'r')]),
        /without workload info/,
      ],
      [
        'an fd with Del',
        (A, ib) => A.send(ib, { del: { uid: 'x' } }, [openSync(net.podPath, 'r')]),
        /file descriptor sent with del/,
      ],
      [
        'Keep after SnapshotSent',
        async (A, ib) => {
          A.send(ib, { snapshotSent: {} });
          assert.equal(await A.reply(ib), '');
          A.send(ib, { keep: { uid: 'x' } });
        },
        /Keep after SnapshotSent/,
      ],
      [
        'a second SnapshotSent',
        async (A, ib) => {
          A.send(ib, { snapshotSent: {} });
          assert.equal(await A.reply(ib), '');
          A.send(ib, { snapshotSent: {} });
        },
        /second SnapshotSent/,
      ],
    ];
    for (const [i, [what, misuse, reason]] of cases.entries()) {
      const agent = new FakeAgent(`${dir}-${i}.sock`);
      const fatal: string[] = [];
      const standIn = new ZtunnelStandIn({ socketPath: `${dir}-${i}.sock`, onFatal: (r) => fatal.push(r) });
      try {
        standIn.start();
        const inbox = await agent.accept();
        await misuse(FakeAgent, inbox);
        const nack = await FakeAgent.reply(inbox);
        assert.match(nack ?? '', reason, what);
        await inbox.closed;
        assert.equal(fatal.length, 1, what);
        assert.equal(standIn.connected, false, `${what}: still connected`);
      } finally {
        standIn.stop();
        agent.close();
        rmSync(`${dir}-${i}.sock`, { force: true });
      }
    }
  });

  it('end to end with the datapath: traffic both ways through the stand-in with original destination and source', async (t) => {
    const { topo, server, makeStandIn } = setup(t);
    const net: PodNet = await podWithRemote(topo, 25);
    const root = testBpffsRoot(topo.id);
    const dp = await Datapath.open({ bpffsRoot: root });
    dp.trustZtunnelCgroup(testRunnerCgroup()); // the stand-in runs in the test runner
    t.after(async () => {
      await dp.detach('pod-e2e');
      dp.close();
      rmSync(root, { recursive: true, force: true });
    });
    const remoteNs = Topology.netnsPath(net.remote);
    const app = await RecordingServer.start('app', { netns: net.podPath, family: 6, address: '::', port: 8080 });
    const remote = await RecordingServer.start('remote', { netns: remoteNs, family: 6, address: '::', port: 8080 });
    const dns = await udpInNetns(remoteNs, net.remoteV4, 53);
    dns.on('message', (msg, rinfo) => dns.send(Buffer.concat([msg, Buffer.from('answer')]), rinfo.port, rinfo.address));
    const dnsTcp = await RecordingServer.start('dns-over-tcp', {
      netns: remoteNs,
      family: 4,
      address: net.remoteV4,
      port: 53,
    });
    t.after(async () => {
      await app.close();
      await remote.close();
      await dnsTcp.close();
      dns.close();
    });

    await dp.attach({ uid: 'pod-e2e', netnsPath: net.podPath, ips: [net.podV4, net.podV6] });
    const standInDns = makeStandIn({ dnsUpstream: { host: net.remoteV4, port: 53 } });
    server.start();
    standInDns.start();
    await until(() => server.connectedCount === 1, 'stand-in connected');
    assert.deepEqual(await server.enroll({ uid: 'pod-e2e', info: info('e2e'), netnsFd: openSync(net.podPath, 'r') }), {
      status: 'acked',
    });

    // Outbound: the app in the pod reaches the remote host through the stand-in.
    for (const host of [net.remoteV4, net.remoteV6]) {
      assert.equal(await whoAnswers({ netns: net.podPath, host, port: 8080 }, 'out'), 'remote');
    }
    assert.deepEqual(
      remote.accepted.map((a) => [a.localAddress, a.remoteAddress]),
      [
        [net.remoteV4, net.podV4],
        [net.remoteV6, net.podV6],
      ],
    );
    // Inbound: the remote host reaches the app, which sees the real client address.
    for (const host of [net.podV4, net.podV6]) {
      assert.equal(await whoAnswers({ netns: remoteNs, host, port: 8080 }, 'in'), 'app');
    }
    assert.deepEqual(
      app.accepted.map((a) => [a.localAddress, a.remoteAddress]),
      [
        [net.podV4, net.remoteV4],
        [net.podV6, net.remoteV6],
      ],
    );
    // HBONE (plain CONNECT): tunnelled to the app.
    const tunnel = await connectFromNetns({ netns: remoteNs, host: net.podV4, port: 15008 });
    const tunnelled = await new Promise<string>((resolve) => {
      let buf = '';
      tunnel.on('data', (d: Buffer) => {
        buf += d.toString();
        if (buf.includes('app\n')) resolve(buf);
      });
      tunnel.write(`CONNECT ${net.podV4}:8080 HTTP/1.1\r\nHost: ${net.podV4}:8080\r\n\r\nhello`);
    });
    tunnel.destroy();
    assert.match(tunnelled, /^HTTP\/1\.1 200 OK\r\n\r\napp\n$/);
    // DNS over UDP to ztunnel's 15053 is forwarded to the upstream and answered with the query id.
    const resolver = await udpInNetns(net.podPath, '127.0.0.1', 0);
    const query = Buffer.from('abcd0100000100000000000003777777076578616d706c6503636f6d0000010001', 'hex');
    const answer = await new Promise<Buffer>((resolve) => {
      resolver.once('message', resolve);
      resolver.send(query, 15053, '127.0.0.1');
    });
    resolver.close();
    assert.equal(answer.toString('hex'), query.toString('hex') + Buffer.from('answer').toString('hex'));

    // DNS over TCP to 15053 reaches the upstream's TCP listener.
    assert.equal(await whoAnswers({ netns: net.podPath, host: '127.0.0.1', port: 15053 }), 'dns-over-tcp');
    assert.equal(dnsTcp.accepted[0]?.remoteAddress, net.podV4);

    const [pod] = standInDns.stats();
    assert.equal(pod?.stats.outbound.connections, 2);
    assert.equal(pod?.stats.inbound.connections, 2);
    assert.equal(pod?.stats.hbone.connections, 1);
    assert.equal(pod?.stats.dns.connections, 2);
    assert.ok(
      pod.stats.outbound.bytesUp >= 6 && pod.stats.outbound.bytesDown >= 14,
      JSON.stringify(pod.stats.outbound),
    );
    assert.deepEqual(
      pod.recent.filter((c) => c.direction === 'outbound').map((c) => c.destination),
      [`${net.remoteV4}:8080`, `[${net.remoteV6}]:8080`],
    );
  });

  // The kernel grows a process's fd table by doubling, each growth waiting for an RCU grace period
  // (~10 ms) inside whichever socket() crosses 256, 512...: found as the enrollment benchmark's
  // p99 (the 26th and 55th pods' Adds). The stand-in sizes its table before any pod arrives.
  it('starts with an fd table sized for hundreds of pods, and within a low RLIMIT_NOFILE', async (t) => {
    const { dir, socketPath } = setup(t);
    mkdirSync(dir, { recursive: true });
    const fdSize = (pid: number) => Number(/FDSize:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]);
    for (const [prefix, expected] of [
      [[], 8192],
      [['prlimit', '--nofile=1000:1000'], 1024],
    ] as const) {
      // No agent at socketPath: the stand-in keeps retrying, alive.
      const [cmd, ...args] = [...prefix, CLI, 'ztunnel', '--socket', socketPath, '--log-level', 'error'];
      const child = spawn(cmd, args, { stdio: 'ignore' });
      t.after(() => void child.kill('SIGKILL'));
      await until(() => child.exitCode !== null || fdSize(child.pid!) >= expected, `FDSize ${expected}`, 10_000);
      assert.equal(child.exitCode, null, 'the stand-in is running');
      assert.equal(fdSize(child.pid!), expected);
      child.kill('SIGKILL');
    }
  });
});
