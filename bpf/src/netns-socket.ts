// TCP sockets made inside a network namespace with ztunnel's socket options, wrapped as ordinary
// Node sockets and servers (the fd is polled by libuv like any other).
import net, { isIP } from 'node:net';
import { addon, type NativeSocketOptions } from './native.js';

export interface NetnsListenOptions {
  netns?: string;
  family?: 4 | 6;
  address?: string;
  port: number;
  mark?: number;
  transparent?: boolean;
  reuseport?: boolean;
  v6only?: boolean;
  backlog?: number;
}

/** A listening TCP server bound inside `netns`. */
export async function listenInNetns(options: NetnsListenOptions): Promise<net.Server> {
  return serverOnFd(await addon().socket(listenOptions(options)));
}

const listenOptions = (options: NetnsListenOptions): NativeSocketOptions =>
  socketOptions(options, { bind: true, listen: options.backlog ?? 511 });

/** A net.Server (with these options) on a listening socket made by socketsInNetns. */
export async function serverOnFd(fd: number, options: net.ServerOpts = {}): Promise<net.Server> {
  const server = net.createServer(options);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ fd }, () => {
      server.off('error', reject);
      resolve();
    });
  });
  return server;
}

export interface NetnsConnectOptions {
  netns?: string;
  family?: 4 | 6;
  host: string;
  port: number;
  mark?: number;
  /** Source address to bind (with transparent + freebind it need not be local: a spoofed source). */
  localAddress?: string;
  localPort?: number;
  transparent?: boolean;
  freebind?: boolean;
  timeoutMs?: number;
}

/** A TCP connection opened from inside `netns`; resolves once connected. */
export async function connectFromNetns(options: NetnsConnectOptions): Promise<net.Socket> {
  const bind = options.localAddress !== undefined || options.localPort !== undefined;
  const family = options.family ?? (isIP(options.host) === 6 ? 6 : 4);
  const fd = await addon().socket({
    ...socketOptions({ ...options, family, address: options.localAddress, port: options.localPort ?? 0 }, { bind }),
    freebind: options.freebind ?? false,
  });
  const socket = new net.Socket({ fd, readable: true, writable: true });
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`connect to ${options.host}:${options.port} timed out`));
    }, options.timeoutMs ?? 3000);
    socket.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    socket.connect({ host: options.host, port: options.port }, () => {
      clearTimeout(timer);
      socket.removeAllListeners('error');
      resolve();
    });
  });
  return socket;
}

function socketOptions(
  o: {
    netns?: string | undefined;
    family?: 4 | 6 | undefined;
    address?: string | undefined;
    port: number;
    mark?: number | undefined;
    transparent?: boolean | undefined;
    reuseport?: boolean | undefined;
    v6only?: boolean | undefined;
  },
  extra: { bind: boolean; listen?: number },
): NativeSocketOptions {
  const family = o.family ?? (o.address?.includes(':') ? 6 : 4);
  const out: NativeSocketOptions = { family, type: 'tcp' };
  if (o.netns !== undefined) out.netns = o.netns;
  if (o.mark !== undefined) out.mark = o.mark;
  if (o.transparent) out.transparent = true;
  if (o.reuseport) out.reuseport = true;
  if (o.v6only) out.v6only = true;
  if (extra.bind) {
    out.bindAddress = o.address ?? (family === 6 ? '::' : '0.0.0.0');
    out.bindPort = o.port;
  }
  if (extra.listen !== undefined) out.listen = extra.listen;
  return out;
}

export interface NetnsUdpOptions {
  netns?: string;
  address: string;
  port: number;
  mark?: number;
}

/** A UDP socket bound inside `netns` (fd, for dgram's bind({ fd })). */
export async function udpSocketInNetns(options: NetnsUdpOptions): Promise<number> {
  return addon().socket(udpOptions(options));
}

function udpOptions(options: NetnsUdpOptions): NativeSocketOptions {
  const o: NativeSocketOptions = {
    family: isIP(options.address) === 6 ? 6 : 4,
    type: 'udp',
    bindAddress: options.address,
    bindPort: options.port,
  };
  if (options.netns !== undefined) o.netns = options.netns;
  if (options.mark !== undefined) o.mark = options.mark;
  return o;
}

export type NetnsSocketSpec = { listen: Omit<NetnsListenOptions, 'netns'> } | { udp: Omit<NetnsUdpOptions, 'netns'> };

/** Up to 12 sockets made on one thread inside `netns` (one netns entry instead of one each, which
 * is most of the cost of a proxy's per-pod set-up); each succeeds or fails on its own: an fd (for
 * serverOnFd or dgram's bind({ fd })) or why not. Rejects only when the netns cannot be entered. */
export function socketsInNetns(
  netns: string,
  specs: NetnsSocketSpec[],
): Promise<({ fd: number } | { error: string })[]> {
  return addon().sockets(
    netns,
    specs.map((s) => ('listen' in s ? listenOptions(s.listen) : udpOptions(s.udp))),
  );
}
