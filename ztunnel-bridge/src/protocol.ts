// ZDS messages (proto/zds.proto) encoded with protobufjs. One message per SEQPACKET datagram.
import { fileURLToPath } from 'node:url';
import protobuf from 'protobufjs';

/** Both sides read into a buffer of this size; a longer datagram is a protocol error. */
export const ZDS_MAX_MESSAGE = 1024;

export interface WorkloadInfo {
  name: string;
  namespace: string;
  serviceAccount: string;
}

export type WorkloadRequest =
  | { add: { uid: string; workloadInfo?: WorkloadInfo } }
  | { del: { uid: string } }
  | { snapshotSent: Record<string, never> }
  | { keep: { uid: string } };

export interface WorkloadResponse {
  ack?: { error: string };
}

export interface ZdsHello {
  version: number;
}

export const ZDS_VERSION_V1 = 1;

const PROTO_PATH = fileURLToPath(new URL('../../../ztunnel-bridge/proto/zds.proto', import.meta.url));
const root = protobuf.loadSync(PROTO_PATH);
const types = {
  hello: root.lookupType('istio.workload.zds.ZdsHello'),
  request: root.lookupType('istio.workload.zds.WorkloadRequest'),
  response: root.lookupType('istio.workload.zds.WorkloadResponse'),
};

export class ProtocolError extends Error {
  override readonly name = 'ProtocolError';
}

function decode<T>(type: protobuf.Type, bytes: Uint8Array, what: string): T {
  try {
    const msg = type.decode(bytes);
    return type.toObject(msg, { defaults: false, oneofs: false }) as T;
  } catch (err) {
    throw new ProtocolError(`malformed ${what}: ${(err as Error).message}`);
  }
}

function encode(type: protobuf.Type, value: object): Buffer {
  return Buffer.from(type.encode(type.fromObject(value)).finish());
}

export const encodeHello = (h: ZdsHello): Buffer => encode(types.hello, h);
export const decodeHello = (b: Uint8Array): ZdsHello => ({
  version: 0,
  ...decode<Partial<ZdsHello>>(types.hello, b, 'ZdsHello'),
});
export const encodeRequest = (r: WorkloadRequest): Buffer => encode(types.request, r);
export const encodeResponse = (r: WorkloadResponse): Buffer => encode(types.response, r);

/** Decodes a WorkloadRequest; exactly one payload must be set. */
export function decodeRequest(b: Uint8Array): WorkloadRequest {
  const r = decode<Record<string, unknown>>(types.request, b, 'WorkloadRequest');
  const keys = Object.keys(r);
  if (keys.length !== 1)
    throw new ProtocolError(`WorkloadRequest with ${keys.length === 0 ? 'no' : 'more than one'} payload`);
  const req = r as WorkloadRequest;
  if ('add' in req) req.add.uid ??= '';
  if ('del' in req) req.del.uid ??= '';
  if ('keep' in req) req.keep.uid ??= '';
  return req;
}

/** Decodes a WorkloadResponse; it must carry an Ack (an empty error means success). */
export function decodeResponse(b: Uint8Array): { error: string } {
  const r = decode<WorkloadResponse>(types.response, b, 'WorkloadResponse');
  if (!r.ack) throw new ProtocolError('WorkloadResponse without an Ack');
  return { error: r.ack.error ?? '' };
}
