// Bypass attempts from an app inside an ambient pod, unprivileged and privileged, against the
// datapath and the ztunnel stand-in: what must go through ztunnel does, whatever the app tries.
// (The forged-mark attempt with NET_ADMIN is in capture-policy.test.ts.)
import assert from 'node:assert/strict';
import { openSync, rmSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { PodProxy } from '../ztunnel-bridge/src/standin/pod-proxy.js';
import { AppCgroup, testRunnerCgroup } from './helpers/app.js';
import { kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { podWithRemote, Topology, type PodNet } from './helpers/topology.js';
import { RecordingServer } from './helpers/traffic.js';

const APP_PORT = 8080;

after(assertNothingLeft);

describe('bypass attempts from an ambient pod', kernelTest(), () => {
  const topo = new Topology();
  const uid = `pod-${topo.id}`;
  const root = testBpffsRoot(topo.id);
  let net: PodNet;
  let dp: Datapath;
  let app: AppCgroup;
  let proxy: PodProxy;
  let remote: RecordingServer;

  const remoteNs = (): string => Topology.netnsPath(net.remote);
  const attach = () => dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6] });

  /** SYNs for APP_PORT that reached the remote host while `send` ran. */
  async function synsSeenDuring(send: () => Promise<unknown>): Promise<number> {
    const sniffer = app.spawn(
      'nsenter',
      [`--net=${remoteNs()}`, 'python3', app.clientScript, 'sniff-syn', String(APP_PORT)],
      { stdio: ['pipe', 'pipe', 'inherit'] },
    );
    let out = '';
    sniffer.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    const exited = new Promise((r) => sniffer.once('exit', r));
    while (!out.includes('ready')) await new Promise((r) => setTimeout(r, 20));
    await send();
    // The SYN is on the wire when the sender returns; the veth pair delivers it within this.
    await new Promise((r) => setTimeout(r, 500));
    sniffer.stdin!.end();
    await exited;
    return Number(out.trim().split('\n').at(-1));
  }

  before(async () => {
    net = await podWithRemote(topo, 45);
    dp = await Datapath.open({ bpffsRoot: root });
    dp.trustZtunnelCgroup(testRunnerCgroup()); // the stand-in runs in the test runner
    await dp.configure({ ztunnelExemption: 'ztunnel-sockets', strictAllow: [] });
    await attach();
    app = new AppCgroup(topo.id);
    proxy = await PodProxy.open(uid, openSync(net.podPath, 'r')); // owns the fd
    remote = await RecordingServer.start('remote', { netns: remoteNs(), family: 6, address: '::', port: APP_PORT });
  });

  after(async () => {
    proxy?.close();
    await remote?.close();
    await dp?.detach(uid);
    dp?.close();
    app?.remove();
    await topo.cleanup();
    rmSync(root, { recursive: true, force: true });
  });

  it('an unprivileged app cannot set ztunnel’s mark, and its TCP (IPv4 and IPv6) goes through ztunnel', async () => {
    assert.match(
      await app.unprivilegedClient(net.podPath, 'tcp', net.remoteV4, APP_PORT, '0x539'),
      /^ERR PermissionError/,
    );
    const before = proxy.stats.outbound.connections;
    assert.equal(await app.unprivilegedClient(net.podPath, 'tcp', net.remoteV4, APP_PORT), 'remote');
    assert.equal(await app.unprivilegedClient(net.podPath, 'tcp', net.remoteV6, APP_PORT), 'remote');
    assert.equal(proxy.stats.outbound.connections - before, 2, 'a connection reached the remote host around ztunnel');
  });

  it('an unprivileged app cannot take over ztunnel’s ports, even with SO_REUSEPORT', async () => {
    for (const port of [15001, 15006, 15008]) {
      assert.match(
        await app.unprivilegedClient(net.podPath, 'bind', port),
        /^ERR (OSError|PermissionError).*(in use|denied)/i,
        `port ${port}`,
      );
    }
  });

  it('a hand-made SYN on a raw socket (NET_RAW) never leaves the pod', async () => {
    assert.equal(
      await synsSeenDuring(() => app.client(net.podPath, 'raw-syn', net.remoteV4, APP_PORT)),
      0,
      'a raw SYN reached the remote host',
    );
    // Control: without redirection the same SYN does reach it (the sniffer works).
    await dp.detach(uid);
    try {
      assert.ok(
        (await synsSeenDuring(() => app.client(net.podPath, 'raw-syn', net.remoteV4, APP_PORT))) >= 1,
        'the sniffer saw nothing even without redirection',
      );
    } finally {
      await attach();
    }
  });

  it('connecting to ztunnel’s own ports directly reaches ztunnel, which refuses to loop to itself', async () => {
    const before = proxy.stats.outbound.connections;
    for (const [host, port] of [
      [net.podV4, 15001],
      [net.podV4, 15006],
      ['127.0.0.1', 15001],
      [net.podV6, 15001],
    ] as const) {
      const out = await app.client(net.podPath, 'tcp', host, port);
      assert.doesNotMatch(out, /^(remote|app)$/, `${host}:${port} answered as ${out}`);
    }
    await new Promise((r) => setTimeout(r, 300));
    assert.ok(
      proxy.stats.outbound.connections - before <= 4,
      `a connection storm: ${proxy.stats.outbound.connections - before} outbound connections`,
    );
  });
});
