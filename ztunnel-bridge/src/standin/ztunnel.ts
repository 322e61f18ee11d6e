// The node-local ztunnel stand-in: a ZDS client that behaves like upstream ztunnel. It connects
// with backoff (10 ms doubling to 15 s), says ZdsHello{V1}, and for each Add opens the pod's
// listeners inside the pod netns, acking only once they are up. It is as strict as ztunnel: Add
// without exactly one fd or without workload info, an fd on any other message, Keep after
// SnapshotSent and a second SnapshotSent are fatal (nack, then stop, as ztunnel exits).
import { fstatSync } from 'node:fs';
import { closeFd, reserveFileDescriptors, SeqpacketSocket } from '../../../bpf/src/node-netns.js';
import {
  decodeRequest,
  encodeHello,
  encodeResponse,
  ProtocolError,
  ZDS_MAX_MESSAGE,
  ZDS_VERSION_V1,
  type WorkloadInfo,
} from '../protocol.js';
import { silentLogger, type Logger } from '../logger.js';
import { PodProxy, type Direction, type DirectionStats, type Endpoint, type SeenConnection } from './pod-proxy.js';

export interface ZtunnelStandInOptions {
  socketPath: string;
  dnsUpstream?: Endpoint;
  log?: Logger;
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  /** Called when a protocol violation made the stand-in stop (upstream ztunnel exits). */
  onFatal?: (reason: string) => void;
}

export interface PodStats {
  uid: string;
  name: string;
  namespace: string;
  stats: Record<Direction, DirectionStats>;
  recent: SeenConnection[];
}

interface Pod {
  info: WorkloadInfo;
  netns: { ino: number; dev: number };
  proxy: PodProxy;
}

/** A pod holds about ten fds here (its netns, listeners, DNS sockets): room for ~800 pods before
 * the fd table has to grow again, each growth a stall of ~10 ms for the Add that crosses it. */
const FD_TABLE = 8192;

export class ZtunnelStandIn {
  private readonly pods = new Map<string, Pod>();
  private socket: SeqpacketSocket | undefined;
  private session = { snapshotDone: false, seen: new Set<string>() };
  private backoffMs: number;
  private retry: NodeJS.Timeout | undefined;
  private stopped = false;
  /** Requests are handled one at a time, in order. */
  private work: Promise<void> = Promise.resolve();
  private readonly log: Logger;

  constructor(private readonly options: ZtunnelStandInOptions) {
    this.log = options.log ?? silentLogger;
    this.backoffMs = options.initialBackoffMs ?? 10;
  }

  start(): void {
    reserveFileDescriptors(FD_TABLE);
    this.stopped = false;
    this.connect();
  }

  get connected(): boolean {
    return this.socket !== undefined && !this.socket.isClosed;
  }

  stats(): PodStats[] {
    return [...this.pods.entries()].map(([uid, p]) => ({
      uid,
      name: p.info.name,
      namespace: p.info.namespace,
      stats: p.proxy.stats,
      recent: [...p.proxy.recent],
    }));
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.retry);
    this.socket?.close();
    this.socket = undefined;
    for (const uid of [...this.pods.keys()]) this.removePod(uid);
  }

  private connect(): void {
    if (this.stopped) return;
    let socket: SeqpacketSocket;
    try {
      socket = SeqpacketSocket.connect(this.options.socketPath, ZDS_MAX_MESSAGE);
    } catch (err) {
      this.log.debug({ error: (err as Error).message, retryMs: this.backoffMs }, 'cannot reach the agent yet');
      this.retry = setTimeout(() => this.connect(), this.backoffMs);
      this.backoffMs = Math.min(this.backoffMs * 2, this.options.maxBackoffMs ?? 15_000);
      return;
    }
    this.backoffMs = this.options.initialBackoffMs ?? 10;
    this.socket = socket;
    this.session = { snapshotDone: false, seen: new Set() };
    socket.onMessage = (data, fds) => {
      this.work = this.work.then(() => this.handle(socket, data, fds));
    };
    socket.onClose = () => {
      if (this.socket === socket) this.socket = undefined;
      if (!this.stopped) {
        this.log.info({}, 'agent connection closed; reconnecting');
        this.retry = setTimeout(() => this.connect(), this.backoffMs);
      }
    };
    try {
      socket.send(encodeHello({ version: ZDS_VERSION_V1 }));
    } catch (err) {
      // The agent went away between connect and hello (a restart): the send closed the socket,
      // and onClose has asked for the next attempt.
      this.log.info({ error: (err as Error).message }, 'the agent went away during the hello; reconnecting');
      return;
    }
    this.log.info({ socket: this.options.socketPath }, 'connected to the agent');
  }

  private async handle(socket: SeqpacketSocket, data: Buffer, fds: number[]): Promise<void> {
    if (socket.isClosed) return fds.forEach(closeFd);
    try {
      const req = decodeRequest(data);
      if (!('add' in req) && fds.length > 0)
        throw new ProtocolError(`file descriptor sent with ${Object.keys(req)[0]}`);
      if ('add' in req) {
        if (fds.length !== 1)
          throw new ProtocolError(fds.length === 0 ? 'Add without a netns fd' : `Add with ${fds.length} fds`);
        if (!req.add.workloadInfo) throw new ProtocolError('Add without workload info');
        const error = await this.addPod(req.add.uid, req.add.workloadInfo, fds.splice(0)[0]!);
        return this.reply(socket, error);
      }
      if ('keep' in req) {
        if (this.session.snapshotDone) throw new ProtocolError('Keep after SnapshotSent');
        this.session.seen.add(req.keep.uid);
        return this.reply(socket, '');
      }
      if ('snapshotSent' in req) {
        if (this.session.snapshotDone) throw new ProtocolError('second SnapshotSent');
        this.session.snapshotDone = true;
        for (const uid of [...this.pods.keys()]) {
          if (!this.session.seen.has(uid)) {
            this.log.info({ uid }, 'pod missing from the snapshot: draining');
            this.removePod(uid);
          }
        }
        return this.reply(socket, '');
      }
      this.removePod(req.del.uid);
      return this.reply(socket, '');
    } catch (err) {
      fds.forEach(closeFd);
      const reason = err instanceof ProtocolError ? err.message : `unexpected: ${String(err)}`;
      this.fatal(socket, reason);
    }
  }

  /** Opens the pod's proxy; returns '' (ack) or the reason (nack). Owns `fd`. */
  private async addPod(uid: string, info: WorkloadInfo, fd: number): Promise<string> {
    if (!this.session.snapshotDone) this.session.seen.add(uid);
    let netns;
    try {
      const st = fstatSync(fd);
      netns = { ino: st.ino, dev: st.dev };
    } catch (err) {
      closeFd(fd);
      return `cannot inspect the netns fd: ${(err as Error).message}`;
    }
    const existing = this.pods.get(uid);
    if (existing && existing.netns.ino === netns.ino && existing.netns.dev === netns.dev) {
      closeFd(fd); // same pod, same netns: nothing to do
      return '';
    }
    if (existing) this.removePod(uid);
    try {
      const proxy = await PodProxy.open(uid, fd, this.options.dnsUpstream);
      this.pods.set(uid, { info, netns, proxy });
      this.log.info({ uid, pod: `${info.namespace}/${info.name}` }, 'pod proxy started');
      return '';
    } catch (err) {
      closeFd(fd);
      this.log.warn({ uid, error: (err as Error).message }, 'cannot start pod proxy');
      return `cannot start the proxy for ${info.namespace}/${info.name}: ${(err as Error).message}`;
    }
  }

  private removePod(uid: string): void {
    const pod = this.pods.get(uid);
    if (!pod) return;
    pod.proxy.close();
    this.pods.delete(uid);
    this.log.info({ uid }, 'pod proxy stopped');
  }

  private reply(socket: SeqpacketSocket, error: string): void {
    if (!socket.isClosed) socket.send(encodeResponse({ ack: { error } }));
  }

  private fatal(socket: SeqpacketSocket, reason: string): void {
    this.log.error({ reason }, 'ZDS protocol violation: stopping, as ztunnel exits');
    try {
      this.reply(socket, reason);
    } catch {
      // the peer may be gone already
    }
    this.stop();
    this.options.onFatal?.(reason);
  }
}
