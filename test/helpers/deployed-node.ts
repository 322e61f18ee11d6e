// One node with the product as deployed, shared by test/deployed.test.ts and
// bench/pod-start.bench.ts: the images built by scripts/build-image.sh, a private containerd
// (cri.ts), the in-repo API server over HTTPS reached the in-cluster way, the node's primary CNI
// (bridge + host-local, IPv4 and IPv6), the agent run from manifests/base/daemonset.yaml (its installer
// chains the plugin into that configuration), the ztunnel stand-in in its own pod, and the
// namespaces: an ambient one, a plain one, and istio-system.
import { execFile, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { parse as parseYaml } from 'yaml';
import { Datapath } from '../../bpf/src/index.js';
import { socketsInNetns } from '../../bpf/src/node-netns.js';
import { ContainerdNode, daemonSetPod, Kubelet, loadManifest, type K8sPod, type RunningPod } from './cri.js';
import { kernelTest, TEST_PREFIX } from './kernel.js';
import { KubeApiTestServer } from './kube-api-server.js';
import { until } from './wait.js';

const run = promisify(execFile);
const REPO = fileURLToPath(new URL('../../../', import.meta.url));
const CACHE = process.env.AMBIENT_BPF_IMAGE_CACHE ?? '/var/tmp/ambient-bpf-image-cache';
export const NODE_NAME = `${TEST_PREFIX}-node`;
/** The namespace labelled istio.io/dataplane-mode=ambient, and one without the label. */
export const AMBIENT_NAMESPACE = 'shop';
export const PLAIN_NAMESPACE = 'plain';

/** What the deployed node needs besides the kernel: Debian's containerd, runc and the image tools. */
export function missingRuntime(): string | undefined {
  for (const tool of ['containerd', 'ctr', 'runc', 'mmdebstrap', 'buildah', 'openssl', 'nsenter', 'unshare']) {
    try {
      execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
    } catch {
      return `${tool} is not installed (scripts/setup.sh installs it)`;
    }
  }
  if (!existsSync('/bin/busybox') || !existsSync('/usr/lib/cni/bridge'))
    return 'busybox-static and containernetworking-plugins are needed (scripts/setup.sh)';
  return undefined;
}

/** node:test options: skipped without the kernel or the runtime, except under CI=true. */
export function runtimeTest(): { skip?: string } {
  const k = kernelTest();
  if (k.skip) return k;
  const missing = missingRuntime();
  if (!missing) return {};
  if (process.env.CI === 'true') throw new Error(`CI=true and ${missing}: the deployed test must run in CI`);
  return { skip: missing };
}

/** The images (agent, pause, app), built by scripts/build-image.sh once per content of what goes
 * into them (everything the build context has, as git lists it, and this machine's node). */
export async function images(): Promise<string> {
  const files = execFileSync('git', ['ls-files', '-co', '--exclude-standard'], { cwd: REPO, encoding: 'utf8' })
    .split('\n')
    .filter((f) => f && !/^(test|bench)\//.test(f) && existsSync(join(REPO, f)))
    .sort();
  const h = createHash('sha256').update(process.version);
  for (const f of files)
    h.update(f)
      .update('\0')
      .update(readFileSync(join(REPO, f)))
      .update('\0');
  const dir = join(CACHE, h.digest('hex').slice(0, 16));
  if (existsSync(join(dir, 'app.tar'))) return dir;
  mkdirSync(CACHE, { recursive: true });
  const tmp = `${dir}.tmp-${process.pid}`;
  try {
    await run('bash', [join(REPO, 'scripts/build-image.sh'), tmp, '--test-images'], { maxBuffer: 1 << 26 });
  } catch (err) {
    rmSync(tmp, { recursive: true, force: true });
    const e = err as { stderr?: string; message: string };
    throw new Error(`scripts/build-image.sh failed: ${(e.stderr ?? e.message).split('\n').slice(-12).join('\n')}`);
  }
  // Only the newest build is kept.
  for (const old of readdirSync(CACHE))
    if (join(CACHE, old) !== tmp) rmSync(join(CACHE, old), { recursive: true, force: true });
  renameSync(tmp, dir);
  return dir;
}

/** An app pod (the busybox app image, no service account token). */
export const appPod = (name: string, namespace: string, labels: Record<string, string> = {}): K8sPod => ({
  metadata: { name, namespace, labels: { app: name, ...labels } },
  spec: { containers: [{ name: 'app', image: 'localhost/abt-app:1' }], automountServiceAccountToken: false },
});

export interface DeployedNodeOptions {
  /** How long the agent may take to chain its plugin into the CNI configuration (a failure only:
   * the wait ends as soon as it has). */
  agentStartTimeoutMs?: number;
}

/** The node, started by start() and removed by stop(), which also undoes a start() that failed
 * half-way. Fields are set as start() gets to them. */
export class DeployedNode {
  node: ContainerdNode | undefined;
  api: KubeApiTestServer | undefined;
  kubelet: Kubelet | undefined;
  agent: RunningPod | undefined;
  ztunnel: RunningPod | undefined;

  constructor(private readonly o: DeployedNodeOptions = {}) {}

  async start(): Promise<void> {
    const imageDir = await images();
    const node = (this.node = new ContainerdNode());
    await node.start();
    await node.importImage(join(imageDir, 'pause.tar'), 'localhost/abt-pause:1');
    await node.importImage(join(imageDir, 'app.tar'), 'localhost/abt-app:1');
    // The DaemonSet names the image as the kustomization leaves it; kubelet resolves short names.
    await node.importImage(
      join(imageDir, 'ambient-bpf.tar'),
      'localhost/ambient-bpf:latest',
      'docker.io/library/ambient-bpf:latest',
    );

    // The API server, over HTTPS, on the node's loopback (where a host-network pod reaches it).
    await run('openssl', [
      'req',
      '-x509',
      '-newkey',
      'ec',
      '-pkeyopt',
      'ec_paramgen_curve:prime256v1',
      '-nodes',
      '-days',
      '1',
      '-subj',
      '/CN=kube-apiserver',
      '-addext',
      'subjectAltName=IP:127.0.0.1',
      '-keyout',
      join(node.dir, 'api.key'),
      '-out',
      join(node.dir, 'api.crt'),
    ]);
    const [sock] = await socketsInNetns(node.netnsPath, [{ listen: { address: '127.0.0.1', port: 0 } }]);
    if (!sock || !('fd' in sock)) throw new Error(`cannot listen in the node's network: ${JSON.stringify(sock)}`);
    const api = (this.api = new KubeApiTestServer());
    api.token = `token-${node.id}`;
    await api.start({
      tls: { key: readFileSync(join(node.dir, 'api.key')), cert: readFileSync(join(node.dir, 'api.crt')) },
      fd: sock.fd,
    });
    const port = Number(new URL(api.url).port);
    const kubelet = (this.kubelet = new Kubelet({
      node,
      nodeName: NODE_NAME,
      api,
      serviceHost: '127.0.0.1',
      servicePort: port,
      token: api.token,
      caCert: readFileSync(join(node.dir, 'api.crt'), 'utf8'),
    }));

    api.upsert('namespaces', { apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'istio-system' } });
    api.upsert('namespaces', {
      apiVersion: 'v1',
      kind: 'Namespace',
      metadata: { name: AMBIENT_NAMESPACE, labels: { 'istio.io/dataplane-mode': 'ambient' } },
    });
    api.upsert('namespaces', { apiVersion: 'v1', kind: 'Namespace', metadata: { name: PLAIN_NAMESPACE } });

    // The node's primary CNI: bridge + host-local, IPv4 and IPv6.
    writeFileSync(
      join(node.hostPath('/etc/cni/net.d'), '10-pods.conflist'),
      JSON.stringify({
        cniVersion: '1.0.0',
        name: `${TEST_PREFIX}-pods`,
        plugins: [
          {
            type: 'bridge',
            bridge: 'cni0',
            isGateway: true,
            ipMasq: false,
            hairpinMode: true,
            ipam: {
              type: 'host-local',
              dataDir: '/run/cni-ipam',
              ranges: [[{ subnet: '198.18.10.0/24' }], [{ subnet: '2001:db8:10::/64' }]],
              routes: [{ dst: '0.0.0.0/0' }, { dst: '::/0' }],
            },
          },
        ],
      }),
    );

    // The agent, from the DaemonSet (namespace from the kustomization).
    const namespace = (loadManifest('kustomization.yaml')[0] as { namespace: string }).namespace;
    // The DaemonSet itself, which the agent reads on SIGTERM: present, a restart or a rolling
    // update leaves everything in place (absent, the agent would take itself off the node).
    const ds = loadManifest('daemonset.yaml').find((o) => o.kind === 'DaemonSet') as { metadata: { name: string } };
    api.daemonSets.set(`${namespace}/${ds.metadata.name}`, { ...ds, metadata: { ...ds.metadata, namespace } });
    // The node, as kubelet registers it: the agent checks on SIGTERM that the DaemonSet still selects it.
    api.nodes.set(NODE_NAME, {
      apiVersion: 'v1',
      kind: 'Node',
      metadata: { name: NODE_NAME, labels: { 'kubernetes.io/os': 'linux', 'kubernetes.io/hostname': NODE_NAME } },
    });
    const agent = (this.agent = await kubelet.runPod(daemonSetPod('daemonset.yaml', namespace)));
    const conflist = node.hostPath('/etc/cni/net.d/10-pods.conflist');
    try {
      await until(
        () =>
          (JSON.parse(readFileSync(conflist, 'utf8')) as { plugins: { type: string }[] }).plugins.at(-1)?.type ===
          'ambient-bpf-cni',
        'the agent chaining its plugin into the CNI configuration',
        this.o.agentStartTimeoutMs ?? 60_000,
      );
    } catch (err) {
      const st = await kubelet.containerState(agent, 'agent');
      throw new Error(
        `${(err as Error).message}; agent container ${st.state} (exit ${st.exit_code}): ${kubelet.containerLog(agent, 'agent').slice(-3000)}`,
      );
    }
    this.ztunnel = await kubelet.runPod(
      parseYaml(readFileSync(join(REPO, 'test/fixtures/ztunnel-standin-pod.yaml'), 'utf8')) as K8sPod,
    );
    // Ambient pods start only once ztunnel is connected (their ADD fails closed until then).
    const metricsPort = kubelet.containerPort(agent.pod.spec.containers[0]!, 'metrics');
    const connected = async () => {
      const { body } = await kubelet.httpGetFromNode('127.0.0.1', metricsPort, '/metrics').catch(() => ({ body: '' }));
      return Number(/^ambient_bpf_ztunnel_connections (\d+)/m.exec(body)?.[1] ?? 0) >= 1;
    };
    await until(
      connected,
      () =>
        `the ztunnel stand-in connecting to the agent; its log: ${kubelet.containerLog(this.ztunnel!, 'istio-proxy').slice(-2000)}`,
      this.o.agentStartTimeoutMs ?? 60_000,
    );
  }

  /** Deletes every pod (the agent last, as on a drained node: each CNI DEL reaches a running
   * agent), stops containerd, closes the API server, checks that no pod is still attached in the
   * agent's pins and removes the node's bpffs directory. Throws the first error, after all of it. */
  async stop(): Promise<void> {
    const errors: unknown[] = [];
    for (const rp of [...(this.kubelet?.pods ?? [])].reverse()) {
      try {
        await this.kubelet!.deletePod(rp);
      } catch (err) {
        errors.push(err);
      }
    }
    try {
      await this.node?.stop();
    } catch (err) {
      errors.push(err);
    }
    await this.api?.close();
    // The agent's maps stay pinned (as on a node, where a restarted agent adopts them); the pods
    // are gone, so nothing is attached any more.
    const node = this.node;
    if (node && existsSync(node.bpffs)) {
      const root = join(node.bpffs, 'ambient-bpf');
      if (existsSync(root)) {
        try {
          const dp = await Datapath.open({ bpffsRoot: root });
          const left = await dp.list();
          dp.close();
          if (left.length)
            errors.push(new Error(`pods still attached after the node stopped: ${left.map((p) => p.uid).join(', ')}`));
        } catch (err) {
          errors.push(err);
        }
      }
      rmSync(node.bpffs, { recursive: true, force: true });
    }
    if (errors.length) throw errors[0];
  }
}
