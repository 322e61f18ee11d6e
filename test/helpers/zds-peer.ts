import { rmSync } from 'node:fs';
// A scriptable ZDS peer over a real SEQPACKET socket, for protocol tests: plays ztunnel toward the
// agent's server, or the agent toward the stand-in.
import { closeFd, SeqpacketServer, SeqpacketSocket } from '../../bpf/src/node-netns.js';
import {
  decodeRequest,
  decodeResponse,
  encodeHello,
  encodeRequest,
  encodeResponse,
  type WorkloadRequest,
} from '../../ztunnel-bridge/src/protocol.js';

export interface Received {
  data: Buffer;
  fds: number[];
}

/** Datagrams from a socket, awaited one at a time; `closed` settles when the peer hangs up. */
export class Inbox {
  private readonly queue: Received[] = [];
  private waiter: ((r: Received | undefined) => void) | undefined;
  private isClosed = false;
  readonly closed: Promise<void>;

  constructor(readonly socket: SeqpacketSocket) {
    let done!: () => void;
    this.closed = new Promise((r) => (done = r));
    socket.onMessage = (data, fds) => {
      const r = { data, fds };
      if (this.waiter) {
        const w = this.waiter;
        this.waiter = undefined;
        w(r);
      } else this.queue.push(r);
    };
    socket.onClose = () => {
      this.isClosed = true;
      this.waiter?.(undefined);
      done();
    };
  }

  /** The next datagram, or undefined if the socket closed first / none came within timeoutMs. */
  next(timeoutMs = 3000): Promise<Received | undefined> {
    const queued = this.queue.shift();
    if (queued || this.isClosed) return Promise.resolve(queued);
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.waiter = undefined;
        resolve(undefined);
      }, timeoutMs);
      this.waiter = (r) => {
        clearTimeout(timer);
        resolve(r);
      };
    });
  }
}

/** Plays ztunnel: connects, says hello, and answers what the test tells it to. */
export class FakeZtunnel {
  readonly inbox: Inbox;
  constructor(path: string) {
    this.inbox = new Inbox(SeqpacketSocket.connect(path, 1024));
  }

  hello(version = 1): this {
    this.inbox.socket.send(encodeHello({ version }));
    return this;
  }

  /** The next request; its fds are closed after their count is noted. */
  async request(timeoutMs?: number): Promise<{ request: WorkloadRequest; fdCount: number } | undefined> {
    const r = await this.inbox.next(timeoutMs);
    if (!r) return undefined;
    r.fds.forEach(closeFd);
    return { request: decodeRequest(r.data), fdCount: r.fds.length };
  }

  ack(error = ''): void {
    this.inbox.socket.send(encodeResponse({ ack: { error } }));
  }

  /** Answers every request with an Ack until closed; returns what it saw. */
  autoAck(): WorkloadRequest[] {
    const seen: WorkloadRequest[] = [];
    this.inbox.socket.onMessage = (data, fds) => {
      fds.forEach(closeFd);
      seen.push(decodeRequest(data));
      this.ack();
    };
    return seen;
  }

  send(raw: Buffer): void {
    this.inbox.socket.send(raw);
  }

  close(): void {
    this.inbox.socket.close();
  }
}

/** Plays the agent toward the stand-in: accepts one connection and sends what the test says. */
export class FakeAgent {
  private readonly server: SeqpacketServer;
  private connection: Promise<Inbox>;

  constructor(private readonly path: string) {
    this.server = new SeqpacketServer(path, 0o600, 1024);
    this.connection = this.nextConnection();
  }

  private nextConnection(): Promise<Inbox> {
    return new Promise((resolve) => {
      this.server.onConnection = (s) => resolve(new Inbox(s));
    });
  }

  /** Waits for the stand-in and checks its hello. */
  async accept(): Promise<Inbox> {
    const inbox = await this.connection;
    this.connection = this.nextConnection();
    const hello = await inbox.next();
    if (!hello || hello.data.toString('hex') !== '0801')
      throw new Error(`expected ZdsHello{V1}, got ${hello?.data.toString('hex')}`);
    return inbox;
  }

  static send(inbox: Inbox, request: WorkloadRequest, fds: number[] = []): void {
    inbox.socket.send(encodeRequest(request), fds);
  }

  /** The Ack the stand-in answered with ('' = success), or undefined if it closed instead. */
  static async reply(inbox: Inbox): Promise<string | undefined> {
    const r = await inbox.next();
    return r ? decodeResponse(r.data).error : undefined;
  }

  close(): void {
    this.server.close();
    rmSync(this.path, { force: true });
  }
}
