// The Kubernetes manifests: every object valid against the Kubernetes OpenAPI schemas
// (kubernetes-models), the DaemonSet's flags accepted by the agent, least privilege, and RBAC that
// grants exactly the calls the agent's Kubernetes source makes. The platform overlays
// (manifests/overlays/*), rendered by `kubectl kustomize`: the same checks, and each platform path
// the agent is given is the node path its hostPath volume mounts.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, it } from 'node:test';
import { parseAllDocuments } from 'yaml';
import { whyLeavingNode } from '../cni-agent/src/installer/daemonset-scope.js';
import { removeRedirectionAnnotations } from '../cni-agent/src/installer/removal.js';
import { EventRecorder } from '../cni-agent/src/pods/events.js';
import { KubeClient } from '../cni-agent/src/pods/kube-client.js';
import { KubePodSource } from '../cni-agent/src/pods/kube-source.js';
import { silentLogger } from '../ztunnel-bridge/src/logger.js';
import { runCli } from './helpers/cli.js';
import { KubeApiTestServer } from './helpers/kube-api-server.js';

const ROOT = fileURLToPath(new URL('../../manifests/', import.meta.url));
const DIR = `${ROOT}base/`;
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
      const mod = (await import(`kubernetes-models/${group ? `${group}/` : ''}${version}/${o.kind}`)) as Record<
        string,
        new (o: object) => { validate(): void }
      >;
      assert.doesNotThrow(() => new mod[o.kind]!(o).validate(), `${o.kind}/${o.metadata.name}`);
    }
  });

  it('the Dockerfile copies files the build makes (or the repository has)', () => {
    const dockerfile = readFileSync(`${ROOT}Dockerfile`, 'utf8');
    const copied = [...dockerfile.matchAll(/^COPY --from=build \/src\/(\S+) /gm)].map((m) => m[1]!);
    assert.ok(copied.length > 5);
    for (const path of copied)
      assert.ok(existsSync(fileURLToPath(new URL(`../../${path}`, import.meta.url))), `the image would miss ${path}`);
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
      containers: {
        name: string;
        args: string[];
        securityContext: {
          privileged: boolean;
          capabilities: { add: string[]; drop: string[] };
          allowPrivilegeEscalation: boolean;
          appArmorProfile: { type: string };
          seLinuxOptions: { type: string };
        };
        livenessProbe: { httpGet: { path: string } };
        readinessProbe: { httpGet: { path: string } };
        volumeMounts: { mountPath: string }[];
      }[];
      volumes: { hostPath?: { path: string } }[];
    };
    const [c] = pod.containers;
    const help = (await runCli(['agent', '--help'])).stdout;
    for (const arg of c!.args.slice(1))
      assert.match(help, new RegExp(`--${arg.replace(/^--/, '').split('=')[0]}\\b`), `${arg} is not an agent flag`);
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
    assert.equal(
      (ds as unknown as { spec: { template: { metadata: { annotations: Record<string, string> } } } }).spec.template
        .metadata.annotations[`container.apparmor.security.beta.kubernetes.io/${c!.name}`],
      'unconfined',
    );
    assert.equal(c!.securityContext.seLinuxOptions.type, 'spc_t');
    // GKE admits system-node-critical pods outside kube-system only under a quota naming the class.
    const [quota] = byKind('ResourceQuota') as unknown as {
      spec: { scopeSelector: { matchExpressions: { scopeName: string; values: string[] }[] } };
    }[];
    assert.deepEqual(
      quota?.spec.scopeSelector.matchExpressions.map((e) => [e.scopeName, e.values]),
      [['PriorityClass', [pod.priorityClassName]]],
    );
    assert.equal(pod.serviceAccountName, byKind('ServiceAccount')[0]!.metadata.name);
    const hostPaths = pod.volumes.flatMap((v) => (v.hostPath ? [v.hostPath.path] : [])).sort();
    assert.deepEqual(hostPaths, [
      '/etc/cni/net.d',
      '/opt/cni/bin',
      '/proc',
      '/sys/fs/bpf',
      '/sys/fs/cgroup',
      '/var/lib/ambient-bpf',
      '/var/run/ambient-bpf',
      '/var/run/netns',
      '/var/run/ztunnel',
    ]);
  });

  it('grant exactly the API calls the agent makes', async (t) => {
    const api = new KubeApiTestServer();
    await api.start();
    t.after(() => api.close());
    api.upsert('namespaces', { metadata: { name: 'shop' } });
    api.upsert('pods', { metadata: { name: 'p', namespace: 'shop', uid: 'u' }, spec: { nodeName: 'n' } });
    const source = new KubePodSource({
      kubeconfig: api.connection(),
      nodeName: 'n',
      onChange: () => undefined,
      log: silentLogger,
    });
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
    assert.deepEqual(
      api.eventCalls.map((c) => c.method),
      ['POST', 'PATCH'],
    );
    // A CNI ADD before the pod's watch event: the pod and its namespace are read from the API.
    await source.lookup('shop', 'p', 5000);
    // On SIGTERM: is the DaemonSet being deleted, or does it no longer select this node (the
    // node's labels are read)? Then the annotations go (ambient-bpf uninstall too).
    const [ds] = byKind('DaemonSet');
    const client = new KubeClient(api.connection());
    t.after(() => client.close());
    api.daemonSets.set(`istio-system/${ds!.metadata.name}`, ds as unknown as Parameters<typeof api.daemonSets.set>[1]);
    api.nodes.set('n', {
      apiVersion: 'v1',
      kind: 'Node',
      metadata: { name: 'n', labels: { 'kubernetes.io/os': 'linux' } },
    });
    assert.equal(await whyLeavingNode(client, 'istio-system', ds!.metadata.name, 'n', 0), undefined);
    await removeRedirectionAnnotations(client, 'n');
    const used = new Set(
      api.requests.map((r) => {
        const status = /^\/api\/v1\/namespaces\/[^/]+\/pods\/[^/]+\/status$/.test(r.path);
        const daemonSet = /^\/apis\/apps\/v1\/namespaces\/[^/]+\/daemonsets\/([^/]+)$/.exec(r.path);
        if (daemonSet) return `daemonsets/${daemonSet[1]} get`;
        if (/^\/api\/v1\/nodes\/[^/]+$/.test(r.path)) return 'nodes get';
        if (/^\/api\/v1\/namespaces\/[^/]+\/events(\/[^/]+)?$/.test(r.path))
          return `events ${r.method === 'POST' ? 'create' : r.method === 'PATCH' ? 'patch' : r.method}`;
        const one = /^\/api\/v1\/namespaces\/[^/]+(\/pods\/[^/]+)?$/.exec(r.path);
        if (one && r.method === 'GET') return `${one[1] ? 'pods' : 'namespaces'} get`;
        const resource = status ? 'pods/status' : r.path.split('/').at(-1)!;
        const verb = r.method === 'PATCH' ? 'patch' : r.watch ? 'watch' : 'list';
        return `${resource} ${verb}`;
      }),
    );
    const [role] = byKind('ClusterRole') as unknown as {
      metadata: { name: string };
      rules: { apiGroups: string[]; resources: string[]; resourceNames?: string[]; verbs: string[] }[];
    }[];
    const granted = new Set(
      role!.rules.flatMap((r) =>
        r.resources.flatMap((res) =>
          (r.resourceNames ?? ['']).flatMap((n) => r.verbs.map((v) => `${res}${n ? `/${n}` : ''} ${v}`)),
        ),
      ),
    );
    assert.deepEqual([...granted].sort(), [...used].sort());
    const [binding] = byKind('ClusterRoleBinding') as unknown as {
      subjects: { name: string }[];
      roleRef: { name: string };
    }[];
    assert.equal(binding!.roleRef.name, role!.metadata.name);
    assert.equal(binding!.subjects[0]!.name, 'ambient-bpf');
  });
});

// ---- Platform overlays ----

type Container = {
  name: string;
  args: string[];
  securityContext: unknown;
  volumeMounts: { name: string; mountPath: string; mountPropagation?: string }[];
};
type DaemonSet = K8sObject & {
  spec: {
    template: {
      spec: {
        containers: Container[];
        volumes: { name: string; hostPath?: { path: string; type?: string } }[];
      } & Record<string, unknown>;
    };
  };
};

/** The platform paths each overlay must give the agent (node paths; the agent sees them under
 * --host-root). Every overlay is listed: a new one needs its row. */
const BASE_PATHS = {
  binDir: '/opt/cni/bin',
  confDir: '/etc/cni/net.d',
  confFile: undefined as string | undefined,
  netnsDirs: ['/var/run/netns'],
};
const PLATFORMS: Record<string, typeof BASE_PATHS> = {
  gke: { ...BASE_PATHS, binDir: '/home/kubernetes/bin' },
  k3s: { ...BASE_PATHS, binDir: '/var/lib/rancher/k3s/data/cni', confDir: '/var/lib/rancher/k3s/agent/etc/cni/net.d' },
  k3d: { ...BASE_PATHS, binDir: '/bin', confDir: '/var/lib/rancher/k3s/agent/etc/cni/net.d' },
  microk8s: {
    ...BASE_PATHS,
    binDir: '/var/snap/microk8s/current/opt/cni/bin',
    confDir: '/var/snap/microk8s/current/args/cni-network',
  },
  minikube: { ...BASE_PATHS, netnsDirs: ['/var/run/netns', '/var/run/docker/netns'] },
  openshift: {
    ...BASE_PATHS,
    binDir: '/var/lib/cni/bin',
    confDir: '/etc/kubernetes/cni/net.d',
    confFile: '00-multus.conf',
  },
};

/** Is kubectl there? Outside CI a machine without it skips the rendering tests; in CI it fails. */
function kubectlMissing(): string | undefined {
  try {
    execFileSync('kubectl', ['version', '--client'], { stdio: 'ignore' });
    return undefined;
  } catch {
    const why = 'kubectl is not installed (scripts/setup.sh installs Debian’s kubernetes-client)';
    if (process.env.CI === 'true') throw new Error(`CI=true and ${why}: the overlays must be rendered in CI`);
    return why;
  }
}

/** `kubectl kustomize DIR`, as objects (stderr: newer kustomize's deprecation warnings). */
function render(dir: string): K8sObject[] {
  const out = execFileSync('kubectl', ['kustomize', dir], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
    maxBuffer: 16 << 20,
  });
  return parseAllDocuments(out).map((d) => d.toJS() as K8sObject);
}

/** The agent's flags as yargs would see them (repeated ones collected). */
function flags(args: string[]): Map<string, string[]> {
  const m = new Map<string, string[]>();
  for (const a of args.slice(1)) {
    const [k, ...v] = a.replace(/^--/, '').split('=');
    m.set(k!, [...(m.get(k!) ?? []), v.join('=')]);
  }
  return m;
}

/** The node paths the DaemonSet gives the agent, each checked against the hostPath volume mounted
 * where the agent looks: the flag's value (under --host-root) is a mount's path, whose volume is
 * the node's path named by the flag. */
function platformPaths(ds: DaemonSet): typeof BASE_PATHS {
  const pod = ds.spec.template.spec;
  const [c] = pod.containers;
  const f = flags(c!.args);
  const hostRoot = f.get('host-root')?.[0];
  assert.equal(hostRoot, '/host');
  const mountedFrom = (agentPath: string, flag: string): string => {
    const mount = c!.volumeMounts.find((m) => m.mountPath === agentPath);
    assert.ok(mount, `--${flag}: nothing is mounted at ${agentPath}`);
    const volume = pod.volumes.find((v) => v.name === mount.name);
    assert.ok(volume?.hostPath, `--${flag}: ${agentPath} is not a hostPath volume`);
    return volume.hostPath.path;
  };
  const node = (flag: string): string => {
    const values = f.get(flag) ?? [];
    assert.equal(values.length, 1, `--${flag} once`);
    const v = values[0]!;
    assert.ok(v.startsWith(`${hostRoot}/`), `--${flag}=${v} is not under --host-root`);
    const nodePath = v.slice(hostRoot.length);
    assert.equal(mountedFrom(v, flag), nodePath, `--${flag}=${v}: its hostPath is not the node's ${nodePath}`);
    return nodePath;
  };
  const netnsDirs = f.get('netns-dir') ?? [];
  assert.ok(netnsDirs.length > 0, '--netns-dir is given');
  for (const d of netnsDirs) {
    assert.equal(
      mountedFrom(`${hostRoot}${d}`, 'netns-dir'),
      d,
      `--netns-dir=${d}: its hostPath is not the node's ${d}`,
    );
    // Namespaces bind-mounted after the agent started must show up in it.
    assert.equal(
      c!.volumeMounts.find((m) => m.mountPath === `${hostRoot}${d}`)!.mountPropagation,
      'HostToContainer',
      `--netns-dir=${d}`,
    );
  }
  return {
    binDir: node('cni-bin-dir'),
    confDir: node('cni-conf-dir'),
    confFile: f.get('cni-conf-file')?.[0],
    netnsDirs,
  };
}

/** The DaemonSet less what a platform may change (args, volumes and their mounts). */
function platformFree(ds: DaemonSet): unknown {
  const copy = structuredClone(ds);
  const pod = copy.spec.template.spec as Record<string, unknown> & { containers: Partial<Container>[] };
  delete pod.volumes;
  for (const c of pod.containers) {
    delete c.args;
    delete c.volumeMounts;
  }
  return copy;
}

describe('platform overlays', () => {
  const skip = kubectlMissing();
  const overlays = existsSync(`${ROOT}overlays`) ? readdirSync(`${ROOT}overlays`).sort() : [];

  it('are the platforms this test knows', () => {
    assert.deepEqual(overlays, Object.keys(PLATFORMS).sort());
  });

  it('manifests/ renders the base', { skip }, () => {
    const rendered = render(ROOT);
    assert.deepEqual(
      rendered.map((o) => `${o.kind}/${o.metadata.name}`).sort(),
      objects.map((o) => `${o.kind}/${o.metadata.name}`).sort(),
    );
    const ds = rendered.find((o) => o.kind === 'DaemonSet') as DaemonSet;
    assert.deepEqual(platformPaths(ds), BASE_PATHS);
  });

  for (const name of Object.keys(PLATFORMS)) {
    it(`${name}: valid objects, the agent's flags on the platform's paths, the base otherwise`, { skip }, async () => {
      const base = render(`${ROOT}base`);
      const rendered = render(`${ROOT}overlays/${name}`);
      for (const o of rendered) {
        const [group, version] = o.apiVersion.includes('/') ? o.apiVersion.split('/') : ['', o.apiVersion];
        const mod = (await import(`kubernetes-models/${group ? `${group}/` : ''}${version}/${o.kind}`)) as Record<
          string,
          new (o: object) => { validate(): void }
        >;
        assert.doesNotThrow(() => new mod[o.kind]!(o).validate(), `${o.kind}/${o.metadata.name}`);
      }
      // Everything of the base is there, unchanged but for the DaemonSet.
      const key = (o: K8sObject) => `${o.kind}/${o.metadata.name}`;
      for (const b of base) {
        const o = rendered.find((r) => key(r) === key(b));
        assert.ok(o, `${key(b)} missing`);
        if (b.kind !== 'DaemonSet') assert.deepEqual(o, b, key(b));
      }
      const ds = rendered.find((o) => o.kind === 'DaemonSet') as DaemonSet;
      const baseDs = base.find((o) => o.kind === 'DaemonSet') as DaemonSet;
      assert.deepEqual(platformFree(ds), platformFree(baseDs), 'only args, volumes and mounts differ from the base');
      assert.deepEqual(platformPaths(ds), PLATFORMS[name]);
      // Every other flag as in the base, in the base's order.
      const platformFlag = /^--(cni-bin-dir|cni-conf-dir|cni-conf-file|netns-dir)=/;
      const [c] = ds.spec.template.spec.containers;
      assert.deepEqual(
        c!.args.filter((a) => !platformFlag.test(a)),
        baseDs.spec.template.spec.containers[0]!.args.filter((a) => !platformFlag.test(a)),
      );
      // The agent's own start-up checks accept them, and its --help names each.
      const { checkPlatformPaths } = await import('../cni-agent/src/commands/agent.js');
      const f = flags(c!.args);
      const one = (k: string) => f.get(k)?.[0] ?? '';
      assert.doesNotThrow(() =>
        checkPlatformPaths({
          'host-root': one('host-root'),
          bpffs: one('bpffs'),
          'plugin-socket': one('plugin-socket'),
          'cni-policy-file': one('cni-policy-file'),
          'cni-bin-dir': one('cni-bin-dir'),
          'cni-conf-dir': one('cni-conf-dir'),
          'cni-conf-file': f.get('cni-conf-file')?.[0],
          'netns-dir': f.get('netns-dir') ?? [],
        }),
      );
      const help = (await runCli(['agent', '--help'])).stdout;
      for (const k of f.keys()) assert.match(help, new RegExp(`--${k}\\b`), `--${k} is not an agent flag`);
      // No hostPath volume without its use: the base's, with the platform's paths.
      const hostPaths = (d: DaemonSet) =>
        d.spec.template.spec.volumes.flatMap((v) => (v.hostPath ? [v.hostPath.path] : []));
      const expected = hostPaths(baseDs)
        .filter((p) => p !== BASE_PATHS.binDir && p !== BASE_PATHS.confDir && !BASE_PATHS.netnsDirs.includes(p))
        .concat(PLATFORMS[name]!.binDir, PLATFORMS[name]!.confDir, ...PLATFORMS[name]!.netnsDirs);
      assert.deepEqual(hostPaths(ds).sort(), expected.sort());
      if (name === 'openshift') {
        // The SCC its pods are admitted under, granted to the agent's service account only.
        const role = rendered.find((o) => key(o) === 'ClusterRole/ambient-bpf-scc') as unknown as { rules: unknown[] };
        assert.deepEqual(role.rules, [
          {
            apiGroups: ['security.openshift.io'],
            resources: ['securitycontextconstraints'],
            resourceNames: ['privileged'],
            verbs: ['use'],
          },
        ]);
        const binding = rendered.find((o) => key(o) === 'ClusterRoleBinding/ambient-bpf-scc') as unknown as {
          subjects: unknown[];
          roleRef: { name: string };
        };
        assert.deepEqual(binding.subjects, [
          { kind: 'ServiceAccount', name: 'ambient-bpf', namespace: 'istio-system' },
        ]);
        assert.equal(binding.roleRef.name, 'ambient-bpf-scc');
        assert.equal(rendered.length, base.length + 2);
      } else {
        assert.equal(rendered.length, base.length);
      }
    });
  }
});
