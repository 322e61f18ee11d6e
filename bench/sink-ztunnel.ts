// A ztunnel for traffic benchmarks: it speaks ZDS to the agent like ztunnel (hello, then an Ack
// for every message) and, for each Add, puts bench/tcpbench's native listener on 15001 inside the
// pod netns it was handed, so that what is measured is the datapath and not a proxy written in JS.
// It runs in the benchmark's own cgroup, which the agent trusts as ztunnel's (the ZDS peer's).
import type { ChildProcess } from 'node:child_process';
import { closeFd, SeqpacketSocket } from '../bpf/src/node-netns.js';
import {
  decodeRequest,
  encodeHello,
  encodeResponse,
  ZDS_MAX_MESSAGE,
  ZDS_VERSION_V1,
} from '../ztunnel-bridge/src/protocol.js';
import { startListener } from './harness.js';

export class SinkZtunnel {
  private readonly listeners = new Map<string, ChildProcess>();
  private readonly socket: SeqpacketSocket;
  private work: Promise<void> = Promise.resolve();

  /** Throws when the agent's ZDS socket cannot be reached yet. */
  constructor(socketPath: string) {
    this.socket = SeqpacketSocket.connect(socketPath, ZDS_MAX_MESSAGE);
    this.socket.onMessage = (data, fds) => {
      this.work = this.work.then(() => this.handle(data, fds));
    };
    this.socket.send(encodeHello({ version: ZDS_VERSION_V1 }));
  }

  /** Pod uids with a listener. */
  get pods(): string[] {
    return [...this.listeners.keys()];
  }

  private async handle(data: Buffer, fds: number[]): Promise<void> {
    let error = '';
    try {
      const req = decodeRequest(data);
      if ('add' in req && fds.length === 1 && !this.listeners.has(req.add.uid)) {
        this.listeners.set(req.add.uid, await startListener(`/proc/${process.pid}/fd/${fds[0]}`));
      }
      if ('del' in req) {
        this.listeners.get(req.del.uid)?.kill();
        this.listeners.delete(req.del.uid);
      }
    } catch (err) {
      error = (err as Error).message;
    } finally {
      fds.forEach(closeFd);
    }
    if (!this.socket.isClosed) this.socket.send(encodeResponse({ ack: { error } }));
  }

  close(): void {
    this.socket.close();
    for (const l of this.listeners.values()) l.kill();
    this.listeners.clear();
  }
}
