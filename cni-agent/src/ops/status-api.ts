// The agent's status API: gRPC (proto/status.proto) on a local Unix socket, mode 0600.
import { chmodSync, existsSync, mkdirSync, unlinkSync } from 'node:fs';
import { dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import {
  featureLabel,
  KERNEL_FEATURES,
  type DatapathCounters,
  type DatapathModes,
  type KernelProbe,
} from '../../../bpf/src/index.js';

export const DEFAULT_STATUS_SOCKET = '/var/run/ambient-bpf/status.sock';
const PROTO = fileURLToPath(new URL('../../../../cni-agent/proto/status.proto', import.meta.url));

export interface StatusPod {
  uid: string;
  name: string;
  namespace: string;
  state: string;
  reason: string;
  hooks: string;
  ztunnel: string;
  netnsPath: string;
  sinceUnixMs: number;
  dnsCapture: string;
  /** The captured interfaces, the pod's own first. */
  interfaces: string[];
  /** Interfaces (or addresses) of the pod netns left out of capture, each said; absent: none. */
  uncaptured?: string;
  counters?: DatapathCounters;
}

/** The kernel's features as probed at the agent's start, and the modes chosen from them. */
export interface StatusKernel {
  features: { name: string; present: boolean; detail: string; forced: boolean }[];
  probeMs: number;
  hooks: string;
  attachMode: string;
  steering: string;
  hooksReason: string;
  steeringReason: string;
}

/** The status API's kernel section: each feature probed, the modes and why. */
export function kernelStatus(kernel: KernelProbe, modes: DatapathModes): StatusKernel {
  return {
    features: KERNEL_FEATURES.map((f) => ({
      name: featureLabel(f),
      present: kernel.features[f],
      detail: kernel.detail[f],
      forced: kernel.forced.includes(f),
    })),
    probeMs: kernel.elapsedMs,
    hooks: modes.hooks,
    attachMode: modes.attachMode,
    steering: modes.steering,
    hooksReason: modes.why.hooks,
    steeringReason: modes.why.steering,
  };
}

export interface StatusReport {
  pods: StatusPod[];
  ztunnelConnections: number;
  /** Absent from an agent that does not report it (or has not started). */
  kernel?: StatusKernel;
}

type StatusClient = grpc.Client & {
  ListPods(
    req: object,
    options: grpc.CallOptions,
    cb: (
      err: grpc.ServiceError | null,
      res?: { pods?: Partial<StatusPod>[]; ztunnelConnections?: number; kernel?: Partial<StatusKernel> | null },
    ) => void,
  ): void;
};

function service(): { Status: grpc.ServiceClientConstructor } {
  const def = protoLoader.loadSync(PROTO, { keepCase: false, longs: Number, defaults: true });
  const pkg = grpc.loadPackageDefinition(def) as unknown as {
    ambient_bpf: { status: { v1: { Status: grpc.ServiceClientConstructor } } };
  };
  return pkg.ambient_bpf.status.v1;
}

/** Serves the status API at `path`; `report` is asked on every call. */
export async function serveStatus(path: string, report: () => Promise<StatusReport>): Promise<{ close(): void }> {
  if (!existsSync(dirname(path))) mkdirSync(dirname(path), { recursive: true, mode: 0o750 });
  if (existsSync(path)) unlinkSync(path);
  const server = new grpc.Server();
  server.addService(service().Status.service, {
    ListPods: (_call: unknown, callback: grpc.sendUnaryData<StatusReport>) => {
      report().then(
        (r) => callback(null, r),
        (err: Error) => callback({ code: grpc.status.INTERNAL, details: err.message }, null),
      );
    },
  });
  await new Promise<void>((resolve, reject) =>
    server.bindAsync(`unix://${path}`, grpc.ServerCredentials.createInsecure(), (err) =>
      err ? reject(err) : resolve(),
    ),
  );
  chmodSync(path, 0o600);
  return { close: () => server.forceShutdown() };
}

const CHECK_AGENT =
  'is the agent running on this node? (kubectl -n istio-system get pods -o wide -l app.kubernetes.io/name=ambient-bpf, or --status-socket for another path)';

/** One line for a failed call: whether an agent is there at all, and what to check. */
function unreachable(path: string, timeoutMs: number, err: grpc.ServiceError): Error {
  if (!existsSync(path)) return new Error(`no agent here: nothing at ${path}; ${CHECK_AGENT}`);
  if (err.code === grpc.status.DEADLINE_EXCEEDED)
    return new Error(`the agent at ${path} did not answer within ${timeoutMs / 1000} s`);
  if (/ECONNREFUSED/.test(err.details))
    return new Error(`no agent listens at ${path} (the socket is left from one that stopped); ${CHECK_AGENT}`);
  return new Error(`cannot reach the agent at ${path}: ${err.details.split('. ')[0] || err.message}`);
}

/** Asks the agent at `path`. */
export function fetchStatus(path: string, timeoutMs = 5000): Promise<StatusReport> {
  const client = new (service().Status)(`unix://${path}`, grpc.credentials.createInsecure()) as unknown as StatusClient;
  return new Promise((resolve, reject) => {
    client.ListPods({}, { deadline: Date.now() + timeoutMs }, (err, res) => {
      client.close();
      if (err) return reject(unreachable(path, timeoutMs, err));
      const k = res?.kernel;
      resolve({
        ztunnelConnections: res?.ztunnelConnections ?? 0,
        ...(k
          ? {
              kernel: {
                features: (k.features ?? []).map((f) => ({
                  name: f.name ?? '',
                  present: f.present ?? false,
                  detail: f.detail ?? '',
                  forced: f.forced ?? false,
                })),
                probeMs: Number(k.probeMs ?? 0),
                hooks: k.hooks ?? '',
                attachMode: k.attachMode ?? '',
                steering: k.steering ?? '',
                hooksReason: k.hooksReason ?? '',
                steeringReason: k.steeringReason ?? '',
              },
            }
          : {}),
        pods: (res?.pods ?? []).map((p) => ({
          uid: p.uid ?? '',
          name: p.name ?? '',
          namespace: p.namespace ?? '',
          state: p.state ?? '',
          reason: p.reason ?? '',
          hooks: p.hooks ?? '',
          ztunnel: p.ztunnel ?? '',
          netnsPath: p.netnsPath ?? '',
          sinceUnixMs: Number(p.sinceUnixMs ?? 0),
          dnsCapture: p.dnsCapture ?? '',
          interfaces: p.interfaces ?? [],
          ...(p.uncaptured ? { uncaptured: p.uncaptured } : {}),
          ...(p.counters ? { counters: numbers(p.counters) } : {}),
        })),
      });
    });
  });
}

/** The counters as numbers (the proto's uint64s arrive as numbers with longs: Number). */
function numbers(c: Partial<Record<keyof DatapathCounters, number | string>>): DatapathCounters {
  const n = (v: number | string | undefined): number => Number(v ?? 0);
  return {
    outboundRedirected: n(c.outboundRedirected),
    outboundNoZtunnel: n(c.outboundNoZtunnel),
    inboundRedirected: n(c.inboundRedirected),
    inboundNoZtunnel: n(c.inboundNoZtunnel),
    bypassZtunnel: n(c.bypassZtunnel),
    bypassHbone: n(c.bypassHbone),
    bypassProbe: n(c.bypassProbe),
    bypassInboundAnnotation: n(c.bypassInboundAnnotation),
    forgedMark: n(c.forgedMark),
    strictDropped: n(c.strictDropped),
    rerouted: n(c.rerouted),
    unclassifiedDropped: n(c.unclassifiedDropped),
    spoofedDropped: n(c.spoofedDropped),
    lookupRefused: n(c.lookupRefused),
    uncapturedDropped: n(c.uncapturedDropped),
  };
}
