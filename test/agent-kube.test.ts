// The agent with the Kubernetes pod source (through the in-repo API test server): a running pod is
// enrolled and annotated through pods/status; a namespace label flip unenrols it and removes the
// annotation; a broken watch does not stop the agent; custom enablement selectors, and the Events
// (an enrollment failure, an ignored annotation) recorded on pods.
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
import { kernelTest, TEST_PREFIX, testBpffsRoot } from './helpers/kernel.js';
import { KubeApiTestServer } from './helpers/kube-api-server.js';
import { assertNothingLeft, removeDatapath } from './helpers/leftovers.js';
import { podWithRemote, Topology } from './helpers/topology.js';
import { until } from './helpers/wait.js';

after(assertNothingLeft);

describe('agent with the Kubernetes pod source', kernelTest(), () => {
  it('enrols, annotates through pods/status, and unenrols on a label flip, across watch breaks', { timeout: 60_000 }, async (t) => {
    const topo = new Topology();
    const root = testBpffsRoot(topo.id);
    const dir = mkdtempSync(join(tmpdir(), 'abt-agentk-'));
    const net = await podWithRemote(topo, 90);
    const api = new KubeApiTestServer();
    await api.start();
    const nsObj = (mode?: string) => ({ apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'shop', labels: mode ? { 'istio.io/dataplane-mode': mode } : {} } });
    api.upsert('namespaces', nsObj('ambient'));
    api.upsert('pods', { apiVersion: 'v1', kind: 'Pod', metadata: { name: 'cart', namespace: 'shop', uid: `uid-cart-${topo.id}` }, spec: { nodeName: 'node-a', serviceAccountName: 'cart' }, status: { phase: 'Running', podIP: net.podV4, podIPs: [{ ip: net.podV4 }] } });
    const agent = new Agent({ nodeName: 'node-a', source: { kubeconfig: api.connection() }, ztunnelSocket: join(dir, 'z.sock'), pluginSocket: join(dir, 'cni.sock'), cniPolicyFile: join(dir, 'cni-policy'), bpffs: root, hostRoot: '/', attachMode: 'auto', log: silentLogger });
    const standIn = new ZtunnelStandIn({ socketPath: join(dir, 'z.sock') });
    t.after(async () => {
      standIn.stop();
      agent.stop();
      await api.close();
      await removeDatapath(root);
      await topo.cleanup();
      rmSync(dir, { recursive: true, force: true });
    });
    const annotation = () => (api.get('pods', 'cart', 'shop')?.metadata as { annotations?: Record<string, string> }).annotations?.[REDIRECTION_ANNOTATION];

    await agent.start();
    assert.equal(annotation(), 'pending', 'redirected while ztunnel is away: pending');
    standIn.start();
    await until(() => annotation() === 'enabled', 'enabled once ztunnel acked');
    assert.deepEqual(standIn.stats().map((p) => [p.name, p.namespace]), [['cart', 'shop']]);
    assert.ok(api.patches.every((p) => p.contentType.startsWith('application/merge-patch+json')));

    // The watch breaks; the next change still arrives.
    api.breakWatches();
    api.upsert('namespaces', nsObj());
    await until(() => annotation() === undefined, 'annotation removed after the label flip');
    const dp = await Datapath.open({ bpffsRoot: root });
    t.after(() => dp.close());
    await until(async () => (await dp.list()).length === 0, 'detached');
    await until(() => standIn.stats().length === 0, 'ztunnel told');
    assert.deepEqual(agent.status().map((s) => [s.name, s.state]), [['cart', 'not ambient']]);
  });

  it('removes a stale redirection annotation left by an agent killed before it could (not ambient any more)', async (t) => {
    const topo = new Topology();
    const root = testBpffsRoot(topo.id);
    const dir = mkdtempSync(join(tmpdir(), 'abt-agentk-'));
    const api = new KubeApiTestServer();
    await api.start();
    api.upsert('namespaces', { apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'plain' } });
    api.upsert('pods', { apiVersion: 'v1', kind: 'Pod', metadata: { name: 'old', namespace: 'plain', uid: `uid-old-${topo.id}`, annotations: { [REDIRECTION_ANNOTATION]: 'enabled' } }, spec: { nodeName: 'node-a' }, status: { phase: 'Running', podIP: '198.18.91.2' } });
    const agent = new Agent({ nodeName: 'node-a', source: { kubeconfig: api.connection() }, ztunnelSocket: join(dir, 'z.sock'), pluginSocket: join(dir, 'cni.sock'), cniPolicyFile: join(dir, 'cni-policy'), bpffs: root, hostRoot: '/', attachMode: 'auto', log: silentLogger });
    t.after(async () => {
      agent.stop();
      await api.close();
      await removeDatapath(root);
      rmSync(dir, { recursive: true, force: true });
    });
    await agent.start();
    await until(() => (api.get('pods', 'old', 'plain')?.metadata as { annotations?: Record<string, string> }).annotations?.[REDIRECTION_ANNOTATION] === undefined, 'stale annotation removed');
    assert.equal(api.patches.length, 1, 'patched more than once');
  });

  it('custom enablement selectors enrol a pod the default would not; Events say why a pod failed and which annotation was ignored', { timeout: 60_000 }, async (t) => {
    const topo = new Topology();
    const root = testBpffsRoot(topo.id);
    const dir = mkdtempSync(join(tmpdir(), `${TEST_PREFIX}-agentk-`));
    const net = await podWithRemote(topo, 231);
    const api = new KubeApiTestServer();
    await api.start();
    // A plain namespace: with the default selectors nothing here is ambient.
    api.upsert('namespaces', { apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'shop', labels: { team: 'payments' } } });
    const cart = { apiVersion: 'v1', kind: 'Pod', metadata: { name: 'cart', namespace: 'shop', uid: `uid-cart-${topo.id}`, labels: { mesh: 'on' }, annotations: { [DNS_CAPTURE_ANNOTATION]: 'maybe' } }, spec: { nodeName: 'node-a' }, status: { phase: 'Running', podIP: net.podV4, podIPs: [{ ip: net.podV4 }] } };
    // Selected too, but no network namespace holds its IP: it fails, and keeps failing.
    const ghost = { apiVersion: 'v1', kind: 'Pod', metadata: { name: 'ghost', namespace: 'shop', uid: `uid-ghost-${topo.id}`, labels: { mesh: 'on' } }, spec: { nodeName: 'node-a' }, status: { phase: 'Running', podIP: '198.18.232.2' } };
    api.upsert('pods', cart);
    api.upsert('pods', ghost);
    // Selected by its labels and its namespace's, but the namespace is excluded.
    api.upsert('namespaces', { apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'legacy', labels: { team: 'payments' } } });
    api.upsert('pods', { apiVersion: 'v1', kind: 'Pod', metadata: { name: 'old', namespace: 'legacy', uid: `uid-old-${topo.id}`, labels: { mesh: 'on' } }, spec: { nodeName: 'node-a' }, status: { phase: 'Running', podIP: '198.18.233.2' } });
    const warnings: string[] = [];
    assert.equal(selectPod({ metadata: cart.metadata }, { metadata: { name: 'shop', labels: { team: 'payments' } } }).ambient, false, 'the default selectors leave it out');
    const agent = new Agent({
      nodeName: 'node-a',
      source: { kubeconfig: api.connection() },
      selection: { excludedNamespaces: ['legacy'], enablementSelectors: parseEnablementSelectors('[{podSelector: {matchExpressions: [{key: mesh, operator: In, values: ["on"]}]}, namespaceSelector: {matchLabels: {team: payments}}}]') },
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
    const annotation = () => (api.get('pods', 'cart', 'shop')?.metadata as { annotations?: Record<string, string> }).annotations?.[REDIRECTION_ANNOTATION];
    await until(() => annotation() === 'enabled', 'the custom selector enrolled the pod');
    assert.deepEqual(standIn.stats().map((p) => p.name), ['cart']);
    assert.match(agent.status().find((s) => s.name === 'cart')!.reason, /namespace label team=payments, pod labels mesh in \(on\)/);

    // The ignored annotation: a Warning Event on the pod, with the annotation and the value.
    await until(() => api.eventsFor('shop', 'cart').length === 1, 'an Event about the annotation');
    const [ignored] = api.eventsFor('shop', 'cart');
    assert.equal(ignored!.type, 'Warning');
    assert.equal(ignored!.reason, 'AmbientAnnotationInvalid');
    assert.match(ignored!.message, /ambient\.istio\.io\/dns-capture: "maybe" is not a boolean/);

    // The failing pod: one Event, whose count grows with the retries (patched, not re-created).
    await until(() => (api.eventsFor('shop', 'ghost')[0]?.count ?? 0) >= 3, 'the failure counted over retries', 20_000);
    const failures = api.eventsFor('shop', 'ghost');
    assert.equal(failures.length, 1, 'one Event for every retry');
    assert.equal(failures[0]!.reason, 'AmbientEnrollmentFailed');
    assert.match(failures[0]!.message, /no network namespace holds the pod IPs 198\.18\.232\.2/);
    assert.ok(api.eventCalls.some((c) => c.method === 'PATCH' && c.name === [...api.events.keys()].find((k) => (api.events.get(k)!.involvedObject as { name: string }).name === 'ghost')!.split('/')[1]));
    assert.equal(agent.status().find((s) => s.name === 'ghost')!.state, 'failed');
    // The excluded namespace: a warning, the pod's reason, an Event on the pod; never enrolled.
    assert.ok(warnings.some((w) => /namespace is labelled for ambient but excluded.*"namespace":"legacy"/.test(w)), warnings.join('\n'));
    const old = agent.status().find((s) => s.name === 'old')!;
    assert.equal(old.state, 'not ambient');
    assert.match(old.reason, /namespace legacy is excluded \(--exclude-namespaces\), although/);
    await until(() => api.eventsFor('legacy', 'old').length === 1, 'an Event on the excluded pod');
    assert.equal(api.eventsFor('legacy', 'old')[0]!.reason, 'AmbientNamespaceExcluded');
    assert.ok(!standIn.stats().some((p) => p.name === 'old'));
    // The pod that is fine has no failure Event.
    assert.deepEqual(api.eventsFor('shop', 'cart').map((e) => e.reason), ['AmbientAnnotationInvalid']);
  });
});
