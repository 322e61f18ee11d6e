// CNI chaining executed as runtimes do it: Debian's bridge + host-local create the pod's interface
// in real namespaces, then ambient-bpf-cni (the static binary) relays to the agent. Ambient pods
// are redirected and acked before ADD returns, or ADD fails (fail closed); other pods pass
// through, also while the agent is down; bad input gets CNI errors. Next to upstream istio-cni in
// sidecar mode (a recording stand-in for its plugin, in the conflist where upstream's installer
// puts it): each plugin leaves the other's pods alone and both see the right prevResult.
import assert from 'node:assert/strict';
import {
  chmodSync,
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
import { PLUGIN_BINARY_PATH } from '../cni-agent/src/commands/agent.js';
import { CniInstaller } from '../cni-agent/src/installer/installer.js';
import { silentLogger } from '../ztunnel-bridge/src/logger.js';
import { ZtunnelStandIn } from '../ztunnel-bridge/src/standin/ztunnel.js';
import { chainAdd, chainDel, execPlugin, type Conflist } from './helpers/cni-runtime.js';
import { kernelTest, TEST_PREFIX, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft, removeDatapath } from './helpers/leftovers.js';
import { Topology } from './helpers/topology.js';
import { RecordingServer, whoAnswers } from './helpers/traffic.js';
import { until } from './helpers/wait.js';

after(assertNothingLeft);

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
kind: Pod
metadata: { name: cart, namespace: shop, uid: uid-cart }
---
apiVersion: v1
kind: Pod
metadata: { name: podman-pod, namespace: default, uid: uid-podman, labels: { istio.io/dataplane-mode: ambient } }
`;

describe('CNI chaining', kernelTest(), () => {
  it(
    'chains after bridge + host-local: fail closed for ambient pods, pass-through for the others, agent up and down',
    { timeout: 120_000 },
    async (t) => {
      const topo = new Topology();
      const dir = mkdtempSync(join(tmpdir(), 'abt-cni-'));
      const root = testBpffsRoot(topo.id);
      const pluginSocket = join(dir, 'run', 'cni.sock');
      const cniPolicyFile = join(dir, 'lib', 'cni-policy');
      const ztunnelSocket = join(dir, 'ztunnel.sock');
      writeFileSync(join(dir, 'pods.yaml'), POD_FILE);
      const node = await topo.netns('node');
      const list = (cniVersion: string): Conflist => ({
        cniVersion,
        name: `abt-${topo.id}`,
        plugins: [
          {
            type: 'bridge',
            bridge: 'cni0',
            isGateway: true,
            ipMasq: false,
            ipam: {
              type: 'host-local',
              ranges: [[{ subnet: '198.18.70.0/24' }]],
              routes: [{ dst: '0.0.0.0/0' }],
              dataDir: join(dir, 'ipam'),
            },
          },
          { type: 'ambient-bpf-cni', agent_socket: pluginSocket, policy_file: cniPolicyFile },
        ],
      });
      const podNs = async (name: string) => Topology.netnsPath(await topo.netns(name));
      const agentOpts = {
        nodeName: 'node-a',
        source: { localPods: join(dir, 'pods.yaml') },
        ztunnelSocket,
        pluginSocket,
        cniPolicyFile,
        bpffs: root,
        hostRoot: '/',
        attachMode: 'auto' as const,
        log: silentLogger,
      };
      let agent = new Agent(agentOpts);
      const standIn = new ZtunnelStandIn({ socketPath: ztunnelSocket });
      const nodeServer = await RecordingServer.start('node-server', {
        netns: Topology.netnsPath(node),
        family: 4,
        address: '0.0.0.0',
        port: 8080,
      });
      t.after(async () => {
        standIn.stop();
        agent.stop();
        await nodeServer.close();
        await removeDatapath(root);
        await topo.cleanup();
        rmSync(dir, { recursive: true, force: true });
      });
      await agent.start();
      standIn.start();
      const dp = await Datapath.open({ bpffsRoot: root });
      t.after(() => dp.close());
      const attached = async () => (await dp.list()).map((p) => p.uid).sort();

      // VERSION: answered by the binary itself.
      const version = await execPlugin(node, 'ambient-bpf-cni', { CNI_COMMAND: 'VERSION' }, '{"cniVersion":"1.0.0"}');
      assert.deepEqual(JSON.parse(version.stdout), {
        cniVersion: '1.0.0',
        supportedVersions: ['0.3.0', '0.3.1', '0.4.0', '1.0.0', '1.1.0'],
      });

      // An ambient pod: redirected and acked before ADD returns; prevResult passes through unchanged.
      await until(() => standIn.connected, 'stand-in connected');
      const cart = {
        containerId: 'c-cart',
        netns: await podNs('cart'),
        args: 'IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart;K8S_POD_UID=uid-cart;K8S_POD_INFRA_CONTAINER_ID=c-cart',
      };
      const added = await chainAdd(node, list('1.0.0'), cart);
      assert.equal(added.last.code, 0, added.last.stdout + added.last.stderr);
      assert.deepEqual(JSON.parse(added.last.stdout), added.results[0]);
      assert.deepEqual(await attached(), ['uid-cart']);
      assert.deepEqual(
        standIn.stats().map((p) => p.name),
        ['cart'],
      );
      assert.equal(await whoAnswers({ netns: cart.netns, host: '198.18.70.1', port: 8080 }), 'node-server');
      assert.equal(standIn.stats()[0]!.stats.outbound.connections, 1, 'the connection did not go through ztunnel');
      const check = await execPlugin(
        node,
        'ambient-bpf-cni',
        {
          CNI_COMMAND: 'CHECK',
          CNI_CONTAINERID: 'c-cart',
          CNI_NETNS: cart.netns,
          CNI_IFNAME: 'eth0',
          CNI_ARGS: cart.args,
        },
        JSON.stringify({ ...list('1.0.0').plugins[1], cniVersion: '1.0.0', name: 'n', prevResult: added.results[0] }),
      );
      assert.equal(check.code, 0, check.stdout);

      // Non-ambient pods pass through for every CNI version the reference plugins speak.
      for (const v of ['0.3.1', '0.4.0', '1.0.0']) {
        const inv = {
          containerId: `c-plain-${v}`,
          netns: await podNs(`plain${v.replace(/\./g, '')}`),
          args: `IgnoreUnknown=1;K8S_POD_NAMESPACE=plain;K8S_POD_NAME=api-${v}`,
        };
        const r = await chainAdd(node, list(v), inv);
        assert.equal(r.last.code, 0, `${v}: ${r.last.stdout}`);
        assert.deepEqual(JSON.parse(r.last.stdout), r.results[0]);
      }
      assert.deepEqual(await attached(), ['uid-cart']);

      // podman passes only K8S_POD_NAME: the namespace is "default".
      const podman = {
        containerId: 'c-podman',
        netns: await podNs('podman'),
        args: 'IgnoreUnknown=1;K8S_POD_NAME=podman-pod',
      };
      assert.equal((await chainAdd(node, list('1.0.0'), podman)).last.code, 0);
      assert.deepEqual(await attached(), ['uid-cart', 'uid-podman']);

      // DEL unenrols.
      assert.ok((await chainDel(node, list('1.0.0'), cart)).every((r) => r.code === 0));
      await until(async () => (await attached()).join() === 'uid-podman', 'cart detached');
      assert.deepEqual(
        standIn.stats().map((p) => p.name),
        ['podman-pod'],
      );

      // ztunnel down: an ambient pod's ADD fails (the runtime retries); a plain pod still starts.
      standIn.stop();
      await until(async () => (await agent.metrics()).includes('ambient_bpf_ztunnel_connections 0'), 'ztunnel gone');
      const cart2 = { ...cart, containerId: 'c-cart2', netns: await podNs('cart2') };
      const refused = await chainAdd(node, list('1.0.0'), cart2);
      assertCniError(refused.last, 11, /ambient pod shop\/cart is not ready: ztunnel unreachable/);

      // The agent down: ambient pods fail closed from the policy file; others pass; DEL succeeds.
      agent.stop();
      assert.match(readFileSync(cniPolicyFile, 'utf8'), /^namespace shop ambient$/m);
      const cart3 = { ...cart, containerId: 'c-cart3', netns: await podNs('cart3') };
      const down = await chainAdd(node, list('1.0.0'), cart3);
      assertCniError(down.last, 11, /agent is not reachable/);
      const plainDown = await chainAdd(node, list('1.0.0'), {
        containerId: 'c-plain-down',
        netns: await podNs('plaindown'),
        args: 'IgnoreUnknown=1;K8S_POD_NAMESPACE=plain;K8S_POD_NAME=late',
      });
      assert.equal(plainDown.last.code, 0, plainDown.last.stdout);
      assert.deepEqual(JSON.parse(plainDown.last.stdout), plainDown.results[0]);
      assert.ok((await chainDel(node, list('1.0.0'), cart3)).every((r) => r.code === 0));

      // The agent counted the CNI requests it answered, by result.
      assert.match(await agent.metrics(), /ambient_bpf_cni_requests_total\{command="ADD",result="11"\} 1/);

      // Bad input, with the agent back.
      agent = new Agent(agentOpts);
      await agent.start();
      const plugin = (env: Record<string, string>, stdin: string) => execPlugin(node, 'ambient-bpf-cni', env, stdin);
      const base = {
        CNI_COMMAND: 'ADD',
        CNI_CONTAINERID: 'x',
        CNI_NETNS: cart.netns,
        CNI_IFNAME: 'eth0',
        CNI_ARGS: '',
      };
      const conf = (extra: object) =>
        JSON.stringify({
          cniVersion: '1.0.0',
          name: 'n',
          type: 'ambient-bpf-cni',
          agent_socket: pluginSocket,
          ...extra,
        });
      const bad: [Record<string, string>, string, number, RegExp][] = [
        [base, 'not json', 6, /not a JSON object/],
        [{ ...base, CNI_COMMAND: '' }, conf({}), 4, /CNI_COMMAND is not set/],
        [{ ...base, CNI_COMMAND: 'FROB' }, conf({}), 4, /unknown CNI_COMMAND FROB/],
        [base, conf({ cniVersion: '9.9.9' }), 1, /9\.9\.9 is not supported/],
        [base, conf({}), 7, /no prevResult/],
        [{ ...base, CNI_NETNS: '' }, conf({ prevResult: { ips: [] } }), 4, /CNI_NETNS is not set/],
        [base, JSON.stringify({ name: 'n', agent_socket: pluginSocket }), 7, /no cniVersion/],
      ];
      // CNI_NETNS tricks for an ambient pod: only a pod netns where runtimes put them is acted on.
      const ambient = { ...base, CNI_ARGS: 'K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart;K8S_POD_UID=uid-cart' };
      const withIps = conf({ prevResult: { cniVersion: '1.0.0', ips: [{ address: '198.18.70.9/24' }] } });
      const link = `/var/run/netns/${TEST_PREFIX}-link-${topo.id}`;
      symlinkSync(cart.netns, link);
      t.after(() => rmSync(link, { force: true }));
      bad.push(
        [
          { ...ambient, CNI_NETNS: '/etc/passwd' },
          withIps,
          4,
          /CNI_NETNS: \/etc\/passwd is not in \/var\/run\/netns or \/run\/netns/,
        ],
        [{ ...ambient, CNI_NETNS: '/var/run/netns/../../etc/passwd' }, withIps, 4, /is not a plain absolute path/],
        [{ ...ambient, CNI_NETNS: link }, withIps, 4, /is a symbolic link/],
        [{ ...ambient, CNI_NETNS: '/var/run/netns/none-such' }, withIps, 4, /none-such: ENOENT/],
        [
          { ...ambient, CNI_NETNS: `/proc/${process.pid}/ns/net` },
          withIps,
          4,
          /is the node's own network namespace, not a pod's/,
        ],
      );
      for (const [env, stdin, code, msg] of bad) {
        assertCniError(await plugin(env, stdin), code, msg);
      }
      assert.match(await agent.metrics(), /ambient_bpf_cni_requests_total\{command="ADD",result="1"\} 1/);
    },
  );

  it(
    'a DEL for another sandbox of the pod changes nothing, also after an agent restart; the enrolled sandbox’s DEL unenrols',
    { timeout: 120_000 },
    async (t) => {
      const topo = new Topology();
      const dir = mkdtempSync(join(tmpdir(), `${TEST_PREFIX}-cni-`));
      const root = testBpffsRoot(topo.id);
      const pluginSocket = join(dir, 'run', 'cni.sock');
      const cniPolicyFile = join(dir, 'lib', 'cni-policy');
      const ztunnelSocket = join(dir, 'ztunnel.sock');
      writeFileSync(join(dir, 'pods.yaml'), POD_FILE);
      const node = await topo.netns('node');
      const list: Conflist = {
        cniVersion: '1.0.0',
        name: `${TEST_PREFIX}-${topo.id}`,
        plugins: [
          {
            type: 'bridge',
            bridge: 'cni0',
            isGateway: true,
            ipMasq: false,
            ipam: {
              type: 'host-local',
              ranges: [[{ subnet: '198.18.71.0/24' }]],
              routes: [{ dst: '0.0.0.0/0' }],
              dataDir: join(dir, 'ipam'),
            },
          },
          { type: 'ambient-bpf-cni', agent_socket: pluginSocket, policy_file: cniPolicyFile },
        ],
      };
      const agentOpts = {
        nodeName: 'node-a',
        source: { localPods: join(dir, 'pods.yaml') },
        ztunnelSocket,
        pluginSocket,
        cniPolicyFile,
        bpffs: root,
        hostRoot: '/',
        attachMode: 'auto' as const,
        log: silentLogger,
      };
      let agent = new Agent(agentOpts);
      const standIn = new ZtunnelStandIn({ socketPath: ztunnelSocket });
      const nodeServer = await RecordingServer.start('node-server', {
        netns: Topology.netnsPath(node),
        family: 4,
        address: '0.0.0.0',
        port: 8080,
      });
      t.after(async () => {
        standIn.stop();
        agent.stop();
        await nodeServer.close();
        await removeDatapath(root);
        await topo.cleanup();
        rmSync(dir, { recursive: true, force: true });
      });
      await agent.start();
      standIn.start();
      const dp = await Datapath.open({ bpffsRoot: root });
      t.after(() => dp.close());
      const attached = async () => (await dp.list()).map((p) => p.uid).sort();
      const outbound = () => standIn.stats().find((p) => p.name === 'cart')?.stats.outbound.connections ?? 0;
      const captured = async (netns: string) => {
        const before = outbound();
        assert.equal(await whoAnswers({ netns, host: '198.18.71.1', port: 8080 }), 'node-server');
        return outbound() === before + 1;
      };
      await until(() => standIn.connected, 'stand-in connected');

      const args = 'IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart;K8S_POD_UID=uid-cart';
      const sandboxA = {
        containerId: 'sandbox-a',
        netns: Topology.netnsPath(await topo.netns('cart-a')),
        args: `${args};K8S_POD_INFRA_CONTAINER_ID=sandbox-a`,
      };
      // An earlier sandbox of the same pod whose DEL the runtime retries; its netns may still exist.
      const sandboxB = {
        containerId: 'sandbox-b',
        netns: Topology.netnsPath(await topo.netns('cart-b')),
        args: `${args};K8S_POD_INFRA_CONTAINER_ID=sandbox-b`,
      };
      const added = await chainAdd(node, list, sandboxA);
      assert.equal(added.last.code, 0, added.last.stdout + added.last.stderr);
      assert.deepEqual(await attached(), ['uid-cart']);
      assert.ok(await captured(sandboxA.netns), 'not captured after ADD');
      // The pod source reports the pod's IP, as the API server does once the sandbox is up (a
      // restarted agent knows the pod's IPs only from there).
      const ip = (added.results[0] as { ips: { address: string }[] }).ips[0]!.address.split('/')[0]!;
      writeFileSync(
        join(dir, 'pods.yaml'),
        POD_FILE.replace('uid: uid-cart }', `uid: uid-cart }\nstatus: { podIP: ${ip} }`),
      );
      await until(
        () => agent.status().some((p) => p.uid === 'uid-cart' && p.state === 'enabled'),
        'cart enabled with its IP from the source',
      );

      // A stale DEL (another container ID, another or no netns): nothing changes.
      assert.ok((await chainDel(node, list, sandboxB)).every((r) => r.code === 0));
      assert.ok((await chainDel(node, list, { ...sandboxB, netns: '' })).every((r) => r.code === 0));
      assert.deepEqual(await attached(), ['uid-cart']);
      assert.ok(
        agent.status().some((p) => p.uid === 'uid-cart' && p.state === 'enabled'),
        'the pod is no longer enabled',
      );
      assert.ok(await captured(sandboxA.netns), 'not captured after a stale DEL');

      // The agent restarts: the enrolled sandbox is remembered, a stale DEL still changes nothing.
      agent.stop();
      agent = new Agent(agentOpts);
      await agent.start();
      await until(
        () => agent.status().some((p) => p.uid === 'uid-cart' && p.state === 'enabled'),
        'cart enabled after the restart',
      );
      assert.ok((await chainDel(node, list, { ...sandboxB, netns: '' })).every((r) => r.code === 0));
      assert.deepEqual(await attached(), ['uid-cart']);
      assert.ok(await captured(sandboxA.netns), 'not captured after a stale DEL following a restart');
      const records = join(dir, 'run', 'sandboxes');
      assert.deepEqual(readdirSync(records), ['uid-cart']);

      // Without a record (a pod enrolled while running, e.g. by a label flip): a DEL that names no
      // netns, or another one, while the enrolled netns exists is stale too.
      agent.stop();
      rmSync(records, { recursive: true, force: true });
      agent = new Agent(agentOpts);
      await agent.start();
      await until(
        () => agent.status().some((p) => p.uid === 'uid-cart' && p.state === 'enabled'),
        'cart enabled without a record',
      );
      assert.ok((await chainDel(node, list, { ...sandboxB, netns: '' })).every((r) => r.code === 0));
      assert.ok((await chainDel(node, list, sandboxB)).every((r) => r.code === 0));
      assert.deepEqual(await attached(), ['uid-cart']);
      assert.ok(await captured(sandboxA.netns), 'not captured after a stale DEL without a record');

      // The enrolled sandbox's own DEL unenrols.
      assert.ok((await chainDel(node, list, sandboxA)).every((r) => r.code === 0));
      await until(async () => (await attached()).length === 0, 'cart detached');
      assert.deepEqual(existsSync(records) ? readdirSync(records) : [], [], 'the sandbox record was not removed');
    },
  );

  it(
    'next to upstream istio-cni in sidecar mode: installed before its entry, each leaves the other’s pods alone, prevResult passes through both, uninstall leaves its entry',
    { timeout: 120_000 },
    async (t) => {
      const topo = new Topology();
      const dir = mkdtempSync(join(tmpdir(), `${TEST_PREFIX}-cni-`));
      const root = testBpffsRoot(topo.id);
      const pluginSocket = join(dir, 'run', 'cni.sock');
      const cniPolicyFile = join(dir, 'lib', 'cni-policy');
      const ztunnelSocket = join(dir, 'ztunnel.sock');
      const binDir = join(dir, 'bin');
      const confDir = join(dir, 'net.d');
      const records = join(dir, 'istio-cni.records');
      mkdirSync(binDir);
      mkdirSync(confDir);
      writeFileSync(
        join(dir, 'pods.yaml'),
        `${POD_FILE}---
apiVersion: v1
kind: Pod
metadata: { name: reviews, namespace: shop, uid: uid-reviews, annotations: { sidecar.istio.io/status: '{"containers":["istio-proxy"],"initContainers":null}' } }
`,
      );
      // The stand-in for upstream's plugin: records its command, CNI_* environment and stdin, and
      // answers as upstream's sidecar-mode plugin does for every pod: the prevResult it was given.
      writeFileSync(
        join(binDir, 'istio-cni'),
        `#!${process.execPath}
const fs = require('fs');
const conf = JSON.parse(fs.readFileSync(0, 'utf8') || '{}');
const command = process.env.CNI_COMMAND;
const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => k.startsWith('CNI_')));
if (conf.record_file) fs.appendFileSync(conf.record_file, JSON.stringify({ command, env, stdin: conf }) + '\\n');
if (command === 'VERSION') process.stdout.write(JSON.stringify({ cniVersion: conf.cniVersion, supportedVersions: ['0.3.0', '0.3.1', '0.4.0', '1.0.0'] }));
else if (command === 'ADD') process.stdout.write(JSON.stringify(conf.prevResult ?? { cniVersion: conf.cniVersion }));
`,
      );
      chmodSync(join(binDir, 'istio-cni'), 0o755);
      const recorded = (): { command: string; env: Record<string, string>; stdin: { prevResult?: unknown } }[] =>
        existsSync(records)
          ? readFileSync(records, 'utf8')
              .trim()
              .split('\n')
              .map(
                (l) =>
                  JSON.parse(l) as { command: string; env: Record<string, string>; stdin: { prevResult?: unknown } },
              )
          : [];
      // The node's conflist as upstream's installer leaves it (sidecar mode: ambient off): its entry last.
      const bridge = {
        type: 'bridge',
        bridge: 'cni0',
        isGateway: true,
        ipMasq: false,
        ipam: {
          type: 'host-local',
          ranges: [[{ subnet: '198.18.73.0/24' }]],
          routes: [{ dst: '0.0.0.0/0' }],
          dataDir: join(dir, 'ipam'),
        },
      };
      const istioCni = {
        type: 'istio-cni',
        plugin_log_level: 'info',
        cni_agent_run_dir: join(dir, 'istio-cni'),
        ambient_enabled: false,
        exclude_namespaces: ['kube-system'],
        pod_namespace: 'istio-system',
        record_file: records,
      };
      const confFile = join(confDir, '10-bridge.conflist');
      writeFileSync(
        confFile,
        JSON.stringify(
          { cniVersion: '1.0.0', name: `${TEST_PREFIX}-${topo.id}`, plugins: [bridge, istioCni] },
          null,
          2,
        ),
      );
      const node = await topo.netns('node');
      const agent = new Agent({
        nodeName: 'node-a',
        source: { localPods: join(dir, 'pods.yaml') },
        ztunnelSocket,
        pluginSocket,
        cniPolicyFile,
        bpffs: root,
        hostRoot: '/',
        attachMode: 'auto',
        installCni: { binDir, confDir, binarySource: PLUGIN_BINARY_PATH },
        log: silentLogger,
      });
      const standIn = new ZtunnelStandIn({ socketPath: ztunnelSocket });
      t.after(async () => {
        standIn.stop();
        agent.stop();
        await removeDatapath(root);
        await topo.cleanup();
        rmSync(dir, { recursive: true, force: true });
      });
      await agent.start();
      standIn.start();
      await until(() => standIn.connected, 'stand-in connected');
      const dp = await Datapath.open({ bpffsRoot: root });
      t.after(() => dp.close());
      const attached = async () => (await dp.list()).map((p) => p.uid).sort();

      // Our installer put its entry before upstream's, which it left as it was.
      const list = JSON.parse(readFileSync(confFile, 'utf8')) as Conflist;
      assert.deepEqual(
        list.plugins.map((p) => p.type),
        ['bridge', 'ambient-bpf-cni', 'istio-cni'],
      );
      assert.deepEqual(list.plugins[0], bridge);
      assert.deepEqual(list.plugins[2], istioCni);
      assert.equal(list.plugins[1]!.agent_socket, pluginSocket);

      // An ambient pod: enrolled by us; istio-cni (sidecar mode) gets the bridge's result through us.
      const cart = {
        containerId: 'c-cart',
        netns: Topology.netnsPath(await topo.netns('cart')),
        args: 'IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart;K8S_POD_UID=uid-cart',
      };
      const cartAdd = await chainAdd(node, list, cart, [binDir]);
      assert.equal(cartAdd.last.code, 0, cartAdd.last.stdout + cartAdd.last.stderr);
      assert.equal(cartAdd.results.length, 3);
      assert.deepEqual(cartAdd.results[1], cartAdd.results[0], 'our plugin changed the prevResult of an ambient pod');
      assert.deepEqual(cartAdd.results[2], cartAdd.results[0]);
      assert.deepEqual(await attached(), ['uid-cart']);
      assert.deepEqual(
        standIn.stats().map((p) => p.name),
        ['cart'],
      );
      const cartSeen = recorded().at(-1)!;
      assert.equal(cartSeen.command, 'ADD');
      assert.match(cartSeen.env.CNI_ARGS!, /K8S_POD_NAME=cart/);
      assert.equal(cartSeen.env.CNI_NETNS, cart.netns);
      assert.deepEqual(cartSeen.stdin.prevResult, cartAdd.results[0], 'istio-cni did not get the bridge’s result');

      // A sidecar-injected pod in the same ambient namespace: upstream's to redirect; we leave it
      // alone and return its prevResult unchanged.
      const reviews = {
        containerId: 'c-reviews',
        netns: Topology.netnsPath(await topo.netns('reviews')),
        args: 'IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=reviews;K8S_POD_UID=uid-reviews',
      };
      const reviewsAdd = await chainAdd(node, list, reviews, [binDir]);
      assert.equal(reviewsAdd.last.code, 0, reviewsAdd.last.stdout + reviewsAdd.last.stderr);
      assert.deepEqual(
        reviewsAdd.results[1],
        reviewsAdd.results[0],
        'our plugin changed the prevResult of a sidecar pod',
      );
      const reviewsSeen = recorded().at(-1)!;
      assert.match(reviewsSeen.env.CNI_ARGS!, /K8S_POD_NAME=reviews/);
      assert.deepEqual(reviewsSeen.stdin.prevResult, reviewsAdd.results[0]);
      assert.deepEqual(await attached(), ['uid-cart'], 'a sidecar-injected pod was redirected');
      assert.deepEqual(
        standIn.stats().map((p) => p.name),
        ['cart'],
        'ztunnel was given a sidecar-injected pod',
      );
      assert.match(agent.status().find((s) => s.name === 'reviews')?.reason ?? '', /sidecar injected/);

      // DEL runs the chain backwards: istio-cni first, then us (which unenrols the ambient pod).
      const before = recorded().length;
      for (const inv of [reviews, cart])
        assert.ok((await chainDel(node, list, inv, [binDir])).every((r) => r.code === 0));
      assert.deepEqual(
        recorded()
          .slice(before)
          .map((r) => [r.command, /K8S_POD_NAME=(\w+)/.exec(r.env.CNI_ARGS!)?.[1]]),
        [
          ['DEL', 'reviews'],
          ['DEL', 'cart'],
        ],
      );
      await until(async () => (await attached()).length === 0, 'cart detached');

      // Our uninstall takes out our entry and binary only: upstream's entry and plugin stay, and
      // the chain still works without us.
      agent.stop();
      new CniInstaller({
        binDir,
        confDir,
        binarySource: PLUGIN_BINARY_PATH,
        agentSocket: pluginSocket,
        policyFile: cniPolicyFile,
        log: silentLogger,
      }).uninstall();
      const left = JSON.parse(readFileSync(confFile, 'utf8')) as Conflist;
      assert.deepEqual(left.plugins, [bridge, istioCni]);
      assert.deepEqual(readdirSync(binDir), ['istio-cni']);
      const later = await chainAdd(
        node,
        left,
        {
          containerId: 'c-later',
          netns: Topology.netnsPath(await topo.netns('later')),
          args: 'IgnoreUnknown=1;K8S_POD_NAMESPACE=plain;K8S_POD_NAME=later',
        },
        [binDir],
      );
      assert.equal(later.last.code, 0, later.last.stdout);
      assert.deepEqual(recorded().at(-1)!.stdin.prevResult, later.results[0]);
    },
  );
});

/** The plugin failed with a CNI error of this code whose message matches. */
function assertCniError(run: { code: number; stdout: string }, code: number, msg: RegExp): void {
  assert.equal(run.code, 1, `exit code ${run.code}: ${run.stdout}`);
  const e = JSON.parse(run.stdout) as { code: number; msg: string };
  assert.equal(e.code, code, e.msg);
  assert.match(e.msg, msg);
}
