// The start-up scan finds running pods' namespaces by their IPs: named netns and process-only netns.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { statSync } from 'node:fs';
import { after, describe, it } from 'node:test';
import { findPodNetns, scanNetns } from '../cni-agent/src/pods/netns-discovery.js';
import { kernelTest } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { sh, Topology } from './helpers/topology.js';

after(assertNothingLeft);

describe('netns discovery', kernelTest(), () => {
  it('finds named and process-only namespaces by pod IP, never the host’s', async (t) => {
    const topo = new Topology();
    const a = await topo.netns('da');
    const b = await topo.netns('db');
    await topo.veth(a, 'eth0', b, 'eth0');
    await topo.addAddress(a, 'eth0', '198.18.40.2/24');
    await topo.addAddress(a, 'eth0', '2001:db8:40::2/64');
    await topo.addAddress(b, 'eth0', '198.18.40.3/24');
    // A pod whose netns only a process holds (no named mount).
    const holder = spawn('unshare', ['--net', 'sleep', '60'], { stdio: 'ignore' });
    t.after(async () => {
      holder.kill('SIGKILL');
      await topo.cleanup();
    });
    await new Promise((r) => setTimeout(r, 200));
    await sh('nsenter', [`--net=/proc/${holder.pid}/ns/net`, 'ip', 'link', 'add', 'v0', 'type', 'veth', 'peer', 'name', 'v1']);
    await sh('nsenter', [`--net=/proc/${holder.pid}/ns/net`, 'ip', 'addr', 'add', '198.18.40.9/32', 'dev', 'v0']);

    const found = await scanNetns('/');
    assert.equal(findPodNetns(found, ['198.18.40.2', '2001:db8:40::2'])?.path, Topology.netnsPath(a));
    assert.equal(findPodNetns(found, ['198.18.40.3'])?.path, Topology.netnsPath(b));
    assert.equal(findPodNetns(found, ['198.18.40.9'])?.path, `/proc/${holder.pid}/ns/net`);
    assert.equal(findPodNetns(found, ['198.18.40.77']), undefined);
    assert.equal(findPodNetns(found, []), undefined);
    assert.ok(found.every((c) => c.addresses.every((ip) => !ip.startsWith('127.') && ip !== '::1' && !ip.startsWith('fe80'))));
    const hostInode = statSync('/proc/self/ns/net').ino;
    assert.ok(found.every((c) => c.inode !== hostInode), 'the host netns was scanned');
  });
});
