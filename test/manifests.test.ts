// The Kubernetes manifests: every object valid against the Kubernetes OpenAPI schemas
// (kubernetes-models), the DaemonSet's flags accepted by the agent, least privilege, and RBAC that
// grants exactly the calls the agent's Kubernetes source makes.
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, it } from 'node:test';
import { parseAllDocuments } from 'yaml';
import { daemonSetRemoved, removeRedirectionAnnotations } from '../cni-agent/src/installer/removal.js';
import { EventRecorder } from '../cni-agent/src/pods/events.js';
import { KubeClient } from '../cni-agent/src/pods/kube-client.js';
import { KubePodSource } from '../cni-agent/src/pods/kube-source.js';
import { silentLogger } from '../ztunnel-bridge/src/logger.js';
import { runCli } from './helpers/cli.js';
import { KubeApiTestServer } from './helpers/kube-api-server.js';

const DIR = fileURLToPath(new URL('../../manifests/', import.meta.url));
type K8sObject = { apiVersion: string; kind: string; metadata: { name: string }; [k: string]: unknown };

function load(file: string): K8sObject[] {
  return parseAllDocuments(readFileSync(DIR + file, 'utf8')).map((d) => d.toJS() as K8sObject);
}
const files = readdirSync(DIR).filter((f) => f.endsWith('.yaml') && f !== 'kustomization.yaml');
const objects = files.flatMap(load);
const byKind = (kind: string) => objects.filter((o) => o.kind === kind);

describe('manifests', () => {
  it('are valid against the Kubernetes OpenAPI schemas', async () => {
    assert.ok(objects.length >= 5);
    for (const o of objects) {
      const [group, version] = o.apiVersion.includes('/') ? o.apiVersion.split('/') : ['', o.apiVersion];
      const mod = (await import(`kubernetes-models/${group ? `${group}/` : ''}${version}/${o.kind}`)) as Record<string, new (o: object) => { validate(): void }>;
      assert.doesNotThrow(() => new mod[o.kind]!(o).validate(), `${o.kind}/${o.metadata.name}`);
    }
  });

  it('the Dockerfile copies files the build makes (or the repository has)', () => {
    const dockerfile = readFileSync(`${DIR}/Dockerfile`, 'utf8');
    const copied = [...dockerfile.matchAll(/^COPY --from=build \/src\/(\S+) /gm)].map((m) => m[1]!);
    assert.ok(copied.length > 5);
    for (const path of copied) assert.ok(existsSync(fileURLToPath(new URL(`../../${path}`, import.meta.url))), `the image would miss ${path}`);
  });

  it('are all in the kustomization', () => {
    const k = load('kustomization.yaml')[0] as unknown as { resources: string[] };
    assert.deepEqual([...k.resources].sort(), [...files].sort());
  });

  it('run the agent with flags it accepts, least privilege, probes, every node', async () => {
    const [ds] = byKind('DaemonSet') as unknown as { spec: { template: { spec: Record<string, unknown> } } }[];
    const pod = ds!.spec.template.spec as {
      serviceAccountName: string;
      tolerations: { operator: string }[];
      priorityClassName: string;
      nodeSelector: Record<string, string>;
      containers: { name: string; args: string[]; securityContext: { privileged: boolean; capabilities: { add: string[]; drop: string[] }; allowPrivilegeEscalation: boolean; appArmorProfile: { type: string }; seLinuxOptions: { type: string } }; livenessProbe: { httpGet: { path: string } }; readinessProbe: { httpGet: { path: string } }; volumeMounts: { mountPath: string }[] }[];
      volumes: { hostPath?: { path: string } }[];
    };
    const [c] = pod.containers;
    const help = (await runCli(['agent', '--help'])).stdout;
    for (const arg of c!.args.slice(1)) assert.match(help, new RegExp(`--${arg.replace(/^--/, '').split('=')[0]}\\b`), `${arg} is not an agent flag`);
    assert.equal(c!.args[0], 'agent');
    assert.equal(c!.securityContext.privileged, false);
    assert.equal(c!.securityContext.allowPrivilegeEscalation, false);
    assert.deepEqual(c!.securityContext.capabilities.drop, ['ALL']);
    assert.deepEqual([...c!.securityContext.capabilities.add].sort(), ['BPF', 'NET_ADMIN', 'SYS_ADMIN', 'SYS_PTRACE']);
    assert.equal(c!.livenessProbe.httpGet.path, '/healthz');
    assert.equal(c!.readinessProbe.httpGet.path, '/readyz');
    assert.deepEqual(pod.tolerations, [{ operator: 'Exists' }]);
    assert.equal(pod.priorityClassName, 'system-node-critical');
    // What real nodes need: Linux only; AppArmor unconfined (field and, for clusters before 1.30,
    // annotation) and SELinux spc_t, or the runtime's profiles deny bpffs writes and bpf().
    assert.deepEqual(pod.nodeSelector, { 'kubernetes.io/os': 'linux' });
    assert.equal(c!.securityContext.appArmorProfile.type, 'Unconfined');
    assert.equal((ds as unknown as { spec: { template: { metadata: { annotations: Record<string, string> } } } }).spec.template.metadata.annotations[`container.apparmor.security.beta.kubernetes.io/${c!.name}`], 'unconfined');
    assert.equal(c!.securityContext.seLinuxOptions.type, 'spc_t');
    // GKE admits system-node-critical pods outside kube-system only under a quota naming the class.
    const [quota] = byKind('ResourceQuota') as unknown as { spec: { scopeSelector: { matchExpressions: { scopeName: string; values: string[] }[] } } }[];
    assert.deepEqual(quota?.spec.scopeSelector.matchExpressions.map((e) => [e.scopeName, e.values]), [['PriorityClass', [pod.priorityClassName]]]);
    assert.equal(pod.serviceAccountName, byKind('ServiceAccount')[0]!.metadata.name);
    const hostPaths = pod.volumes.flatMap((v) => (v.hostPath ? [v.hostPath.path] : [])).sort();
    assert.deepEqual(hostPaths, ['/etc/cni/net.d', '/opt/cni/bin', '/proc', '/sys/fs/bpf', '/sys/fs/cgroup', '/var/lib/ambient-bpf', '/var/run/ambient-bpf', '/var/run/netns', '/var/run/ztunnel']);
  });

  it('grant exactly the API calls the agent makes', async (t) => {
    const api = new KubeApiTestServer();
    await api.start();
    t.after(() => api.close());
    api.upsert('namespaces', { metadata: { name: 'shop' } });
    api.upsert('pods', { metadata: { name: 'p', namespace: 'shop', uid: 'u' }, spec: { nodeName: 'n' } });
    const source = new KubePodSource({ kubeconfig: api.connection(), nodeName: 'n', onChange: () => undefined, log: silentLogger });
    t.after(() => source.stop());
    const state = await source.start();
    await source.setRedirection(state.pods.get('u')!, 'enabled');
    await source.setRedirection(state.pods.get('u')!, undefined);
    // Events on the pod: created, and a repeat patches the count.
    const eventClient = new KubeClient(api.connection());
    const events = new EventRecorder({ client: eventClient, nodeName: 'n', log: silentLogger, minIntervalMs: 0 });
    t.after(() => {
      events.stop();
      eventClient.close();
    });
    events.podEvent(state.pods.get('u')!, 'Warning', 'AmbientEnrollmentFailed', 'boom');
    await events.idle();
    events.podEvent(state.pods.get('u')!, 'Warning', 'AmbientEnrollmentFailed', 'boom');
    await events.idle();
    assert.deepEqual(api.eventCalls.map((c) => c.method), ['POST', 'PATCH']);
    // On SIGTERM: is the DaemonSet being deleted? Then the annotations go (ambient-bpf uninstall too).
    const [ds] = byKind('DaemonSet');
    const client = new KubeClient(api.connection());
    t.after(() => client.close());
    assert.equal(await daemonSetRemoved(client, 'istio-system', ds!.metadata.name), true);
    await removeRedirectionAnnotations(client, 'n');
    const used = new Set(api.requests.map((r) => {
      const status = /^\/api\/v1\/namespaces\/[^/]+\/pods\/[^/]+\/status$/.test(r.path);
      const daemonSet = /^\/apis\/apps\/v1\/namespaces\/[^/]+\/daemonsets\/([^/]+)$/.exec(r.path);
      if (daemonSet) return `daemonsets/${daemonSet[1]} get`;
      if (/^\/api\/v1\/namespaces\/[^/]+\/events(\/[^/]+)?$/.test(r.path)) return `events ${r.method === 'POST' ? 'create' : r.method === 'PATCH' ? 'patch' : r.method}`;
      const resource = status ? 'pods/status' : r.path.split('/').at(-1)!;
      const verb = r.method === 'PATCH' ? 'patch' : r.watch ? 'watch' : 'list';
      return `${resource} ${verb}`;
    }));
    const [role] = byKind('ClusterRole') as unknown as { metadata: { name: string }; rules: { apiGroups: string[]; resources: string[]; resourceNames?: string[]; verbs: string[] }[] }[];
    const granted = new Set(role!.rules.flatMap((r) => r.resources.flatMap((res) => (r.resourceNames ?? ['']).flatMap((n) => r.verbs.map((v) => `${res}${n ? `/${n}` : ''} ${v}`)))));
    assert.deepEqual([...granted].sort(), [...used].sort());
    const [binding] = byKind('ClusterRoleBinding') as unknown as { subjects: { name: string }[]; roleRef: { name: string } }[];
    assert.equal(binding!.roleRef.name, role!.metadata.name);
    assert.equal(binding!.subjects[0]!.name, 'ambient-bpf');
  });
});
