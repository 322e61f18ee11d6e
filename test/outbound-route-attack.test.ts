// Attacks on the loopback route for a pod's outbound TCP (outbound_route.bpf.c, the lo branch of
// listener_steering.bpf.c), by an app as a real process in the pod's cgroup: unprivileged (uid
// 65534, no capabilities), with NET_RAW only (a container's default), and as root (NET_ADMIN).
// Every assertion is what must hold: a connection of the pod reaches ztunnel's 15001 (or fails),
// never the remote, never a listener of the app's, never another pod's ztunnel.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { chmodSync, copyFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, it } from 'node:test';
import { Datapath, listenInNetns } from '../bpf/src/index.js';
import { openSync } from 'node:fs';
import { PodProxy } from '../ztunnel-bridge/src/standin/pod-proxy.js';
import { AppCgroup, testRunnerCgroup } from './helpers/app.js';
import { kernelTest, testBpffsRoot, TEST_PREFIX } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { podWithRemote, sh, Topology, type PodNet } from './helpers/topology.js';
import { RecordingServer, ztunnelListener } from './helpers/traffic.js';

const SCRIPT = fileURLToPath(new URL('../../test/fixtures/route-attack.py', import.meta.url));
const APP_PORT = 8080;

type Who = 'root' | 'netraw' | 'nobody';
const DROP: Record<Who, string> = {
  root: '',
  netraw:
    'setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all,+net_raw --ambient-caps=-all,+net_raw --bounding-set=-all,+net_raw',
  nobody: 'setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all',
};

after(assertNothingLeft);

describe('attacks on the outbound loopback route', kernelTest(), () => {
  const topo = new Topology();
  const uid = `pod-${topo.id}`;
  const otherUid = `other-${topo.id}`;
  const root = testBpffsRoot(topo.id);
  const script = join(tmpdir(), `${TEST_PREFIX}-route-attack-${topo.id}.py`);
  let net: PodNet;
  let other: PodNet;
  let second4: string;
  let dp: Datapath;
  let app: AppCgroup;
  let remote: RecordingServer;
  const remoteZ: RecordingServer[] = [];
  let appListener: RecordingServer;
  let ztunnel: RecordingServer;
  let otherZtunnel: RecordingServer;

  const attach = () =>
    dp.attach({
      uid,
      netnsPath: net.podPath,
      ips: [net.podV4, second4, net.podV6],
      podCgroup: app.path,
      dnsCapture: false,
    });
  /** Connections the app's own listener took that were not for the pod's own addresses. */
  const stolen = () =>
    appListener.accepted.filter((a) => ![net.podV4, net.podV6, second4].includes(a.localAddress)).length;

  /** Runs the attacking app in the pod's cgroup (or none: `cgroup` false) and netns. */
  const run = async (who: Who, args: (string | number)[], cgroup = true): Promise<string> => {
    const join_ = cgroup ? `echo $$ > ${join(app.path, 'cgroup.procs')} && ` : '';
    const cmd = `${join_}exec nsenter --net=${net.podPath} ${DROP[who]} /usr/bin/python3 ${script} "$@"`;
    return (await sh('sh', ['-c', cmd, 'app', ...args.map(String)])).trim();
  };
  const conn = (who: Who, host: string, port: number, ...opts: string[]) => run(who, ['conn', host, port, ...opts]);

  before(async () => {
    net = await podWithRemote(topo, 51);
    other = await podWithRemote(topo, 52, 'o');
    second4 = '198.18.51.3';
    await topo.addAddress(net.pod, 'eth0', `${second4}/24`);
    copyFileSync(SCRIPT, script);
    chmodSync(script, 0o644);
    dp = await Datapath.open({ bpffsRoot: root });
    dp.trustZtunnelCgroup(testRunnerCgroup());
    await dp.configure({ ztunnelExemption: 'ztunnel-sockets', strictAllow: [] });
    app = new AppCgroup(topo.id);
    await attach();
    await dp.attach({ uid: otherUid, netnsPath: other.podPath, ips: [other.podV4, other.podV6] });
    remote = await RecordingServer.start('remote', {
      netns: Topology.netnsPath(net.remote),
      family: 6,
      address: '::',
      port: APP_PORT,
    });
    for (const port of [15006, 15008]) {
      remoteZ.push(
        await RecordingServer.start(`remote-${port}`, {
          netns: Topology.netnsPath(net.remote),
          family: 6,
          address: '::',
          port,
        }),
      );
    }
    appListener = await RecordingServer.start('app', { netns: net.podPath, family: 6, address: '::', port: APP_PORT });
    ztunnel = await ztunnelListener(net.podPath, 15001);
    otherZtunnel = await ztunnelListener(other.podPath, 15001, 'other-ztunnel-15001');
  });

  after(async () => {
    for (const s of [otherZtunnel, ztunnel, appListener, remote, ...remoteZ]) await s?.destroy();
    await dp?.detach(otherUid);
    await dp?.detach(uid);
    dp?.close();
    app?.remove();
    rmSync(script, { force: true });
    await topo.cleanup();
    await sh('rm', ['-rf', root]);
  });

  /** Was a half-open connection (SYN-RECV) from `source` seen in `ns` while `attempt` ran? A SYN
   * queued on a listener of that netns. */
  const synRecvFrom = async (ns: string, source: string, attempt: Promise<string>): Promise<boolean> => {
    let done = false;
    const finished = attempt.finally(() => (done = true));
    let seen = false;
    while (!seen && !done) {
      seen = (await sh('ip', ['netns', 'exec', ns, 'ss', '-Htan', 'state', 'syn-recv'])).includes(
        source.includes(':') ? `[${source}]` : `${source}:`,
      );
      await new Promise((r) => setTimeout(r, 50));
    }
    await finished;
    return seen;
  };

  const nothingAround = (what: string) => {
    assert.equal(remote.accepted.length, 0, `${what}: a connection reached the remote host around ztunnel`);
    assert.equal(stolen(), 0, `${what}: the app's own listener took an outbound connection`);
    assert.equal(otherZtunnel.accepted.length, 0, `${what}: another pod's ztunnel accepted this pod's connection`);
  };

  for (const who of ['nobody', 'netraw', 'root'] as const) {
    it(`${who}: plain, TCP Fast Open (sendto and connect), IPv4-mapped, bound to eth0: all to ztunnel`, async () => {
      const cases: [string, string, string[]][] = [
        ['v4', net.remoteV4, []],
        ['v6', net.remoteV6, []],
        ['tfo sendto v4', net.remoteV4, ['tfo=sendto']],
        ['tfo sendto v6', net.remoteV6, ['tfo=sendto']],
        ['tfo connect v4', net.remoteV4, ['tfo=connect']],
        ['tfo connect v6', net.remoteV6, ['tfo=connect']],
        ['v4-mapped', net.remoteV4, ['mapped=1']],
        ['SO_BINDTODEVICE eth0 v4', net.remoteV4, ['dev=eth0']],
        ['SO_BINDTODEVICE eth0 v6', net.remoteV6, ['dev=eth0']],
        ['bound to the second IPv4', net.remoteV4, [`src=${second4}`]],
        ['to another enrolled pod v4', other.podV4, []],
        ['to another enrolled pod v6', other.podV6, []],
      ];
      const results: string[] = [];
      for (const [name, host, opts] of cases) results.push(`${name}: ${await conn(who, host, APP_PORT, ...opts)}`);
      for (const r of results) assert.match(r, /: ztunnel-15001 /, results.join('\n'));
      // Bound to lo: the SYN goes over lo to ztunnel, whose SYN-ACK (to the pod's address, on eth0)
      // cannot reach a socket bound to lo: it times out, as it did before the change.
      for (const host of [net.remoteV4, net.remoteV6]) {
        assert.match(await conn(who, host, APP_PORT, 'dev=lo', 'timeout=1.5'), /^ERR TimeoutError/);
      }
      nothingAround(who);
    });

    it(`${who}: a source address bound with IP_FREEBIND that is no pod's (v4, v6): never the app's own listener`, async () => {
      const results = [
        await conn(who, net.remoteV4, APP_PORT, 'src=198.18.51.77', 'freebind=1', 'timeout=2'),
        await conn(who, net.remoteV6, APP_PORT, 'src=2001:db8:51::77', 'freebind=1', 'timeout=2'),
      ];
      console.log(`${who} freebind non-pod source: ${results.join(' | ')}`);
      for (const r of results) assert.doesNotMatch(r, /^app /, `the app's listener answered: ${results.join(' | ')}`);
      nothingAround(`${who} freebind`);
    });

    it(`${who}: a source address bound with IP_FREEBIND that is another enrolled pod's: never that pod's ztunnel`, async () => {
      // The SYN is queued on this pod's ztunnel listener (a request socket in this netns), never
      // handed to pod B's in B's netns. (Counters cannot tell: they go by the SYN's source.)
      for (const [host, src] of [
        [net.remoteV4, other.podV4],
        [net.remoteV6, other.podV6],
      ] as const) {
        const attempt = conn(who, host, APP_PORT, `src=${src}`, 'freebind=1', 'timeout=2');
        const here = await synRecvFrom(net.pod, src, attempt);
        if (/Network is unreachable/.test(await attempt)) continue; // no SYN at all (IPv4 freebind without a route)
        assert.ok(here, `pod A's SYN (source ${src}) did not reach this pod's ztunnel listener: ${await attempt}`);
      }
      nothingAround(`${who} freebind other pod`);
    });

    it(`${who}: to a remote's port 15006 and 15008: ztunnel's outbound listener, as pod_egress sends them`, async () => {
      const inbound = await ztunnelListener(net.podPath, 15006);
      const hbone = await ztunnelListener(net.podPath, 15008);
      try {
        const results: string[] = [];
        for (const port of [15006, 15008]) {
          for (const host of [net.remoteV4, net.remoteV6])
            results.push(`${host}:${port} ${await conn(who, host, port, 'timeout=2')}`);
          // The interface path (a socket marked by the app, NET_ADMIN) for comparison.
          if (who === 'root')
            results.push(
              `${net.remoteV4}:${port} via pod_egress ${await conn(who, net.remoteV4, port, 'mark=0x100', 'timeout=2')}`,
            );
        }
        for (const r of results) assert.match(r, / ztunnel-15001 /, results.join('\n'));
      } finally {
        await hbone.destroy();
        await inbound.destroy();
      }
    });
  }

  it('netraw: IP_TRANSPARENT source of another enrolled pod: never that pod’s ztunnel', async () => {
    // Not routed over lo (the source is not this pod's): pod_egress loops the SYN; on IPv4 the
    // socket lookup then refuses it (a looped SYN from a pod address it did not get from tc): the
    // app times out. Never pod B's listener (no request socket there), the app's or the remote's.
    const attempt = conn('netraw', net.remoteV4, APP_PORT, `src=${other.podV4}`, 'transparent=1', 'timeout=2');
    assert.equal(await synRecvFrom(other.pod, other.podV4, attempt), false, "pod A's SYN was queued in pod B's netns");
    assert.doesNotMatch(await attempt, /^(app|remote) /);
    nothingAround('transparent other pod');
  });

  it('a process in the pod netns outside the pod’s cgroup: pod_egress still takes it to ztunnel', async () => {
    for (const host of [net.remoteV4, net.remoteV6]) {
      const r = await run('nobody', ['conn', host, APP_PORT], false);
      assert.match(r, /^ztunnel-15001 mark=0x0 /, r);
    }
    nothingAround('no cgroup');
  });

  it('root (NET_ADMIN): clearing the mark after connect leaves the data with ztunnel', async () => {
    const before = ztunnel.received.length;
    for (const host of [net.remoteV4, net.remoteV6]) {
      const r = await conn('root', host, APP_PORT, 'clearmark=1', 'payload=secret');
      assert.match(r, /^ztunnel-15001 mark=0x0 /, r);
    }
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(ztunnel.received.slice(before), ['secret', 'secret']);
    nothingAround('clearmark');
  });

  it('a socket made before the pod was enrolled and connected after: to ztunnel', async () => {
    await dp.detach(uid);
    const flag = join(tmpdir(), `${TEST_PREFIX}-flag-${topo.id}`);
    try {
      const child = spawn('sh', [
        '-c',
        `echo $$ > ${join(app.path, 'cgroup.procs')} && exec nsenter --net=${net.podPath} ${DROP.nobody} /usr/bin/python3 ${script} conn ${net.remoteV4} ${APP_PORT} wait=${flag}`,
      ]);
      let out = '';
      child.stdout.on('data', (d: Buffer) => (out += d.toString()));
      const done = new Promise<void>((r) => child.on('exit', () => r()));
      for (let i = 0; !out.includes('ready'); i++) {
        assert.ok(i < 100, 'the app never made its socket');
        await new Promise((r) => setTimeout(r, 20));
      }
      await attach();
      writeFileSync(flag, '');
      await done;
      assert.match(out.split('\n')[1] ?? '', /^ztunnel-15001 mark=0x111 /, out);
    } finally {
      rmSync(flag, { force: true });
      await attach();
    }
    nothingAround('early socket');
  });

  it(
    'a reconnect on the same 4-tuple right after a closed flow (a TIME_WAIT on the tuple) goes to ztunnel again, never the app’s listener',
    { timeout: 30000 },
    async () => {
      await ztunnel.destroy();
      const closer = await listenInNetns({
        netns: net.podPath,
        family: 6,
        address: '::',
        port: 15001,
        transparent: true,
        reuseport: true,
        mark: 0x539,
      });
      let accepted = 0;
      const open = new Set<import('node:net').Socket>();
      closer.on('connection', (s) => {
        accepted++;
        open.add(s);
        s.on('close', () => open.delete(s));
        s.on('error', () => undefined);
        s.end('ztunnel-closer\n'); // ztunnel closes first: its socket (remote -> pod) goes to TIME_WAIT
      });
      try {
        for (const host of [net.remoteV4, net.remoteV6]) {
          const first = await conn('nobody', host, APP_PORT, 'sport=41234', 'reuse=1');
          console.log(`time-wait first ${host}: ${first}`);
          assert.match(first, /^ztunnel-closer /, first);
          await new Promise((r) => setTimeout(r, 300));
          const tw = await sh('ip', ['netns', 'exec', net.pod, 'ss', '-tanH', 'state', 'time-wait']);
          console.log(`time-wait sockets: ${tw}`);
          const second = await conn('nobody', host, APP_PORT, 'sport=41234', 'reuse=1');
          console.log(`time-wait second ${host}: ${second}`);
          assert.match(second, /^ztunnel-closer /, `${second}\nTIME_WAIT sockets:\n${tw}`);
        }
        assert.equal(accepted, 4);
        nothingAround('time-wait');
      } finally {
        for (const o of open) o.destroy();
        await new Promise<void>((r) => closer.close(() => r()));
        ztunnel = await ztunnelListener(net.podPath, 15001);
      }
    },
  );

  it(
    'DNS capture on the same cgroup: TCP to a server’s port 53 still reaches ztunnel’s 15053',
    { timeout: 30000 },
    async () => {
      await dp.attach({
        uid,
        netnsPath: net.podPath,
        ips: [net.podV4, second4, net.podV6],
        podCgroup: app.path,
        dnsCapture: true,
      });
      const dns4 = await RecordingServer.start('dns-15053', {
        netns: net.podPath,
        family: 4,
        address: '127.0.0.1',
        port: 15053,
      });
      const dns6 = await RecordingServer.start('dns6-15053', {
        netns: net.podPath,
        family: 6,
        address: '::1',
        port: 15053,
      });
      try {
        console.log(`dns: ${(await dp.list()).find((p) => p.uid === uid)?.dnsCapture}`);
        const r4 = await conn('nobody', net.remoteV4, 53);
        const r6 = await conn('nobody', net.remoteV6, 53);
        assert.match(r4, /^dns-15053 /, r4);
        assert.match(r6, /^dns6-15053 /, r6);
        const still = await conn('nobody', net.remoteV4, APP_PORT);
        assert.match(still, /^ztunnel-15001 mark=0x111 /, still);
      } finally {
        await dns6.destroy();
        await dns4.destroy();
        await attach();
      }
    },
  );

  it(
    'the bundled ztunnel stand-in: a connection to a remote’s port 15006 leaves through ztunnel’s inbound relay, not its outbound',
    { timeout: 30000 },
    async () => {
      await ztunnel.destroy();
      const fd = openSync(net.podPath, 'r');
      const proxy = await PodProxy.open(uid, fd);
      const remote15006 = remoteZ[0]!;
      try {
        const before = remote15006.accepted.length;
        const r = await conn('nobody', net.remoteV4, 15006, 'payload=exfil');
        const seen = JSON.stringify({
          outbound: proxy.stats.outbound,
          inbound: proxy.stats.inbound,
          remote: remote15006.accepted.slice(before),
        });
        assert.equal(
          proxy.stats.inbound.connections,
          0,
          `the app's outbound connection was taken by ztunnel's inbound listener: ${r} ${seen}`,
        );
        assert.equal(remote15006.accepted.length - before, proxy.stats.outbound.connections, seen);
      } finally {
        proxy.close(); // closes fd too
        ztunnel = await ztunnelListener(net.podPath, 15001);
      }
    },
  );

  it(
    'nobody: an IPV6_FREEBIND source that is no pod’s: the app’s own listener never takes the connection, and no app data leaves',
    { timeout: 30000 },
    async () => {
      // The app binds the address it wants packets sent to (here the remote host's) and connects to
      // any address D:P. Such a socket is not routed over lo (its source is no pod's); pod_egress
      // hands the SYN to ztunnel, whose handshake reply from D:P goes to that source out of eth0, as
      // upstream's REDIRECT replies do: a SYN-ACK, never the app's data (the handshake cannot
      // complete: the real owner of the source does not answer it).
      const sport = 42424;
      const sniffer = spawn('nsenter', [
        `--net=${Topology.netnsPath(net.remote)}`,
        '/usr/bin/python3',
        script,
        'sniff6',
        '3',
        `${sport},${sport + 1}`,
      ]);
      let out = '';
      sniffer.stdout.on('data', (d: Buffer) => (out += d.toString()));
      const done = new Promise<void>((r) => sniffer.on('exit', () => r()));
      for (let i = 0; !out.includes('ready'); i++) {
        assert.ok(i < 100, 'the sniffer never started');
        await new Promise((r) => setTimeout(r, 20));
      }
      const withListener = await conn(
        'nobody',
        '2001:db8:99::9',
        APP_PORT,
        `src=${net.remoteV6}`,
        `sport=${sport}`,
        'freebind=1',
        'timeout=1',
      );
      const noListener = await conn(
        'nobody',
        '2001:db8:99::9',
        9,
        `src=${net.remoteV6}`,
        `sport=${sport + 1}`,
        'freebind=1',
        'timeout=1',
      );
      await done;
      const seen = out.split('\n')[1] ?? '';
      console.log(
        `freebind reflection: app saw "${withListener}" / "${noListener}"; the remote host received: ${seen}`,
      );
      for (const segment of seen === 'none' ? [] : seen.split(','))
        assert.match(segment, /\/SA$/, `a segment other than ztunnel's SYN-ACK left the pod: ${seen}`);
      assert.doesNotMatch(
        withListener,
        /^app /,
        'the app’s own listener took its marked outbound connection (the socket lookup passed it: its source is no pod’s)',
      );
    },
  );
});
