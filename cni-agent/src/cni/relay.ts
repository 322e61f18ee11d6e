// The agent's end of the plugin relay: a Unix stream socket the static plugin binary connects to.
// Request: "AMBIENT-BPF-CNI 1\n", "KEY=VALUE\n" per CNI variable, "\n", the plugin's stdin.
// Response: "<exit code>\n" and what the plugin prints.
import { chmodSync, existsSync, mkdirSync, unlinkSync } from 'node:fs';
import net from 'node:net';
import { dirname } from 'node:path';
import type { CniRequest, CniResponse } from './handler.js';

const MAGIC = 'AMBIENT-BPF-CNI 1';
const MAX_REQUEST = 1 << 20;

export function parseRelayRequest(raw: Buffer): CniRequest {
  const headerEnd = raw.indexOf('\n\n');
  if (headerEnd < 0) throw new Error('no end of header');
  const [magic, ...vars] = raw.subarray(0, headerEnd).toString('utf8').split('\n');
  if (magic !== MAGIC) throw new Error(`not an ambient-bpf-cni request (${JSON.stringify(magic)})`);
  const env: Record<string, string> = {};
  for (const line of vars) {
    const eq = line.indexOf('=');
    if (eq <= 0 || !line.startsWith('CNI_')) throw new Error(`bad header line ${JSON.stringify(line)}`);
    env[line.slice(0, eq)] = line.slice(eq + 1);
  }
  return { env, stdin: raw.subarray(headerEnd + 2).toString('utf8') };
}

/** Listens at `path` (mode 0600, stale socket replaced) and answers each request with `handle`. */
export async function serveRelay(path: string, handle: (req: CniRequest) => Promise<CniResponse>): Promise<net.Server> {
  if (!existsSync(dirname(path))) mkdirSync(dirname(path), { recursive: true, mode: 0o750 });
  if (existsSync(path)) unlinkSync(path);
  // allowHalfOpen: the plugin shuts its write side after the request and then waits for the answer.
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    const chunks: Buffer[] = [];
    let size = 0;
    socket.on('data', (d: Buffer) => {
      size += d.length;
      if (size > MAX_REQUEST) return void socket.destroy();
      chunks.push(d);
    });
    socket.on('error', () => socket.destroy());
    socket.on('end', () => {
      let req: CniRequest;
      try {
        req = parseRelayRequest(Buffer.concat(chunks));
      } catch (err) {
        return void socket.end(
          `1\n${JSON.stringify({ cniVersion: '1.1.0', code: 4, msg: `bad request from the plugin: ${(err as Error).message}` })}\n`,
        );
      }
      handle(req).then(
        (res) => socket.end(`${res.exitCode}\n${res.stdout}`),
        // A bug must not take the agent down; the runtime retries the ADD.
        (err: Error) =>
          socket.end(
            `1\n${JSON.stringify({ cniVersion: '1.1.0', code: 11, msg: `the agent failed on this request: ${err.message}` })}\n`,
          ),
      );
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => resolve());
  });
  chmodSync(path, 0o600);
  return server;
}
