// Finding running pods' namespaces: the scan (named and process-only namespaces, never the host's)
// and the pod's identity: its kubelet pod cgroup decides, its IPs only cross-check; without any
// process in a cgroup of the pod (local mode), the IPs decide, strictly.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { statSync } from 'node:fs';
import { after, describe, it } from 'node:test';
import { NetnsLocator, NetnsRefused } from '../cni-agent/src/enrollment/netns-locator.js';
import { scanNetns, type NetnsScan } from '../cni-agent/src/pods/netns-discovery.js';
import { resolvePodNetns } from '../cni-agent/src/pods/pod-identity.js';
import { kernelTest } from './helpers/kernel.js';
import { KubeletCgroups } from './helpers/kubelet-cgroups.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { sh, Topology } from './helpers/topology.js';

after(assertNothingLeft);

/** A /24 of 198.19.0.0/16 picked by the topology's id: suites running side by side on this machine
 * do not put the same addresses in their namespaces (which local mode would rightly call ambiguous). */
const subnet = (topo: Topology, n: number): string => `198.19.${(parseInt(topo.id.slice(0, 2), 16) + n * 37) % 256}`;
/** The same for IPv6: a /64 of 2001:db8::/32. */
const subnet6 = (topo: Topology, n: number): string =>
  `2001:db8:${parseInt(topo.id.slice(0, 4), 16).toString(16)}:${n + 1}`;

const found = (scan: NetnsScan, uid: string, ips: string[]): string | undefined => {
  const r = resolvePodNetns(scan, uid, ips);
  return 'found' in r ? r.found.path : undefined;
};
const refused = (scan: NetnsScan, uid: string, ips: string[]): string => {
  const r = resolvePodNetns(scan, uid, ips);
  assert.ok('refused' in r, `not refused: ${JSON.stringify(r)}`);
  return r.refused;
};

describe('netns discovery', kernelTest(), () => {
  it('finds named and process-only namespaces by pod IP in local mode, never the host’s', async (t) => {
    const topo = new Topology();
    const net = subnet(topo, 0);
    const net6 = subnet6(topo, 0);
    const started: ReturnType<typeof spawn>[] = [];
    t.after(async () => {
      for (const p of started) p.kill('SIGKILL');
      await topo.cleanup();
    });
    const a = await topo.netns('da');
    const b = await topo.netns('db');
    await topo.veth(a, 'eth0', b, 'eth0');
    await topo.addAddress(a, 'eth0', `${net}.2/24`);
    await topo.addAddress(a, 'eth0', `${net6}::2/64`);
    await topo.addAddress(b, 'eth0', `${net}.3/24`);
    // A pod whose netns only a process holds (no named mount).
    const holder = spawn('unshare', ['--net', 'sleep', '60'], { stdio: 'ignore' });
    started.push(holder);
    await new Promise((r) => setTimeout(r, 200));
    await sh('nsenter', [
      `--net=/proc/${holder.pid}/ns/net`,
      'ip',
      'link',
      'add',
      'v0',
      'type',
      'veth',
      'peer',
      'name',
      'v1',
    ]);
    await sh('nsenter', [`--net=/proc/${holder.pid}/ns/net`, 'ip', 'addr', 'add', `${net}.9/32`, 'dev', 'v0']);

    const scan = await scanNetns('/');
    const uid = randomUUID(); // no process is in a cgroup of this pod: local mode
    assert.equal(found(scan, uid, [`${net}.2`, `${net6}::2`]), Topology.netnsPath(a));
    assert.equal(found(scan, uid, [`${net}.3`]), Topology.netnsPath(b));
    assert.equal(found(scan, uid, [`${net}.9`]), `/proc/${holder.pid}/ns/net`);
    assert.deepEqual(resolvePodNetns(scan, uid, [`${net}.77`]), {
      missing: `no network namespace holds the pod IPs ${net}.77 (not started yet?)`,
    });
    assert.ok('missing' in resolvePodNetns(scan, uid, []));
    assert.match(refused(scan, uid, [`${net}.2`, `${net}.77`]), /holds only some of the pod IPs/);
    const { candidates } = scan;
    assert.ok(
      candidates.every((c) =>
        c.addresses.every((ip) => !ip.startsWith('127.') && ip !== '::1' && !ip.startsWith('fe80')),
      ),
    );
    const hostInode = statSync('/proc/self/ns/net').ino;
    assert.ok(
      candidates.every((c) => c.inode !== hostInode),
      'the host netns was scanned',
    );
  });

  it('local mode: two namespaces holding a pod IP are refused as ambiguous; one is found', async (t) => {
    const topo = new Topology();
    const net = subnet(topo, 1);
    const l1 = await topo.netns('l1');
    const l2 = await topo.netns('l2');
    t.after(() => topo.cleanup());
    await topo.veth(l1, 'eth0', l2, 'eth0');
    await topo.addAddress(l1, 'eth0', `${net}.5/32`);
    await topo.addAddress(l2, 'eth0', `${net}.5/32`);
    await topo.addAddress(l1, 'eth0', `${net}.6/32`);
    const scan = await scanNetns('/');
    const uid = randomUUID();
    assert.match(
      refused(scan, uid, [`${net}.5`]),
      new RegExp(`^ambiguous: 2 network namespaces hold the pod’s IPs \\(.*${l1}.*${l2}.*\\)$`),
    );
    // A second netns holding any of the IPs is enough to refuse, even if only one holds them all.
    assert.match(refused(scan, uid, [`${net}.5`, `${net}.6`]), /^ambiguous/);
    assert.equal(found(scan, uid, [`${net}.6`]), Topology.netnsPath(l1));
    // The locator says the same, refusing with the reason.
    const locator = new NetnsLocator('/');
    await assert.rejects(
      locator.find(uid, [`${net}.5`]),
      (err: Error) => err instanceof NetnsRefused && /^ambiguous/.test(err.message),
    );
    assert.equal(await locator.find(uid, [`${net}.6`]), Topology.netnsPath(l1));
  });

  it('kubelet mode: the pod’s netns is the one its cgroup’s processes are in, not an impostor holding its IP', async (t) => {
    const topo = new Topology();
    const cgroups = new KubeletCgroups(topo.id);
    const net = subnet(topo, 2);
    const net6 = subnet6(topo, 2);
    // The impostor's netns sorts first: by IP alone it would be taken for the pod.
    const impostor = await topo.netns('aimp');
    const real = await topo.netns('zreal');
    t.after(async () => {
      await cgroups.cleanup();
      await topo.cleanup();
    });
    await topo.veth(impostor, 'eth0', real, 'eth0');
    await topo.addAddress(real, 'eth0', `${net}.2/24`);
    await topo.addAddress(real, 'eth0', `${net6}::2/64`);
    // A NET_ADMIN pod on the node puts the victim's addresses on its own interface.
    await topo.addAddress(impostor, 'eth0', `${net}.2/24`);
    await topo.addAddress(impostor, 'eth0', `${net6}::2/64`);
    const uid = randomUUID();
    const ips = [`${net}.2`, `${net6}::2`];
    await cgroups.sleeper(`kubepods/besteffort/pod${uid}/pause`, Topology.netnsPath(real));
    await cgroups.sleeper(`kubepods/burstable/pod${randomUUID()}/app`, Topology.netnsPath(impostor));

    let scan = await scanNetns('/');
    assert.equal(
      scan.candidates.find((c) => ips.every((ip) => c.addresses.includes(ip)))?.path,
      Topology.netnsPath(impostor),
      'control: by IPs alone the impostor comes first',
    );
    assert.equal(found(scan, uid, ips), Topology.netnsPath(real));
    assert.equal(await new NetnsLocator('/').find(uid, ips), Topology.netnsPath(real));
    // An impostor whose netns no process holds (a named netns only) is not taken either.
    const bare = await topo.netns('abare');
    await topo.ip(bare, 'link', 'add', 'eth0', 'type', 'veth', 'peer', 'name', 'eth1');
    await topo.addAddress(bare, 'eth0', `${net}.2/32`);
    scan = await scanNetns('/');
    assert.equal(found(scan, uid, ips), Topology.netnsPath(real));
    // The pod's netns must hold all of its IPs.
    assert.match(
      refused(scan, uid, [...ips, `${net}.99`]),
      new RegExp(`^the pod’s network namespace /var/run/netns/${real} does not hold its IPs`),
    );

    // A process of the pod that made its own user and network namespaces (an unprivileged app may)
    // and put the pod's IPs there does not make the pod's netns ambiguous: no runtime made that one.
    const own = await cgroups.ownNetns(`kubepods/besteffort/pod${uid}/app`, [`${net}.2/24`, `${net6}::2/64`]);
    scan = await scanNetns('/');
    const made = scan.candidates.find((c) => c.inode === statSync(`/proc/${own.pid}/ns/net`).ino);
    assert.deepEqual(
      [made?.nodeOwned, made?.podUids, ips.every((ip) => made?.addresses.includes(ip))],
      [false, [uid], true],
      'control: the app’s own netns holds the pod IPs, in the pod cgroup',
    );
    assert.equal(found(scan, uid, ips), Topology.netnsPath(real));
    const gone = new Promise((r) => own.once('exit', r));
    own.kill('SIGKILL');
    await gone;

    // Processes of the pod in two namespaces: refused, with the reason.
    const other = await topo.netns('zother');
    await cgroups.sleeper(`kubepods/besteffort/pod${uid}/app`, Topology.netnsPath(other));
    scan = await scanNetns('/');
    assert.match(refused(scan, uid, ips), /^the pod’s processes are in 2 network namespaces/);
    await assert.rejects(
      new NetnsLocator('/').find(uid, ips),
      (err: Error) => err instanceof NetnsRefused && /in 2 network namespaces/.test(err.message),
    );
  });

  it('kubelet mode, systemd driver: the same pod identity from slices', async (t) => {
    const topo = new Topology();
    const cgroups = new KubeletCgroups(topo.id);
    const net = subnet(topo, 3);
    const impostor = await topo.netns('aimp');
    const real = await topo.netns('zreal');
    t.after(async () => {
      await cgroups.cleanup();
      await topo.cleanup();
    });
    await topo.veth(impostor, 'eth0', real, 'eth0');
    await topo.addAddress(real, 'eth0', `${net}.2/24`);
    await topo.addAddress(impostor, 'eth0', `${net}.2/24`);
    const uid = randomUUID();
    await cgroups.sleeper(
      `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod${uid.replace(/-/g, '_')}.slice/cri-containerd-abc.scope`,
      Topology.netnsPath(real),
    );
    const scan = await scanNetns('/');
    assert.equal(found(scan, uid, [`${net}.2`]), Topology.netnsPath(real));
    // Without a process in the pod's cgroup (local mode) the same IPs are ambiguous.
    assert.match(refused(scan, randomUUID(), [`${net}.2`]), /^ambiguous/);
  });
});
