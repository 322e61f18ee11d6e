// The CLI contract used by checks outside the project: command names, exit codes, one-line errors.
import assert from 'node:assert/strict';
import { readFileSync, rmSync } from 'node:fs';
import { after, describe, it } from 'node:test';
import { kernelTest, testBpffsRoot, uniqueSuffix } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { podWithRemote, Topology } from './helpers/topology.js';
import { CLI, runCli } from './helpers/cli.js';
import { spawn } from 'node:child_process';
import { openSync } from 'node:fs';
import { ZdsServer } from '../ztunnel-bridge/src/zds-server.js';
import { FakeAgent } from './helpers/zds-peer.js';
import { sleep } from './helpers/wait.js';

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
    const attach = [
      'datapath',
      'attach',
      '--netns',
      net.podPath,
      '--uid',
      uid,
      '--pod-ip',
      net.podV4,
      '--pod-ip',
      net.podV6,
      '--bpffs',
      root,
    ];

    const first = await runCli(attach);
    assert.equal(first.code, 0, first.stderr);
    assert.match(first.stdout, /^attached /);
    const second = await runCli(attach);
    assert.equal(second.code, 0, second.stderr);
    assert.match(second.stdout, /^updated /);

    const listed = await runCli(['datapath', 'list', '--json', '--bpffs', root]);
    const pods = JSON.parse(listed.stdout) as { uid: string; ips: string[]; netnsPath: string; mode: string }[];
    assert.deepEqual(
      pods.map((p) => [p.uid, p.ips, p.netnsPath, p.mode]),
      [[uid, [net.podV4, net.podV6], net.podPath, 'tcx']],
    );
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
      [
        ['datapath', 'attach', '--uid', 'x', '--netns', '/nonexistent', '--pod-ip', '198.18.0.9', '--bpffs', root],
        /netns \/nonexistent does not exist/,
      ],
      [
        ['datapath', 'attach', '--uid', 'x', '--netns', '/etc/hostname', '--pod-ip', '198.18.0.9', '--bpffs', root],
        /not a network namespace/,
      ],
      [
        ['datapath', 'attach', '--uid', 'x', '--netns', '/proc/self/ns/net', '--pod-ip', 'bogus', '--bpffs', root],
        /not an IP address: bogus/,
      ],
      [['datapath', 'attach', '--uid', 'x', '--pod-ip', '198.18.0.9'], /Missing required argument/],
      [['datapath', 'list', '--bpffs', '/tmp'], /not on a bpffs/],
      [['datapath', 'frobnicate'], /Unknown argument|name a datapath command/],
      [[], /^ambient-bpf: name a command \(see --help\)\n$/],
      [
        ['status', '--status-socket', `${root}-none.sock`],
        /no agent here: nothing at .*-none\.sock; is the agent running on this node\?/,
      ],
    ];
    for (const [args, message] of cases) {
      const r = await runCli(args);
      assert.notEqual(r.code, 0, args.join(' '));
      oneLine(r.stderr);
      assert.match(r.stderr, message);
    }
  });
});

describe('ambient-bpf --version', () => {
  it('names the version and the commit built', async () => {
    const r = await runCli(['--version']);
    assert.equal(r.code, 0, r.stderr);
    const { version } = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as {
      version: string;
    };
    assert.match(
      r.stdout,
      new RegExp(`^ambient-bpf ${version.replace(/\./g, '\\.')} \\(commit ([0-9a-f]{40}|unknown)\\)\n$`),
    );
  });
});

describe('ambient-bpf ztunnel CLI', kernelTest(), () => {
  it('serves pods handed over by the agent, prints stats on SIGUSR1 and exits cleanly on SIGTERM', async (t) => {
    const topo = new Topology();
    const socketPath = `/tmp/abt-zt-cli-${topo.id}.sock`;
    const server = new ZdsServer({ socketPath });
    server.start();
    const child = spawn(CLI, ['ztunnel', '--socket', socketPath, '--dns-upstream', '198.18.30.1'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', resolve));
    t.after(async () => {
      child.kill('SIGKILL');
      server.close();
      await topo.cleanup();
    });
    const net = await podWithRemote(topo, 30);
    for (let i = 0; i < 200 && server.connectedCount === 0; i++) await sleep(25);
    assert.equal(server.connectedCount, 1, `stand-in did not connect: ${stderr}`);
    assert.deepEqual(
      await server.enroll({
        uid: 'cli-pod',
        info: { name: 'p', namespace: 'n', serviceAccount: 's' },
        netnsFd: openSync(net.podPath, 'r'),
      }),
      { status: 'acked' },
    );
    child.kill('SIGUSR1');
    for (let i = 0; i < 100 && !stdout.includes('\n'); i++) await sleep(20);
    const stats = JSON.parse(stdout.split('\n')[0]!) as {
      pods: { uid: string; stats: { outbound: { connections: number } } }[];
    };
    assert.deepEqual(
      stats.pods.map((p) => [p.uid, p.stats.outbound.connections]),
      [['cli-pod', 0]],
    );
    child.kill('SIGTERM');
    assert.equal(await exited, 0, stderr);
    assert.match(stderr, /"msg":"pod proxy started"/);
  });

  it('exits non-zero with the reason on a ZDS protocol violation', async (t) => {
    const socketPath = `/tmp/abt-zt-cli-${Date.now()}.sock`;
    const agent = new FakeAgent(socketPath);
    t.after(() => agent.close());
    const child = spawn(CLI, ['ztunnel', '--socket', socketPath, '--log-level', 'error'], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', resolve));
    const inbox = await agent.accept();
    FakeAgent.send(inbox, { keep: { uid: 'x' } });
    FakeAgent.send(inbox, { snapshotSent: {} });
    assert.equal(await FakeAgent.reply(inbox), '');
    assert.equal(await FakeAgent.reply(inbox), '');
    FakeAgent.send(inbox, { snapshotSent: {} });
    assert.match((await FakeAgent.reply(inbox)) ?? '', /second SnapshotSent/);
    assert.equal(await exited, 1);
    assert.match(
      stderr.trim().split('\n').at(-1)!,
      /^ambient-bpf: stopped on a ZDS protocol violation: second SnapshotSent$/,
    );
  });
});

describe('ambient-bpf agent capability check', () => {
  it('names each missing capability and what it is for, from CapEff', async () => {
    const { missingCapabilities } = await import('../cni-agent/src/commands/agent.js');
    const status = (eff: bigint) =>
      `Name:\tnode\nCapInh:\t0000000000000000\nCapEff:\t${eff.toString(16).padStart(16, '0')}\n`;
    const daemonSet = (1n << 12n) | (1n << 21n) | (1n << 19n) | (1n << 39n);
    assert.deepEqual(missingCapabilities(status(daemonSet)), []);
    assert.deepEqual(missingCapabilities(status((1n << 41n) - 1n)), [], 'root with every capability');
    assert.deepEqual(
      missingCapabilities(status(daemonSet & ~(1n << 12n))).map((c) => c.name),
      ['CAP_NET_ADMIN'],
    );
    assert.deepEqual(
      missingCapabilities(status(1n << 39n)).map((c) => c.name),
      ['CAP_NET_ADMIN', 'CAP_SYS_ADMIN', 'CAP_SYS_PTRACE'],
      'CAP_BPF alone',
    );
  });
});
