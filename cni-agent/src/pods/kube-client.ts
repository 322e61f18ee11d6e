// The Kubernetes API calls the agent makes (list, watch, get, merge patch) over node's http/https,
// in place of @kubernetes/client-node's generated API, whose code alone costs ~70 MiB of resident
// memory (the agent's budget is 150 MiB with 1,000 pods). Credentials: the pod's service account
// (in cluster), or a kubeconfig's current context with a token, token file, client certificate or
// basic auth. A kubeconfig user that needs an exec or auth-provider plugin (cloud CLIs, OIDC) is
// handed to client-node's KubeConfig, loaded only then.
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { dirname, isAbsolute, join } from 'node:path';
import { parse as parseYaml } from 'yaml';

export const SERVICE_ACCOUNT_DIR = '/var/run/secrets/kubernetes.io/serviceaccount';
/** Service account tokens rotate (kubelet rewrites the file): read again at most this often. */
const TOKEN_REREAD_MS = 60_000;

/** What every request carries: TLS material and headers. */
type RequestSettings = Pick<https.RequestOptions, 'ca' | 'cert' | 'key' | 'rejectUnauthorized' | 'servername'> & {
  headers: Record<string, string>;
};

export interface KubeConnection {
  server: URL;
  /** Settings for the next request (credentials that expire are refreshed here). */
  settings(): Promise<RequestSettings>;
}

export class KubeConfigError extends Error {}

/** An API error: the HTTP status, or the code of a watch ERROR event (410: history gone). */
export class KubeApiError extends Error {
  constructor(
    readonly code: number,
    message: string,
  ) {
    super(message);
  }
}

/** A file's contents, re-read at most every `ms`. */
function rereadEvery(path: string, ms = TOKEN_REREAD_MS): () => string {
  let cached: { value: string; at: number } | undefined;
  return () => {
    if (!cached || Date.now() - cached.at > ms) cached = { value: readFileSync(path, 'utf8').trim(), at: Date.now() };
    return cached.value;
  };
}

/** The pod's service account, as every in-cluster client finds it. */
export function inClusterConnection({
  env = process.env,
  dir = SERVICE_ACCOUNT_DIR,
  tokenRereadMs = TOKEN_REREAD_MS,
} = {}): KubeConnection {
  const host = env.KUBERNETES_SERVICE_HOST;
  const port = env.KUBERNETES_SERVICE_PORT;
  if (!host || !port)
    throw new KubeConfigError(
      'not running in a cluster (KUBERNETES_SERVICE_HOST/PORT unset): pass --kubeconfig or --local-pods',
    );
  let ca: Buffer;
  try {
    ca = readFileSync(join(dir, 'ca.crt'));
  } catch (err) {
    throw new KubeConfigError(`cannot read the service account's CA: ${(err as Error).message}`);
  }
  const token = rereadEvery(join(dir, 'token'), tokenRereadMs);
  return {
    server: new URL(`https://${host.includes(':') ? `[${host}]` : host}:${port}`),
    settings: () => Promise.resolve({ ca, headers: { authorization: `Bearer ${token()}` } }),
  };
}

interface NamedEntry<T> {
  name: string;
  cluster?: T;
  user?: T;
  context?: T;
}
type Fields = Record<string, unknown>;

/** A kubeconfig file's current context. */
export async function kubeconfigConnection(path: string): Promise<KubeConnection> {
  let doc: Fields;
  try {
    doc = (parseYaml(readFileSync(path, 'utf8')) ?? {}) as Fields;
  } catch (err) {
    throw new KubeConfigError(`cannot read kubeconfig ${path}: ${(err as Error).message}`);
  }
  const find = (list: string, name: unknown, key: 'cluster' | 'user' | 'context'): Fields => {
    const entry = ((doc[list] as NamedEntry<Fields>[] | undefined) ?? []).find((e) => e.name === name);
    if (!entry) throw new KubeConfigError(`kubeconfig ${path}: no ${key} named ${String(name)}`);
    return entry[key] ?? {};
  };
  if (!doc['current-context']) throw new KubeConfigError(`kubeconfig ${path}: no current-context`);
  const context = find('contexts', doc['current-context'], 'context');
  const cluster = find('clusters', context.cluster, 'cluster');
  const user = context.user === undefined ? {} : find('users', context.user, 'user');
  if (typeof cluster.server !== 'string') throw new KubeConfigError(`kubeconfig ${path}: the cluster has no server`);
  if (user.exec || user['auth-provider']) return pluginConnection(path, new URL(cluster.server));

  const file = (p: unknown) => readFileSync(isAbsolute(String(p)) ? String(p) : join(dirname(path), String(p)));
  const material = (dataKey: string, fileKey: string, from: Fields): Buffer | undefined =>
    typeof from[dataKey] === 'string'
      ? Buffer.from(from[dataKey], 'base64')
      : from[fileKey] !== undefined
        ? file(from[fileKey])
        : undefined;
  const tls: Omit<RequestSettings, 'headers'> = {};
  try {
    const ca = material('certificate-authority-data', 'certificate-authority', cluster);
    const cert = material('client-certificate-data', 'client-certificate', user);
    const key = material('client-key-data', 'client-key', user);
    if (ca) tls.ca = ca;
    if (cert) tls.cert = cert;
    if (key) tls.key = key;
  } catch (err) {
    throw new KubeConfigError(`kubeconfig ${path}: ${(err as Error).message}`);
  }
  if (cluster['insecure-skip-tls-verify'] === true) tls.rejectUnauthorized = false;
  if (typeof cluster['tls-server-name'] === 'string') tls.servername = cluster['tls-server-name'];
  const tokenFile =
    typeof user.tokenFile === 'string'
      ? rereadEvery(isAbsolute(user.tokenFile) ? user.tokenFile : join(dirname(path), user.tokenFile))
      : undefined;
  const basic =
    typeof user.username === 'string'
      ? Buffer.from(`${user.username}:${typeof user.password === 'string' ? user.password : ''}`).toString('base64')
      : undefined;
  return {
    server: new URL(cluster.server),
    settings: () => {
      const token = typeof user.token === 'string' ? user.token : tokenFile?.();
      const headers: Record<string, string> = token
        ? { authorization: `Bearer ${token}` }
        : basic
          ? { authorization: `Basic ${basic}` }
          : {};
      return Promise.resolve({ ...tls, headers });
    },
  };
}

/** Exec and auth-provider credentials, through client-node (its plugins run and refresh them). */
async function pluginConnection(path: string, server: URL): Promise<KubeConnection> {
  const { KubeConfig } = await import('@kubernetes/client-node');
  const kc = new KubeConfig();
  kc.loadFromFile(path);
  return {
    server,
    settings: async () => {
      const o: https.RequestOptions = {};
      await kc.applyToHTTPSOptions(o);
      return {
        ca: o.ca,
        cert: o.cert,
        key: o.key,
        rejectUnauthorized: o.rejectUnauthorized ?? true,
        headers: Object.fromEntries(Object.entries(o.headers ?? {}).map(([k, v]) => [k, String(v)])),
      };
    },
  };
}

export interface WatchEvent<T> {
  type: 'ADDED' | 'MODIFIED' | 'DELETED' | 'BOOKMARK';
  object: T;
}

export interface Watching {
  /** Resolves when the server ends the stream; rejects on a broken one or an ERROR event. */
  done: Promise<void>;
  stop(): void;
}

const WATCH_TIMEOUT_S = 300; // the server ends a watch after this long; it is resumed from its resourceVersion

export class KubeClient {
  /** Lists and patches reuse connections; watches hold their own. */
  private readonly agent: http.Agent;

  constructor(private readonly connection: KubeConnection) {
    this.agent =
      connection.server.protocol === 'https:'
        ? new https.Agent({ keepAlive: true })
        : new http.Agent({ keepAlive: true });
  }

  async list<T>(path: string, query: Record<string, string> = {}): Promise<{ items: T[]; resourceVersion: string }> {
    const body = (await this.call('GET', path, query)) as { items?: T[]; metadata?: { resourceVersion?: string } };
    if (!body.metadata?.resourceVersion) throw new KubeApiError(0, `list ${path}: no resourceVersion in the answer`);
    return { items: body.items ?? [], resourceVersion: body.metadata.resourceVersion };
  }

  /** One object; a missing one is a KubeApiError with code 404. `timeoutMs` bounds the wait for
   * the answer (default 30 s). */
  async get<T>(path: string, timeoutMs?: number): Promise<T> {
    return (await this.call('GET', path, {}, {}, undefined, timeoutMs)) as T;
  }

  /** POST: creates an object; returns what the server made of it. */
  async create<T>(path: string, body: unknown): Promise<T> {
    return (await this.call('POST', path, {}, { 'content-type': 'application/json' }, JSON.stringify(body))) as T;
  }

  async mergePatch(path: string, patch: unknown): Promise<void> {
    await this.call('PATCH', path, {}, { 'content-type': 'application/merge-patch+json' }, JSON.stringify(patch));
  }

  /** Streams changes after `resourceVersion`, with bookmarks. */
  async watch<T>(path: string, query: Record<string, string>, onEvent: (e: WatchEvent<T>) => void): Promise<Watching> {
    const req = await this.request(
      'GET',
      path,
      { ...query, watch: 'true', allowWatchBookmarks: 'true', timeoutSeconds: String(WATCH_TIMEOUT_S) },
      {},
      undefined,
    );
    let stop!: () => void;
    const done = new Promise<void>((resolve, reject) => {
      stop = () => {
        req.destroy();
        resolve();
      };
      req.on('error', (err) => reject(new KubeApiError(0, `watch ${path}: ${err.message}`)));
      req.on('response', (res) => {
        if (res.statusCode !== 200)
          return void readBody(res).then((b) => reject(apiError('watch', path, res.statusCode ?? 0, b)), reject);
        let buffered = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          buffered += chunk;
          for (let nl = buffered.indexOf('\n'); nl >= 0; nl = buffered.indexOf('\n')) {
            const line = buffered.slice(0, nl).trim();
            buffered = buffered.slice(nl + 1);
            if (!line) continue;
            let event: { type: string; object: unknown };
            try {
              event = JSON.parse(line) as { type: string; object: unknown };
            } catch {
              req.destroy();
              return reject(new KubeApiError(0, `watch ${path}: not a JSON event: ${line.slice(0, 200)}`));
            }
            if (event.type === 'ERROR') {
              const status = event.object as { code?: number; message?: string };
              req.destroy();
              return reject(new KubeApiError(status.code ?? 0, `watch ${path}: ${status.message ?? 'error event'}`));
            }
            onEvent(event as WatchEvent<T>);
          }
        });
        res.on('close', () =>
          res.complete ? resolve() : reject(new KubeApiError(0, `watch ${path}: the stream broke`)),
        );
      });
      req.end();
    });
    return { done, stop };
  }

  close(): void {
    this.agent.destroy();
  }

  private async call(
    method: string,
    path: string,
    query: Record<string, string>,
    headers: Record<string, string> = {},
    body?: string,
    timeoutMs = 30_000,
  ): Promise<unknown> {
    const req = await this.request(method, path, query, headers, timeoutMs);
    return new Promise((resolve, reject) => {
      req.on('error', (err) => reject(new KubeApiError(0, `${method} ${path}: ${err.message}`)));
      req.on('response', (res) => {
        readBody(res).then((text) => {
          if (res.statusCode !== 200 && res.statusCode !== 201)
            return reject(apiError(method, path, res.statusCode ?? 0, text));
          try {
            resolve(JSON.parse(text));
          } catch {
            reject(new KubeApiError(0, `${method} ${path}: the answer is not JSON`));
          }
        }, reject);
      });
      req.end(body);
    });
  }

  /** `timeoutMs`: a pooled request (list, get, patch) that fails without an answer in that time;
   * undefined: a watch, on its own connection, without a timeout. */
  private async request(
    method: string,
    path: string,
    query: Record<string, string>,
    headers: Record<string, string>,
    timeoutMs: number | undefined,
  ): Promise<http.ClientRequest> {
    const pooled = timeoutMs !== undefined;
    const url = new URL(path, this.connection.server);
    for (const [k, v] of Object.entries(query)) url.searchParams.set(k, v);
    const settings = await this.connection.settings();
    const options: https.RequestOptions = {
      ...settings,
      method,
      headers: { accept: 'application/json', ...settings.headers, ...headers },
      timeout: timeoutMs ?? 0,
    };
    if (pooled) options.agent = this.agent;
    const req = (url.protocol === 'https:' ? https : http).request(url, options);
    if (pooled) req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs / 1000} s`)));
    else req.on('socket', (s) => s.setKeepAlive(true, 30_000)); // a dead peer ends the watch
    return req;
  }
}

function readBody(res: http.IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = '';
    res.setEncoding('utf8');
    res.on('data', (d: string) => (text += d));
    res.on('end', () => resolve(text));
    res.on('error', reject);
  });
}

function apiError(method: string, path: string, code: number, body: string): KubeApiError {
  let message = body.slice(0, 300);
  try {
    message = (JSON.parse(body) as { message?: string }).message ?? message;
  } catch {
    // not a Status object
  }
  return new KubeApiError(code, `${method} ${path}: HTTP ${code}: ${message}`);
}

/** The connection the agent uses: a kubeconfig file, or the in-cluster service account. */
export async function loadKubeConnection(kubeconfig: string | undefined): Promise<KubeConnection> {
  return kubeconfig ? kubeconfigConnection(kubeconfig) : inClusterConnection();
}
