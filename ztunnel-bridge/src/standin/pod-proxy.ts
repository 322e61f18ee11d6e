// One pod's proxy in the ztunnel stand-in: the listeners ztunnel opens inside the pod netns, and
// plain-TCP proxying behind them (no mTLS: the stand-in is for one machine and for tests).
//   15001 outbound: to the accepted socket's local address (the original destination), from the
//         pod netns with ztunnel's mark
//   15006 inbound: to the app at the local address, with the real client as (spoofed) source
//   15008 HBONE: HTTP/1.1 CONNECT without TLS, tunnelled to the authority
//   15053 DNS (127.0.0.1, UDP and TCP): forwarded to a configured upstream
// Each TCP connection is relayed with TCP's semantics (relay.ts): half-close, resets, backpressure.
import dgram from 'node:dgram';
import net from 'node:net';
import {
  closeFd,
  connectFromNetns,
  netnsAddresses,
  netnsPathOfFd,
  serverOnFd,
  socketsInNetns,
  type NetnsSocketSpec,
} from '../../../bpf/src/node-netns.js';
import { relay, reset } from './relay.js';

export const ZTUNNEL_MARK = 0x539;
export const PORTS = { outbound: 15001, inbound: 15006, hbone: 15008, dns: 15053 } as const;

export type Direction = 'outbound' | 'inbound' | 'hbone' | 'dns';

export interface DirectionStats {
  connections: number;
  /** Bytes from the connecting side (the client) toward the destination. */
  bytesUp: number;
  bytesDown: number;
  failures: number;
}

/** What the proxy saw of a recent connection: enough to tell where traffic really went. */
export interface SeenConnection {
  direction: Direction;
  source: string;
  destination: string;
  at: number;
}

export interface Endpoint {
  host: string;
  port: number;
}

const RECENT = 32;
const MAX_CONNECT_HEAD = 8192;
const DNS_TIMEOUT_MS = 5000;

export class PodProxy {
  readonly stats: Record<Direction, DirectionStats> = {
    outbound: emptyStats(),
    inbound: emptyStats(),
    hbone: emptyStats(),
    dns: emptyStats(),
  };
  readonly recent: SeenConnection[] = [];
  private readonly servers: net.Server[] = [];
  private readonly sockets = new Set<net.Socket>();
  /** DNS over UDP: listeners on 127.0.0.1 (and [::1] when lo has IPv6), one upstream socket. */
  private udp: { locals: dgram.Socket[]; upstream: dgram.Socket } | undefined;
  private readonly dnsPending = new Map<
    number,
    { id: number; address: string; port: number; at: number; via: dgram.Socket }
  >();
  private nextDnsId = 1;
  /** The pod's own addresses, to refuse connections that would loop back into these listeners. */
  private readonly ownAddresses = new Set<string>();
  private closed = false;

  private constructor(
    readonly uid: string,
    /** Held for the proxy's lifetime: every upstream socket is made inside this netns. */
    private readonly netnsFd: number,
    private readonly dnsUpstream: Endpoint | undefined,
  ) {}

  private get netns(): string {
    return netnsPathOfFd(this.netnsFd);
  }

  /** Opens every listener inside the pod netns; on any failure nothing stays open (the caller
   * keeps ownership of netnsFd then). */
  static async open(uid: string, netnsFd: number, dnsUpstream?: Endpoint): Promise<PodProxy> {
    const proxy = new PodProxy(uid, netnsFd, dnsUpstream);
    try {
      // Both settle before a failure closes anything: a listener opened late would leak.
      const [addresses, listening] = await Promise.allSettled([netnsAddresses(proxy.netns), proxy.listenAll()]);
      if (addresses.status === 'rejected') throw addresses.reason;
      if (listening.status === 'rejected') throw listening.reason;
      for (const a of addresses.value) proxy.ownAddresses.add(a);
    } catch (err) {
      proxy.closeListeners();
      throw err;
    }
    return proxy;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.closeListeners();
    closeFd(this.netnsFd);
  }

  private closeListeners(): void {
    for (const s of this.servers) s.close();
    // Reset, not FIN: a connection cut short must not look like one that ended.
    for (const s of this.sockets) reset(s);
    for (const local of this.udp?.locals ?? []) local.close();
    this.udp?.upstream.close();
    this.udp = undefined;
    this.servers.length = 0;
  }

  /** Makes every socket in one trip into the pod netns (a pod's Add is acked sooner, and ZDS hands
   * pods over one at a time), then wraps them: the three wildcard listeners ([::] dual-stack like
   * ztunnel, 0.0.0.0 where that fails, as without IPv6: a second trip), DNS on 127.0.0.1 and, when the pod's
   * lo has IPv6, [::1], over TCP and UDP, and the DNS upstream socket. */
  private async listenAll(): Promise<void> {
    const wildcard = (family: 4 | 6, port: number): NetnsSocketSpec => ({
      listen: {
        family,
        address: family === 6 ? '::' : '0.0.0.0',
        port,
        transparent: true,
        reuseport: true,
        mark: ZTUNNEL_MARK,
      },
    });
    const wildcardPorts = [PORTS.outbound, PORTS.inbound, PORTS.hbone];
    const upstreamAddress = this.dnsUpstream?.host.includes(':') ? '::' : '0.0.0.0';
    const specs: NetnsSocketSpec[] = [
      ...wildcardPorts.map((port) => wildcard(6, port)),
      { listen: { family: 4, address: '127.0.0.1', port: PORTS.dns, mark: ZTUNNEL_MARK } },
      { listen: { family: 6, address: '::1', port: PORTS.dns, mark: ZTUNNEL_MARK, v6only: true } },
      { udp: { address: '127.0.0.1', port: PORTS.dns, mark: ZTUNNEL_MARK } },
      { udp: { address: '::1', port: PORTS.dns, mark: ZTUNNEL_MARK } },
      { udp: { address: upstreamAddress, port: 0, mark: ZTUNNEL_MARK } },
    ];
    const made = await socketsInNetns(this.netns, specs);
    const retry = wildcardPorts.flatMap((_port, i) => ('error' in made[i]! ? [i] : []));
    if (retry.length > 0) {
      const v4 = await socketsInNetns(
        this.netns,
        retry.map((i) => wildcard(4, wildcardPorts[i]!)),
      );
      retry.forEach((i, k) => (made[i] = v4[k]!));
    }
    const optional = new Set([4, 6]); // [::1]: only when the pod's lo has IPv6
    const failed = made.findIndex((r, i) => 'error' in r && !optional.has(i));
    if (failed >= 0) {
      for (const r of made) if ('fd' in r) closeFd(r.fd);
      throw new Error(
        `cannot open ${describeSpec(specs[failed]!)} in the pod: ${(made[failed] as { error: string }).error}`,
      );
    }
    const fds = made.map((r) => ('fd' in r ? r.fd : undefined));
    const take = (i: number): number | undefined => {
      const f = fds[i];
      fds[i] = undefined; // owned by a Node socket from here on
      return f;
    };
    const bound: dgram.Socket[] = [];
    const udp = async (f: number, ipv6: boolean) => {
      const socket = await bindUdp(f, ipv6);
      bound.push(socket);
      return socket;
    };
    try {
      const handlers: ((s: net.Socket) => void)[] = [
        (s) => void this.outbound(s),
        (s) => void this.inbound(s),
        (s) => this.hbone(s),
        (s) => void this.dnsTcp(s),
        (s) => void this.dnsTcp(s),
      ];
      for (const [i, handler] of handlers.entries()) {
        const f = take(i);
        if (f === undefined) continue;
        // Accepted sockets stay half open: a client's FIN must not end the stand-in's side toward
        // it, the reply is still to come.
        const server = await serverOnFd(f, { allowHalfOpen: true });
        server.on('connection', handler);
        this.servers.push(server);
      }
      const v6Local = take(6);
      const locals = [await udp(take(5)!, false), ...(v6Local === undefined ? [] : [await udp(v6Local, true)])];
      const upstream = await udp(take(7)!, upstreamAddress === '::');
      this.udp = { locals, upstream };
      for (const local of locals) local.on('message', (msg, rinfo) => this.dnsQuery(local, msg, rinfo));
      upstream.on('message', (msg) => this.dnsAnswer(msg));
    } catch (err) {
      for (const f of fds) if (f !== undefined) closeFd(f); // never owned by a Node socket
      for (const socket of bound) socket.close();
      throw err;
    }
  }

  private track(socket: net.Socket): void {
    this.sockets.add(socket);
    socket.on('close', () => this.sockets.delete(socket));
    socket.on('error', () => socket.destroy());
  }

  private see(direction: Direction, source: string, destination: string): void {
    this.stats[direction].connections++;
    this.recent.push({ direction, source, destination, at: Date.now() });
    if (this.recent.length > RECENT) this.recent.shift();
  }

  /** Relays two sockets (relay.ts), counting bytes; `head` is data already read from the client. */
  private splice(direction: Direction, client: net.Socket, upstream: net.Socket, head?: Buffer): void {
    const stats = this.stats[direction];
    this.track(upstream);
    if (this.closed) {
      // The pod went away while connecting: its sockets were reset already.
      reset(upstream);
      return;
    }
    relay(client, upstream, { up: (n) => (stats.bytesUp += n), down: (n) => (stats.bytesDown += n) }, head);
  }

  private async outbound(client: net.Socket): Promise<void> {
    this.track(client);
    client.pause();
    const destination = { host: unmap(client.localAddress), port: client.localPort ?? 0 };
    this.see('outbound', `${unmap(client.remoteAddress)}:${client.remotePort}`, hostPort(destination));
    if (this.isSelf(destination)) return this.refuseLoop('outbound', client);
    try {
      const upstream = await connectFromNetns({ netns: this.netns, ...destination, mark: ZTUNNEL_MARK });
      this.splice('outbound', client, upstream);
    } catch {
      this.stats.outbound.failures++;
      reset(client);
    }
  }

  private async inbound(client: net.Socket): Promise<void> {
    this.track(client);
    client.pause();
    const app = { host: unmap(client.localAddress), port: client.localPort ?? 0 };
    const source = unmap(client.remoteAddress);
    this.see('inbound', `${source}:${client.remotePort}`, hostPort(app));
    if (this.isSelf(app)) return this.refuseLoop('inbound', client);
    try {
      this.splice('inbound', client, await this.connectAs(source, app));
    } catch {
      this.stats.inbound.failures++;
      reset(client);
    }
  }

  /** A destination that is one of these listeners: forwarding there would loop forever (a
   * connection made straight to 15001 on the pod's own address, say). ztunnel refuses those too. */
  private isSelf(to: Endpoint): boolean {
    const ports: number[] = Object.values(PORTS);
    return (
      ports.includes(to.port) && (this.ownAddresses.has(to.host) || to.host === '::1' || to.host.startsWith('127.'))
    );
  }

  private refuseLoop(direction: Direction, client: net.Socket): void {
    this.stats[direction].failures++;
    reset(client);
  }

  /** HBONE without TLS: `CONNECT host:port HTTP/1.1`, then a tunnel to the app. */
  private hbone(client: net.Socket): void {
    this.track(client);
    let head = Buffer.alloc(0);
    const onEnd = (): void => void client.end(); // a FIN before a whole request: nothing to tunnel
    const onData = (d: Buffer): void => {
      head = Buffer.concat([head, d]);
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) {
        if (head.length > MAX_CONNECT_HEAD) this.reject(client, '431 Request Header Fields Too Large');
        return;
      }
      client.off('data', onData);
      client.off('end', onEnd);
      client.pause();
      const target = parseConnect(head.subarray(0, end).toString('latin1'));
      if (!target) return this.reject(client, '400 Bad Request');
      void this.tunnel(client, target, head.subarray(end + 4));
    };
    client.on('data', onData);
    client.on('end', onEnd);
  }

  private async tunnel(client: net.Socket, target: Endpoint, rest: Buffer): Promise<void> {
    const source = unmap(client.remoteAddress);
    this.see('hbone', `${source}:${client.remotePort}`, hostPort(target));
    if (this.isSelf(target)) {
      this.stats.hbone.failures++;
      return this.reject(client, '400 Bad Request');
    }
    try {
      const upstream = await this.connectAs(source, target);
      client.write('HTTP/1.1 200 OK\r\n\r\n');
      this.splice('hbone', client, upstream, rest);
    } catch {
      this.stats.hbone.failures++;
      this.reject(client, '502 Bad Gateway');
    }
  }

  /** Connects to the app from inside the pod as ztunnel does: with the real client's address as
   * (non-local) source, so the app sees who is calling. */
  private connectAs(source: string, target: Endpoint): Promise<net.Socket> {
    return connectFromNetns({
      netns: this.netns,
      ...target,
      localAddress: source,
      transparent: true,
      freebind: true,
      mark: ZTUNNEL_MARK,
    });
  }

  private reject(client: net.Socket, status: string): void {
    client.end(`HTTP/1.1 ${status}\r\ncontent-length: 0\r\n\r\n`);
  }

  private async dnsTcp(client: net.Socket): Promise<void> {
    this.track(client);
    client.pause();
    this.see(
      'dns',
      `${unmap(client.remoteAddress)}:${client.remotePort}`,
      this.dnsUpstream ? hostPort(this.dnsUpstream) : 'none',
    );
    if (!this.dnsUpstream) {
      this.stats.dns.failures++;
      return void reset(client);
    }
    try {
      const upstream = await connectFromNetns({ netns: this.netns, ...this.dnsUpstream, mark: ZTUNNEL_MARK });
      this.splice('dns', client, upstream);
    } catch {
      this.stats.dns.failures++;
      reset(client);
    }
  }

  /** Forwards a query with an id of our own, so answers map back to the right client. */
  private dnsQuery(via: dgram.Socket, msg: Buffer, from: dgram.RemoteInfo): void {
    if (!this.udp || msg.length < 12) return;
    this.see('dns', `${from.address}:${from.port}`, this.dnsUpstream ? hostPort(this.dnsUpstream) : 'none');
    this.stats.dns.bytesUp += msg.length;
    if (!this.dnsUpstream) return void this.stats.dns.failures++;
    const now = Date.now();
    for (const [id, p] of this.dnsPending) if (now - p.at > DNS_TIMEOUT_MS) this.dnsPending.delete(id);
    const id = this.nextDnsId;
    this.nextDnsId = (this.nextDnsId % 0xffff) + 1;
    this.dnsPending.set(id, { id: msg.readUInt16BE(0), address: from.address, port: from.port, at: now, via });
    const out = Buffer.from(msg);
    out.writeUInt16BE(id, 0);
    this.udp.upstream.send(out, this.dnsUpstream.port, this.dnsUpstream.host);
  }

  private dnsAnswer(msg: Buffer): void {
    if (!this.udp || msg.length < 12) return;
    const pending = this.dnsPending.get(msg.readUInt16BE(0));
    if (!pending) return;
    this.dnsPending.delete(msg.readUInt16BE(0));
    const out = Buffer.from(msg);
    out.writeUInt16BE(pending.id, 0);
    this.stats.dns.bytesDown += out.length;
    pending.via.send(out, pending.port, pending.address);
  }
}

function emptyStats(): DirectionStats {
  return { connections: 0, bytesUp: 0, bytesDown: 0, failures: 0 };
}

function describeSpec(s: NetnsSocketSpec): string {
  return 'listen' in s
    ? `a TCP listener on ${s.listen.address ?? '*'}:${s.listen.port}`
    : `a UDP socket on ${s.udp.address}:${s.udp.port}`;
}

function bindUdp(fd: number, ipv6 = false): Promise<dgram.Socket> {
  const socket = dgram.createSocket(ipv6 ? 'udp6' : 'udp4');
  return new Promise((resolve, reject) => {
    socket.once('error', reject);
    socket.bind({ fd }, () => {
      socket.off('error', reject);
      resolve(socket);
    });
  });
}

function unmap(address: string | undefined): string {
  const a = address ?? '';
  return a.startsWith('::ffff:') ? a.slice(7) : a;
}

function hostPort(e: Endpoint): string {
  return e.host.includes(':') ? `[${e.host}]:${e.port}` : `${e.host}:${e.port}`;
}

/** `CONNECT authority HTTP/1.x` -> the authority, or undefined. */
export function parseConnect(head: string): Endpoint | undefined {
  const m = /^CONNECT (\[[0-9a-fA-F:.]+\]|[^\s:]+):(\d{1,5}) HTTP\/1\.[01]\r?(\n|$)/.exec(head);
  if (!m) return undefined;
  const port = Number(m[2]);
  if (port < 1 || port > 65535) return undefined;
  return { host: m[1]!.replace(/^\[|\]$/g, ''), port };
}
