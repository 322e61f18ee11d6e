// The CLI contract used by checks outside the project: command names, exit codes, one-line errors.
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { after, describe, it } from 'node:test';
import { kernelTest, testBpffsRoot, uniqueSuffix } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { podWithRemote, Topology } from './helpers/topology.js';
import { runCli } from './helpers/cli.js';

after(assertNothingLeft);

const oneLine = (s: string) => assert.match(s, /^ambient-bpf: [^\n]+\n$/, `not one line: ${JSON.stringify(s)}`);

describe('ambient-bpf datapath CLI', kernelTest(), () => {
  it('attaches idempotently, lists, verifies and detaches', async (t) => {
    const topo = new Topology();
    const root = testBpffsRoot(topo.id);
    t.after(async () => {
      await topo.cleanup();
      rmSync(root, { recursive: true, force: true });
    });
    const net = await podWithRemote(topo, 7);
    const uid = `cli-${topo.id}`;
    const attach = ['datapath', 'attach', '--netns', net.podPath, '--uid', uid, '--pod-ip', net.podV4, '--pod-ip', net.podV6, '--bpffs', root];

    const first = await runCli(attach);
    assert.equal(first.code, 0, first.stderr);
    assert.match(first.stdout, /^attached /);
    const second = await runCli(attach);
    assert.equal(second.code, 0, second.stderr);
    assert.match(second.stdout, /^updated /);

    const listed = await runCli(['datapath', 'list', '--json', '--bpffs', root]);
    const pods = JSON.parse(listed.stdout) as { uid: string; ips: string[]; netnsPath: string; mode: string }[];
    assert.deepEqual(pods.map((p) => [p.uid, p.ips, p.netnsPath, p.mode]), [[uid, [net.podV4, net.podV6], net.podPath, 'tcx']]);
    const table = await runCli(['datapath', 'list', '--bpffs', root]);
    assert.match(table.stdout, new RegExp(`^UID .*\\n${uid} +tcx +attached`));

    assert.equal((await runCli(['datapath', 'verify', '--uid', uid, '--bpffs', root])).code, 0);
    await topo.ip(net.pod, '-6', 'rule', 'del', 'fwmark', '0x111/0xfff', 'table', '100', 'pref', '32764');
    const broken = await runCli(['datapath', 'verify', '--uid', uid, '--bpffs', root]);
    assert.notEqual(broken.code, 0);
    oneLine(broken.stderr);
    assert.match(broken.stderr, /IPv6 fwmark rule/);

    const detached = await runCli(['datapath', 'detach', '--uid', uid, '--bpffs', root]);
    assert.equal(detached.code, 0, detached.stderr);
    const gone = await runCli(['datapath', 'verify', '--uid', uid, '--bpffs', root]);
    assert.notEqual(gone.code, 0);
    oneLine(gone.stderr);
    assert.equal((await runCli(['datapath', 'list', '--json', '--bpffs', root])).stdout.trim(), '[]');
  });

  it('fails with one line on stderr for bad input', async (t) => {
    const root = testBpffsRoot(`cli-bad-${uniqueSuffix()}`);
    t.after(() => rmSync(root, { recursive: true, force: true }));
    const cases: [string[], RegExp][] = [
      [['datapath', 'attach', '--uid', 'x', '--netns', '/nonexistent', '--pod-ip', '198.18.0.9', '--bpffs', root], /netns \/nonexistent does not exist/],
      [['datapath', 'attach', '--uid', 'x', '--netns', '/etc/hostname', '--pod-ip', '198.18.0.9', '--bpffs', root], /not a network namespace/],
      [['datapath', 'attach', '--uid', 'x', '--netns', '/proc/self/ns/net', '--pod-ip', 'bogus', '--bpffs', root], /not an IP address: bogus/],
      [['datapath', 'attach', '--uid', 'x', '--pod-ip', '198.18.0.9'], /Missing required argument/],
      [['datapath', 'list', '--bpffs', '/tmp'], /not on a bpffs/],
      [['datapath', 'frobnicate'], /Unknown argument|name a datapath command/],
    ];
    for (const [args, message] of cases) {
      const r = await runCli(args);
      assert.notEqual(r.code, 0, args.join(' '));
      oneLine(r.stderr);
      assert.match(r.stderr, message);
    }
  });
});
