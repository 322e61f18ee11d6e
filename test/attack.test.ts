// Attacks on the capture guarantee, as an outside reviewer would make them: packets crafted with
// scapy (test/fixtures/craft.py) from a peer namespace (inbound) and from a privileged app inside
// the pod (outbound, raw and packet sockets), in every attach mode (tcx, tc) and steering mode
// (sk-assign, sk-lookup). Each case is asserted on who took the connection: ztunnel's listener
// (15006 inbound, 15001 outbound) or nobody is fine; the app's own listener (inbound) or the
// remote host's (outbound) never. Every case runs right after a control, a plain SYN in the same
// set-up that does reach ztunnel, so "nothing arrived" proves something; and a first suite shows,
// without the datapath, that the kernel delivers the crafted packets to the app (they are real
// attacks, not malformed packets the stack would drop anyway).
//
// Inbound, the crafter completes the handshake itself from an address no namespace owns (the pod
// has a static neighbour entry for it), so no kernel resets its SYN-ACK, and reads the first line
// the listener writes: its name. Outbound, the crafter watches every interface of the pod for the
// answer to its SYN: a SYN-ACK on lo is ztunnel's in-pod listener (looped), on eth0 the remote's.
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { after, before, describe, it } from 'node:test';
import { Datapath, type DatapathCounters, type Steering } from '../bpf/src/index.js';
import { AppCgroup } from './helpers/app.js';
import { CRAFT, crafter, PYTHON, type Crafter } from './helpers/crafter.js';
import { kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft, removeDatapath } from './helpers/leftovers.js';
import { podWithRemote, Topology, type PodNet } from './helpers/topology.js';
import { RecordingServer } from './helpers/traffic.js';

const APP_PORT = 8080;
const FORGED_MARK = 0x539; // ztunnel's (ambient_shared.h ZTUNNEL_MARK)
const REDIRECT_MARK = 0x111; // the mark pod_egress puts on looped packets

after(assertNothingLeft);

/** Where a crafted packet must end. `kernel`: without the datapath the stack delivers it to the app
 * (inbound) or the remote host answers it (outbound); false for shapes the stack drops itself. */
interface Case {
  name: string;
  v6: boolean;
  expect: 'ztunnel' | 'dropped' | 'not-delivered';
  kernel: boolean;
}

const c = (name: string, v6: boolean, expect: Case['expect'], kernel = true): Case => ({ name, v6, expect, kernel });

const INBOUND: Case[] = [
  c('syn-data', false, 'ztunnel'),
  c('ipopt-nop', false, 'ztunnel'),
  c('ipopt-rr', false, 'ztunnel'),
  c('ipopt-ts', false, 'ztunnel'),
  c('frag4-tiny', false, 'dropped'),
  c('frag4-full-header', false, 'dropped'),
  c('frag4-overlap', false, 'dropped', false),
  c('frag4-out-of-order', false, 'dropped'),
  c('syn-data', true, 'ztunnel'),
  c('hbh', true, 'ztunnel'),
  c('dstopt', true, 'ztunnel'),
  c('rh0-segleft0', true, 'ztunnel'),
  c('atomic-frag', true, 'ztunnel'),
  c('chain', true, 'ztunnel'),
  c('rh0-segleft1', true, 'dropped', false),
  c('long-chain', true, 'dropped'),
  c('frag6-full-header', true, 'dropped'),
  c('frag6-tiny', true, 'dropped', false),
  c('frag6-out-of-order', true, 'dropped'),
  c('frag6-overlap', true, 'dropped', false),
  c('frag6-ext', true, 'dropped'),
  c('hao', true, 'not-delivered', false),
  c('vlan0', false, 'ztunnel'),
  // Two tags: tc sees 802.1Q after the first is stripped; the second would be stripped after tc.
  c('qinq0', false, 'dropped'),
  c('qinq0', true, 'dropped'),
];

const OUTBOUND: Case[] = [
  c('syn-data', false, 'ztunnel'),
  c('ipopt-nop', false, 'ztunnel'),
  c('ipopt-ts', false, 'ztunnel'),
  c('frag4-tiny', false, 'dropped'),
  c('frag4-full-header', false, 'dropped'),
  c('frag4-out-of-order', false, 'dropped'),
  c('packet-control', false, 'ztunnel'),
  c('syn-data', true, 'ztunnel'),
  c('hbh', true, 'ztunnel'),
  c('dstopt', true, 'ztunnel'),
  c('atomic-frag', true, 'ztunnel'),
  c('chain', true, 'ztunnel'),
  c('long-chain', true, 'dropped'),
  c('frag6-full-header', true, 'dropped'),
  c('frag6-ext', true, 'dropped'),
  c('packet-control', true, 'ztunnel'),
  c('packet-ethproto', false, 'dropped'),
  c('packet-ethproto', true, 'dropped'),
  c('packet-vlan0', false, 'dropped'),
  c('packet-vlan0', true, 'dropped'),
];

const label = (k: Case): string => `${k.name} (IPv${k.v6 ? 6 : 4})`;

/** ztunnel's in-pod listeners (craft.py listen), a process of ztunnel's cgroup. */
class ZtunnelListeners {
  readonly accepted: { port: number; local: [string, number]; remote: [string, number] }[] = [];
  private readonly exited: Promise<unknown>;

  private constructor(private readonly proc: ChildProcess) {
    this.exited = new Promise((r) => proc.once('exit', r));
  }

  static async start(cgroup: AppCgroup, netns: string): Promise<ZtunnelListeners> {
    const proc = cgroup.spawn('nsenter', [`--net=${netns}`, PYTHON, CRAFT, 'listen', '15001', '15006'], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const z = new ZtunnelListeners(proc);
    await new Promise<void>((resolve, reject) => {
      proc.once('exit', () => reject(new Error('ztunnel listeners exited')));
      createInterface({ input: proc.stdout! }).on('line', (line) => {
        if (line === 'ready') resolve();
        else z.accepted.push(JSON.parse(line) as ZtunnelListeners['accepted'][number]);
      });
    });
    return z;
  }

  async stop(): Promise<void> {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGTERM');
    await this.exited;
  }
}

async function macOf(topo: Topology, ns: string): Promise<string> {
  const [link] = JSON.parse(await topo.ip(ns, '-j', 'link', 'show', 'eth0')) as { address: string }[];
  return link!.address;
}

/** The pod, its remote host, and an attacker address on the remote's link that no namespace owns. */
async function topology(topo: Topology, subnet: number) {
  const net = await podWithRemote(topo, subnet);
  const attackerV4 = `198.18.${subnet}.66`;
  const attackerV6 = `2001:db8:${subnet}::66`;
  const podMac = await macOf(topo, net.pod);
  const remoteMac = await macOf(topo, net.remote);
  // The pod answers the attacker's address at the remote's MAC, where the crafter reads it; the
  // remote's kernel does not own the address, so it never resets what the pod sends there.
  await topo.ip(net.pod, 'neigh', 'replace', attackerV4, 'lladdr', remoteMac, 'dev', 'eth0', 'nud', 'permanent');
  await topo.ip(net.pod, '-6', 'neigh', 'replace', attackerV6, 'lladdr', remoteMac, 'dev', 'eth0', 'nud', 'permanent');
  return { net, attackerV4, attackerV6, podMac, remoteMac };
}

describe('the crafted packets are real attacks: without the datapath the kernel delivers them', kernelTest(), () => {
  const topo = new Topology();
  let t: Awaited<ReturnType<typeof topology>>;
  let app: RecordingServer, remote: RecordingServer;
  let appCgroup: AppCgroup;
  let peer: Crafter, inPod: Crafter;

  before(async () => {
    t = await topology(topo, 69);
    appCgroup = new AppCgroup(topo.id);
    app = await RecordingServer.start('app', { netns: t.net.podPath, family: 6, address: '::', port: APP_PORT });
    remote = await RecordingServer.start('remote', {
      netns: Topology.netnsPath(t.net.remote),
      family: 6,
      address: '::',
      port: APP_PORT,
    });
    peer = await crafter(Topology.netnsPath(t.net.remote));
    inPod = await crafter(t.net.podPath, appCgroup);
  });

  after(async () => {
    await peer?.stop();
    await inPod?.stop();
    await app?.close();
    await remote?.close();
    appCgroup?.remove();
    await topo.cleanup();
  });

  it('inbound: each shape the stack accepts reaches the app when nothing guards the pod', async () => {
    for (const k of [c('control', false, 'ztunnel'), c('control', true, 'ztunnel'), ...INBOUND]) {
      const r = await peer.send({
        op: 'inbound',
        case: k.name,
        src: k.v6 ? t.attackerV6 : t.attackerV4,
        dst: k.v6 ? t.net.podV6 : t.net.podV4,
        dport: APP_PORT,
        dmac: t.podMac,
      });
      if (k.kernel) assert.equal(r.banner, 'app', `${label(k)}: ${JSON.stringify(r)}`);
      else assert.notEqual(r.banner, 'app', `${label(k)} is marked as dropped by the stack itself`);
    }
  });

  it('outbound: each shape reaches the remote host when nothing guards the pod', async () => {
    for (const k of [
      c('control', false, 'ztunnel'),
      c('control', true, 'ztunnel'),
      c('packet-qdisc-bypass', false, 'ztunnel'),
      ...OUTBOUND,
    ]) {
      const r = await inPod.send({
        op: 'outbound',
        case: k.name,
        src: k.v6 ? t.net.podV6 : t.net.podV4,
        dst: k.v6 ? t.net.remoteV6 : t.net.remoteV4,
        dport: APP_PORT,
        dmac: t.remoteMac,
        smac: t.podMac,
      });
      assert.deepEqual([r.result, r.iface], ['synack', 'eth0'], `${label(k)}: ${JSON.stringify(r)}`);
    }
  });
});

const MODES: { mode: 'tcx' | 'tc'; steering: Steering; subnet: number }[] = [
  { mode: 'tcx', steering: 'sk-assign', subnet: 70 },
  { mode: 'tc', steering: 'sk-assign', subnet: 71 },
  { mode: 'tcx', steering: 'sk-lookup', subnet: 72 },
  { mode: 'tc', steering: 'sk-lookup', subnet: 73 },
];

for (const { mode, steering, subnet } of MODES) {
  describe(
    `attacks with ${mode} hooks and ${steering} steering`,
    kernelTest({ name: `attacks with ${mode} hooks and ${steering} steering`, tcx: mode === 'tcx', steering }),
    () => {
      const topo = new Topology();
      const uid = `pod-${topo.id}`;
      const root = testBpffsRoot(topo.id);
      let t: Awaited<ReturnType<typeof topology>>;
      let net: PodNet;
      let dp: Datapath;
      let appCgroup: AppCgroup, ztCgroup: AppCgroup;
      let ztunnel: ZtunnelListeners;
      let app: RecordingServer, remote: RecordingServer;
      let peer: Crafter, inPod: Crafter, ztunnelCrafter: Crafter;

      const counters = async (): Promise<DatapathCounters> => {
        const p = (await dp.list()).find((x) => x.uid === uid);
        assert.ok(p, 'pod not attached');
        return p.counters;
      };
      /** Frames whose link layer hides their addresses are counted node-wide (no pod to charge). */
      const nodeUnclassified = (): number => dp.nodeCounters().unclassifiedDropped;
      const inbound = (name: string, v6: boolean, extra: Record<string, unknown> = {}) =>
        peer.send({
          op: 'inbound',
          case: name,
          src: v6 ? t.attackerV6 : t.attackerV4,
          dst: v6 ? net.podV6 : net.podV4,
          dport: APP_PORT,
          dmac: t.podMac,
          ...extra,
        });
      const outbound = (from: Crafter, name: string, v6: boolean, mark?: number) =>
        from.send({
          op: 'outbound',
          case: name,
          src: v6 ? net.podV6 : net.podV4,
          dst: v6 ? net.remoteV6 : net.remoteV4,
          dport: APP_PORT,
          mark,
          dmac: t.remoteMac,
          smac: t.podMac,
        });
      /** Runs craft.py (no scapy) as the app: its own cgroup, the pod's netns. */
      const asApp = async (...args: string[]): Promise<string> => {
        const proc = appCgroup.spawn('nsenter', [`--net=${net.podPath}`, PYTHON, CRAFT, ...args], {
          stdio: ['ignore', 'pipe', 'inherit'],
        });
        let out = '';
        proc.stdout!.on('data', (d: Buffer) => (out += d.toString()));
        await new Promise((r) => proc.once('exit', r));
        return out.trim();
      };

      /** A plain SYN in the same set-up reaches ztunnel's 15006 right now. */
      async function inboundControl(v6: boolean): Promise<void> {
        const r = await inbound('control', v6);
        assert.equal(r.banner, 'ztunnel-15006', `control (IPv${v6 ? 6 : 4}): ${JSON.stringify(r)}`);
      }

      /** A plain raw SYN from the app reaches ztunnel's 15001 (answered on lo) right now. */
      async function outboundControl(v6: boolean): Promise<void> {
        const r = await outbound(inPod, 'control', v6);
        assert.deepEqual([r.result, r.iface], ['synack', 'lo'], `control (IPv${v6 ? 6 : 4}): ${JSON.stringify(r)}`);
      }

      before(async () => {
        t = await topology(topo, subnet);
        net = t.net;
        dp = await Datapath.open({ bpffsRoot: root });
        await dp.configure({ ztunnelExemption: 'ztunnel-sockets', strictAllow: [], steering });
        appCgroup = new AppCgroup(topo.id);
        // The pod's cgroup carries the socket-option guard (DNS capture is not what this suite tests).
        assert.equal(
          (
            await dp.attach(
              {
                uid,
                netnsPath: net.podPath,
                ips: [net.podV4, net.podV6],
                podCgroup: appCgroup.path,
                dnsCapture: false,
              },
              { mode },
            )
          ).mode,
          mode,
        );
        ztCgroup = new AppCgroup(`${topo.id}zt`);
        dp.trustZtunnelCgroup(ztCgroup.path); // before ztunnel listens: sk-lookup learns its listeners there
        ztunnel = await ZtunnelListeners.start(ztCgroup, net.podPath);
        app = await RecordingServer.start('app', { netns: net.podPath, family: 6, address: '::', port: APP_PORT });
        remote = await RecordingServer.start('remote', {
          netns: Topology.netnsPath(net.remote),
          family: 6,
          address: '::',
          port: APP_PORT,
        });
        peer = await crafter(Topology.netnsPath(net.remote));
        inPod = await crafter(net.podPath, appCgroup);
        ztunnelCrafter = await crafter(net.podPath, ztCgroup);
      });

      after(async () => {
        for (const p of [peer, inPod, ztunnelCrafter]) await p?.stop();
        await ztunnel?.stop();
        await app?.close();
        await remote?.close();
        dp?.close();
        await removeDatapath(root);
        appCgroup?.remove();
        ztCgroup?.remove();
        await topo.cleanup();
      });

      for (const k of INBOUND) {
        it(`inbound ${label(k)}: ${k.expect === 'ztunnel' ? 'to 15006' : 'never to the app'}`, async () => {
          await inboundControl(k.v6);
          const before = await counters();
          const nodeBefore = nodeUnclassified();
          const appBefore = app.accepted.length;
          const ztBefore = ztunnel.accepted.length;
          const r = await inbound(k.name, k.v6);
          assert.notEqual(r.banner, 'app', `the app took it: ${JSON.stringify(r)}`);
          assert.equal(app.accepted.length, appBefore, 'the app accepted a connection');
          const after = await counters();
          if (k.expect === 'ztunnel') {
            assert.equal(r.banner, 'ztunnel-15006', JSON.stringify(r));
            const got = ztunnel.accepted.at(-1)!;
            assert.deepEqual(
              [got.port, got.local, got.remote],
              [15006, [k.v6 ? net.podV6 : net.podV4, APP_PORT], [k.v6 ? t.attackerV6 : t.attackerV4, r.sport]],
            );
            assert.equal(after.inboundRedirected - before.inboundRedirected, 1);
          } else {
            assert.equal(r.result, 'none', JSON.stringify(r));
            assert.equal(ztunnel.accepted.length, ztBefore);
            if (k.expect === 'dropped')
              assert.ok(
                after.unclassifiedDropped + nodeUnclassified() > before.unclassifiedDropped + nodeBefore,
                'unclassifiedDropped did not rise',
              );
          }
        });
      }

      for (const v6 of [false, true]) {
        // In both steering modes tc leaves this SYN to the stack's TIME_WAIT path, whose listener
        // lookup the pod's sk_lookup program answers with ztunnel's 15006 (an assignment made in tc
        // would be lost: the kernel will not queue a request beside the TIME_WAIT socket).
        it(`inbound IPv${v6 ? 6 : 4}: a SYN on a tuple in TIME_WAIT in the pod goes to 15006, never the app`, async () => {
          await inboundControl(v6);
          const since = ztunnel.accepted.length;
          const first = await inbound('close-first', v6);
          assert.equal(first.banner, 'ztunnel-15006');
          const tw = await topo.exec(net.pod, 'ss', '-Htan', 'state', 'time-wait');
          assert.match(tw, new RegExp(`:${first.sport}\\b`), `no TIME_WAIT socket for the tuple: ${tw}`);
          const appBefore = app.accepted.length;
          const again = await inbound('control', v6, { sport: first.sport, seq: (first.seq! + 100_000) % 2 ** 32 });
          assert.notEqual(again.banner, 'app', 'the app took a SYN that met a TIME_WAIT socket');
          assert.equal(app.accepted.length, appBefore);
          assert.equal(again.banner, 'ztunnel-15006', JSON.stringify(again));
          const fromPort = ztunnel.accepted.slice(since).filter((a) => a.remote[1] === first.sport);
          assert.equal(fromPort.length, 2, 'both connections from the same port reached ztunnel');
        });
      }

      it('outbound control for the oracle: ztunnel’s own marked raw SYN leaves and the remote answers it', async () => {
        for (const v6 of [false, true]) {
          const r = await outbound(ztunnelCrafter, 'control', v6, FORGED_MARK);
          assert.deepEqual([r.result, r.iface], ['synack', 'eth0'], JSON.stringify(r));
        }
      });

      for (const k of OUTBOUND) {
        it(`outbound raw ${label(k)} from the app: ${k.expect === 'ztunnel' ? 'to 15001' : 'dropped'}, never to the remote`, async () => {
          await outboundControl(k.v6);
          const before = await counters();
          const nodeBefore = nodeUnclassified();
          const r = await outbound(inPod, k.name, k.v6);
          assert.notEqual(r.iface, 'eth0', `the remote host answered: ${JSON.stringify(r)}`);
          const after = await counters();
          if (k.expect === 'ztunnel') {
            assert.deepEqual([r.result, r.iface], ['synack', 'lo'], JSON.stringify(r));
            assert.equal(after.outboundRedirected - before.outboundRedirected, 1);
          } else {
            assert.equal(r.result, 'none', JSON.stringify(r));
            assert.ok(
              after.unclassifiedDropped + nodeUnclassified() > before.unclassifiedDropped + nodeBefore,
              'unclassifiedDropped did not rise',
            );
          }
          assert.equal(remote.accepted.length, 0);
        });
      }

      it('outbound raw SYNs with ztunnel’s mark forged from the app’s cgroup: to 15001, counted; fragments dropped', async () => {
        for (const v6 of [false, true]) {
          await outboundControl(v6);
          const before = await counters();
          const r = await outbound(inPod, 'control', v6, FORGED_MARK);
          assert.deepEqual([r.result, r.iface], ['synack', 'lo'], JSON.stringify(r));
          const after = await counters();
          assert.equal(after.forgedMark - before.forgedMark, 1);
        }
        const before = await counters();
        const r = await outbound(inPod, 'frag4-tiny', false, FORGED_MARK);
        assert.equal(r.result, 'none', JSON.stringify(r));
        assert.ok((await counters()).unclassifiedDropped > before.unclassifiedDropped);
      });

      it('outbound TCP with a forged mark (ztunnel’s or the redirect mark) from the app’s cgroup never reaches the remote', async () => {
        // Control: ztunnel's cgroup with its mark goes out directly, so the mark is honoured here.
        assert.equal(await ztCgroup.client(net.podPath, 'tcp', net.remoteV4, APP_PORT, `${FORGED_MARK}`), 'remote');
        const remoteBefore = remote.accepted.length;
        const before = await counters();
        for (const host of [net.remoteV4, net.remoteV6]) {
          assert.equal(
            await appCgroup.client(net.podPath, 'tcp', host, APP_PORT, `${FORGED_MARK}`),
            'ztunnel-15001',
            host,
          );
          assert.notEqual(
            await appCgroup.client(net.podPath, 'tcp', host, APP_PORT, `${REDIRECT_MARK}`),
            'remote',
            host,
          );
        }
        assert.equal((await counters()).forgedMark - before.forgedMark, 2);
        assert.equal(remote.accepted.length, remoteBefore, 'a forged mark reached the remote host');
      });

      it('sticky IP options set by the app (IPV6_DSTOPTS, IPV6_HOPOPTS, IP_OPTIONS): to 15001', async () => {
        assert.equal(await appCgroup.client(net.podPath, 'tcp', net.remoteV6, APP_PORT), 'ztunnel-15001', 'control');
        const remoteBefore = remote.accepted.length;
        for (const [kind, host] of [
          ['dstopts6', net.remoteV6],
          ['hopopts6', net.remoteV6],
          ['ipopts4', net.remoteV4],
        ] as const) {
          assert.equal(await asApp('sticky', kind, host, String(APP_PORT)), 'ztunnel-15001', kind);
          const got = ztunnel.accepted.at(-1)!;
          assert.deepEqual([got.port, got.local], [15001, [host, APP_PORT]], kind);
        }
        assert.equal(remote.accepted.length, remoteBefore, 'a connection with sticky options reached the remote host');
      });

      it('outbound SYN on a packet socket with PACKET_QDISC_BYPASS never reaches the remote: the option is refused', async () => {
        // The oracle's control: from a cgroup without the guard (ztunnel's), the same frame skips the
        // pod's egress hooks and the remote host answers it on eth0.
        const open = await outbound(ztunnelCrafter, 'packet-qdisc-bypass', false);
        assert.deepEqual([open.result, open.iface], ['synack', 'eth0'], `control: ${JSON.stringify(open)}`);
        await outboundControl(false);
        const r = await outbound(inPod, 'packet-qdisc-bypass', false);
        assert.notEqual(r.iface, 'eth0', `the remote host answered: ${JSON.stringify(r)}`);
        assert.equal(r.result, 'refused', `setsockopt(PACKET_QDISC_BYPASS) was not refused: ${JSON.stringify(r)}`);
      });
    },
  );
}
