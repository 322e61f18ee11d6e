// The node's lifecycle around the agent (issue #15): a reboot (pods created again before the agent
// is back), the DaemonSet deleted versus upgraded, a long agent outage, and uninstall. The real
// plugin binary with real CNI input, the real agent process where its signals matter, the
// Kubernetes API test server.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { Agent } from '../cni-agent/src/agent.js';
import { REDIRECTION_ANNOTATION } from '../cni-agent/src/pods/pod.js';
import { silentLogger } from '../ztunnel-bridge/src/logger.js';
import { ZtunnelStandIn } from '../ztunnel-bridge/src/standin/ztunnel.js';
import { CLI, runCli } from './helpers/cli.js';
import { fixedListenPort } from './helpers/ports.js';
import { chainAdd, execPlugin, type Conflist } from './helpers/cni-runtime.js';
import { kernelTest, TEST_PREFIX, testBpffsRoot } from './helpers/kernel.js';
import { KubeApiTestServer } from './helpers/kube-api-server.js';
import { assertNothingLeft, removeDatapath } from './helpers/leftovers.js';
import { podWithRemote, Topology } from './helpers/topology.js';
import { RecordingServer, whoAnswers } from './helpers/traffic.js';
import { sleep, until } from './helpers/wait.js';

after(assertNothingLeft);

/** The agent as a process (its signals are what this file is about). */
function runAgent(args: string[]): {
  kill: (sig: NodeJS.Signals) => void;
  pid: number;
  stderr: () => string;
  exited: Promise<number | null>;
} {
  const child = spawn(CLI, ['agent', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((r) => child.on('exit', r));
  return { kill: (sig) => child.kill(sig), pid: child.pid!, stderr: () => err, exited };
}

/** One ADD of ambient-bpf-cni alone, as the runtime runs it after the interface plugin. */
function pluginAdd(
  node: string,
  entry: Record<string, unknown>,
  namespace: string,
  name: string,
  netns = '/var/run/netns/none',
  uid = `uid-${name}`,
) {
  const config = {
    cniVersion: '1.0.0',
    name: 'k8s',
    ...entry,
    prevResult: { cniVersion: '1.0.0', ips: [{ address: '198.18.110.77/24' }] },
  };
  const env = {
    CNI_COMMAND: 'ADD',
    CNI_CONTAINERID: `c-${namespace}-${name}`,
    CNI_NETNS: netns,
    CNI_IFNAME: 'eth0',
    CNI_ARGS: `IgnoreUnknown=1;K8S_POD_NAMESPACE=${namespace};K8S_POD_NAME=${name};K8S_POD_UID=${uid}`,
  };
  return execPlugin(node, 'ambient-bpf-cni', env, JSON.stringify(config));
}

function assertCniError(run: { code: number; stdout: string }, code: number, msg: RegExp, what: string): void {
  assert.equal(run.code, 1, `${what}: exit code ${run.code}: ${run.stdout}`);
  const e = JSON.parse(run.stdout) as { code: number; msg: string };
  assert.equal(e.code, code, `${what}: ${e.msg}`);
  assert.match(e.msg, msg, what);
}

function assertStarts(run: { code: number; stdout: string }, what: string): void {
  assert.equal(run.code, 0, `${what}: ${run.stdout}`);
  assert.deepEqual((JSON.parse(run.stdout) as { ips: unknown[] }).ips.length, 1, what);
}

const POD_FILE = `
apiVersion: v1
kind: Namespace
metadata: { name: shop, labels: { istio.io/dataplane-mode: ambient } }
---
apiVersion: v1
kind: Namespace
metadata: { name: plain }
---
apiVersion: v1
kind: Namespace
metadata: { name: mixed }
---
apiVersion: v1
kind: Pod
metadata: { name: cart, namespace: shop, uid: uid-cart }
---
apiVersion: v1
kind: Pod
metadata: { name: web, namespace: plain, uid: uid-web }
---
apiVersion: v1
kind: Pod
metadata: { name: opt, namespace: mixed, uid: uid-opt, labels: { istio.io/dataplane-mode: ambient } }
---
apiVersion: v1
kind: Pod
metadata: { name: other, namespace: mixed, uid: uid-other }
`;

describe('node lifecycle', kernelTest(), () => {
  it(
    'after a reboot, pods created before the agent is back: ambient ones never start unmeshed, plain ones start',
    { timeout: 120_000 },
    async (t) => {
      const topo = new Topology();
      const dir = mkdtempSync(join(tmpdir(), `${TEST_PREFIX}-life-`));
      const root = testBpffsRoot(topo.id);
      const run = join(dir, 'run'); // /var/run: a tmpfs, empty after a reboot
      const pluginSocket = join(run, 'cni.sock');
      const policyFile = join(dir, 'lib', 'cni-policy'); // /var/lib: survives it
      const ztunnelSocket = join(run, 'ztunnel.sock');
      writeFileSync(join(dir, 'pods.yaml'), POD_FILE);
      const node = await topo.netns('node');
      const entry = { type: 'ambient-bpf-cni', agent_socket: pluginSocket, policy_file: policyFile };
      const agentOpts = {
        nodeName: 'node-a',
        source: { localPods: join(dir, 'pods.yaml') },
        ztunnelSocket,
        pluginSocket,
        cniPolicyFile: policyFile,
        bpffs: root,
        hostRoot: '/',
        attachMode: 'auto' as const,
        log: silentLogger,
      };
      let agent = new Agent(agentOpts);
      const standIn = new ZtunnelStandIn({ socketPath: ztunnelSocket });
      t.after(async () => {
        standIn.stop();
        agent.stop();
        await removeDatapath(root);
        await topo.cleanup();
        rmSync(dir, { recursive: true, force: true });
      });
      await agent.start();
      agent.stop();

      // The reboot: the agent is not running, /var/run and the bpffs pins are gone.
      rmSync(run, { recursive: true, force: true });
      await removeDatapath(root);
      const add = (namespace: string, name: string) => pluginAdd(node, entry, namespace, name);
      const unreachable =
        /the ambient-bpf agent is not reachable at .*cni\.sock .*check the ambient-bpf DaemonSet pod on this node and its logs/;
      assertCniError(await add('shop', 'cart'), 11, /shop\/cart: the policy says it is ambient/, 'a known ambient pod');
      assertCniError(await add('shop', 'cart-2'), 11, /its namespace is ambient/, 'a new pod in an ambient namespace');
      assertCniError(await add('mixed', 'opt'), 11, /the policy says it is ambient/, 'a known pod labelled ambient');
      assertCniError(
        await add('mixed', 'new'),
        11,
        /it may be ambient: pods of its namespace opt in by label/,
        'a new pod where pods opt in by label',
      );
      assertCniError(
        await add('created-meanwhile', 'x'),
        11,
        /it may be ambient: its namespace is not in the policy/,
        'a pod of a namespace the agent never saw',
      );
      assertCniError(await add('shop', 'cart'), 11, unreachable, 'the message names the agent and what to check');
      assertStarts(await add('plain', 'web'), 'a known plain pod');
      assertStarts(await add('plain', 'web-2'), 'a new pod in a plain namespace');
      assertStarts(await add('mixed', 'other'), 'a known plain pod where others opt in by label');
      // A new pod under a known pod's name (another uid: a StatefulSet's pod made again, maybe now
      // labelled ambient) is not judged by the earlier pod's line.
      assertCniError(
        await pluginAdd(node, entry, 'mixed', 'other', undefined, 'uid-other-2'),
        11,
        /it may be ambient: pods of its namespace opt in by label/,
        'a new pod with a known pod’s name',
      );
      assertStarts(await add('kube-system', 'coredns'), 'an excluded namespace');

      // With --unseen-pods=hold, a new pod of a plain namespace waits for the agent too (it may opt
      // in by its own label); known pods and excluded namespaces are decided as before.
      const policy = readFileSync(policyFile, 'utf8');
      const holding = new Agent({ ...agentOpts, selection: { unseenPods: 'hold' } });
      await holding.start();
      holding.stop();
      rmSync(run, { recursive: true, force: true });
      await removeDatapath(root);
      assertCniError(
        await add('plain', 'web-2'),
        11,
        /plain\/web-2: it may be ambient: the agent holds pods it has not seen \(--unseen-pods=hold\)/,
        'a new pod in a plain namespace, held',
      );
      assertStarts(await add('plain', 'web'), 'a known plain pod, held policy');
      assertStarts(await add('kube-system', 'coredns'), 'an excluded namespace, held policy');
      assertCniError(
        await add('shop', 'cart-2'),
        11,
        /its namespace is ambient/,
        'a new pod in an ambient namespace, held policy',
      );
      writeFileSync(policyFile, policy);

      // Decision data that is not whole (cut short) or lost: nobody can decide, so it fails closed.
      writeFileSync(policyFile, policy.replace(/\nend\n$/, '\n'));
      assertCniError(await add('plain', 'web'), 11, /the policy at .* is incomplete/, 'an incomplete policy');
      rmSync(policyFile);
      assertCniError(await add('plain', 'web'), 11, /no policy at .*cni-policy/, 'no policy');
      assertCniError(await add('kube-system', 'coredns'), 11, /no policy/, 'no policy, even for an excluded namespace');
      // DEL never waits for anyone.
      const del = await execPlugin(
        node,
        'ambient-bpf-cni',
        {
          CNI_COMMAND: 'DEL',
          CNI_CONTAINERID: 'c',
          CNI_NETNS: '',
          CNI_IFNAME: 'eth0',
          CNI_ARGS: 'K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart',
        },
        JSON.stringify({ cniVersion: '1.0.0', name: 'k8s', ...entry }),
      );
      assert.equal(del.code, 0, del.stdout);

      // The agent is back: the policy is written again and the ambient pod starts, redirected.
      agent = new Agent(agentOpts);
      await agent.start();
      standIn.start();
      await until(() => standIn.connected, 'stand-in connected');
      assert.equal(readFileSync(policyFile, 'utf8'), policy);
      const list: Conflist = {
        cniVersion: '1.0.0',
        name: `${TEST_PREFIX}-${topo.id}`,
        plugins: [
          {
            type: 'bridge',
            bridge: 'cni0',
            isGateway: true,
            ipMasq: false,
            ipam: { type: 'host-local', ranges: [[{ subnet: '198.18.110.0/24' }]], dataDir: join(dir, 'ipam') },
          },
          entry,
        ],
      };
      const cart = {
        containerId: 'c-cart',
        netns: Topology.netnsPath(await topo.netns('cart')),
        args: 'IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart;K8S_POD_UID=uid-cart',
      };
      const added = await chainAdd(node, list, cart);
      assert.equal(added.last.code, 0, added.last.stdout);
      const dp = await Datapath.open({ bpffsRoot: root });
      t.after(() => dp.close());
      assert.deepEqual(
        (await dp.list()).map((p) => p.uid),
        ['uid-cart'],
      );
    },
  );

  it(
    'SIGTERM: an upgrade (or an API that cannot say) leaves everything; a deleted DaemonSet takes ambient-bpf off the node; uninstall finishes the job',
    { timeout: 120_000 },
    async (t) => {
      const topo = new Topology();
      const dir = mkdtempSync(join(tmpdir(), `${TEST_PREFIX}-life-`));
      const root = testBpffsRoot(topo.id);
      const net = await podWithRemote(topo, 111);
      const binDir = join(dir, 'bin');
      const confDir = join(dir, 'net.d');
      mkdirSync(binDir);
      mkdirSync(confDir);
      const conflist = join(confDir, '10-bridge.conflist');
      writeFileSync(conflist, JSON.stringify({ cniVersion: '1.0.0', name: 'k8s', plugins: [{ type: 'bridge' }] }));
      const policyFile = join(dir, 'lib', 'cni-policy');
      const api = new KubeApiTestServer();
      await api.start();
      writeFileSync(join(dir, 'kubeconfig'), api.kubeconfigYaml());
      api.upsert('namespaces', {
        apiVersion: 'v1',
        kind: 'Namespace',
        metadata: { name: 'shop', labels: { 'istio.io/dataplane-mode': 'ambient' } },
      });
      api.upsert('pods', {
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: { name: 'cart', namespace: 'shop', uid: `uid-cart-${topo.id}` },
        spec: { nodeName: 'node-a' },
        status: { phase: 'Running', podIP: net.podV4 },
      });
      // A pod of another node: none of this node's business.
      api.upsert('pods', {
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: {
          name: 'far',
          namespace: 'shop',
          uid: 'uid-far',
          annotations: { [REDIRECTION_ANNOTATION]: 'enabled' },
        },
        spec: { nodeName: 'node-b' },
      });
      const daemonSet = {
        apiVersion: 'apps/v1',
        kind: 'DaemonSet',
        metadata: { name: 'ambient-bpf', namespace: 'istio-system' },
      };
      api.daemonSets.set('istio-system/ambient-bpf', daemonSet);
      const args = [
        '--kubeconfig',
        join(dir, 'kubeconfig'),
        '--node-name',
        'node-a',
        '--daemonset',
        'istio-system/ambient-bpf',
        '--ztunnel-socket',
        join(dir, 'z.sock'),
        '--plugin-socket',
        join(dir, 'cni.sock'),
        '--status-socket',
        join(dir, 'status.sock'),
        '--cni-policy-file',
        policyFile,
        '--bpffs',
        root,
        '--install-cni',
        '--cni-bin-dir',
        binDir,
        '--cni-conf-dir',
        confDir,
      ];
      const port = await fixedListenPort();
      args.push('--health-addr', `127.0.0.1:${port}`);
      const ready = async () =>
        (await fetch(`http://127.0.0.1:${port}/readyz`).catch(() => ({ status: 0 }))).status === 200;
      const agents: ReturnType<typeof runAgent>[] = [];
      t.after(async () => {
        for (const a of agents) a.kill('SIGKILL');
        await api.close();
        await removeDatapath(root);
        await topo.cleanup();
        rmSync(dir, { recursive: true, force: true });
      });
      const annotation = (name = 'cart') =>
        (api.get('pods', name, 'shop')?.metadata as { annotations?: Record<string, string> }).annotations?.[
          REDIRECTION_ANNOTATION
        ];
      const entryTypes = () =>
        (JSON.parse(readFileSync(conflist, 'utf8')) as { plugins: { type: string }[] }).plugins.map((p) => p.type);
      const attached = async () => {
        if (!existsSync(root)) return 0;
        const dp = await Datapath.open({ bpffsRoot: root });
        try {
          return (await dp.list()).length;
        } finally {
          dp.close();
        }
      };
      const start = async (extra: string[] = []) => {
        const agent = runAgent([...args, ...extra]);
        agents.push(agent);
        await until(
          async () => (await ready()) && annotation() === 'pending' && (await attached()) === 1,
          () => `ready, the pod redirected (${agent.stderr()})`,
          15_000,
        );
        return agent;
      };
      const stop = async (agent: ReturnType<typeof runAgent>) => {
        agent.kill('SIGTERM');
        assert.equal(await agent.exited, 0, agent.stderr());
      };
      const everythingInPlace = async (what: string) => {
        assert.deepEqual(entryTypes(), ['bridge', 'ambient-bpf-cni'], what);
        assert.ok(existsSync(join(binDir, 'ambient-bpf-cni')), what);
        assert.ok(existsSync(policyFile), what);
        assert.equal(await attached(), 1, what);
        assert.equal(annotation(), 'pending', what);
      };

      // An upgrade or a restart: the DaemonSet is there.
      await stop(await start());
      await everythingInPlace('after a restart');
      // The API cannot say: nothing is removed on a guess.
      let agent = await start();
      api.failNext(1_000_000);
      await stop(agent);
      api.failNext(0);
      assert.match(
        agent.stderr(),
        /cannot tell whether the DaemonSet is being deleted or leaves this node; leaving everything in place/,
      );
      await everythingInPlace('after a stop the API could not explain');

      // The DaemonSet still selects this node by its labels: an upgrade, everything stays. Its node
      // unknown to the API: nothing is removed on a guess.
      /** node-a, as kubelet registers it, in a node pool. */
      const labelNode = (pool: string) =>
        api.nodes.set('node-a', {
          apiVersion: 'v1',
          kind: 'Node',
          metadata: { name: 'node-a', labels: { 'kubernetes.io/os': 'linux', pool } },
        });
      const linuxOnly = {
        ...daemonSet,
        spec: { template: { spec: { nodeSelector: { 'kubernetes.io/os': 'linux' } } } },
      };
      api.daemonSets.set('istio-system/ambient-bpf', linuxOnly);
      labelNode('mesh');
      agent = await start();
      await stop(agent);
      assert.match(agent.stderr(), /the DaemonSet still runs on this node \(an upgrade or a restart\)/);
      await everythingInPlace('after a restart of a DaemonSet that selects the node');
      api.nodes.delete('node-a');
      agent = await start();
      await stop(agent);
      assert.match(agent.stderr(), /nodes \\?"node-a\\?" not found.*leaving everything in place/);
      await everythingInPlace('after a stop on a node the API does not know');

      // The DaemonSet no longer selects this node for a moment only (a selector edit ahead of the
      // labels it needs, set right): asked again after a few seconds, it does; everything stays.
      labelNode('mesh');
      const otherPool = {
        ...daemonSet,
        spec: { template: { spec: { nodeSelector: { 'kubernetes.io/os': 'linux', pool: 'other' } } } },
      };
      agent = await start();
      api.daemonSets.set('istio-system/ambient-bpf', otherPool);
      const stopping = stop(agent);
      await sleep(500);
      labelNode('other');
      await stopping;
      assert.match(agent.stderr(), /the DaemonSet still runs on this node/);
      await everythingInPlace('after a deselection that was undone within the confirmation');

      // For good (its nodeSelector changed, as when a node pool leaves the mesh): the plugin, its
      // entry and the policy go, as for a deletion, but the pods stay redirected (a deselection is
      // as easily undone), whatever --keep-pod-redirection says.
      labelNode('mesh');
      api.daemonSets.set('istio-system/ambient-bpf', linuxOnly);
      agent = await start();
      api.daemonSets.set('istio-system/ambient-bpf', otherPool);
      await stop(agent);
      assert.match(
        agent.stderr(),
        /the DaemonSet no longer selects node node-a .*: removing ambient-bpf from the node \(the pods stay redirected/,
      );
      assert.deepEqual(entryTypes(), ['bridge']);
      assert.equal(existsSync(policyFile), false);
      assert.equal(await attached(), 1, 'a deselection unredirected the pod');
      api.daemonSets.set('istio-system/ambient-bpf', daemonSet);

      // The DaemonSet is being deleted: entry, binary, policy, redirection and annotation go.
      agent = await start();
      api.daemonSets.set('istio-system/ambient-bpf', {
        ...daemonSet,
        metadata: { ...daemonSet.metadata, deletionTimestamp: new Date().toISOString() },
      });
      await stop(agent);
      assert.deepEqual(entryTypes(), ['bridge']);
      assert.equal(existsSync(join(binDir, 'ambient-bpf-cni')), false);
      assert.equal(existsSync(policyFile), false);
      assert.equal(await attached(), 0);
      assert.equal(existsSync(root), false, 'the bpffs root is left');
      assert.equal(annotation(), undefined);
      assert.equal(annotation('far'), 'enabled', 'another node’s pod was touched');

      // Deleted outright (NotFound), with --keep-pod-redirection: the plugin goes, the pod stays
      // redirected and annotated.
      api.daemonSets.set('istio-system/ambient-bpf', daemonSet);
      agent = await start(['--keep-pod-redirection']);
      api.daemonSets.delete('istio-system/ambient-bpf');
      await stop(agent);
      assert.deepEqual(entryTypes(), ['bridge']);
      assert.equal(existsSync(policyFile), false);
      assert.equal(await attached(), 1);
      assert.equal(annotation(), 'pending');

      // A half-finished removal (plugin gone, pods still redirected) converges when an agent starts
      // again: everything is back, the pod adopted, not attached twice.
      api.daemonSets.set('istio-system/ambient-bpf', daemonSet);
      const patches = api.patches.length;
      await stop(await start());
      await everythingInPlace('after an agent started on a half-removed node');
      assert.equal(api.patches.length, patches, 'the adopted pod was annotated again');

      // uninstall: without the API it says what it could not do; a second run with it finishes.
      const uninstall = [
        'uninstall',
        '--cni-bin-dir',
        binDir,
        '--cni-conf-dir',
        confDir,
        '--cni-policy-file',
        policyFile,
        '--bpffs',
        root,
        '--node-name',
        'node-a',
      ];
      writeFileSync(
        join(dir, 'kubeconfig-down'),
        api.kubeconfigYaml().replace(/server: .*/, 'server: http://127.0.0.1:1'),
      );
      const down = await runCli([...uninstall, '--kubeconfig', join(dir, 'kubeconfig-down')]);
      assert.equal(down.code, 1, down.stderr);
      assert.match(down.stdout, /removed the redirection of pod uid-cart-/);
      assert.match(
        down.stderr,
        /could not remove the ambient\.istio\.io\/redirection annotations of node node-a's pods: .*ECONNREFUSED/,
      );
      assert.equal(await attached(), 0);
      assert.equal(annotation(), 'pending');
      const up = await runCli([...uninstall, '--kubeconfig', join(dir, 'kubeconfig')]);
      assert.equal(up.code, 0, up.stderr);
      assert.match(up.stdout, /removed the ambient\.istio\.io\/redirection annotation from 1 pod of node node-a/);
      assert.equal(annotation(), undefined);
      assert.equal(annotation('far'), 'enabled', 'another node’s pod was touched');
    },
  );

  it(
    'an agent that accepts no connection (its listen queue full): the plugin gives up after its connect timeout and decides alone',
    { timeout: 60_000 },
    async (t) => {
      const topo = new Topology();
      const dir = mkdtempSync(join(tmpdir(), `${TEST_PREFIX}-life-`));
      const node = await topo.netns('node');
      const socketPath = join(dir, 'cni.sock');
      const policyFile = join(dir, 'cni-policy');
      writeFileSync(policyFile, 'ambient-bpf-cni-policy 1\nnamespace shop ambient\nnamespace plain none\nend\n');
      // A listener that never accepts, with a queue of one, filled by its own first connection: the
      // next connect() waits for room, as it does on an agent hung under a burst of pod starts.
      const hung = spawn(
        'python3',
        [
          '-c',
          `import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(0)
c = socket.socket(socket.AF_UNIX); c.connect(sys.argv[1])
print('ready', flush=True); time.sleep(120)`,
          socketPath,
        ],
        { stdio: ['ignore', 'pipe', 'inherit'] },
      );
      t.after(async () => {
        hung.kill('SIGKILL');
        await topo.cleanup();
        rmSync(dir, { recursive: true, force: true });
      });
      await new Promise<void>((resolve, reject) => {
        hung.stdout.once('data', () => resolve());
        hung.once('exit', (code) => reject(new Error(`the hung listener exited (${code})`)));
      });
      const entry = { type: 'ambient-bpf-cni', agent_socket: socketPath, policy_file: policyFile };
      const began = Date.now();
      const [ambient, plain] = await Promise.all([
        pluginAdd(node, entry, 'shop', 'new'),
        pluginAdd(node, entry, 'plain', 'new'),
      ]);
      const took = Date.now() - began;
      assert.ok(took >= 9_000 && took < 30_000, `the plugin gave up after ${took} ms (its connect timeout is 10 s)`);
      assertCniError(
        ambient,
        11,
        /shop\/new: its namespace is ambient, and the ambient-bpf agent is not reachable at .*cni\.sock \(Connection timed out\)/,
        'a new ambient pod, agent not accepting',
      );
      assertStarts(plain, 'a plain pod, agent not accepting');
    },
  );

  it(
    'a long agent outage: enrolled pods keep working, new ambient pods fail naming the agent, plain pods start',
    { timeout: 300_000 },
    async (t) => {
      const topo = new Topology();
      const dir = mkdtempSync(join(tmpdir(), `${TEST_PREFIX}-life-`));
      const root = testBpffsRoot(topo.id);
      const net = await podWithRemote(topo, 112);
      const node = await topo.netns('node');
      const pluginSocket = join(dir, 'cni.sock');
      const policyFile = join(dir, 'lib', 'cni-policy');
      const ztunnelSocket = join(dir, 'z.sock');
      writeFileSync(
        join(dir, 'pods.yaml'),
        `${POD_FILE}---\napiVersion: v1\nkind: Pod\nmetadata: { name: checkout, namespace: shop, uid: uid-checkout-${topo.id} }\nstatus: { phase: Running, podIP: ${net.podV4} }\n`,
      );
      const agent = runAgent([
        '--local-pods',
        join(dir, 'pods.yaml'),
        '--node-name',
        'node-a',
        '--ztunnel-socket',
        ztunnelSocket,
        '--plugin-socket',
        pluginSocket,
        '--status-socket',
        join(dir, 'status.sock'),
        '--cni-policy-file',
        policyFile,
        '--bpffs',
        root,
      ]);
      const standIn = new ZtunnelStandIn({ socketPath: ztunnelSocket });
      const remote = await RecordingServer.start('remote', {
        netns: Topology.netnsPath(net.remote),
        family: 4,
        address: net.remoteV4,
        port: 8080,
      });
      t.after(async () => {
        agent.kill('SIGCONT');
        agent.kill('SIGKILL');
        standIn.stop();
        await remote.close();
        await removeDatapath(root);
        await topo.cleanup();
        rmSync(dir, { recursive: true, force: true });
      });
      standIn.start();
      await until(
        () => standIn.stats().some((p) => p.name === 'checkout'),
        () => `pod enrolled and acked (${agent.stderr()})`,
        15_000,
      );
      const throughZtunnel = async (what: string) => {
        const before = standIn.stats().find((p) => p.name === 'checkout')?.stats.outbound.connections ?? 0;
        assert.equal(await whoAnswers({ netns: net.podPath, host: net.remoteV4, port: 8080 }), 'remote', what);
        assert.equal(
          standIn.stats().find((p) => p.name === 'checkout')?.stats.outbound.connections,
          before + 1,
          `${what}: not through ztunnel`,
        );
      };
      await throughZtunnel('agent up');
      const entry = { type: 'ambient-bpf-cni', agent_socket: pluginSocket, policy_file: policyFile };
      const unreachable =
        /shop\/new: its namespace is ambient, and the ambient-bpf agent is not reachable at .*cni\.sock \((.*)\): check the ambient-bpf DaemonSet pod on this node and its logs/;

      // Hung (stopped): the plugin connects, waits out its reply timeout (60 s), then decides alone.
      agent.kill('SIGSTOP');
      const began = Date.now();
      const [ambient, plain] = await Promise.all([
        pluginAdd(node, entry, 'shop', 'new'),
        pluginAdd(node, entry, 'plain', 'new'),
        throughZtunnel('agent stopped'),
      ]);
      assert.ok(Date.now() - began >= 59_000, `the plugin gave up after ${Date.now() - began} ms`);
      assertCniError(ambient, 11, unreachable, 'a new ambient pod, agent hung');
      assertStarts(plain, 'a plain pod, agent hung');

      // Gone (killed), long past every timeout: the same, at once; the enrolled pod still works.
      agent.kill('SIGKILL');
      await agent.exited;
      await sleep(2_000);
      const t0 = Date.now();
      assertCniError(await pluginAdd(node, entry, 'shop', 'new'), 11, unreachable, 'a new ambient pod, agent gone');
      assertStarts(await pluginAdd(node, entry, 'plain', 'new'), 'a plain pod, agent gone');
      assert.ok(Date.now() - t0 < 5_000, 'the plugin waited for an agent that is gone');
      await throughZtunnel(`agent out for ${Math.round((Date.now() - began) / 1000)} s`);
    },
  );
});
