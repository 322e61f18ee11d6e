// A TCP port for a server that must listen on the same number across restarts (the agent's health
// and metrics port). Chosen below the kernel's ephemeral range, so no outgoing connection on the
// machine can be given it between the pick and the bind (a port picked inside that range was
// taken by some client once in a CI run: EADDRINUSE at the agent's start), and checked free now.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:net';

const LOWEST = 20000;

function ephemeralStart(): number {
  const [low] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/);
  return Number(low);
}

function bindable(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer();
    server.once('error', () => resolve(false));
    server.listen({ port, host: '0.0.0.0', exclusive: true }, () => server.close(() => resolve(true)));
  });
}

/** The first of `count` consecutive free ports (the agent takes port and port + 1: health and
 * metrics). */
export async function fixedListenPort(count = 2): Promise<number> {
  const highest = Math.min(ephemeralStart(), 32768) - count;
  if (highest <= LOWEST)
    throw new Error(`the ephemeral port range starts at ${highest + count}: no fixed port below it`);
  for (let attempt = 0; attempt < 50; attempt++) {
    const port = LOWEST + Math.floor(Math.random() * (highest - LOWEST));
    let free = true;
    for (let i = 0; i < count && free; i++) free = await bindable(port + i);
    if (free) return port;
  }
  throw new Error(`no free port found in ${LOWEST}-${highest} after 50 tries`);
}
