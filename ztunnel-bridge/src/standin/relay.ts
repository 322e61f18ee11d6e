// The stand-in's relay between a captured connection and the one it opened to the destination,
// keeping TCP's semantics end to end, as if the two ends were connected directly:
//   - half-close: a FIN from one side becomes shutdown(SHUT_WR) toward the other once what came
//     before it is written; the other direction keeps flowing until it ends too (`nc` whose stdin
//     ends, an HTTP/1.0 client, a TLS close_notify...);
//   - reset: an error on one side (ECONNRESET, EPIPE, a timeout) resets the other (SO_LINGER 0),
//     so an abort is never passed on as a clean end of stream;
//   - no byte lost: a socket is only closed once it has written everything and both directions
//     ended (Node's autoDestroy), never because its peer closed;
//   - backpressure: a reader is paused while the other side's write buffer is full (pipe
//     semantics), so a slow reader holds at most a socket buffer's worth in the stand-in;
//   - no idle timeout: a connection lives as long as its ends keep it.
import type net from 'node:net';

export interface RelayCounters {
  /** Bytes from the client toward the destination. */
  up: (n: number) => void;
  down: (n: number) => void;
}

/** Relays `client` and `upstream` until both directions ended or one side failed. `head` is
 * data already read from the client (sent first). Both sockets are expected to be paused. */
export function relay(client: net.Socket, upstream: net.Socket, counters: RelayCounters, head?: Buffer): void {
  for (const s of [client, upstream]) {
    // A FIN read from the peer must not end our side of the socket: the other direction may still
    // carry data (net.Socket ends its writable side on the peer's FIN unless allowHalfOpen).
    s.allowHalfOpen = true;
    // Small writes go out as they came, as between the two ends directly (ztunnel sets nodelay).
    s.setNoDelay(true);
  }
  client.on('error', () => reset(upstream));
  upstream.on('error', () => reset(client));
  // The client may have gone while the upstream connection was made.
  if (client.destroyed) return reset(upstream);
  if (upstream.destroyed) return reset(client);
  oneWay(client, upstream, counters.up);
  oneWay(upstream, client, counters.down);
  let clientReady = true;
  if (head?.length) {
    counters.up(head.length);
    clientReady = upstream.write(head);
  }
  if (clientReady) client.resume(); // otherwise on upstream's 'drain'
  upstream.resume();
}

function oneWay(from: net.Socket, to: net.Socket, count: (n: number) => void): void {
  from.on('data', (d: Buffer) => {
    count(d.length);
    if (!to.write(d)) from.pause();
  });
  to.on('drain', () => from.resume());
  // end() sends the FIN once everything written before it is flushed. A paused socket emits 'end'
  // as soon as the FIN is read if nothing came before it: the client may have half-closed already,
  // while the stand-in was still connecting (`nc -N < /dev/null`).
  if (from.readableEnded) to.end();
  else from.on('end', () => to.end());
}

/** Aborts the connection toward `s`'s peer with a reset (SO_LINGER 0 and close). */
export function reset(s: net.Socket): void {
  if (s.destroyed) return;
  // libuv refuses SO_LINGER 0 while a shutdown is in flight (and Node would then leak the handle):
  // nothing is left to write, so the shutdown completes at once, and the reset follows it.
  if (s.writableEnded && !s.writableFinished && s.writableLength === 0) {
    s.once('finish', () => reset(s));
    return;
  }
  s.resetAndDestroy();
}
