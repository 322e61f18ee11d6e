// Both ends of TCP connections for semantics tests: how a socket's stream ended (EOF or which
// error), and bulk data sent with backpressure and compared by sha256.
import { createHash, randomBytes } from 'node:crypto';
import type net from 'node:net';

export interface Outcome {
  data: Buffer;
  /** 'eof' for a clean end of stream, else the error code (ECONNRESET, EPIPE...). */
  end: string;
}

/** Everything `s` reads until its stream ends, and how it ended. */
export function outcome(s: net.Socket): Promise<Outcome> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    s.on('data', (d: Buffer) => chunks.push(d));
    s.on('end', () => resolve({ data: Buffer.concat(chunks), end: 'eof' }));
    s.on('error', (e: NodeJS.ErrnoException) => resolve({ data: Buffer.concat(chunks), end: e.code ?? e.message }));
  });
}

export interface Digest {
  bytes: number;
  sha256: string;
  end: string;
}

/** What `s` reads until its stream ends, as a length and sha256 (nothing kept in memory); a slow
 * reader with `pauseMs`: it stops that long after each chunk. */
export function digest(s: net.Socket, pauseMs = 0): Promise<Digest> {
  return new Promise((resolve) => {
    const hash = createHash('sha256');
    let bytes = 0;
    s.on('data', (d: Buffer) => {
      bytes += d.length;
      hash.update(d);
      if (pauseMs > 0) {
        s.pause();
        setTimeout(() => s.resume(), pauseMs);
      }
    });
    const done = (end: string) => resolve({ bytes, sha256: hash.digest('hex'), end });
    s.on('end', () => done('eof'));
    s.on('error', (e: NodeJS.ErrnoException) => done(e.code ?? e.message));
  });
}

const BLOCK = randomBytes(1 << 20);
const CHUNK = 64 << 10;

/** Writes `total` pseudo-random bytes with backpressure (waits for 'drain'), then ends the socket
 * (`seed` makes the stream differ from others; `close`: and closes it at once, close(2) right after the last write). Resolves with what was
 * written; `progress` is updated as chunks are handed to the socket. */
export async function send(
  s: net.Socket,
  total: number,
  options: { close?: boolean; progress?: { bytes: number }; seed?: number } = {},
): Promise<Digest> {
  const hash = createHash('sha256');
  let sent = 0;
  for (let i = 0; sent < total; i++) {
    if (s.destroyed) return { bytes: sent, sha256: hash.digest('hex'), end: 'destroyed' };
    const n = Math.min(CHUNK, total - sent);
    const chunk = Buffer.allocUnsafe(n);
    BLOCK.copy(chunk, 0, (i * CHUNK) % BLOCK.length, ((i * CHUNK) % BLOCK.length) + n);
    // No two chunks alike (a lost or repeated one changes the hash), nor two streams of other seeds.
    chunk.writeUInt32BE(i >>> 0, 0);
    chunk.writeUInt32BE((options.seed ?? 0) >>> 0, 4);
    hash.update(chunk);
    sent += n;
    if (options.progress) options.progress.bytes = sent;
    if (!s.write(chunk)) await new Promise<void>((r) => s.once('drain', r).once('close', r));
  }
  await new Promise<void>((r) => s.end(r));
  if (options.close) s.destroy();
  return { bytes: sent, sha256: hash.digest('hex'), end: 'eof' };
}
