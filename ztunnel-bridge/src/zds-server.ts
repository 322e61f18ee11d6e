// The agent side of ZDS: a SEQPACKET server that ztunnel connects to. It knows pods only as
// "enrolled (uid, netns fd, workload info)" and "gone (uid)"; nothing of Kubernetes or BPF.
//
// Per connection: read ZdsHello (deadline), send the snapshot (Add + netns fd for every enrolled
// pod, Keep for pods whose netns it cannot hold), always SnapshotSent, waiting for the Ack after
// every message (deadline). Afterwards Add goes to the newest connection, Del to all of them (two
// ztunnels coexist during an upgrade). Anything ztunnel sends that is not an expected reply is a
// protocol error and closes that connection.
import { chmodSync, existsSync, fstatSync, mkdirSync, unlinkSync } from 'node:fs';
import { dirname } from 'node:path';
import {
  closeFd,
  dupFd,
  SeqpacketServer,
  type PeerCredentials,
  type SeqpacketError,
  type SeqpacketSocket,
} from '../../bpf/src/node-netns.js';
import {
  decodeHello,
  decodeResponse,
  encodeRequest,
  ProtocolError,
  ZDS_MAX_MESSAGE,
  ZDS_VERSION_V1,
  type WorkloadInfo,
  type WorkloadRequest,
} from './protocol.js';
import { silentLogger, type Logger } from './logger.js';

export const DEFAULT_ZTUNNEL_SOCKET = '/var/run/ztunnel/ztunnel.sock';

export type ZtunnelResult =
  { status: 'acked' } | { status: 'nacked'; error: string } | { status: 'unreachable'; reason: string };

export interface PodEnrollment {
  uid: string;
  info: WorkloadInfo;
  /** The pod's netns; the server takes ownership (closes it on remove). Absent: the server only
   * knows the pod exists (it is announced with Keep in snapshots). */
  netnsFd?: number;
}

export interface ZdsServerOptions {
  socketPath?: string;
  /** Deadline for each Ack (upstream: 5 s). */
  ackTimeoutMs?: number;
  /** Deadline for ZdsHello on a new connection (upstream: 5 s). */
  helloTimeoutMs?: number;
  /** Every ztunnel answer about a pod, including those to snapshots sent after a reconnect. */
  onStatus?: (uid: string, result: ZtunnelResult) => void;
  /** A ztunnel said hello; called before its snapshot is sent, so whatever ztunnel's sockets need
   * from the node (its cgroup trusted by the datapath) is in place before ztunnel opens them. */
  onZtunnelHello?: (peer: PeerCredentials) => void;
  log?: Logger;
}

type Reply = { answered: true; error: string } | { answered: false; reason: string };

interface QueuedRequest {
  request: WorkloadRequest;
  /** Owned by the queue item: a duplicate, closed once sent or dropped. */
  fd: number;
  resolve: (r: Reply) => void;
}

let nextConnectionId = 1;

class ZtunnelConnection {
  readonly id = nextConnectionId++;
  state: 'hello' | 'snapshot' | 'ready' | 'closed' = 'hello';
  /** Pods this connection's snapshot hands over with an Add that ztunnel has not answered yet. */
  readonly snapshotAdds = new Set<string>();
  private readonly queue: QueuedRequest[] = [];
  private inflight: { item: QueuedRequest; timer: NodeJS.Timeout } | undefined;
  private readonly helloTimer: NodeJS.Timeout;
  private closeReason = 'connection closed';

  constructor(
    private readonly socket: SeqpacketSocket,
    private readonly server: ZdsServer,
    private readonly opts: Required<Pick<ZdsServerOptions, 'ackTimeoutMs' | 'helloTimeoutMs'>>,
    private readonly log: Logger,
  ) {
    socket.onMessage = (data, fds) => this.onMessage(data, fds);
    socket.onClose = (err) => this.onClosed(err);
    this.helloTimer = setTimeout(() => this.fail(`no ZdsHello within ${opts.helloTimeoutMs} ms`), opts.helloTimeoutMs);
  }

  /** Sends one request after those before it were answered; resolves with ztunnel's answer. */
  request(request: WorkloadRequest, fd = -1): Promise<Reply> {
    return new Promise((resolve) => {
      const item = { request, fd: fd >= 0 ? dupFd(fd) : -1, resolve };
      if (this.state === 'closed') return this.drop(item, this.closeReason);
      this.queue.push(item);
      this.pump();
    });
  }

  close(reason: string): void {
    this.closeReason = reason;
    this.socket.close();
  }

  private pump(): void {
    if (this.inflight || this.state === 'closed') return;
    const item = this.queue.shift();
    if (!item) return;
    try {
      this.socket.send(encodeRequest(item.request), item.fd);
    } catch (err) {
      this.drop(item, `send failed: ${(err as Error).message}`);
      return this.fail(`send failed: ${(err as Error).message}`);
    }
    if (item.fd >= 0) closeFd(item.fd);
    item.fd = -1;
    const timer = setTimeout(() => this.fail(`no Ack within ${this.opts.ackTimeoutMs} ms`), this.opts.ackTimeoutMs);
    this.inflight = { item, timer };
  }

  private onMessage(data: Buffer, fds: number[]): void {
    fds.forEach(closeFd);
    try {
      if (fds.length > 0) throw new ProtocolError('ztunnel sent a file descriptor');
      if (this.state === 'hello') {
        const hello = decodeHello(data);
        if (hello.version !== ZDS_VERSION_V1) throw new ProtocolError(`unsupported ZDS version ${hello.version}`);
        clearTimeout(this.helloTimer);
        this.state = 'snapshot';
        const peer = this.socket.peerCredentials();
        this.log.info({ connection: this.id, pid: peer.pid }, 'ztunnel connected; sending snapshot');
        this.server.helloFrom(peer);
        this.server.sendSnapshot(this);
        return;
      }
      if (!this.inflight) throw new ProtocolError('unsolicited message from ztunnel');
      const { error } = decodeResponse(data);
      const { item, timer } = this.inflight;
      clearTimeout(timer);
      this.inflight = undefined;
      item.resolve({ answered: true, error });
      this.pump();
    } catch (err) {
      this.fail(err instanceof ProtocolError ? `protocol error: ${err.message}` : String(err));
    }
  }

  private fail(reason: string): void {
    if (this.state === 'closed') return;
    this.log.warn({ connection: this.id, reason }, 'closing ztunnel connection');
    this.close(reason);
  }

  private onClosed(err?: SeqpacketError): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    clearTimeout(this.helloTimer);
    const reason = err ? `${this.closeReason}: ${err.message}` : this.closeReason;
    if (this.inflight) {
      clearTimeout(this.inflight.timer);
      this.drop(this.inflight.item, reason);
      this.inflight = undefined;
    }
    for (const item of this.queue.splice(0)) this.drop(item, reason);
    this.server.connectionClosed(this, reason);
  }

  private drop(item: QueuedRequest, reason: string): void {
    if (item.fd >= 0) closeFd(item.fd);
    item.fd = -1;
    item.resolve({ answered: false, reason });
  }
}

export class ZdsServer {
  readonly socketPath: string;
  private readonly opts: Required<Pick<ZdsServerOptions, 'ackTimeoutMs' | 'helloTimeoutMs'>>;
  private readonly log: Logger;
  private readonly pods = new Map<string, PodEnrollment>();
  private readonly results = new Map<string, ZtunnelResult>();
  /** Oldest first: Add goes to the last one. */
  private readonly connections: ZtunnelConnection[] = [];
  /** enroll() calls that wait for a snapshot in progress on a connection. */
  private readonly snapshotWaiters = new Map<
    string,
    { connection: ZtunnelConnection; resolve: (r: ZtunnelResult) => void }[]
  >();
  private server: SeqpacketServer | undefined;

  constructor(private readonly options: ZdsServerOptions = {}) {
    this.socketPath = options.socketPath ?? DEFAULT_ZTUNNEL_SOCKET;
    this.opts = { ackTimeoutMs: options.ackTimeoutMs ?? 5000, helloTimeoutMs: options.helloTimeoutMs ?? 5000 };
    this.log = options.log ?? silentLogger;
  }

  /** Binds the socket (replacing a stale socket file) without serving yet: ztunnel's connect
   * succeeds and its hello waits until start(). ztunnel reconnects with a doubling backoff, so the
   * sooner a restarted agent's socket exists, the sooner ztunnel is back; an agent binds it first
   * and serves once it knows its pods. The directory is created if missing, mode 0750; the socket
   * is 0600: only root (ztunnel) may connect. */
  listen(): void {
    if (this.server) return;
    const dir = dirname(this.socketPath);
    if (!existsSync(dir)) {
      mkdirSync(dir, { recursive: true, mode: 0o750 });
      chmodSync(dir, 0o750);
    }
    this.server = new SeqpacketServer(this.socketPath, 0o600, ZDS_MAX_MESSAGE, { accepting: false });
    this.server.onConnection = (socket) => {
      const connection = new ZtunnelConnection(socket, this, this.opts, this.log);
      this.connections.push(connection);
    };
  }

  /** Serves ztunnel: binds the socket unless listen() did, and accepts its connections. */
  start(): void {
    this.listen();
    this.server!.accept();
    this.log.info({ socket: this.socketPath }, 'ZDS server listening');
  }

  /** @internal */
  helloFrom(peer: PeerCredentials): void {
    this.options.onZtunnelHello?.(peer);
  }

  /** ztunnel connections that completed their hello. */
  get connectedCount(): number {
    return this.connections.filter((c) => c.state === 'snapshot' || c.state === 'ready').length;
  }

  /** The last answer about a pod, or unreachable if none came yet. */
  status(uid: string): ZtunnelResult | undefined {
    return this.results.get(uid);
  }

  /** Knows a pod without telling anyone: it goes out with the next snapshot (a restarted agent
   * adopting pods before ztunnel connects). Takes ownership of the netns fd. */
  remember(pod: PodEnrollment): void {
    const previous = this.pods.get(pod.uid);
    if (previous?.netnsFd !== undefined && previous.netnsFd !== pod.netnsFd) closeFd(previous.netnsFd);
    this.pods.set(pod.uid, pod);
  }

  /** Hands a pod to ztunnel (the newest connection); resolves with ztunnel's answer. The pod is
   * remembered either way and is part of every later snapshot. */
  async enroll(pod: PodEnrollment): Promise<ZtunnelResult> {
    if (!pod.uid || !pod.info.name || !pod.info.namespace) {
      if (pod.netnsFd !== undefined) closeFd(pod.netnsFd);
      throw new Error('a pod needs a uid, a name and a namespace');
    }
    const previous = this.pods.get(pod.uid);
    const sameNetns =
      previous?.netnsFd !== undefined && pod.netnsFd !== undefined && sameFile(previous.netnsFd, pod.netnsFd);
    if (previous?.netnsFd !== undefined && previous.netnsFd !== pod.netnsFd) closeFd(previous.netnsFd);
    this.pods.set(pod.uid, pod);
    const connection = this.connections.at(-1);
    if (!connection) return this.report(pod.uid, { status: 'unreachable', reason: 'ztunnel is not connected' });
    // Its snapshot is built from the pods known when the hello arrives, this one included; or the
    // snapshot in progress hands this pod over in this netns already (a restarted agent's first
    // pass over the pods it adopted): ztunnel's answer to that Add is this one's, not a second Add.
    if (connection.state === 'hello' || (sameNetns && connection.snapshotAdds.has(pod.uid))) {
      return new Promise((resolve) => {
        const list = this.snapshotWaiters.get(pod.uid) ?? [];
        list.push({ connection, resolve });
        this.snapshotWaiters.set(pod.uid, list);
      });
    }
    if (pod.netnsFd === undefined) {
      // Keep is only valid in a snapshot; the pod goes out with the next one.
      return this.report(pod.uid, { status: 'unreachable', reason: 'no netns to hand over' });
    }
    const reply = await connection.request({ add: { uid: pod.uid, workloadInfo: pod.info } }, pod.netnsFd);
    return this.report(pod.uid, toResult(reply));
  }

  /** Forgets a pod and tells every connected ztunnel (Del). */
  async remove(uid: string): Promise<void> {
    const pod = this.pods.get(uid);
    this.pods.delete(uid);
    this.results.delete(uid);
    if (pod?.netnsFd !== undefined) closeFd(pod.netnsFd);
    for (const w of this.snapshotWaiters.get(uid) ?? []) w.resolve({ status: 'unreachable', reason: 'pod removed' });
    this.snapshotWaiters.delete(uid);
    const targets = this.connections.filter((c) => c.state === 'snapshot' || c.state === 'ready');
    const replies = await Promise.all(targets.map((c) => c.request({ del: { uid } })));
    for (const r of replies) {
      if (r.answered && r.error) this.log.warn({ uid, error: r.error }, 'ztunnel refused Del');
    }
  }

  close(): void {
    this.server?.close();
    this.server = undefined;
    for (const c of [...this.connections]) c.close('server closed');
    for (const pod of this.pods.values()) if (pod.netnsFd !== undefined) closeFd(pod.netnsFd);
    this.pods.clear();
    try {
      unlinkSync(this.socketPath);
    } catch {
      // already gone
    }
  }

  /** Called by a connection once its hello arrived. */
  sendSnapshot(connection: ZtunnelConnection): void {
    const pods = [...this.pods.values()];
    for (const pod of pods) {
      const request: WorkloadRequest =
        pod.netnsFd !== undefined ? { add: { uid: pod.uid, workloadInfo: pod.info } } : { keep: { uid: pod.uid } };
      if ('add' in request) connection.snapshotAdds.add(pod.uid);
      void connection.request(request, pod.netnsFd ?? -1).then((reply) => {
        connection.snapshotAdds.delete(pod.uid);
        const result = toResult(reply);
        if ('keep' in request && result.status === 'acked') return; // kept, not (re)started: no news
        this.report(pod.uid, result);
        this.resolveWaiters(pod.uid, connection, result);
      });
    }
    void connection.request({ snapshotSent: {} }).then((reply) => {
      if (!reply.answered) return;
      if (reply.error) this.log.warn({ connection: connection.id, error: reply.error }, 'ztunnel nacked SnapshotSent');
      if (connection.state === 'snapshot') connection.state = 'ready';
      this.log.info({ connection: connection.id, pods: pods.length }, 'snapshot acknowledged');
    });
  }

  /** Called by a connection once it closed. */
  connectionClosed(connection: ZtunnelConnection, reason: string): void {
    this.connections.splice(this.connections.indexOf(connection), 1);
    for (const [uid, waiters] of this.snapshotWaiters) {
      this.resolveWaiters(uid, connection, { status: 'unreachable', reason });
      if (waiters.length === 0) this.snapshotWaiters.delete(uid);
    }
    this.log.info({ connection: connection.id, reason }, 'ztunnel disconnected');
  }

  private resolveWaiters(uid: string, connection: ZtunnelConnection, result: ZtunnelResult): void {
    const waiters = this.snapshotWaiters.get(uid);
    if (!waiters) return;
    for (const w of waiters.filter((w) => w.connection === connection)) w.resolve(result);
    const rest = waiters.filter((w) => w.connection !== connection);
    if (rest.length) this.snapshotWaiters.set(uid, rest);
    else this.snapshotWaiters.delete(uid);
  }

  private report(uid: string, result: ZtunnelResult): ZtunnelResult {
    if (this.pods.has(uid)) {
      this.results.set(uid, result);
      this.options.onStatus?.(uid, result);
    }
    return result;
  }
}

/** Do two fds name the same file (the same network namespace)? */
function sameFile(a: number, b: number): boolean {
  try {
    const x = fstatSync(a);
    const y = fstatSync(b);
    return x.ino === y.ino && x.dev === y.dev;
  } catch {
    return false;
  }
}

function toResult(reply: Reply): ZtunnelResult {
  if (!reply.answered) return { status: 'unreachable', reason: reply.reason };
  return reply.error ? { status: 'nacked', error: reply.error } : { status: 'acked' };
}
