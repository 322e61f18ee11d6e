// The pod cgroup found from the pod's processes, on a /proc made of plain files and symlinks (no
// root, no cgroup mount): which cgroup is the pod's alone, and one scan of /proc shared by the pods
// looked up around the same time. test/pod-cgroup.test.ts finds kubelet's pod cgroups on the kernel.
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { CgroupLocator } from '../../cni-agent/src/enrollment/cgroup-locator.js';

const dir = mkdtempSync(join(tmpdir(), 'abt-unit-cgroup-'));
after(() => rmSync(dir, { recursive: true, force: true }));

let nextNode = 0;

/** A host root with a fake /proc, a cgroup mount directory, and pod netns files. */
class FakeNode {
  readonly root = join(dir, `node-${nextNode++}`);
  readonly mount = join(this.root, 'cgroup');
  private nextPid = 100;

  constructor() {
    mkdirSync(join(this.root, 'proc'), { recursive: true });
    mkdirSync(this.mount);
    writeFileSync(join(this.root, 'host-netns'), '');
  }

  /** A netns file (its inode names it in the processes' ns/net links). */
  netns(name: string): string {
    const path = join(this.root, `netns-${name}`);
    writeFileSync(path, '');
    return path;
  }

  /** A process in `netns` (a path from netns(), or the host's) and cgroup `cgroup` (made below the mount). */
  process(netns: string, cgroup: string): number {
    const pid = this.nextPid++;
    const p = join(this.root, 'proc', String(pid));
    mkdirSync(join(p, 'ns'), { recursive: true });
    writeFileSync(join(p, 'cgroup'), `0::${cgroup}\n`);
    symlinkSync(`net:[${statSync(netns).ino}]`, join(p, 'ns', 'net'));
    mkdirSync(join(this.mount, cgroup), { recursive: true });
    return pid;
  }

  exit(pid: number): void {
    rmSync(join(this.root, 'proc', String(pid)), { recursive: true });
  }

  get host(): string {
    return join(this.root, 'host-netns');
  }

  locator(o: { freshMs?: number; hitMs?: number } = {}): CgroupLocator {
    return new CgroupLocator(this.root, { mount: this.mount, kubeletRoot: this.mount, ...o });
  }
}

describe('the pod cgroup from its processes', () => {
  it('is the cgroup the pod’s processes share, and only when no outside process is in it or below it', () => {
    const node = new FakeNode();
    const a = node.netns('a');
    const b = node.netns('b');
    const c = node.netns('c');
    node.process(node.host, '/system.slice/containerd.service');
    node.process(a, '/pods/a/pause');
    node.process(a, '/pods/a/app');
    node.process(b, '/pods/b');
    node.process(node.host, '/pods/b/intruder'); // a node process below b's cgroup
    node.process(c, '/'); // c's process in the root cgroup
    const locator = node.locator();
    assert.equal(locator.find('uid-a', a), join(node.mount, 'pods/a'));
    assert.equal(locator.find('uid-b', b), undefined, 'shared with a process outside the pod');
    assert.equal(locator.find('uid-c', c), undefined, 'the root cgroup is nobody’s');
    assert.equal(locator.find('uid-d', node.netns('d')), undefined, 'no process yet');
  });

  it('reads /proc once for the pods looked up around the same time', () => {
    const node = new FakeNode();
    const pods = ['a', 'b', 'c'].map((name) => ({ name, netns: node.netns(name) }));
    for (const p of pods) node.process(p.netns, `/pods/${p.name}`);
    const locator = node.locator({ freshMs: 60_000, hitMs: 60_000 });
    assert.equal(locator.find('uid-a', pods[0]!.netns), join(node.mount, 'pods/a'));
    // Gone from /proc after the scan: the others are still answered from it.
    rmSync(join(node.root, 'proc'), { recursive: true });
    mkdirSync(join(node.root, 'proc'));
    assert.equal(locator.find('uid-b', pods[1]!.netns), join(node.mount, 'pods/b'));
    assert.equal(locator.find('uid-c', pods[2]!.netns), join(node.mount, 'pods/c'));
    // A cgroup found on the scan but removed since is looked up on a new scan (which finds nothing).
    rmSync(join(node.mount, 'pods/c'), { recursive: true });
    assert.equal(locator.find('uid-c', pods[2]!.netns), undefined);
  });

  it('looks again once the scan is older than it trusts: a found cgroup after hitMs, a miss after freshMs', async () => {
    const node = new FakeNode();
    const a = node.netns('a');
    const b = node.netns('b');
    const pid = node.process(a, '/pods/a');
    const locator = node.locator({ freshMs: 500, hitMs: 500 });
    assert.equal(locator.find('uid-a', a), join(node.mount, 'pods/a'));
    assert.equal(locator.find('uid-b', b), undefined, 'no process yet');
    node.process(b, '/pods/b');
    assert.equal(locator.find('uid-b', b), undefined, 'a miss on a fresh scan stands');
    // An outside process joins a's cgroup: seen once the hit is older than hitMs.
    node.exit(pid);
    node.process(a, '/pods/a');
    node.process(node.host, '/pods/a');
    await new Promise((r) => setTimeout(r, 550));
    assert.equal(locator.find('uid-b', b), join(node.mount, 'pods/b'));
    assert.equal(locator.find('uid-a', a), undefined);
  });
});
