// Platform settings of the agent (README, "Platforms"): malformed paths stop it at start-up naming
// the flag and the value, before it touches the node; --cni-conf-file picks the conflist it chains
// into; --netns-dir lets CNI_NETNS name another directory of pod network namespaces (minikube's
// /var/run/docker/netns), through the real plugin binary, and nothing else.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { Agent } from '../cni-agent/src/agent.js';
import { checkNetnsPath, NetnsPathError } from '../cni-agent/src/cni/netns-path.js';
import { CniInstaller } from '../cni-agent/src/installer/installer.js';
import { silentLogger } from '../ztunnel-bridge/src/logger.js';
import { ZtunnelStandIn } from '../ztunnel-bridge/src/standin/ztunnel.js';
import { runCli } from './helpers/cli.js';
import { execPlugin } from './helpers/cni-runtime.js';
import { kernelTest, TEST_PREFIX, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft, removeDatapath } from './helpers/leftovers.js';
import { podWithRemote, Topology } from './helpers/topology.js';
import { until } from './helpers/wait.js';

after(assertNothingLeft);

function tempDir(t: { after: (fn: () => void) => void }, what: string): string {
  const dir = mkdtempSync(join(tmpdir(), `${TEST_PREFIX}-${what}-`));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

describe('agent platform flags', () => {
  it('refuses malformed platform paths at start-up, naming the flag and the value, and installs nothing', async (t) => {
    const dir = tempDir(t, 'platflags');
    const binDir = join(dir, 'bin');
    const confDir = join(dir, 'net.d');
    mkdirSync(binDir);
    mkdirSync(confDir);
    const conflist = JSON.stringify({ cniVersion: '1.0.0', name: 'k8s', plugins: [{ type: 'bridge' }] });
    writeFileSync(join(confDir, '10-bridge.conflist'), conflist);
    writeFileSync(join(dir, 'pods.yaml'), '');
    const good = [
      'agent',
      `--local-pods=${join(dir, 'pods.yaml')}`,
      `--ztunnel-socket=${join(dir, 'z.sock')}`,
      `--plugin-socket=${join(dir, 'run', 'cni.sock')}`,
      `--cni-policy-file=${join(dir, 'lib', 'cni-policy')}`,
      `--status-socket=${join(dir, 'status.sock')}`,
      `--bpffs=${join(dir, 'bpffs')}`,
      '--install-cni',
      `--cni-bin-dir=${binDir}`,
      `--cni-conf-dir=${confDir}`,
    ];
    const cases: [string[], RegExp][] = [
      [['--cni-bin-dir='], /^ambient-bpf: --cni-bin-dir "": is empty: name an absolute path\n$/],
      [
        ['--cni-conf-dir=etc/cni/net.d'],
        /^ambient-bpf: --cni-conf-dir "etc\/cni\/net\.d": is a relative path: name an absolute path\n$/,
      ],
      [
        ['--cni-bin-dir=/opt/cni/../cni/bin'],
        /^ambient-bpf: --cni-bin-dir "\/opt\/cni\/\.\.\/cni\/bin": is not a plain path \(say "\/opt\/cni\/bin"\)\n$/,
      ],
      [['--netns-dir=var/run/netns'], /^ambient-bpf: --netns-dir "var\/run\/netns": is a relative path/],
      [
        ['--netns-dir=/var/run/netns', '--netns-dir=/var/run/docker/netns/'],
        /^ambient-bpf: --netns-dir "\/var\/run\/docker\/netns\/": is not a plain path \(say "\/var\/run\/docker\/netns"\)\n$/,
      ],
      [['--netns-dir=/'], /^ambient-bpf: --netns-dir "\/": not a directory of network namespaces/],
      [['--netns-dir=/proc/1'], /^ambient-bpf: --netns-dir "\/proc\/1": not a directory of network namespaces/],
      [['--host-root='], /^ambient-bpf: --host-root "": is empty/],
      [['--cni-policy-file=cni-policy'], /^ambient-bpf: --cni-policy-file "cni-policy": is a relative path/],
      [
        ['--cni-conf-file=../10-bridge.conflist'],
        /^ambient-bpf: --cni-conf-file "\.\.\/10-bridge\.conflist": must be a file name in --cni-conf-dir ending in \.conflist, \.conf or \.json/,
      ],
      [['--cni-conf-file=10-bridge.txt'], /^ambient-bpf: --cni-conf-file "10-bridge\.txt": must be a file name/],
      [['--cni-conf-file='], /^ambient-bpf: --cni-conf-file "": must be a file name/],
    ];
    cases.push([
      [`--cni-bin-dir=${binDir}`, `--cni-bin-dir=${join(dir, 'other')}`],
      /^ambient-bpf: --cni-bin-dir is given 2 times \(".*\/bin", ".*\/other"\): name one\n$/,
    ]);
    for (const [extra, message] of cases) {
      // Each case's flags replace the good ones of the same name.
      const names = new Set(extra.map((a) => a.split('=')[0]));
      const r = await runCli([...good.filter((a) => !names.has(a.split('=')[0])), ...extra]);
      assert.equal(r.code, 2, `${extra.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, message, extra.join(' '));
      // Nothing of the node was touched: no binary, the conflist as it was, no socket, policy or pins.
      assert.deepEqual(readdirSync(binDir), [], extra.join(' '));
      assert.equal(readFileSync(join(confDir, '10-bridge.conflist'), 'utf8'), conflist, extra.join(' '));
      assert.deepEqual(readdirSync(dir).sort(), ['bin', 'net.d', 'pods.yaml'], extra.join(' '));
    }
  });

  it('uninstall refuses malformed paths too, before it removes anything', async (t) => {
    const dir = tempDir(t, 'platun');
    writeFileSync(join(dir, 'cni-policy'), 'namespace shop ambient\n');
    const good = [
      `--cni-bin-dir=${dir}`,
      `--cni-conf-dir=${dir}`,
      `--cni-policy-file=${join(dir, 'cni-policy')}`,
      `--bpffs=${join(dir, 'pins')}`,
    ];
    for (const [bad, message] of [
      [
        '--bpffs=sys/fs/bpf/ambient-bpf',
        /^ambient-bpf: --bpffs "sys\/fs\/bpf\/ambient-bpf": is a relative path: name an absolute path\n$/,
      ],
      ['--cni-conf-dir=', /^ambient-bpf: --cni-conf-dir "": is empty/],
      ['--cni-policy-file=/var/lib//x', /^ambient-bpf: --cni-policy-file "\/var\/lib\/\/x": is not a plain path/],
    ] as const) {
      const name = bad.split('=')[0]!;
      const r = await runCli(['uninstall', ...good.filter((a) => !a.startsWith(`${name}=`)), bad]);
      assert.equal(r.code, 2, `${bad}: ${r.stderr}`);
      assert.match(r.stderr, message);
      assert.equal(
        readFileSync(join(dir, 'cni-policy'), 'utf8'),
        'namespace shop ambient\n',
        `${bad}: the policy file was removed`,
      );
    }
  });

  it('--cni-conf-file: chains into the named file, not the first one, also once a lone .conf became its .conflist', async (t) => {
    const dir = tempDir(t, 'platconf');
    const binDir = join(dir, 'bin');
    const confDir = join(dir, 'net.d');
    mkdirSync(binDir);
    mkdirSync(confDir);
    const binarySource = join(dir, 'plugin-build');
    writeFileSync(binarySource, '#!/bin/sh\n');
    const first = JSON.stringify({ cniVersion: '1.0.0', name: 'first', plugins: [{ type: 'bridge' }] });
    writeFileSync(join(confDir, '00-first.conflist'), first);
    const multus = (delegate: string) =>
      JSON.stringify({
        cniVersion: '0.3.1',
        name: 'multus-cni-network',
        type: 'multus',
        delegates: [{ type: delegate }],
      });
    writeFileSync(join(confDir, '10-multus.conf'), multus('ovn'));
    const installer = new CniInstaller({
      binDir,
      confDir,
      confFile: '10-multus.conf',
      binarySource,
      agentSocket: '/run/a.sock',
      policyFile: '/var/lib/a/cni-policy',
      log: silentLogger,
      debounceMs: 10,
    });
    t.after(() => installer.stop());
    installer.start();
    const types = (file: string) =>
      (JSON.parse(readFileSync(join(confDir, file), 'utf8')) as { plugins: { type: string }[] }).plugins.map(
        (p) => p.type,
      );
    assert.deepEqual(types('10-multus.conflist'), ['multus', 'ambient-bpf-cni']);
    assert.equal(existsSync(join(confDir, '10-multus.conf')), false);
    assert.equal(readFileSync(join(confDir, '00-first.conflist'), 'utf8'), first, 'the first file was changed');
    assert.equal(installer.entryInPlace, true);
    // Multus writes its .conf again: the entry follows it.
    writeFileSync(join(confDir, '10-multus.conf'), multus('ovn2'));
    await until(
      () => !existsSync(join(confDir, '10-multus.conf')) && installer.entryInPlace,
      'the rewritten .conf chained again',
    );
    assert.equal(
      (
        JSON.parse(readFileSync(join(confDir, '10-multus.conflist'), 'utf8')) as {
          plugins: { delegates?: { type: string }[] }[];
        }
      ).plugins[0]!.delegates![0]!.type,
      'ovn2',
    );
    installer.stop();

    // A named file that is not there: an error naming it and the flag, and nothing installed.
    const missing = new CniInstaller({
      binDir: join(dir, 'bin2'),
      confDir,
      confFile: '99-none.conflist',
      binarySource,
      agentSocket: '/run/a.sock',
      policyFile: '/var/lib/a/cni-policy',
      log: silentLogger,
    });
    mkdirSync(join(dir, 'bin2'));
    assert.throws(() => missing.start(), /no 99-none\.conflist in .*net\.d to chain into \(--cni-conf-file/);
    assert.equal(missing.entryInPlace, false);
  });

  it('--netns-dir: CNI_NETNS is accepted in the directories named (and their /run twins) only', (t) => {
    const root = tempDir(t, 'platns');
    mkdirSync(join(root, 'var/run/docker/netns'), { recursive: true });
    mkdirSync(join(root, 'var/run/netns'), { recursive: true });
    symlinkSync('var/run', join(root, 'run'));
    writeFileSync(join(root, 'var/run/docker/netns/abc'), '');
    symlinkSync(join(root, 'var/run/docker/netns/abc'), join(root, 'var/run/docker/netns/link'));
    const hostPath = (p: string) => join(root, p);
    const docker = ['/var/run/netns', '/var/run/docker/netns'];
    assert.throws(
      () => checkNetnsPath('/var/run/docker/netns/abc', hostPath),
      (e: Error) =>
        e instanceof NetnsPathError &&
        /is not in \/var\/run\/netns or \/run\/netns nor \/proc\/PID\/ns\/net \(--netns-dir\)/.test(e.message),
    );
    assert.equal(checkNetnsPath('/var/run/docker/netns/abc', hostPath, docker), join(root, 'var/run/docker/netns/abc'));
    assert.equal(checkNetnsPath('/run/docker/netns/abc', hostPath, docker), join(root, 'run/docker/netns/abc'));
    assert.throws(() => checkNetnsPath('/var/run/docker/netns/link', hostPath, docker), /is a symbolic link/);
    assert.throws(() => checkNetnsPath('/var/run/docker/abc', hostPath, docker), /is not in/);
    assert.throws(
      () => checkNetnsPath('/var/run/docker/netns/../netns/abc', hostPath, docker),
      /is not a plain absolute path/,
    );
  });
});

describe('agent --netns-dir through the CNI plugin', kernelTest(), () => {
  it(
    'a pod netns bind-mounted in another directory (as Docker’s) is enrolled only by an agent given that directory',
    { timeout: 120_000 },
    async (t) => {
      const topo = new Topology();
      const root = testBpffsRoot(topo.id);
      const dir = mkdtempSync(join(tmpdir(), `${TEST_PREFIX}-platcni-`));
      // 244: above what the churn tests fill (198.18.0-199.x), whose netns the agent would also scan.
      const net = await podWithRemote(topo, 244);
      // Docker's layout: the pod's netns bind-mounted under a directory of its own.
      const dockerNetns = join(dir, 'docker-netns');
      mkdirSync(dockerNetns);
      const podPath = join(dockerNetns, 'f00d');
      writeFileSync(podPath, '');
      execFileSync('mount', ['--bind', net.podPath, podPath]);
      writeFileSync(
        join(dir, 'pods.yaml'),
        [
          'apiVersion: v1\nkind: Namespace\nmetadata: { name: shop, labels: { istio.io/dataplane-mode: ambient } }',
          `apiVersion: v1\nkind: Pod\nmetadata: { name: cart, namespace: shop, uid: plat-cart-${topo.id} }`,
        ].join('\n---\n'),
      );
      const pluginSocket = join(dir, 'cni.sock');
      const ztunnelSocket = join(dir, 'ztunnel.sock');
      const opts = {
        nodeName: 'node-a',
        source: { localPods: join(dir, 'pods.yaml') },
        ztunnelSocket,
        pluginSocket,
        cniPolicyFile: join(dir, 'cni-policy'),
        bpffs: root,
        hostRoot: '/',
        attachMode: 'auto' as const,
        log: silentLogger,
      };
      const standIn = new ZtunnelStandIn({ socketPath: ztunnelSocket });
      let agent = new Agent(opts);
      t.after(async () => {
        standIn.stop();
        agent.stop();
        execFileSync('umount', [podPath]);
        await removeDatapath(root);
        await topo.cleanup();
        rmSync(dir, { recursive: true, force: true });
      });
      await agent.start();
      standIn.start();
      await until(() => standIn.connected, 'stand-in connected');
      const dp = await Datapath.open({ bpffsRoot: root });
      t.after(() => dp.close());
      const add = () =>
        execPlugin(
          net.remote,
          'ambient-bpf-cni',
          {
            CNI_COMMAND: 'ADD',
            CNI_CONTAINERID: 'c-cart',
            CNI_NETNS: podPath,
            CNI_IFNAME: 'eth0',
            CNI_ARGS: `IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart;K8S_POD_UID=plat-cart-${topo.id}`,
          },
          JSON.stringify({
            cniVersion: '1.0.0',
            name: 'k8s',
            type: 'ambient-bpf-cni',
            agent_socket: pluginSocket,
            policy_file: opts.cniPolicyFile,
            prevResult: { cniVersion: '1.0.0', ips: [{ address: `${net.podV4}/24` }] },
          }),
        );

      // The default (/var/run/netns): refused, with the flag to use named.
      const refused = await add();
      assert.notEqual(refused.code, 0);
      const err = JSON.parse(refused.stdout) as { code: number; msg: string; details?: string };
      assert.equal(err.code, 4);
      assert.match(
        `${err.msg} ${err.details ?? ''}`,
        new RegExp(
          `CNI_NETNS: ${podPath} is not in /var/run/netns or /run/netns nor /proc/PID/ns/net \\(--netns-dir\\)`,
        ),
      );
      assert.deepEqual(await dp.list(), []);

      // With the directory named: enrolled and acked before ADD returns.
      agent.stop();
      agent = new Agent({ ...opts, netnsDirs: ['/var/run/netns', dockerNetns] });
      await agent.start();
      await until(() => standIn.connected, 'stand-in connected again');
      const added = await add();
      assert.equal(added.code, 0, added.stdout + added.stderr);
      assert.deepEqual(
        (await dp.list()).map((p) => p.uid),
        [`plat-cart-${topo.id}`],
      );
      assert.deepEqual(
        standIn.stats().map((p) => p.name),
        ['cart'],
      );
      assert.equal(agent.status()[0]?.netnsPath, podPath);
    },
  );
});
