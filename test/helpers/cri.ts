// A node as Kubernetes runs one, for the test of the product as deployed: Debian's containerd (with
// its CRI plugin and runc) started by the test with its own config, root, state, socket and CNI
// directories, and a kubelet stand-in that turns pod specs (the DaemonSet's, read from
// manifests/) into CRI calls the way kubelet does.
//
// The node's file system and network are the test's own, so nothing of the host is changed:
// containerd runs in a network namespace the test makes (the node network: the CNI bridge, host
// network pods) and in a private mount namespace where the node's directories that pods and the
// CNI configuration name are the test's: /run (netns, the agent's and ztunnel's sockets), /opt
// (CNI binaries), /etc and /var/lib (overlays: /etc/cni/net.d, CNI caches), /sys/fs/bpf (a bpffs
// directory named with TEST_PREFIX). Host paths in pod specs are used as written, as kubelet does,
// and mean those directories. /proc and /sys/fs/cgroup are the machine's (hostPID, cgroups).
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import {
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  rmdirSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { parseAllDocuments } from 'yaml';
import { cgroup2Mount } from '../../bpf/src/index.js';
import { connectFromNetns } from '../../bpf/src/node-netns.js';
import { TEST_PREFIX, uniqueSuffix } from './kernel.js';
import type { KubeApiTestServer } from './kube-api-server.js';
import { sleep } from './wait.js';

const run = promisify(execFile);
const PROTO = fileURLToPath(new URL('../../../test/cri/runtime-v1-subset.proto', import.meta.url));
export const MANIFESTS = fileURLToPath(new URL('../../../manifests/base', import.meta.url));

type Call = (
  req: unknown,
  meta: grpc.Metadata,
  opts: grpc.CallOptions,
  cb: (err: grpc.ServiceError | null, res: unknown) => void,
) => void;

/** The runtime service of a CRI socket (runtime.v1). */
export class CriClient {
  private readonly client: grpc.Client & Record<string, Call>;

  constructor(socket: string) {
    const def = protoLoader.loadSync(PROTO, { keepCase: true, longs: Number, enums: String, defaults: true });
    const pkg = grpc.loadPackageDefinition(def) as unknown as {
      runtime: { v1: { RuntimeService: grpc.ServiceClientConstructor } };
    };
    this.client = new pkg.runtime.v1.RuntimeService(
      `unix://${socket}`,
      grpc.credentials.createInsecure(),
    ) as unknown as grpc.Client & Record<string, Call>;
  }

  call<T = Record<string, unknown>>(method: string, req: unknown, timeoutMs = 120_000): Promise<T> {
    return new Promise((resolve, reject) => {
      this.client[method]!.call(
        this.client,
        req,
        new grpc.Metadata(),
        { deadline: Date.now() + timeoutMs },
        (err, res) => (err ? reject(new Error(`CRI ${method}: ${err.details || err.message}`)) : resolve(res as T)),
      );
    });
  }

  close(): void {
    this.client.close();
  }
}

export interface ExecResult {
  stdout: string;
  stderr: string;
  exit_code: number;
}

/** Where every kernel hierarchy keeps cgroups (v1 controllers and the v2 one). */
function cgroupHierarchies(): string[] {
  return readFileSync('/proc/self/mounts', 'utf8')
    .split('\n')
    .map((l) => l.split(' '))
    .filter((f) => f[2] === 'cgroup' || f[2] === 'cgroup2')
    .map((f) => f[1]!);
}

/** Removes a cgroup directory tree (children first); processes must be gone. */
function removeCgroupTree(path: string): void {
  if (!existsSync(path)) return;
  for (const e of readdirSync(path, { withFileTypes: true })) if (e.isDirectory()) removeCgroupTree(join(path, e.name));
  rmdirSync(path);
}

/** Test cgroups under any hierarchy (v1 or v2) left behind. */
export function leftoverCgroupsAnyHierarchy(): string[] {
  return cgroupHierarchies().flatMap((h) =>
    existsSync(h)
      ? readdirSync(h)
          .filter((n) => n.startsWith(`${TEST_PREFIX}-`))
          .map((n) => join(h, n))
      : [],
  );
}

/** The test's containerd: its node network namespace, its mount namespace, its CRI socket. */
export class ContainerdNode {
  readonly id = uniqueSuffix();
  readonly dir = `/tmp/${TEST_PREFIX}-cri-${this.id}`;
  readonly netnsName = `${TEST_PREFIX}-node-${this.id}`;
  readonly netnsPath = `/run/netns/${this.netnsName}`;
  /** The host's directory behind the node's /sys/fs/bpf. */
  readonly bpffs = `/sys/fs/bpf/${TEST_PREFIX}-cri-${this.id}`;
  /** Every pod's cgroups go under this (kubelet's /kubepods, QoS level and pod cgroup below). */
  readonly cgroupParent = `/${TEST_PREFIX}-kubepods-${this.id}`;
  readonly socket = join(this.dir, 'containerd.sock');
  cri!: CriClient;
  private proc: ChildProcess | undefined;
  private exited: Promise<void> = Promise.resolve();

  /** The host's path for a path on the node (what the node's mount namespace shows there). */
  hostPath(nodePath: string): string {
    const maps: [string, string][] = [
      ['/var/run/', join(this.dir, 'run/')],
      ['/run/', join(this.dir, 'run/')],
      ['/opt/', join(this.dir, 'opt/')],
      ['/etc/cni/net.d/', join(this.dir, 'cni-conf/')],
      ['/sys/fs/bpf/', `${this.bpffs}/`],
    ];
    const p = nodePath.endsWith('/') ? nodePath : `${nodePath}/`;
    for (const [from, to] of maps) if (p.startsWith(from)) return join(to, p.slice(from.length)).replace(/\/$/, '');
    return nodePath;
  }

  async start(): Promise<void> {
    for (const d of [
      'run/netns',
      'opt/cni/bin',
      'cni-conf',
      'etc-up',
      'etc-work',
      'varlib-up',
      'varlib-work',
      'root',
      'state',
      'pods',
      'logs',
    ])
      mkdirSync(join(this.dir, d), { recursive: true });
    mkdirSync(this.bpffs);
    for (const plugin of ['bridge', 'host-local', 'loopback'])
      await run('cp', [`/usr/lib/cni/${plugin}`, join(this.dir, 'opt/cni/bin/')]);
    await run('ip', ['netns', 'add', this.netnsName]);
    await run('ip', ['-n', this.netnsName, 'link', 'set', 'lo', 'up']);
    writeFileSync(join(this.dir, 'containerd.toml'), this.config());
    // The node's mounts, then containerd.
    const d = this.dir;
    const script = [
      'set -e',
      // Private from the host (unshare), then shared within this namespace only: runtimes check
      // the mount a HostToContainer path is on, as lexically written (/var/run is on /).
      'mount --make-rshared /',
      `mount --bind ${d}/run /run`,
      `mount -t overlay overlay -o lowerdir=/etc,upperdir=${d}/etc-up,workdir=${d}/etc-work /etc`,
      'mkdir -p /etc/cni/net.d',
      `mount --bind ${d}/cni-conf /etc/cni/net.d`,
      `mount -t overlay overlay -o lowerdir=/var/lib,upperdir=${d}/varlib-up,workdir=${d}/varlib-work /var/lib`,
      `mount --bind ${d}/opt /opt`,
      `mount --bind ${this.bpffs} /sys/fs/bpf`,
      `exec containerd --config ${d}/containerd.toml`,
    ].join('\n');
    const log = openSync(join(this.dir, 'containerd.log'), 'a');
    const proc = spawn(
      'nsenter',
      [`--net=${this.netnsPath}`, 'unshare', '--mount', '--propagation', 'private', 'sh', '-c', script],
      { stdio: ['ignore', log, log] },
    );
    closeSync(log);
    this.proc = proc;
    this.exited = new Promise((resolve) => proc.once('exit', () => resolve()));
    this.cri = new CriClient(this.socket);
    for (const start = Date.now(); ; await sleep(200)) {
      if (proc.exitCode !== null) throw new Error(`containerd exited (${proc.exitCode}): ${this.logTail()}`);
      if (existsSync(this.socket)) {
        try {
          await this.cri.call('Version', { version: 'v1' }, 2000);
          break;
        } catch {
          /* the CRI plugin is not ready yet */
        }
      }
      if (Date.now() - start > 30_000) throw new Error(`containerd's CRI did not answer: ${this.logTail()}`);
    }
  }

  logTail(): string {
    try {
      return readFileSync(join(this.dir, 'containerd.log'), 'utf8').split('\n').slice(-15).join('\n');
    } catch {
      return '(no log)';
    }
  }

  /** containerd's config: everything under the test's directory. ABT_RUNC_BINARY names a runc
   * wrapper to use instead (debugging: `runc --debug`, a copy of each bundle's config.json). */
  private config(): string {
    const d = this.dir;
    return `version = 2
root = "${d}/root"
state = "${d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "${d}/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "${d}/opt-containerd"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/abt-pause:1"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  # This machine refuses to lower oom_score_adj (containerd asks -998 for sandboxes).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
${
  process.env.ABT_RUNC_BINARY
    ? `      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "${process.env.ABT_RUNC_BINARY}"
`
    : ''
}`;
  }

  /** `ctr` against this containerd, in Kubernetes' namespace. */
  ctr(...args: string[]): Promise<{ stdout: string }> {
    return run('ctr', ['--address', this.socket, '--namespace', 'k8s.io', ...args], { maxBuffer: 1 << 24 });
  }

  /** Imports a docker/OCI archive; `alsoAs` tags its image with more names. */
  async importImage(archive: string, image: string, ...alsoAs: string[]): Promise<void> {
    await this.ctr('images', 'import', '--no-unpack', archive);
    for (const name of alsoAs) await this.ctr('images', 'tag', '--force', image, name);
  }

  /** Runs a command in the node's mount and network namespaces (what kubelet on the node sees). */
  nodeExec(cmd: string[]): Promise<{ stdout: string }> {
    return run('nsenter', [`--target=${this.proc!.pid}`, '--mount', '--net', '--', ...cmd]);
  }

  /** Stops and removes every sandbox (CNI DEL for each), then containerd and anything it left
   * running, the node's namespaces and cgroups, and its files. */
  async stop(): Promise<void> {
    const errors: string[] = [];
    if (this.proc && this.proc.exitCode === null) {
      try {
        const { items } = await this.cri.call<{ items: { id: string }[] }>('ListPodSandbox', {});
        for (const s of items) {
          await this.cri.call('StopPodSandbox', { pod_sandbox_id: s.id }).catch((e: Error) => errors.push(e.message));
          await this.cri.call('RemovePodSandbox', { pod_sandbox_id: s.id }).catch((e: Error) => errors.push(e.message));
        }
        const images = (await this.ctr('images', 'list', '--quiet')).stdout.split('\n').filter(Boolean);
        if (images.length) await this.ctr('images', 'remove', ...images);
      } catch (err) {
        errors.push((err as Error).message);
      }
      this.cri.close();
      this.proc.kill('SIGTERM');
      await Promise.race([this.exited, sleep(10_000)]);
      if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGKILL');
      await this.exited;
    }
    // Shims (and their containers) outlive containerd; these are ours by their socket address.
    for (let round = 0; round < 50; round++) {
      const ours = readdirSync('/proc')
        .filter((p) => /^\d+$/.test(p))
        .filter((p) => {
          try {
            return readFileSync(`/proc/${p}/cmdline`, 'utf8').includes(this.socket);
          } catch {
            return false;
          }
        });
      if (!ours.length) break;
      for (const p of ours) {
        try {
          process.kill(Number(p), 'SIGKILL');
        } catch {
          /* gone */
        }
      }
      await sleep(100);
    }
    await run('ip', ['netns', 'delete', this.netnsName]).catch(() => undefined);
    for (const h of cgroupHierarchies()) {
      try {
        removeCgroupTree(join(h, this.cgroupParent));
      } catch (err) {
        errors.push(`cgroup ${h}${this.cgroupParent}: ${(err as Error).message}`);
      }
    }
    rmSync(this.dir, { recursive: true, force: true });
    if (errors.length) throw new Error(`stopping the node: ${errors.join('; ')}`);
  }
}

// ---- the kubelet stand-in --------------------------------------------------------------------

type Obj = Record<string, unknown>;
export interface K8sContainer {
  name: string;
  image: string;
  command?: string[];
  args?: string[];
  env?: { name: string; value?: string; valueFrom?: { fieldRef?: { fieldPath: string } } }[];
  envFrom?: { configMapRef?: { name: string } }[];
  volumeMounts?: { name: string; mountPath: string; readOnly?: boolean; mountPropagation?: string }[];
  securityContext?: {
    privileged?: boolean;
    allowPrivilegeEscalation?: boolean;
    readOnlyRootFilesystem?: boolean;
    runAsUser?: number;
    seccompProfile?: { type: string; localhostProfile?: string };
    appArmorProfile?: { type: string; localhostProfile?: string };
    seLinuxOptions?: { user?: string; role?: string; type?: string; level?: string };
    capabilities?: { add?: string[]; drop?: string[] };
  };
  resources?: { requests?: { cpu?: string; memory?: string }; limits?: { cpu?: string; memory?: string } };
  ports?: { name: string; containerPort: number }[];
  readinessProbe?: { httpGet?: { path: string; port: number | string } };
  livenessProbe?: { httpGet?: { path: string; port: number | string } };
}
/** A Kubernetes seccomp or AppArmor profile as CRI's SecurityProfile. */
function securityProfile(p: { type: string; localhostProfile?: string } | undefined): {
  profile_type: string;
  localhost_ref: string;
} {
  const type = p?.type === 'RuntimeDefault' ? 'RuntimeDefault' : p?.type === 'Localhost' ? 'Localhost' : 'Unconfined';
  return { profile_type: type, localhost_ref: p?.localhostProfile ?? '' };
}

export interface K8sPodSpec {
  serviceAccountName?: string;
  terminationGracePeriodSeconds?: number;
  automountServiceAccountToken?: boolean;
  hostNetwork?: boolean;
  hostPID?: boolean;
  containers: K8sContainer[];
  volumes?: { name: string; hostPath?: { path: string; type?: string }; emptyDir?: Obj }[];
  securityContext?: { seccompProfile?: { type: string } };
}
export interface K8sPod {
  metadata: {
    name: string;
    namespace: string;
    labels?: Record<string, string>;
    annotations?: Record<string, string>;
    uid?: string;
  };
  spec: K8sPodSpec;
}

/** Every document of a YAML file of manifests/. */
export function loadManifest(file: string): Obj[] {
  return parseAllDocuments(readFileSync(join(MANIFESTS, file), 'utf8')).map((d) => d.toJSON() as Obj);
}

/** The pod the DaemonSet makes on a node (its template, named as a DaemonSet's pods are). */
export function daemonSetPod(file: string, namespace: string): K8sPod {
  const ds = loadManifest(file).find((o) => o.kind === 'DaemonSet') as {
    metadata: { name: string };
    spec: { template: { metadata: { labels: Record<string, string> }; spec: K8sPodSpec } };
  };
  return {
    metadata: {
      name: `${ds.metadata.name}-${uniqueSuffix().slice(0, 5)}`,
      namespace,
      labels: ds.spec.template.metadata.labels,
    },
    spec: structuredClone(ds.spec.template.spec),
  };
}

/** Kubernetes quantities kubelet turns into cgroup settings. */
function bytes(q: string | undefined): number {
  if (!q) return 0;
  const m = /^(\d+)(Ki|Mi|Gi|K|M|G)?$/.exec(q);
  if (!m) throw new Error(`unsupported quantity ${q}`);
  const unit = { Ki: 1024, Mi: 1024 ** 2, Gi: 1024 ** 3, K: 1e3, M: 1e6, G: 1e9 }[m[2] ?? ''] ?? 1;
  return Number(m[1]) * unit;
}
function milliCpu(q: string | undefined): number {
  if (!q) return 0;
  return q.endsWith('m') ? Number(q.slice(0, -1)) : Number(q) * 1000;
}

/** kubelet's masked and read-only /proc and /sys paths for unprivileged containers. */
const DEFAULT_MASKED_PATHS = [
  '/proc/asound',
  '/proc/acpi',
  '/proc/kcore',
  '/proc/keys',
  '/proc/latency_stats',
  '/proc/timer_list',
  '/proc/timer_stats',
  '/proc/sched_debug',
  '/proc/scsi',
  '/sys/firmware',
  '/sys/devices/virtual/powercap',
];
const DEFAULT_READONLY_PATHS = ['/proc/bus', '/proc/fs', '/proc/irq', '/proc/sys', '/proc/sysrq-trigger'];

/** Docker's short image names, as kubelet and containerd resolve them. */
export function normalizeImage(image: string): string {
  const named = image.includes(':') || image.includes('@') ? image : `${image}:latest`;
  const first = named.split('/')[0]!;
  if (!named.includes('/')) return `docker.io/library/${named}`;
  if (!first.includes('.') && !first.includes(':') && first !== 'localhost') return `docker.io/${named}`;
  return named;
}

export interface RunningPod {
  pod: K8sPod;
  uid: string;
  sandboxId: string;
  sandboxConfig: Obj;
  ips: string[];
  containers: Map<string, { id: string; attempt: number }>;
}

/** kubelet's --cgroup-driver. The node's containerd always uses cgroupfs (systemd is not PID 1
 * here): with `systemd` the pod cgroups are named and nested as the systemd driver makes them. */
export type CgroupDriver = 'cgroupfs' | 'systemd';
export type QosClass = 'Guaranteed' | 'Burstable' | 'BestEffort';

/** The pod's QoS class, as kubelet derives it from the containers' requests and limits. */
export function qosClass(spec: K8sPodSpec): QosClass {
  const res = spec.containers.map((c) => ({ r: c.resources?.requests ?? {}, l: c.resources?.limits ?? {} }));
  if (!res.some(({ r, l }) => r.cpu || r.memory || l.cpu || l.memory)) return 'BestEffort';
  const guaranteed = res.every(
    ({ r, l }) => l.cpu && l.memory && (!r.cpu || r.cpu === l.cpu) && (!r.memory || r.memory === l.memory),
  );
  return guaranteed ? 'Guaranteed' : 'Burstable';
}

/** kubelet's pod cgroup below `root` (its --cgroup-root) for the QoS class and driver. */
export function podCgroupPath(root: string, uid: string, qos: QosClass, driver: CgroupDriver): string {
  const q = qos.toLowerCase();
  if (driver === 'cgroupfs') return qos === 'Guaranteed' ? `${root}/pod${uid}` : `${root}/${q}/pod${uid}`;
  const u = uid.replace(/-/g, '_');
  return qos === 'Guaranteed'
    ? `${root}/kubepods.slice/kubepods-pod${u}.slice`
    : `${root}/kubepods.slice/kubepods-${q}.slice/kubepods-${q}-pod${u}.slice`;
}

export interface KubeletOptions {
  node: ContainerdNode;
  nodeName: string;
  api: KubeApiTestServer;
  /** The API server as pods reach it (the `kubernetes` service's env). */
  serviceHost: string;
  servicePort: number;
  /** The service account token and CA every pod with automount gets. */
  token: string;
  caCert: string;
}

/** A kubelet stand-in: pods from their specs to CRI calls, their API objects kept up to date. */
export class Kubelet {
  readonly pods: RunningPod[] = [];
  /** RunPodSandbox errors that a retry got past (as kubelet's events would show them). */
  readonly sandboxFailures: string[] = [];
  /** The driver for the pods started from now on. */
  cgroupDriver: CgroupDriver = 'cgroupfs';
  /** Pod cgroups made for sandboxes, by pod uid (removed with the sandbox). */
  private readonly podCgroups = new Map<string, string>();

  constructor(private readonly o: KubeletOptions) {}

  private configMap(name: string, namespace: string): Record<string, string> {
    for (const file of readdirSync(MANIFESTS).filter((f) => f.endsWith('.yaml'))) {
      for (const obj of loadManifest(file)) {
        const md = obj.metadata as { name?: string } | undefined;
        if (obj.kind === 'ConfigMap' && md?.name === name) return (obj.data as Record<string, string>) ?? {};
      }
    }
    throw new Error(`configmap ${namespace}/${name} not found in ${MANIFESTS}`);
  }

  private env(pod: K8sPod, c: K8sContainer, ips: string[]): Map<string, string> {
    const env = new Map<string, string>();
    env.set('KUBERNETES_SERVICE_HOST', this.o.serviceHost);
    env.set('KUBERNETES_SERVICE_PORT', String(this.o.servicePort));
    for (const from of c.envFrom ?? []) {
      if (from.configMapRef)
        for (const [k, v] of Object.entries(this.configMap(from.configMapRef.name, pod.metadata.namespace)))
          env.set(k, String(v));
    }
    for (const e of c.env ?? []) {
      if (e.value !== undefined) env.set(e.name, expand(e.value, env));
      else if (e.valueFrom?.fieldRef) {
        const field = e.valueFrom.fieldRef.fieldPath;
        const value = {
          'spec.nodeName': this.o.nodeName,
          'metadata.name': pod.metadata.name,
          'metadata.namespace': pod.metadata.namespace,
          'metadata.uid': pod.metadata.uid ?? '',
          'status.podIP': ips[0] ?? '',
          'spec.serviceAccountName': pod.spec.serviceAccountName ?? 'default',
        }[field];
        if (value === undefined) throw new Error(`fieldRef ${field} is not supported by the test kubelet`);
        env.set(e.name, value);
      } else throw new Error(`env ${e.name}: only value and fieldRef are supported by the test kubelet`);
    }
    return env;
  }

  /** What kubelet does for a pod before RunPodSandbox: its API object (Pending, as scheduled to
   * this node), its directory (logs) and the sandbox config it sends. */
  prepareSandbox(pod: K8sPod): { uid: string; sandboxConfig: Obj } {
    const uid = pod.metadata.uid ?? randomUUID();
    pod.metadata.uid = uid;
    const spec = pod.spec;
    this.o.api.upsert('pods', { ...this.apiPod(pod), status: { phase: 'Pending' } });
    const podDir = join(this.o.node.dir, 'pods', uid);
    mkdirSync(join(podDir, 'logs'), { recursive: true });
    const nsMode = { network: spec.hostNetwork ? 'NODE' : 'POD', pid: spec.hostPID ? 'NODE' : 'CONTAINER', ipc: 'POD' };
    // kubelet makes the pod cgroup before the sandbox (so it exists at CNI ADD); runc makes the
    // containers' cgroups below it.
    const podCgroup = podCgroupPath(this.o.node.cgroupParent, uid, qosClass(spec), this.cgroupDriver);
    mkdirSync(join(cgroup2Mount(), podCgroup), { recursive: true });
    this.podCgroups.set(uid, podCgroup);
    const sandboxConfig = {
      metadata: { name: pod.metadata.name, namespace: pod.metadata.namespace, uid, attempt: 0 },
      hostname: spec.hostNetwork ? '' : pod.metadata.name,
      log_directory: join(podDir, 'logs'),
      labels: {
        ...(pod.metadata.labels ?? {}),
        'io.kubernetes.pod.name': pod.metadata.name,
        'io.kubernetes.pod.namespace': pod.metadata.namespace,
        'io.kubernetes.pod.uid': uid,
      },
      annotations: pod.metadata.annotations ?? {},
      linux: {
        // containerd takes a parent ending in .slice for its systemd driver's unit name, which
        // runc's cgroupfs driver here cannot use: containers go one directory below the slice.
        cgroup_parent: this.cgroupDriver === 'systemd' ? `${podCgroup}/containers` : podCgroup,
        security_context: {
          namespace_options: nsMode,
          privileged: spec.containers.some((c) => c.securityContext?.privileged === true),
          seccomp: {
            profile_type:
              spec.securityContext?.seccompProfile?.type === 'RuntimeDefault' ? 'RuntimeDefault' : 'Unconfined',
          },
        },
      },
    };
    return { uid, sandboxConfig };
  }

  private apiPod(pod: K8sPod) {
    return {
      apiVersion: 'v1',
      kind: 'Pod',
      metadata: { ...pod.metadata },
      spec: { ...pod.spec, nodeName: this.o.nodeName },
    };
  }

  /** Runs a pod: its API object (as scheduled to this node), the sandbox (CNI ADD), its
   * containers, and its status (IPs, Running). */
  async runPod(pod: K8sPod): Promise<RunningPod> {
    const spec = pod.spec;
    const { uid, sandboxConfig } = this.prepareSandbox(pod);
    // kubelet retries a sandbox whose network set-up failed (with backoff); so does this.
    let pod_sandbox_id = '';
    for (let attempt = 0; ; attempt++) {
      try {
        ({ pod_sandbox_id } = await this.o.node.cri.call<{ pod_sandbox_id: string }>('RunPodSandbox', {
          config: sandboxConfig,
        }));
        break;
      } catch (err) {
        this.sandboxFailures.push(`${pod.metadata.namespace}/${pod.metadata.name}: ${(err as Error).message}`);
        if (attempt >= 20) throw err;
        await sleep(Math.min(500 * 2 ** attempt, 4000));
      }
    }
    const status = await this.o.node.cri.call<{
      status: { network: { ip: string; additional_ips: { ip: string }[] } | null };
    }>('PodSandboxStatus', { pod_sandbox_id });
    const ips = spec.hostNetwork
      ? []
      : [status.status.network?.ip, ...(status.status.network?.additional_ips ?? []).map((a) => a.ip)].filter(
          (ip): ip is string => !!ip,
        );
    const running: RunningPod = { pod, uid, sandboxId: pod_sandbox_id, sandboxConfig, ips, containers: new Map() };
    this.pods.push(running);
    for (const c of spec.containers) await this.startContainer(running, c.name);
    this.o.api.upsert('pods', {
      ...this.apiPod(pod),
      status: { phase: 'Running', ...(ips.length ? { podIP: ips[0], podIPs: ips.map((ip) => ({ ip })) } : {}) },
    });
    return running;
  }

  /** Creates and starts a pod's container (again, after a kill: the next attempt). */
  async startContainer(rp: RunningPod, name: string): Promise<string> {
    const { pod } = rp;
    const spec = pod.spec;
    const c = spec.containers.find((x) => x.name === name);
    if (!c) throw new Error(`no container ${name} in ${pod.metadata.name}`);
    const attempt = rp.containers.has(name) ? rp.containers.get(name)!.attempt + 1 : 0;
    const env = this.env(pod, c, rp.ips);
    const podDir = join(this.o.node.dir, 'pods', rp.uid);
    const mounts: Obj[] = [];
    for (const vm of c.volumeMounts ?? []) {
      const vol = spec.volumes?.find((v) => v.name === vm.name);
      if (!vol) throw new Error(`volumeMount ${vm.name} has no volume`);
      let hostPath: string;
      if (vol.hostPath) {
        hostPath = vol.hostPath.path;
        const type = vol.hostPath.type ?? '';
        if (type === 'DirectoryOrCreate') await this.o.node.nodeExec(['mkdir', '-p', hostPath]);
        else if (type === 'Directory')
          await this.o.node
            .nodeExec(['test', '-d', hostPath])
            .catch(() => Promise.reject(new Error(`hostPath ${hostPath} is not a directory on the node`)));
        else if (type !== '') throw new Error(`hostPath type ${type} is not supported by the test kubelet`);
      } else if (vol.emptyDir) {
        hostPath = join(podDir, 'volumes', vol.name);
        mkdirSync(hostPath, { recursive: true });
      } else throw new Error(`volume ${vol.name}: only hostPath and emptyDir are supported by the test kubelet`);
      const propagation =
        { HostToContainer: 'PROPAGATION_HOST_TO_CONTAINER', Bidirectional: 'PROPAGATION_BIDIRECTIONAL' }[
          vm.mountPropagation ?? ''
        ] ?? 'PROPAGATION_PRIVATE';
      mounts.push({ container_path: vm.mountPath, host_path: hostPath, readonly: vm.readOnly === true, propagation });
    }
    if (spec.automountServiceAccountToken !== false) {
      const sa = join(podDir, 'serviceaccount');
      mkdirSync(sa, { recursive: true });
      writeFileSync(join(sa, 'token'), this.o.token);
      writeFileSync(join(sa, 'ca.crt'), this.o.caCert);
      writeFileSync(join(sa, 'namespace'), pod.metadata.namespace);
      mounts.push({ container_path: '/var/run/secrets/kubernetes.io/serviceaccount', host_path: sa, readonly: true });
    }
    const sc = c.securityContext ?? {};
    const limits = c.resources?.limits ?? {};
    const requests = c.resources?.requests ?? {};
    const config = {
      metadata: { name, attempt },
      image: { image: normalizeImage(c.image) },
      command: (c.command ?? []).map((s) => expand(s, env)),
      args: (c.args ?? []).map((s) => expand(s, env)),
      envs: [...env].map(([key, value]) => ({ key, value })),
      mounts,
      labels: {
        'io.kubernetes.container.name': name,
        'io.kubernetes.pod.name': pod.metadata.name,
        'io.kubernetes.pod.namespace': pod.metadata.namespace,
        'io.kubernetes.pod.uid': rp.uid,
      },
      log_path: `${name}/${attempt}.log`,
      linux: {
        resources: {
          cpu_period: 100_000,
          cpu_shares: Math.max(2, Math.floor((milliCpu(requests.cpu) * 1024) / 1000)),
          cpu_quota: limits.cpu ? Math.floor((milliCpu(limits.cpu) * 100_000) / 1000) : 0,
          memory_limit_in_bytes: bytes(limits.memory),
        },
        security_context: {
          capabilities: {
            add_capabilities: sc.capabilities?.add ?? [],
            drop_capabilities: sc.capabilities?.drop ?? [],
          },
          privileged: sc.privileged === true,
          namespace_options: (rp.sandboxConfig.linux as { security_context: { namespace_options: Obj } })
            .security_context.namespace_options,
          ...(sc.runAsUser !== undefined ? { run_as_user: { value: sc.runAsUser } } : {}),
          readonly_rootfs: sc.readOnlyRootFilesystem === true,
          no_new_privs: sc.allowPrivilegeEscalation === false,
          masked_paths: sc.privileged ? [] : DEFAULT_MASKED_PATHS,
          readonly_paths: sc.privileged ? [] : DEFAULT_READONLY_PATHS,
          seccomp: securityProfile(sc.seccompProfile),
          // As kubelet passes them (the runtime ignores what its host does not enforce: this
          // test's containerd runs with AppArmor off, and the host has no SELinux).
          ...(sc.appArmorProfile
            ? {
                apparmor: securityProfile(sc.appArmorProfile),
                apparmor_profile:
                  sc.appArmorProfile.type === 'Unconfined'
                    ? 'unconfined'
                    : sc.appArmorProfile.type === 'Localhost'
                      ? `localhost/${sc.appArmorProfile.localhostProfile ?? ''}`
                      : 'runtime/default',
              }
            : {}),
          ...(sc.seLinuxOptions
            ? {
                selinux_options: {
                  user: sc.seLinuxOptions.user ?? '',
                  role: sc.seLinuxOptions.role ?? '',
                  type: sc.seLinuxOptions.type ?? '',
                  level: sc.seLinuxOptions.level ?? '',
                },
              }
            : {}),
        },
      },
    };
    const { container_id } = await this.o.node.cri.call<{ container_id: string }>('CreateContainer', {
      pod_sandbox_id: rp.sandboxId,
      config,
      sandbox_config: rp.sandboxConfig,
    });
    await this.o.node.cri.call('StartContainer', { container_id });
    rp.containers.set(name, { id: container_id, attempt });
    return container_id;
  }

  /** An httpGet probe as kubelet makes it: from the node, to the pod's IP (the node's loopback for
   * a host network pod); the HTTP status. */
  async probe(rp: RunningPod, name: string, which: 'readinessProbe' | 'livenessProbe'): Promise<number> {
    const c = rp.pod.spec.containers.find((x) => x.name === name)!;
    const get = c[which]?.httpGet;
    if (!get) throw new Error(`${name} has no httpGet ${which}`);
    const port = typeof get.port === 'number' ? get.port : this.containerPort(c, get.port);
    return (await this.httpGetFromNode(rp.pod.spec.hostNetwork ? '127.0.0.1' : rp.ips[0]!, port, get.path)).status;
  }

  /** A named port of a container (`ports:` in its spec). */
  containerPort(c: K8sContainer, name: string): number {
    const port = c.ports?.find((p) => p.name === name)?.containerPort;
    if (port === undefined) throw new Error(`${c.name} has no port named ${name}`);
    return port;
  }

  /** An HTTP/1.1 GET from the node's network namespace: status and body. */
  async httpGetFromNode(host: string, port: number, path: string): Promise<{ status: number; body: string }> {
    const sock = await connectFromNetns({ netns: this.o.node.netnsPath, host, port });
    const answer = await new Promise<string>((resolve, reject) => {
      let text = '';
      sock.on('data', (d: Buffer) => (text += d.toString()));
      sock.on('end', () => resolve(text));
      sock.on('error', reject);
      sock.setTimeout(3000, () => sock.destroy(new Error(`GET ${path} timed out`)));
      sock.write(
        `GET ${path} HTTP/1.1\r\nHost: ${host.includes(':') ? `[${host}]` : host}:${port}\r\nUser-Agent: kube-probe/1.31\r\nConnection: close\r\n\r\n`,
      );
    });
    const split = answer.indexOf('\r\n\r\n');
    return {
      status: Number(/^HTTP\/1\.[01] (\d{3})/.exec(answer)?.[1] ?? 0),
      body: split < 0 ? '' : answer.slice(split + 4),
    };
  }

  /** Stops a container as kubelet does on a rolling update (SIGTERM, then SIGKILL after the pod's
   * grace period) and removes it; its exit code. */
  async stopContainer(rp: RunningPod, name: string): Promise<number> {
    const id = rp.containers.get(name)!.id;
    await this.o.node.cri.call('StopContainer', {
      container_id: id,
      timeout: rp.pod.spec.terminationGracePeriodSeconds ?? 30,
    });
    const { status } = await this.o.node.cri.call<{ status: { exit_code: number } }>('ContainerStatus', {
      container_id: id,
    });
    await this.o.node.cri.call('RemoveContainer', { container_id: id });
    return status.exit_code;
  }

  /** Kills a container (no grace period) and removes it. */
  async killContainer(rp: RunningPod, name: string): Promise<void> {
    const id = rp.containers.get(name)!.id;
    await this.o.node.cri.call('StopContainer', { container_id: id, timeout: 0 });
    await this.o.node.cri.call('RemoveContainer', { container_id: id });
  }

  async containerState(
    rp: RunningPod,
    name: string,
  ): Promise<{ state: string; exit_code: number; reason: string; log_path: string }> {
    const { status } = await this.o.node.cri.call<{
      status: { state: string; exit_code: number; reason: string; log_path: string };
    }>('ContainerStatus', { container_id: rp.containers.get(name)!.id });
    return status;
  }

  /** The container's log (CRI format, stream prefixes removed). */
  containerLog(rp: RunningPod, name: string): string {
    const path = join(this.o.node.dir, 'pods', rp.uid, 'logs', `${name}/${rp.containers.get(name)!.attempt}.log`);
    if (!existsSync(path) || !statSync(path).isFile()) return '';
    return readFileSync(path, 'utf8')
      .split('\n')
      .map((l) => l.replace(/^\S+ (stdout|stderr) [FP] /, ''))
      .join('\n');
  }

  async exec(rp: RunningPod, name: string, cmd: string[], timeoutS = 10): Promise<ExecResult> {
    const r = await this.o.node.cri.call<{ stdout: Buffer; stderr: Buffer; exit_code: number }>(
      'ExecSync',
      { container_id: rp.containers.get(name)!.id, cmd, timeout: timeoutS },
      (timeoutS + 10) * 1000,
    );
    return { stdout: r.stdout.toString(), stderr: r.stderr.toString(), exit_code: r.exit_code };
  }

  /** Deletes a pod as kubelet does: StopPodSandbox (CNI DEL), RemovePodSandbox, the API object. */
  async deletePod(rp: RunningPod): Promise<void> {
    await this.removeSandbox(rp.pod, rp.sandboxId);
    this.pods.splice(this.pods.indexOf(rp), 1);
  }

  /** StopPodSandbox (CNI DEL), RemovePodSandbox, and the pod's API object (for a sandbox started
   * without runPod: prepareSandbox, then RunPodSandbox). */
  async removeSandbox(pod: K8sPod, sandboxId: string): Promise<void> {
    await this.o.node.cri.call('StopPodSandbox', { pod_sandbox_id: sandboxId });
    await this.o.node.cri.call('RemovePodSandbox', { pod_sandbox_id: sandboxId });
    this.o.api.remove('pods', pod.metadata.name, pod.metadata.namespace);
    const podCgroup = pod.metadata.uid && this.podCgroups.get(pod.metadata.uid);
    if (podCgroup) {
      this.podCgroups.delete(pod.metadata.uid!);
      try {
        for (const h of cgroupHierarchies()) removeCgroupTree(join(h, podCgroup));
      } catch {
        // still busy: ContainerdNode.stop() removes the whole tree
      }
    }
  }
}

/** kubelet's $(VAR) expansion in command, args and env values ($$ escapes). */
export function expand(text: string, env: Map<string, string>): string {
  return text.replace(/\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (m, name: string | undefined) =>
    m === '$$' ? '$' : name !== undefined && env.has(name) ? env.get(name)! : m,
  );
}
