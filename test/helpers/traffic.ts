// Real sockets in test namespaces that record who took each connection, and with which addresses.
import dgram from 'node:dgram';
import type net from 'node:net';
import {
  connectFromNetns,
  listenInNetns,
  type NetnsConnectOptions,
  type NetnsListenOptions,
} from '../../bpf/src/index.js';
import { udpSocketInNetns } from '../../bpf/src/node-netns.js';
import { scaled } from './wait.js';

export interface Accepted {
  localAddress: string;
  localPort: number;
  remoteAddress: string;
  remotePort: number;
}

/** A listener that answers every connection with its own name and remembers what it accepted. */
export class RecordingServer {
  readonly accepted: Accepted[] = [];
  /** Bytes each connection sent before closing, in accept order. */
  readonly received: string[] = [];
  private readonly open = new Set<net.Socket>();

  private constructor(
    readonly name: string,
    private readonly server: net.Server,
    closeDelayMs: number,
  ) {
    server.on('connection', (s) => {
      this.open.add(s);
      s.on('close', () => this.open.delete(s));
      this.accepted.push({
        localAddress: unmap(s.localAddress ?? ''),
        localPort: s.localPort ?? 0,
        remoteAddress: unmap(s.remoteAddress ?? ''),
        remotePort: s.remotePort ?? 0,
      });
      const idx = this.received.push('') - 1;
      s.on('data', (d: Buffer) => (this.received[idx] += d.toString()));
      s.on('error', () => undefined);
      s.write(`${name}\n`);
      s.on('end', () => (closeDelayMs ? setTimeout(() => s.end(), closeDelayMs) : s.end()));
    });
  }

  /** `closeDelayMs`: how long after the client's FIN this side closes (0: at once, so its FIN
   * usually rides on the ACK of the client's). */
  static async start(name: string, options: NetnsListenOptions, closeDelayMs = 0): Promise<RecordingServer> {
    return new RecordingServer(name, await listenInNetns(options), closeDelayMs);
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  /** Closes, also cutting connections whose clients went silent (close() waits for those). */
  async destroy(): Promise<void> {
    const closed = this.close();
    for (const s of this.open) s.destroy();
    await closed;
  }
}

/** ztunnel's in-pod listener shape: wildcard [::] (dual stack), transparent, reuseport, marked. */
export function ztunnelListener(netns: string, port: number, name = `ztunnel-${port}`): Promise<RecordingServer> {
  return RecordingServer.start(name, {
    netns,
    family: 6,
    address: '::',
    port,
    transparent: true,
    reuseport: true,
    mark: 0x539,
  });
}

/** Connects, sends `payload`, and returns the first line the server answered (its name). */
export async function whoAnswers(options: NetnsConnectOptions, payload = 'ping'): Promise<string> {
  const socket = await connectFromNetns(options);
  try {
    return await new Promise<string>((resolve, reject) => {
      let buf = '';
      const timer = setTimeout(
        () => reject(new Error(`no answer from ${options.host}:${options.port}`)),
        options.timeoutMs ?? scaled(3000),
      );
      socket.on('data', (d: Buffer) => {
        buf += d.toString();
        const nl = buf.indexOf('\n');
        if (nl >= 0) {
          clearTimeout(timer);
          resolve(buf.slice(0, nl));
        }
      });
      socket.on('error', (e) => {
        clearTimeout(timer);
        reject(e);
      });
      socket.write(payload);
    });
  } finally {
    socket.end();
    socket.destroy();
  }
}

/** Resolves to the error a connection attempt ends with (or throws if it connects). */
export async function connectFails(options: NetnsConnectOptions): Promise<Error> {
  try {
    const s = await connectFromNetns(options);
    s.destroy();
  } catch (err) {
    return err as Error;
  }
  throw new Error(`connection to ${options.host}:${options.port} unexpectedly succeeded`);
}

function unmap(a: string): string {
  return a.startsWith('::ffff:') ? a.slice(7) : a;
}

/** A UDP socket bound inside `netns`. */
export async function udpInNetns(netns: string, address: string, port: number): Promise<dgram.Socket> {
  const fd = await udpSocketInNetns({ netns, address, port });
  const socket = dgram.createSocket(address.includes(':') ? 'udp6' : 'udp4');
  await new Promise<void>((resolve) => socket.bind({ fd }, resolve));
  return socket;
}
