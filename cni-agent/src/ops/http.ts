// The agent's health and metrics endpoints (plain HTTP on the addresses the operator chose).
import http from 'node:http';

export interface HealthSource {
  /** Reasons the agent is not ready; empty when it is. */
  notReady(): string[];
}

export interface MetricsSource {
  /** Prometheus text exposition format. */
  metrics(): Promise<string>;
}

/** Serves /healthz (alive), /readyz (ready, or 503 with the reasons) and /metrics on one listener,
 * or only what was given. Resolves once listening. */
export async function serveOps(
  address: string,
  routes: { health?: HealthSource; metrics?: MetricsSource },
): Promise<http.Server> {
  const { host, port } = parseHostPort(address);
  const server = http.createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET') return void res.writeHead(405).end();
    if (routes.health && path === '/healthz')
      return void res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
    if (routes.health && path === '/readyz') {
      const reasons = routes.health.notReady();
      return void res
        .writeHead(reasons.length ? 503 : 200, { 'content-type': 'text/plain' })
        .end(reasons.length ? reasons.join('\n') + '\n' : 'ready\n');
    }
    if (routes.metrics && path === '/metrics') {
      routes.metrics.metrics().then(
        (text) => res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' }).end(text),
        (err: Error) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`${err.message}\n`),
      );
      return;
    }
    res.writeHead(404).end();
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  return server;
}

/** HOST:PORT or [V6]:PORT. */
export function parseHostPort(address: string): { host: string; port: number } {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(address) ?? /^([^:[\]]+):(\d+)$/.exec(address);
  const port = Number(m?.[2]);
  if (!m || !Number.isInteger(port) || port < 0 || port > 65535) throw new Error(`not HOST:PORT: ${address}`);
  return { host: m[1]!, port };
}
