// Unix SOCK_SEQPACKET sockets with file-descriptor passing, on Node's event loop (the native side
// only makes non-blocking calls; readiness comes from libuv).
import { addon, type NativeWatcher, type PeerCredentials } from './native.js';

export type { PeerCredentials } from './native.js';

const READABLE = 1;
const WRITABLE = 2;
const HANGUP = 4;

export class SeqpacketError extends Error {
  override readonly name = 'SeqpacketError';
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

function wrap(err: unknown): SeqpacketError {
  const e = err as { code?: string; message?: string };
  return new SeqpacketError(e.code ?? 'ESYSTEM', e.message ?? String(err));
}

/** A connected SEQPACKET socket: one datagram per message, optional fds with each. */
export class SeqpacketSocket {
  /** Called for each datagram. The receiver owns `fds` and must close them. */
  onMessage: (data: Buffer, fds: number[]) => void = (_data, fds) => fds.forEach(closeFd);
  /** Called once when the socket closes: peer hang-up (no error), local close, or an error. */
  onClose: (err?: SeqpacketError) => void = () => undefined;

  private readonly watcher: NativeWatcher;
  private readonly pending: { data: Buffer; fd: number | number[] }[] = [];
  private closed = false;

  constructor(
    readonly fd: number,
    private readonly maxMessage: number,
  ) {
    this.watcher = new (addon().seqpacket.Watcher)(fd, (events) => this.ready(events));
    this.watcher.start(READABLE);
  }

  static connect(path: string, maxMessage: number): SeqpacketSocket {
    try {
      return new SeqpacketSocket(addon().seqpacket.connect(path), maxMessage);
    } catch (err) {
      throw wrap(err);
    }
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** The process that connected (SO_PEERCRED). */
  peerCredentials(): PeerCredentials {
    try {
      return addon().seqpacket.peerCredentials(this.fd);
    } catch (err) {
      throw wrap(err);
    }
  }

  /** Queues one datagram, with `passFd` (one fd, or several) sent along by SCM_RIGHTS; the caller
   * keeps its own fds, and may close them once this returns: a datagram that has to wait for room
   * keeps duplicates of them (closed once sent or dropped), never the caller's fd numbers, which
   * could name another file by then. */
  send(data: Buffer, passFd: number | number[] = -1): void {
    if (this.closed) throw new SeqpacketError('ECLOSED', 'socket is closed');
    if (this.pending.length > 0) {
      this.pending.push({ data, fd: duplicates(passFd) });
      return;
    }
    try {
      if (!addon().seqpacket.send(this.fd, data, passFd)) {
        this.pending.push({ data, fd: duplicates(passFd) });
        this.watcher.start(READABLE | WRITABLE);
      }
    } catch (err) {
      this.close(wrap(err));
      throw wrap(err);
    }
  }

  close(err?: SeqpacketError): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher.close();
    addon().seqpacket.close(this.fd);
    for (const p of this.pending.splice(0)) closeAll(p.fd);
    this.onClose(err);
  }

  private ready(events: number): void {
    if (this.closed) return;
    if (events < 0) return this.close(new SeqpacketError('EPOLL', `poll error ${events}`));
    if (events & WRITABLE) this.flush();
    if (events & (READABLE | HANGUP)) this.drain();
  }

  private drain(): void {
    while (!this.closed) {
      let msg;
      try {
        msg = addon().seqpacket.recv(this.fd, this.maxMessage);
      } catch (err) {
        return this.close(wrap(err));
      }
      if (msg === null) return;
      if ('eof' in msg) return this.close();
      this.onMessage(msg.data, msg.fds);
    }
  }

  private flush(): void {
    while (this.pending.length > 0 && !this.closed) {
      const next = this.pending[0]!;
      try {
        if (!addon().seqpacket.send(this.fd, next.data, next.fd)) return;
      } catch (err) {
        return this.close(wrap(err));
      }
      closeAll(this.pending.shift()!.fd);
    }
    if (!this.closed) this.watcher.start(READABLE);
  }
}

/** A listening SEQPACKET socket at a filesystem path. */
export class SeqpacketServer {
  onConnection: (socket: SeqpacketSocket) => void = (s) => s.close();
  private readonly fd: number;
  private readonly watcher: NativeWatcher;
  private closed = false;
  private accepting = false;

  /** Listens at `path` (a stale socket file there is replaced) with file mode `mode`, and accepts;
   * with `accepting: false`, only listens: peers' connects succeed and wait in the backlog (their
   * first messages queued) until accept(). */
  constructor(
    readonly path: string,
    mode: number,
    private readonly maxMessage: number,
    { accepting = true }: { accepting?: boolean } = {},
  ) {
    try {
      this.fd = addon().seqpacket.listen(path, mode);
    } catch (err) {
      throw wrap(err);
    }
    this.watcher = new (addon().seqpacket.Watcher)(this.fd, () => this.acceptAll());
    if (accepting) this.accept();
  }

  /** Starts accepting connections (those waiting in the backlog first). */
  accept(): void {
    if (this.accepting || this.closed) return;
    this.accepting = true;
    this.watcher.start(READABLE);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher.close();
    addon().seqpacket.close(this.fd);
  }

  private acceptAll(): void {
    for (;;) {
      if (this.closed) return;
      const fd = addon().seqpacket.accept(this.fd);
      if (fd < 0) return;
      this.onConnection(new SeqpacketSocket(fd, this.maxMessage));
    }
  }
}

/** Duplicates of the fds a queued datagram passes (-1: none). */
function duplicates(fd: number | number[]): number | number[] {
  return Array.isArray(fd) ? fd.map(dupFd) : fd >= 0 ? dupFd(fd) : -1;
}

function closeAll(fd: number | number[]): void {
  for (const f of Array.isArray(fd) ? fd : [fd]) if (f >= 0) closeFd(f);
}

export function closeFd(fd: number): void {
  addon().seqpacket.close(fd);
}

/** Grows this process's fd table to `count` descriptors now (fewer under RLIMIT_NOFILE; returns
 * how many): each later growth would wait for an RCU grace period inside whichever socket() or
 * open() crossed 256, 512, 1024... (about 10 ms here), in the middle of some pod's enrolment. */
export function reserveFileDescriptors(count: number): number {
  try {
    return addon().seqpacket.reserveFds(count);
  } catch (err) {
    throw wrap(err);
  }
}

/** A close-on-exec duplicate of `fd`. */
export function dupFd(fd: number): number {
  try {
    return addon().seqpacket.dup(fd);
  } catch (err) {
    throw wrap(err);
  }
}
