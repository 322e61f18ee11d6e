// The egress guard on the pod's cgroup (bpf/progs/egress_guard.bpf.c): TCP that the pod's own
// sockets send out through an interface of the pod netns without the pod's egress hook (a tun
// device past the interface limit, or a reroute-virtual-interfaces one, which has an ingress hook
// only) is dropped and counted, never sent past ztunnel. And the interface guard on such an
// interface, and pod_egress on a captured one, against hand-made TCP (packet and raw sockets). Seen from the other end: a reader holding the tun device
// counts what leaves through it. The same sockets from outside the pod's cgroup (the control) and
// from a netns nested in the pod (a container runtime inside it) are not the guard's.
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { rmSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { AppCgroup, useKernelSteering } from './helpers/app.js';
import { KERNEL_STEERING, kernelTest, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { podWithRemote, sh, Topology, type PodNet } from './helpers/topology.js';
import { until } from './helpers/wait.js';

after(assertNothingLeft);

/** Addresses beyond the pod's tun device (nothing answers there: the reader only counts), apart
 * from the pods' own subnets (184, 185). */
const TUN_V4 = { local: '198.18.186.1', peer: '198.18.186.2' };
const TUN_V6 = { local: '2001:db8:186::1', peer: '2001:db8:186::2' };
const NESTED_V4 = { local: '198.18.187.1', peer: '198.18.187.2' };
const PORT = 8080;

/** A tun device `dev` in `ns` with the v4 (and v6) prefix above on it. */
async function tunDevice(topo: Topology, ns: string, dev: string, v4: typeof TUN_V4, v6?: typeof TUN_V6) {
  await topo.ip(ns, 'tuntap', 'add', 'dev', dev, 'mode', 'tun');
  await topo.batch(ns, [
    `link set ${dev} up`,
    `addr add ${v4.local}/24 dev ${dev}`,
    ...(v6 ? [`addr add ${v6.local}/64 dev ${dev} nodad`] : []),
  ]);
}

/** What a counting fixture command (`args`, in `netns`; it counts until its stdin ends) printed
 * last, having counted while `send` ran. */
async function countedWhile(
  app: AppCgroup,
  netns: string,
  args: string[],
  send: () => Promise<unknown>,
): Promise<string> {
  const reader: ChildProcess = app.spawn('nsenter', [`--net=${netns}`, 'python3', app.clientScript, ...args], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  let out = '';
  reader.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise((r) => reader.once('exit', r));
  try {
    await until(
      () => /ready|ERR/.test(out),
      () => `${args.join(' ')} ready (it printed: ${out})`,
      10_000,
    );
    assert.doesNotMatch(out, /ERR/, `${args.join(' ')} failed`);
    await send();
    // A packet is in the device's queue when the sender's call returns; the reader gets it within this.
    await new Promise((r) => setTimeout(r, 300));
  } finally {
    reader.stdin!.end();
    await exited;
  }
  return out.trim().split('\n').pop()!;
}

/** What left through tun device `dev` of `netns` while `send` ran, as its reader counted it. */
async function leftThrough(
  app: AppCgroup,
  netns: string,
  dev: string,
  send: () => Promise<unknown>,
): Promise<{ tcp: number; udp: number }> {
  const out = await countedWhile(app, netns, ['tun-count', dev], send);
  const m = /tcp=(\d+) udp=(\d+)/.exec(out);
  assert.ok(m, `the reader of ${dev} printed ${out}`);
  return { tcp: Number(m[1]), udp: Number(m[2]) };
}

for (const reroute of [false, true]) {
  const title = reroute
    ? 'egress guard: a reroute-virtual-interfaces device (ingress hook only)'
    : 'egress guard: a tun device without hooks (past the interface limit)';
  describe(
    title,
    kernelTest({
      name: title, // (the old-kernel harness lists not-applicable suites by their full name)
      tcNetnsCookie: true,
      ...(reroute ? { steering: 'sk-assign' as const } : {}),
    }),
    () => {
      const topo = new Topology();
      const root = testBpffsRoot(topo.id);
      const uid = `pod-${topo.id}`;
      let net: PodNet;
      let dp: Datapath;
      let app: AppCgroup;
      let nested: string;

      const pod = () => net.podPath;
      /** Entries in one of the datapath's pinned maps. */
      const entries = async (map: string) =>
        (JSON.parse(await sh('bpftool', ['-j', 'map', 'dump', 'pinned', `${root}/maps/${map}`])) as unknown[]).length;
      const dropped = async () => (await dp.list())[0]!.counters.uncapturedDropped;
      /** The app's answer, from a process in the pod's cgroup (`inApp`) or outside it. */
      const run = async (inApp: boolean, netns: string, ...args: (string | number)[]) =>
        inApp
          ? app.client(netns, ...args)
          : (await sh('nsenter', [`--net=${netns}`, 'python3', app.clientScript, ...args.map(String)])).trim();

      const attach = () =>
        dp.attach({
          uid,
          netnsPath: net.podPath,
          ips: [net.podV4, net.podV6],
          podCgroup: app.path,
          dnsCapture: false,
          ...(reroute ? { rerouteInterfaces: ['tun0'] } : {}),
        });
      /** A packet socket's hand-made segment, sent from the pod's cgroup (`ERR` when the drop reaches
       * the sender as an error). */
      const packet = async (dev: string, src: string, dst: string, what: string, ethertype = '-', mark = '') => {
        const out = await run(true, pod(), 'packet', dev, src, dst, PORT, what, ethertype, ...(mark ? [mark] : []));
        assert.match(out, /^sent$|^ERR OSError: \[Errno 105\]/, `the packet socket: ${out}`);
      };
      /** TCP frames to (or from) PORT that reached the remote's eth0 while `send` ran. */
      const reachedRemote = async (send: () => Promise<unknown>, direction = 'to') =>
        Number(await countedWhile(app, Topology.netnsPath(net.remote), ['sniff-tcp', String(PORT), direction], send));
      /** The guard's hooks: its tcx links' pins, or its cls_bpf filter on tun0 (in the tc fallback). */
      const guardPins = async () =>
        (await sh('ls', [`${root}/pods/${uid}`]).catch(() => '')).split('\n').filter((n) => n.startsWith('guard-'));
      const guardFilter = async () =>
        /pod_guard/.test(await sh('nsenter', [`--net=${pod()}`, 'tc', 'filter', 'show', 'dev', 'tun0', 'egress']));

      before(async () => {
        net = await podWithRemote(topo, reroute ? 185 : 184);
        nested = topo.track('nest');
        await topo.batch(undefined, [`netns add ${nested}`]);
        await topo.batch(nested, ['link set lo up']);
        await tunDevice(topo, nested, 'tun1', NESTED_V4);
        dp = await Datapath.open({ bpffsRoot: root });
        await useKernelSteering(dp);
        app = new AppCgroup(topo.id);
        // Without reroute, tun0 is one interface past the limit (a tun device is captured like
        // eth0 otherwise): eight others come first. A first attach refuses a pod with an
        // interface it cannot hook; one that appears in an enrolled pod is reported, and the pod's
        // other interfaces stay captured.
        if (!reroute)
          await topo.batch(
            net.pod,
            [1, 2, 3, 4].map((i) => `link add other${i} type veth peer name other${i}p`),
          );
        await attach();
        await tunDevice(topo, net.pod, 'tun0', TUN_V4, TUN_V6);
        const r = await attach();
        if (!reroute) assert.match(r.warning, /interface tun0: the pod has more than 8 interfaces/);
        else assert.equal(r.warning, '');
      });

      after(async () => {
        await dp?.detach(uid);
        dp?.close();
        app?.remove();
        await topo.cleanup();
        rmSync(root, { recursive: true, force: true });
      });

      it('control: a socket outside the pod’s cgroup sends its SYN out through tun0', async () => {
        const seen = await leftThrough(app, pod(), 'tun0', () =>
          run(false, pod(), 'tcp-dev', 'tun0', TUN_V4.peer, PORT),
        );
        assert.ok(seen.tcp >= 1, `the reader saw no SYN (${JSON.stringify(seen)}): it cannot tell`);
      });

      it('drops the pod’s TCP bound to tun0, v4 and v6 (also behind a Hop-by-Hop header), and counts it', async () => {
        const before = await dropped();
        const seen = await leftThrough(app, pod(), 'tun0', async () => {
          assert.match(await run(true, pod(), 'tcp-dev', 'tun0', TUN_V4.peer, PORT), /^ERR/);
          assert.match(await run(true, pod(), 'tcp-dev', 'tun0', TUN_V6.peer, PORT), /^ERR/);
          assert.match(await run(true, pod(), 'tcp-dev', 'tun0', TUN_V6.peer, PORT, 'hbh'), /^ERR/);
        });
        assert.equal(seen.tcp, 0, 'TCP of the pod’s left through tun0 without ztunnel');
        assert.ok((await dropped()) >= before + 3, `counted: ${before} -> ${await dropped()}`);
      });

      it('drops a hand-made SYN from the pod’s raw socket routed out through tun0', async () => {
        const seen = await leftThrough(app, pod(), 'tun0', async () => {
          // (the guard's drop reaches a raw socket's sendto as EPERM)
          assert.match(await run(true, pod(), 'raw-syn', TUN_V4.peer, PORT), /^sent$|Operation not permitted/);
        });
        assert.equal(seen.tcp, 0, 'a raw TCP SYN left through tun0');
      });

      it('drops a SYN of one IP version sent on a raw socket of the other (what a tun reader reads by the version)', async () => {
        const before = await dropped();
        const seen = await leftThrough(app, pod(), 'tun0', async () => {
          for (const [packet, route, src, dst] of [
            ['v4', TUN_V6.peer, TUN_V4.local, TUN_V4.peer],
            ['v6', TUN_V4.peer, TUN_V6.local, TUN_V6.peer],
          ])
            assert.match(
              await run(true, pod(), 'raw-other-family', 'tun0', packet!, route!, src!, dst!, PORT),
              /^sent$|Operation not permitted/,
            );
        });
        assert.equal(seen.tcp, 0, `TCP of the other IP version left through tun0 (${JSON.stringify(seen)})`);
        assert.ok((await dropped()) >= before + 2, `counted: ${before} -> ${await dropped()}`);
      });

      it('drops the TCP a packet socket sends through tun0 (no cgroup hook sees it), however labelled, and counts it', async () => {
        const before = await dropped();
        const seen = await leftThrough(app, pod(), 'tun0', async () => {
          await packet('tun0', TUN_V4.local, TUN_V4.peer, 'syn');
          await packet('tun0', TUN_V6.local, TUN_V6.peer, 'synack');
          // skb->protocol says ARP; the tun reader goes by the version nibble
          await packet('tun0', TUN_V4.local, TUN_V4.peer, 'data', '0806');
        });
        assert.equal(seen.tcp, 0, `a packet socket's TCP left through tun0 (${JSON.stringify(seen)})`);
        assert.ok((await dropped()) >= before + 3, `counted: ${before} -> ${await dropped()}`);
        const udp = await leftThrough(app, pod(), 'tun0', () => packet('tun0', TUN_V4.local, TUN_V4.peer, 'udp'));
        assert.equal(udp.udp, 1, 'the packet socket’s UDP did not leave: the test cannot tell');
      });

      it('on the captured eth0: a packet socket’s SYN goes to ztunnel’s side, its other TCP is dropped', async () => {
        const before = await dropped();
        const reached = await reachedRemote(async () => {
          await packet('eth0', net.podV4, net.remoteV4, 'syn');
          // What a user-space TCP answering an inbound SYN sends, and its data: from the pod's
          // address and from one the pod does not hold.
          await packet('eth0', net.podV4, net.remoteV4, 'synack');
          await packet('eth0', net.podV4, net.remoteV4, 'data');
          await packet('eth0', net.podV6, net.remoteV6, 'data');
          await packet('eth0', TUN_V4.peer, net.remoteV4, 'data');
        });
        assert.equal(reached, 0, 'hand-made TCP reached the remote past ztunnel');
        assert.ok((await dropped()) >= before + 4, `counted: ${before} -> ${await dropped()}`);
      });

      it('does not take a hand-made segment for ztunnel’s by its mark, even under the mark-only rule', async () => {
        await dp.configure({ ztunnelExemption: 'mark', strictAllow: [], steering: KERNEL_STEERING });
        try {
          const before = await dropped();
          const seen = await leftThrough(app, pod(), 'tun0', () =>
            packet('tun0', TUN_V4.local, TUN_V4.peer, 'data', '-', '0x539'),
          );
          const reached = await reachedRemote(() => packet('eth0', net.podV4, net.remoteV4, 'data', '-', '0x539'));
          assert.deepEqual([seen.tcp, reached], [0, 0], 'a marked hand-made segment left past ztunnel');
          assert.ok((await dropped()) >= before + 2, `counted: ${before} -> ${await dropped()}`);
        } finally {
          await dp.configure({ ztunnelExemption: 'ztunnel-sockets', strictAllow: [], steering: KERNEL_STEERING });
        }
      });

      it('lets out a hand-made reset only as the kernel makes one, never one with headers full of data', async () => {
        const before = await dropped();
        const reached = await reachedRemote(async () => {
          await packet('eth0', net.podV4, net.remoteV4, 'rst+ext');
          await packet('eth0', net.podV6, net.remoteV6, 'rst+ext');
          await packet('tun0', TUN_V6.local, TUN_V6.peer, 'rst+ext'); // (counted, not seen here)
        });
        assert.equal(reached, 0, 'a reset carrying IP options or extension headers reached the remote');
        assert.ok((await dropped()) >= before + 3, `counted: ${before} -> ${await dropped()}`);
        // The control: the plain reset the kernel would send leaves.
        assert.equal(await reachedRemote(() => packet('eth0', net.podV4, net.remoteV4, 'rst')), 1);
      });

      it('lets out the reset the pod’s kernel sends for a stray segment (from a raw socket of its own, for IPv4)', async () => {
        const resets = await reachedRemote(
          () => run(false, Topology.netnsPath(net.remote), 'raw-syn', net.podV4, PORT, 'data'),
          'from',
        );
        assert.ok(resets >= 1, 'the pod’s reset did not reach the remote');
      });

      it('lets the pod’s UDP out through tun0 (ztunnel carries TCP only)', async () => {
        const seen = await leftThrough(app, pod(), 'tun0', () =>
          run(true, pod(), 'udp-dev', 'tun0', TUN_V4.peer, 9999),
        );
        assert.equal(seen.udp, 1);
      });

      it('leaves a netns nested in the pod (its cgroup, not its netns) alone', async () => {
        const before = await dropped();
        const seen = await leftThrough(app, Topology.netnsPath(nested), 'tun1', () =>
          run(true, Topology.netnsPath(nested), 'tcp-dev', 'tun1', NESTED_V4.peer, PORT),
        );
        assert.ok(seen.tcp >= 1, 'the nested netns’s SYN was dropped');
        assert.equal(await dropped(), before);
      });

      it('is part of the pod’s hooks: verify checks it, detach removes it and every entry it reads', async () => {
        const problems = (await dp.verify(uid)).problems;
        assert.ok(!problems.some((p) => /egress guard|gated_netns/.test(p)), problems.join('; '));
        const pins = await guardPins();
        assert.ok(pins.length === 1 || (await guardFilter()), 'tun0 carries no guard');
        // The guard taken away (its tcx link detached, or its tc filter deleted) is a problem, and
        // the next attach puts it back.
        if (pins.length) await sh('bpftool', ['link', 'detach', 'pinned', `${root}/pods/${uid}/${pins[0]}`]);
        else await sh('nsenter', [`--net=${pod()}`, 'tc', 'filter', 'del', 'dev', 'tun0', 'egress', 'pref', '6834']);
        assert.ok(
          (await dp.verify(uid)).problems.some((p) => /interface tun0 has no egress guard/.test(p)),
          'verify did not see the guard gone',
        );
        await attach();
        assert.deepEqual(
          (await dp.verify(uid)).problems.filter((p) => /egress guard/.test(p)),
          [],
          'the attach did not put the guard back',
        );
        assert.ok((await entries('gated_netns')) > 0 && (await entries('captured_ifaces')) > 0);
        await dp.detach(uid);
        assert.deepEqual(
          [await entries('gated_netns'), await entries('captured_ifaces')],
          [0, 0],
          'entries left after detach (a reroute interface’s among them?)',
        );
        assert.deepEqual([await guardPins(), await guardFilter()], [[], false], 'a guard is left after detach');
        const seen = await leftThrough(app, pod(), 'tun0', async () => {
          await run(true, pod(), 'tcp-dev', 'tun0', TUN_V4.peer, PORT);
          await packet('tun0', TUN_V4.local, TUN_V4.peer, 'syn');
        });
        assert.ok(seen.tcp >= 2, `the pod’s TCP is still dropped after detach (${JSON.stringify(seen)})`);
        assert.ok(
          (await reachedRemote(() => packet('eth0', net.podV4, net.remoteV4, 'data'))) >= 1,
          'a packet socket’s TCP on eth0 is still dropped after detach',
        );
      });
    },
  );
}

describe(
  'the pod’s cgroup hooks through an update that finds the pod’s interface replaced',
  kernelTest({
    name: 'the pod’s cgroup hooks through an update that finds the pod’s interface replaced',
    tcNetnsCookie: true,
  }),
  () => {
    const topo = new Topology();
    const root = testBpffsRoot(topo.id);
    const uid = `pod-${topo.id}`;
    let net: PodNet;
    let dp: Datapath;
    let app: AppCgroup;

    const attach = () =>
      dp.attach({ uid, netnsPath: net.podPath, ips: [net.podV4, net.podV6], podCgroup: app.path, dnsCapture: false });
    /** The link behind each pin of the pod's cgroup hooks and of its netns's sk_lookup link (0: none):
     * neither is an interface's. */
    const cgroupLinks = async (): Promise<Record<string, number>> =>
      Object.fromEntries(
        await Promise.all(
          ['pod_setsockopt', 'pod_egress_guard', 'pod_connect4', 'pod_connect6', 'sk_lookup'].map(
            async (hook): Promise<[string, number]> => {
              const show = await sh('bpftool', ['-j', 'link', 'show', 'pinned', `${root}/pods/${uid}/${hook}`]).catch(
                () => '{"id":0}',
              );
              return [hook, (JSON.parse(show) as { id: number }).id];
            },
          ),
        ),
      );
    /** The pod's eth0 deleted and made again (a new index), addresses and routes as before. */
    const replaceEth0 = async () => {
      await topo.ip(net.pod, 'link', 'del', 'eth0');
      await topo.batch(undefined, [`link add eth0 netns ${net.pod} type veth peer name eth0 netns ${net.remote}`]);
      await topo.batch(net.remote, [
        'link set eth0 up',
        `addr add ${net.remoteV4}/24 dev eth0`,
        `addr add ${net.remoteV6}/64 dev eth0 nodad`,
      ]);
      await topo.batch(net.pod, [
        'link set eth0 up',
        `addr add ${net.podV4}/24 dev eth0`,
        `addr add ${net.podV6}/64 dev eth0 nodad`,
        `route add default via ${net.remoteV4}`,
        `route add default via ${net.remoteV6}`,
      ]);
    };

    before(async () => {
      net = await podWithRemote(topo, 188);
      dp = await Datapath.open({ bpffsRoot: root });
      await useKernelSteering(dp);
      app = new AppCgroup(topo.id);
      await attach();
    });

    after(async () => {
      delete process.env.AMBIENT_BPF_FAULT_STEP;
      await dp?.detach(uid);
      dp?.close();
      app?.remove();
      await topo.cleanup();
      rmSync(root, { recursive: true, force: true });
    });

    it('keeps them in place when the update fails, and updates them in place when it succeeds', async () => {
      const links = await cgroupLinks();
      assert.ok(
        Object.values(links).every((id) => id > 0),
        `hooks attached: ${JSON.stringify(links)}`,
      );
      await replaceEth0();
      // Failed inside the pod netns (the interface's programs) and after it (the node side).
      for (const step of ['programs', 'host']) {
        process.env.AMBIENT_BPF_FAULT_STEP = step;
        try {
          await assert.rejects(attach(), new RegExp(`injected failure at step ${step}`));
        } finally {
          delete process.env.AMBIENT_BPF_FAULT_STEP;
        }
        assert.deepEqual(await cgroupLinks(), links, `the update failed at ${step} took a hook away`);
      }
      await attach();
      assert.deepEqual(await cgroupLinks(), links, 'the update made new cgroup links');
      const problems = (await dp.verify(uid)).problems;
      assert.deepEqual(problems, []);
    });
  },
);
