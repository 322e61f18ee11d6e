// The agent with the Kubernetes pod source (through the in-repo API test server): a running pod is
// enrolled and annotated through pods/status; a namespace label flip unenrols it and removes the
// annotation; a broken watch does not stop the agent. A CNI ADD that comes before the pod's watch
// event (driven through the real plugin binary) is decided from the pod and namespace the agent
// asks the API for, and fails closed when the API does not answer for a pod that may be ambient;
// custom enablement selectors, and the Events (an enrollment failure, an ignored annotation)
// recorded on pods.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { Agent } from '../cni-agent/src/agent.js';
import { DNS_CAPTURE_ANNOTATION } from '../cni-agent/src/pods/capture-options.js';
import { parseEnablementSelectors } from '../cni-agent/src/pods/enablement.js';
import { REDIRECTION_ANNOTATION } from '../cni-agent/src/pods/pod.js';
import { selectPod } from '../cni-agent/src/pods/selection.js';
import { silentLogger } from '../ztunnel-bridge/src/logger.js';
import { ZtunnelStandIn } from '../ztunnel-bridge/src/standin/ztunnel.js';
import { chainAdd, type Conflist } from './helpers/cni-runtime.js';
import { kernelTest, TEST_PREFIX, testBpffsRoot } from './helpers/kernel.js';
import { KubeApiTestServer } from './helpers/kube-api-server.js';
import { assertNothingLeft, removeDatapath } from './helpers/leftovers.js';
import { podWithRemote, Topology } from './helpers/topology.js';
import { until } from './helpers/wait.js';

after(assertNothingLeft);

describe('agent with the Kubernetes pod source', kernelTest(), () => {
  it(
    'enrols, annotates through pods/status, and unenrols on a label flip, across watch breaks',
    { timeout: 60_000 },
    async (t) => {
      const topo = new Topology();
      const root = testBpffsRoot(topo.id);
      const dir = mkdtempSync(join(tmpdir(), 'abt-agentk-'));
      const net = await podWithRemote(topo, 90);
      const api = new KubeApiTestServer();
      await api.start();
      const nsObj = (mode?: string) => ({
        apiVersion: 'v1',
        kind: 'Namespace',
        metadata: { name: 'shop', labels: mode ? { 'istio.io/dataplane-mode': mode } : {} },
      });
      api.upsert('namespaces', nsObj('ambient'));
      api.upsert('pods', {
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: { name: 'cart', namespace: 'shop', uid: `uid-cart-${topo.id}` },
        spec: { nodeName: 'node-a', serviceAccountName: 'cart' },
        status: { phase: 'Running', podIP: net.podV4, podIPs: [{ ip: net.podV4 }] },
      });
      const agent = new Agent({
        nodeName: 'node-a',
        source: { kubeconfig: api.connection() },
        ztunnelSocket: join(dir, 'z.sock'),
        pluginSocket: join(dir, 'cni.sock'),
        cniPolicyFile: join(dir, 'cni-policy'),
        bpffs: root,
        hostRoot: '/',
        attachMode: 'auto',
        log: silentLogger,
      });
      const standIn = new ZtunnelStandIn({ socketPath: join(dir, 'z.sock') });
      t.after(async () => {
        standIn.stop();
        agent.stop();
        await api.close();
        await removeDatapath(root);
        await topo.cleanup();
        rmSync(dir, { recursive: true, force: true });
      });
      const annotation = () =>
        (api.get('pods', 'cart', 'shop')?.metadata as { annotations?: Record<string, string> }).annotations?.[
          REDIRECTION_ANNOTATION
        ];

      await agent.start();
      assert.equal(annotation(), 'pending', 'redirected while ztunnel is away: pending');
      standIn.start();
      await until(() => annotation() === 'enabled', 'enabled once ztunnel acked');
      assert.deepEqual(
        standIn.stats().map((p) => [p.name, p.namespace]),
        [['cart', 'shop']],
      );
      assert.ok(api.patches.every((p) => p.contentType.startsWith('application/merge-patch+json')));

      // The watch breaks; the next change still arrives.
      api.breakWatches();
      api.upsert('namespaces', nsObj());
      await until(() => annotation() === undefined, 'annotation removed after the label flip');
      const dp = await Datapath.open({ bpffsRoot: root });
      t.after(() => dp.close());
      await until(async () => (await dp.list()).length === 0, 'detached');
      await until(() => standIn.stats().length === 0, 'ztunnel told');
      assert.deepEqual(
        agent.status().map((s) => [s.name, s.state]),
        [['cart', 'not ambient']],
      );
    },
  );

  it('removes a stale redirection annotation left by an agent killed before it could (not ambient any more)', async (t) => {
    const topo = new Topology();
    const root = testBpffsRoot(topo.id);
    const dir = mkdtempSync(join(tmpdir(), 'abt-agentk-'));
    const api = new KubeApiTestServer();
    await api.start();
    api.upsert('namespaces', { apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'plain' } });
    api.upsert('pods', {
      apiVersion: 'v1',
      kind: 'Pod',
      metadata: {
        name: 'old',
        namespace: 'plain',
        uid: `uid-old-${topo.id}`,
        annotations: { [REDIRECTION_ANNOTATION]: 'enabled' },
      },
      spec: { nodeName: 'node-a' },
      status: { phase: 'Running', podIP: '198.18.91.2' },
    });
    const agent = new Agent({
      nodeName: 'node-a',
      source: { kubeconfig: api.connection() },
      ztunnelSocket: join(dir, 'z.sock'),
      pluginSocket: join(dir, 'cni.sock'),
      cniPolicyFile: join(dir, 'cni-policy'),
      bpffs: root,
      hostRoot: '/',
      attachMode: 'auto',
      log: silentLogger,
    });
    t.after(async () => {
      agent.stop();
      await api.close();
      await removeDatapath(root);
      rmSync(dir, { recursive: true, force: true });
    });
    await agent.start();
    await until(
      () =>
        (api.get('pods', 'old', 'plain')?.metadata as { annotations?: Record<string, string> }).annotations?.[
          REDIRECTION_ANNOTATION
        ] === undefined,
      'stale annotation removed',
    );
    assert.equal(api.patches.length, 1, 'patched more than once');
  });

  it(
    'decides a CNI ADD that comes before the watch event from the API, and fails closed when the API does not answer',
    { timeout: 120_000 },
    async (t) => {
      const topo = new Topology();
      const root = testBpffsRoot(topo.id);
      const dir = mkdtempSync(join(tmpdir(), 'abt-agentk-'));
      const api = new KubeApiTestServer();
      await api.start();
      const nsObj = (name: string, mode?: string) => ({
        apiVersion: 'v1',
        kind: 'Namespace',
        metadata: { name, labels: mode ? { 'istio.io/dataplane-mode': mode } : {} },
      });
      const podObj = (name: string, namespace: string, labels: Record<string, string> = {}) => ({
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: { name, namespace, uid: `uid-${name}-${topo.id}`, labels },
        spec: { nodeName: 'node-a' },
        status: { phase: 'Pending' },
      });
      api.upsert('namespaces', nsObj('mesh', 'ambient'));
      api.upsert('namespaces', nsObj('plain'));
      api.upsert('namespaces', nsObj('other'));
      api.upsert('namespaces', nsObj('relabel'));
      api.upsert('namespaces', nsObj('stateful'));
      const dbOld = podObj('db-0', 'stateful');
      dbOld.metadata.uid = `uid-db-0-old-${topo.id}`;
      api.upsert('pods', dbOld);
      const pluginSocket = join(dir, 'cni.sock');
      const cniPolicyFile = join(dir, 'cni-policy');
      const agent = new Agent({
        nodeName: 'node-a',
        source: { kubeconfig: api.connection() },
        ztunnelSocket: join(dir, 'z.sock'),
        pluginSocket,
        cniPolicyFile,
        bpffs: root,
        hostRoot: '/',
        attachMode: 'auto',
        podLookupTimeoutMs: 1000,
        log: silentLogger,
      });
      const standIn = new ZtunnelStandIn({ socketPath: join(dir, 'z.sock') });
      t.after(async () => {
        standIn.stop();
        agent.stop();
        await api.close();
        await removeDatapath(root);
        await topo.cleanup();
        rmSync(dir, { recursive: true, force: true });
      });
      const node = await topo.netns('node');
      const list: Conflist = {
        cniVersion: '1.0.0',
        name: `abt-${topo.id}`,
        plugins: [
          {
            type: 'bridge',
            bridge: 'cni0',
            isGateway: true,
            ipMasq: false,
            ipam: {
              type: 'host-local',
              ranges: [[{ subnet: '198.18.72.0/24' }]],
              routes: [{ dst: '0.0.0.0/0' }],
              dataDir: join(dir, 'ipam'),
            },
          },
          { type: 'ambient-bpf-cni', agent_socket: pluginSocket, policy_file: cniPolicyFile },
        ],
      };
      const add = async (name: string, namespace: string) => {
        const pod = api.get('pods', name, namespace);
        const uid = pod ? `;K8S_POD_UID=${pod.metadata.uid}` : '';
        return chainAdd(node, list, {
          containerId: `c-${name}`,
          netns: Topology.netnsPath(await topo.netns(name)),
          args: `IgnoreUnknown=1;K8S_POD_NAMESPACE=${namespace};K8S_POD_NAME=${name}${uid}`,
        });
      };
      await agent.start();
      standIn.start();
      await until(() => standIn.connected, 'stand-in connected');
      const dp = await Datapath.open({ bpffsRoot: root });
      t.after(() => dp.close());
      const attached = async () => (await dp.list()).map((p) => p.uid).sort();

      // From here the watch lags: pods and namespaces created now reach the agent only when released.
      api.holdWatchEvents('pods');
      api.holdWatchEvents('namespaces');
      api.upsert('pods', podObj('optout', 'mesh', { 'istio.io/dataplane-mode': 'none' }));
      api.upsert('pods', podObj('optin', 'plain', { 'istio.io/dataplane-mode': 'ambient' }));
      api.upsert('namespaces', nsObj('fresh', 'ambient'));
      api.upsert('pods', podObj('newcomer', 'fresh'));
      assert.deepEqual(
        agent.status().map((s) => s.name),
        ['db-0'],
        'the watch delivered the pods before their ADD',
      );

      // Opted out in an ambient namespace: passes through (judged by its namespace alone, it was enrolled).
      const optout = await add('optout', 'mesh');
      assert.equal(optout.last.code, 0, optout.last.stdout);
      assert.deepEqual(JSON.parse(optout.last.stdout), optout.results[0], 'prevResult not passed through');
      assert.deepEqual(await attached(), []);
      // Opted in by its own label in a plain namespace: enrolled (judged by its namespace alone, it passed).
      const optin = await add('optin', 'plain');
      assert.equal(optin.last.code, 0, optin.last.stdout);
      assert.deepEqual(await attached(), [`uid-optin-${topo.id}`]);
      assert.deepEqual(
        standIn.stats().map((p) => p.name),
        ['optin'],
      );
      // A namespace created (labelled ambient) after the agent's last namespace event: read from the API too.
      const newcomer = await add('newcomer', 'fresh');
      assert.equal(newcomer.last.code, 0, newcomer.last.stdout);
      assert.deepEqual(await attached(), [`uid-newcomer-${topo.id}`, `uid-optin-${topo.id}`].sort());
      // A namespace the agent knows, labelled ambient since its last event: the ADD reads it again.
      api.upsert('namespaces', nsObj('relabel', 'ambient'));
      api.upsert('pods', podObj('joiner', 'relabel'));
      const joiner = await add('joiner', 'relabel');
      assert.equal(joiner.last.code, 0, joiner.last.stdout);
      assert.ok(
        (await attached()).includes(`uid-joiner-${topo.id}`),
        'a pod of a namespace labelled ambient since the last watch event started unredirected',
      );
      // A StatefulSet's pod made again under its name, now labelled ambient: the cached earlier pod of
      // that name (another uid, plain) is not it, and its uid is not the new pod's.
      api.remove('pods', 'db-0', 'stateful');
      api.upsert('pods', podObj('db-0', 'stateful', { 'istio.io/dataplane-mode': 'ambient' }));
      const db = await add('db-0', 'stateful');
      assert.equal(db.last.code, 0, db.last.stdout);
      assert.ok((await attached()).includes(`uid-db-0-${topo.id}`), 'the new pod of an old name judged as the old pod');
      assert.ok(
        !(await attached()).includes(`uid-db-0-old-${topo.id}`),
        "the new pod enrolled under the old pod's uid",
      );
      const reads = api.requests
        .filter((r) => r.method === 'GET' && !r.watch && /^\/api\/v1\/namespaces\/[^/]+(\/pods\/[^/]+)?$/.test(r.path))
        .map((r) => r.path);
      assert.ok(
        reads.includes('/api/v1/namespaces/mesh/pods/optout') &&
          reads.includes('/api/v1/namespaces/plain/pods/optin') &&
          reads.includes('/api/v1/namespaces/fresh'),
        reads.join(' '),
      );

      // The API hangs: a pod that may be ambient (ambient namespace) fails closed with CNI error 11
      // once the bounded wait is over; so does one of a namespace where a pod opts in by label (as
      // optin did in plain); one of a namespace without ambient pods starts (the plugin's rule when
      // the agent is down, README "Agent unreachable").
      api.stallGets = true;
      api.upsert('pods', podObj('late', 'mesh'));
      const began = Date.now();
      const late = await add('late', 'mesh');
      const waited = Date.now() - began;
      assert.notEqual(late.last.code, 0, 'ADD succeeded without an answer from the API');
      const error = JSON.parse(late.last.stdout) as { code: number; msg: string };
      assert.equal(error.code, 11);
      assert.match(
        error.msg,
        /pod mesh\/late is not in the agent's watch cache yet and the Kubernetes API did not answer .*its namespace is labelled ambient/,
      );
      assert.ok(waited >= 1000 && waited < 15_000, `waited ${waited} ms`);
      assert.ok(!(await attached()).includes(`uid-late-${topo.id}`));
      api.upsert('pods', podObj('neighbour', 'plain'));
      const neighbour = await add('neighbour', 'plain');
      assert.equal(
        (JSON.parse(neighbour.last.stdout) as { code?: number; msg?: string }).code,
        11,
        neighbour.last.stdout,
      );
      assert.match(neighbour.last.stdout, /pods of its namespace opt in by label/);
      api.upsert('pods', podObj('quiet', 'other'));
      const quiet = await add('quiet', 'other');
      assert.equal(quiet.last.code, 0, quiet.last.stdout);
      assert.deepEqual(JSON.parse(quiet.last.stdout), quiet.results[0]);

      // The watch catches up: the pods it brings keep their decisions, and the runtime's retry of
      // the refused ADD is decided from the cache (the API still hangs).
      api.releaseWatchEvents('namespaces');
      api.releaseWatchEvents('pods');
      await until(() => agent.status().some((s) => s.name === 'late'), 'the watch delivered late');
      const retried = await chainAdd(node, list, {
        containerId: 'c-late-2',
        netns: Topology.netnsPath(await topo.netns('late2')),
        args: `IgnoreUnknown=1;K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=late;K8S_POD_UID=uid-late-${topo.id}`,
      });
      assert.equal(retried.last.code, 0, retried.last.stdout);
      assert.deepEqual(
        await attached(),
        [
          `uid-db-0-${topo.id}`,
          `uid-joiner-${topo.id}`,
          `uid-late-${topo.id}`,
          `uid-newcomer-${topo.id}`,
          `uid-optin-${topo.id}`,
        ].sort(),
      );
      const states = new Map(agent.status().map((s) => [s.name, s.state]));
      assert.equal(states.get('optout'), 'not ambient');
      assert.equal(states.get('quiet'), 'not ambient');
      for (const name of ['optin', 'newcomer', 'late', 'joiner', 'db-0'])
        assert.equal(states.get(name), 'enabled', `${name}: ${states.get(name)}`);
    },
  );

  it(
    'custom enablement selectors enrol a pod the default would not; Events say why a pod failed and which annotation was ignored',
    { timeout: 60_000 },
    async (t) => {
      const topo = new Topology();
      const root = testBpffsRoot(topo.id);
      const dir = mkdtempSync(join(tmpdir(), `${TEST_PREFIX}-agentk-`));
      const net = await podWithRemote(topo, 231);
      const api = new KubeApiTestServer();
      await api.start();
      // A plain namespace: with the default selectors nothing here is ambient.
      api.upsert('namespaces', {
        apiVersion: 'v1',
        kind: 'Namespace',
        metadata: { name: 'shop', labels: { team: 'payments' } },
      });
      const cart = {
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: {
          name: 'cart',
          namespace: 'shop',
          uid: `uid-cart-${topo.id}`,
          labels: { mesh: 'on' },
          annotations: { [DNS_CAPTURE_ANNOTATION]: 'maybe' },
        },
        spec: { nodeName: 'node-a' },
        status: { phase: 'Running', podIP: net.podV4, podIPs: [{ ip: net.podV4 }] },
      };
      // Selected too, but no network namespace holds its IP: it fails, and keeps failing.
      const ghost = {
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: { name: 'ghost', namespace: 'shop', uid: `uid-ghost-${topo.id}`, labels: { mesh: 'on' } },
        spec: { nodeName: 'node-a' },
        status: { phase: 'Running', podIP: '198.18.232.2' },
      };
      api.upsert('pods', cart);
      api.upsert('pods', ghost);
      // Selected by its labels and its namespace's, but the namespace is excluded.
      api.upsert('namespaces', {
        apiVersion: 'v1',
        kind: 'Namespace',
        metadata: { name: 'legacy', labels: { team: 'payments' } },
      });
      api.upsert('pods', {
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: { name: 'old', namespace: 'legacy', uid: `uid-old-${topo.id}`, labels: { mesh: 'on' } },
        spec: { nodeName: 'node-a' },
        status: { phase: 'Running', podIP: '198.18.233.2' },
      });
      const warnings: string[] = [];
      assert.equal(
        selectPod({ metadata: cart.metadata }, { metadata: { name: 'shop', labels: { team: 'payments' } } }).ambient,
        false,
        'the default selectors leave it out',
      );
      const agent = new Agent({
        nodeName: 'node-a',
        source: { kubeconfig: api.connection() },
        selection: {
          excludedNamespaces: ['legacy'],
          enablementSelectors: parseEnablementSelectors(
            '[{podSelector: {matchExpressions: [{key: mesh, operator: In, values: ["on"]}]}, namespaceSelector: {matchLabels: {team: payments}}}]',
          ),
        },
        ztunnelSocket: join(dir, 'z.sock'),
        pluginSocket: join(dir, 'cni.sock'),
        cniPolicyFile: join(dir, 'cni-policy'),
        bpffs: root,
        hostRoot: '/',
        attachMode: 'auto',
        eventIntervalMs: 200,
        log: { ...silentLogger, warn: (o: object, msg: string) => void warnings.push(`${msg} ${JSON.stringify(o)}`) },
      });
      const standIn = new ZtunnelStandIn({ socketPath: join(dir, 'z.sock') });
      t.after(async () => {
        standIn.stop();
        agent.stop();
        await api.close();
        await removeDatapath(root);
        await topo.cleanup();
        rmSync(dir, { recursive: true, force: true });
      });
      standIn.start();
      await agent.start();
      const annotation = () =>
        (api.get('pods', 'cart', 'shop')?.metadata as { annotations?: Record<string, string> }).annotations?.[
          REDIRECTION_ANNOTATION
        ];
      await until(() => annotation() === 'enabled', 'the custom selector enrolled the pod');
      assert.deepEqual(
        standIn.stats().map((p) => p.name),
        ['cart'],
      );
      assert.match(
        agent.status().find((s) => s.name === 'cart')!.reason,
        /namespace label team=payments, pod labels mesh in \(on\)/,
      );

      // The ignored annotation: a Warning Event on the pod, with the annotation and the value.
      await until(() => api.eventsFor('shop', 'cart').length === 1, 'an Event about the annotation');
      const [ignored] = api.eventsFor('shop', 'cart');
      assert.equal(ignored!.type, 'Warning');
      assert.equal(ignored!.reason, 'AmbientAnnotationInvalid');
      assert.match(ignored!.message, /ambient\.istio\.io\/dns-capture: "maybe" is not a boolean/);

      // The failing pod: one Event, whose count grows with the retries (patched, not re-created).
      await until(
        () => (api.eventsFor('shop', 'ghost')[0]?.count ?? 0) >= 3,
        'the failure counted over retries',
        20_000,
      );
      const failures = api.eventsFor('shop', 'ghost');
      assert.equal(failures.length, 1, 'one Event for every retry');
      assert.equal(failures[0]!.reason, 'AmbientEnrollmentFailed');
      assert.match(failures[0]!.message, /no network namespace holds the pod IPs 198\.18\.232\.2/);
      assert.ok(
        api.eventCalls.some(
          (c) =>
            c.method === 'PATCH' &&
            c.name ===
              [...api.events.keys()]
                .find((k) => (api.events.get(k)!.involvedObject as { name: string }).name === 'ghost')!
                .split('/')[1],
        ),
      );
      assert.equal(agent.status().find((s) => s.name === 'ghost')!.state, 'failed');
      // The excluded namespace: a warning, the pod's reason, an Event on the pod; never enrolled.
      assert.ok(
        warnings.some((w) => /namespace is labelled for ambient but excluded.*"namespace":"legacy"/.test(w)),
        warnings.join('\n'),
      );
      const old = agent.status().find((s) => s.name === 'old')!;
      assert.equal(old.state, 'not ambient');
      assert.match(old.reason, /namespace legacy is excluded \(--exclude-namespaces\), although/);
      await until(() => api.eventsFor('legacy', 'old').length === 1, 'an Event on the excluded pod');
      assert.equal(api.eventsFor('legacy', 'old')[0]!.reason, 'AmbientNamespaceExcluded');
      assert.ok(!standIn.stats().some((p) => p.name === 'old'));
      // The pod that is fine has no failure Event.
      assert.deepEqual(
        api.eventsFor('shop', 'cart').map((e) => e.reason),
        ['AmbientAnnotationInvalid'],
      );
    },
  );
});
