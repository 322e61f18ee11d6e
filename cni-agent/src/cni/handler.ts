// CNI commands as the chained plugin relays them (spec 1.1; versions 0.3.0 to 1.1.0). ADD of an
// ambient pod answers only once the pod is redirected and ztunnel acked it (fail closed: an error
// makes the runtime retry); every other pod gets prevResult back unchanged.
import { selectPod, type SelectionPolicy } from '../pods/selection.js';
import type { ClusterState, Pod } from '../pods/pod.js';
import { PhaseClock, type Reconciler } from '../enrollment/reconciler.js';
import type { Logger } from '../../../ztunnel-bridge/src/logger.js';
import { checkNetnsPath } from './netns-path.js';
import { DERIVED_UID_PREFIX } from '../pods/local-source.js';
import { namespaceModeOf } from './policy-file.js';

export const SUPPORTED_CNI_VERSIONS = ['0.3.0', '0.3.1', '0.4.0', '1.0.0', '1.1.0'];
const COMMANDS = ['ADD', 'DEL', 'CHECK', 'VERSION', 'STATUS', 'GC'];

/** CNI error codes used here (spec 1.1, "Error"). */
export const CniCode = {
  IncompatibleVersion: 1,
  InvalidEnvironment: 4,
  DecodingFailure: 6,
  InvalidConfig: 7,
  TryAgainLater: 11,
} as const;

export interface CniRequest {
  env: Record<string, string>;
  stdin: string;
}

export interface CniResponse {
  exitCode: number;
  stdout: string;
}

class CniFailure extends Error {
  constructor(
    readonly code: number,
    message: string,
    readonly details?: string,
  ) {
    super(message);
  }
}

export interface CniHandlerDeps {
  reconciler: Reconciler;
  state: () => ClusterState;
  policy: SelectionPolicy;
  log: Logger;
  onResult?: (command: string, result: string) => void;
  /** Where a host path (CNI_NETNS) is from the agent's view (under --host-root in a container). */
  hostPath?: (path: string) => string;
  /** A pod the source has not brought yet, asked of the API (with its namespace, which then are in
   * `state()` too); rejects when the API does not answer in time. Absent (the local pod source):
   * such a pod is judged by its namespace. */
  lookup?: (namespace: string, name: string) => Promise<Pod | undefined>;
  /** The node's directories of pod network namespaces CNI_NETNS may name (--netns-dir). */
  netnsDirs?: readonly string[] | undefined;
}

/** K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;... */
export function parseCniArgs(args: string | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const part of (args ?? '').split(';')) {
    const eq = part.indexOf('=');
    if (eq > 0) out[part.slice(0, eq)] = part.slice(eq + 1);
  }
  return out;
}

export class CniHandler {
  constructor(private readonly deps: CniHandlerDeps) {}

  /** Handles one request and reports it (command, and "ok" or the CNI error code) to `onResult`. */
  async handle(req: CniRequest): Promise<CniResponse> {
    const res = await this.dispatch(req);
    const code = res.exitCode === 0 ? 'ok' : String((JSON.parse(res.stdout) as { code?: number }).code ?? 'error');
    this.deps.onResult?.(req.env.CNI_COMMAND || 'none', code);
    return res;
  }

  private async dispatch(req: CniRequest): Promise<CniResponse> {
    let version = '1.1.0';
    try {
      const command = req.env.CNI_COMMAND;
      if (!command) throw new CniFailure(CniCode.InvalidEnvironment, 'CNI_COMMAND is not set');
      if (!COMMANDS.includes(command))
        throw new CniFailure(CniCode.InvalidEnvironment, `unknown CNI_COMMAND ${command}`);
      const config = this.parseConfig(req.stdin);
      version = config.cniVersion;
      if (command === 'VERSION') return ok({ cniVersion: version, supportedVersions: SUPPORTED_CNI_VERSIONS });
      // STATUS: the node's network must not look unready because of us (that would block every pod).
      // GC: attachments are per pod and are collected when their netns goes.
      if (command === 'STATUS' || command === 'GC') return ok(undefined);
      for (const v of ['CNI_CONTAINERID', 'CNI_IFNAME', ...(command === 'DEL' ? [] : ['CNI_NETNS'])]) {
        if (!req.env[v]) throw new CniFailure(CniCode.InvalidEnvironment, `${v} is not set`);
      }
      const args = parseCniArgs(req.env.CNI_ARGS);
      const namespace = args.K8S_POD_NAMESPACE || 'default';
      const name = args.K8S_POD_NAME ?? '';
      if (command === 'ADD') return await this.add(config, req.env, namespace, name, args.K8S_POD_UID);
      const uid = args.K8S_POD_UID || this.deps.reconciler.uidOf(namespace, name);
      if (command === 'DEL') {
        // CNI_NETNS may be empty on DEL (the sandbox's netns is gone); it only helps to tell which
        // sandbox a DEL is for when the pod's container ID was not recorded.
        const netns = req.env.CNI_NETNS ? (this.deps.hostPath ?? ((p: string) => p))(req.env.CNI_NETNS) : undefined;
        if (uid) await this.deps.reconciler.cniDel(uid, req.env.CNI_CONTAINERID, netns);
        return ok(undefined);
      }
      // CHECK: an ambient pod must be redirected and acked (the pod found as for ADD).
      const { pod } = await this.podForAdd(req.env, namespace, name, args.K8S_POD_UID);
      if (name && this.isAmbient(pod) && !(uid && this.deps.reconciler.isEnabled(uid))) {
        throw new CniFailure(
          CniCode.TryAgainLater,
          `ambient pod ${namespace}/${name} is not redirected and acked by ztunnel`,
        );
      }
      return ok(undefined);
    } catch (err) {
      const f = err instanceof CniFailure ? err : new CniFailure(999, `internal error: ${(err as Error).message}`);
      return {
        exitCode: 1,
        stdout:
          JSON.stringify({
            cniVersion: version,
            code: f.code,
            msg: f.message,
            ...(f.details ? { details: f.details } : {}),
          }) + '\n',
      };
    }
  }

  private parseConfig(stdin: string): { cniVersion: string; name?: unknown; prevResult?: unknown } {
    let config: unknown;
    try {
      config = JSON.parse(stdin);
    } catch (err) {
      throw new CniFailure(
        CniCode.DecodingFailure,
        `cannot decode the network configuration: ${(err as Error).message}`,
      );
    }
    if (typeof config !== 'object' || config === null || Array.isArray(config)) {
      throw new CniFailure(CniCode.DecodingFailure, 'the network configuration is not a JSON object');
    }
    const { cniVersion } = config as { cniVersion?: unknown };
    if (typeof cniVersion !== 'string')
      throw new CniFailure(CniCode.InvalidConfig, 'the network configuration has no cniVersion');
    if (!SUPPORTED_CNI_VERSIONS.includes(cniVersion)) {
      throw new CniFailure(
        CniCode.IncompatibleVersion,
        `CNI version ${cniVersion} is not supported (supported: ${SUPPORTED_CNI_VERSIONS.join(', ')})`,
      );
    }
    return config as { cniVersion: string };
  }

  private findPod(namespace: string, name: string, uid: string | undefined): Pod | undefined {
    const pods = this.deps.state().pods;
    if (uid && pods.has(uid)) return pods.get(uid);
    const byName = [...pods.values()].find((p) => p.metadata.namespace === namespace && p.metadata.name === name);
    // With the runtime's uid, a pod of that name with another uid is an earlier pod of the name (a
    // StatefulSet's pod made again), not this one: never judged, nor enrolled, as it. Only a pod
    // whose uid the agent made up (a hand-written pods file) is known by its name alone.
    if (byName && uid && !byName.metadata.uid.startsWith(DERIVED_UID_PREFIX)) return undefined;
    return byName;
  }

  private isAmbient(pod: Pod): boolean {
    return selectPod(pod, this.deps.state().namespaces.get(pod.metadata.namespace), this.deps.policy).ambient;
  }

  /** The pod an ADD is for: from the watch cache; else, with the Kubernetes source, from the API
   * (the watch event may come after the ADD), failing closed when the API does not answer and the
   * pod may be ambient; else a pod without labels, judged by its namespace. */
  private async podForAdd(
    env: Record<string, string>,
    namespace: string,
    name: string,
    uid: string | undefined,
  ): Promise<{ pod: Pod; from: PodOrigin }> {
    const unknown = (): Pod => ({
      metadata: { name, namespace, uid: uid || `cni-${env.CNI_CONTAINERID}`, labels: {} },
    });
    if (!name) return { pod: unknown(), from: 'namespace' };
    const cached = this.findPod(namespace, name, uid);
    if (cached) return { pod: cached, from: 'cache' };
    if (!this.deps.lookup || this.deps.policy.excludedNamespaces.includes(namespace))
      return { pod: unknown(), from: 'namespace' };
    try {
      const fetched = await this.deps.lookup(namespace, name);
      // Another pod of the same name (this sandbox's pod was deleted and made again) is not it.
      if (fetched && (!uid || fetched.metadata.uid === uid)) return { pod: fetched, from: 'api' };
      // (its watch event may have come meanwhile)
      const meanwhile = this.findPod(namespace, name, uid);
      return meanwhile ? { pod: meanwhile, from: 'cache' } : { pod: unknown(), from: 'namespace' };
    } catch (err) {
      const mode = namespaceModeOf(namespace, this.deps.state(), this.deps.policy);
      const message = (err as Error).message;
      if (mode !== 'none' && mode !== 'excluded') {
        const why = {
          unknown: 'its namespace is not known to the agent',
          ambient: 'its namespace is labelled ambient',
          'pod-label': 'pods of its namespace opt in by label',
          held: 'the agent holds pods it has not seen (--unseen-pods=hold)',
        }[mode];
        this.deps.log.warn(
          { pod: `${namespace}/${name}`, error: message },
          'CNI ADD for a pod not in the watch cache, and the Kubernetes API did not answer: failing closed',
        );
        throw new CniFailure(
          CniCode.TryAgainLater,
          `pod ${namespace}/${name} is not in the agent's watch cache yet and the Kubernetes API did not answer (${message}); it may be ambient (${why}), so it does not start before the agent can tell`,
        );
      }
      this.deps.log.warn(
        { pod: `${namespace}/${name}`, error: message },
        'CNI ADD for a pod not in the watch cache, and the Kubernetes API did not answer; no pod of its namespace is ambient: judged by its namespace',
      );
      return { pod: unknown(), from: 'namespace' };
    }
  }

  private async add(
    config: { prevResult?: unknown },
    env: Record<string, string>,
    namespace: string,
    name: string,
    uid: string | undefined,
  ): Promise<CniResponse> {
    const prev = config.prevResult as { ips?: { address?: unknown }[] } | undefined;
    if (typeof prev !== 'object' || prev === null) {
      throw new CniFailure(
        CniCode.InvalidConfig,
        'no prevResult: ambient-bpf-cni must be chained after the plugin that sets up the pod interface',
      );
    }
    const phases = new PhaseClock();
    const passThrough = ok(prev);
    const { pod, from } = await this.podForAdd(env, namespace, name, uid);
    if (!name || !this.isAmbient(pod)) return passThrough;
    const ips = (prev.ips ?? [])
      .map((i) => (typeof i.address === 'string' ? i.address.split('/')[0]! : ''))
      .filter(Boolean);
    if (ips.length === 0) throw new CniFailure(CniCode.InvalidConfig, 'prevResult has no IP addresses for the pod');
    let netns: string;
    try {
      netns = checkNetnsPath(env.CNI_NETNS!, this.deps.hostPath, this.deps.netnsDirs);
    } catch (err) {
      throw new CniFailure(CniCode.InvalidEnvironment, `CNI_NETNS: ${(err as Error).message}`);
    }
    phases.mark('lookup');
    const r = await this.deps.reconciler.cniAdd(pod, netns, ips, env.CNI_CONTAINERID, phases);
    phases.mark('answer');
    if (!r.ok) {
      this.deps.log.warn(
        { uid: pod.metadata.uid, pod: `${namespace}/${name}`, reason: r.reason, ms: phases.ms },
        'CNI ADD failed for an ambient pod; the runtime will retry',
      );
      throw new CniFailure(CniCode.TryAgainLater, `ambient pod ${namespace}/${name} is not ready: ${r.reason}`);
    }
    // ms: where the ADD's time went (pod lookup, waiting for the pod's reconcile pass, netns, cgroup,
    // datapath attach, ztunnel's Add to its ack, the answer).
    this.deps.log.info(
      { uid: pod.metadata.uid, pod: `${namespace}/${name}`, from, ms: phases.ms },
      'CNI ADD: pod redirected and acked by ztunnel',
    );
    return passThrough;
  }
}

/** Where the pod an ADD is judged by came from: the watch cache, the API (asked at ADD), or
 * nowhere (only its namespace is known). */
type PodOrigin = 'cache' | 'api' | 'namespace';

function ok(result: unknown): CniResponse {
  return { exitCode: 0, stdout: result === undefined ? '' : JSON.stringify(result) + '\n' };
}
