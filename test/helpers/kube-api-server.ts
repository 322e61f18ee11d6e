// An in-repo Kubernetes API test server (no kube-apiserver can run here): the real REST and watch
// protocol for v1 Pods and Namespaces, as Kubernetes clients use it. Lists carry a
// resourceVersion; watches stream newline-delimited events from a resourceVersion, send bookmarks,
// and answer 410 Gone (an ERROR event) for a resourceVersion older than the last compaction; the
// spec.nodeName field selector filters pods; pods/status takes JSON merge patches; apps/v1
// DaemonSets can be read one at a time (daemonSets); a single pod or namespace can be read by
// name (GET .../namespaces/NS/pods/NAME, .../namespaces/NAME); core v1 Events can be created
// (POST) and merge-patched, and are kept by namespace/name (events) with every call (eventCalls).
// Test hooks change objects, break watch streams, compact history, hold a kind's watch events
// back (a watch that lags) and leave single-object reads unanswered (an API server that hangs).
import http from 'node:http';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import type { KubeConnection } from '../../cni-agent/src/pods/kube-client.js';

type Kind = 'pods' | 'namespaces';
type Obj = {
  metadata: { name: string; namespace?: string; resourceVersion?: string; uid?: string; [k: string]: unknown };
  spec?: { nodeName?: string; [k: string]: unknown };
  [k: string]: unknown;
};
interface Event {
  kind: Kind;
  type: 'ADDED' | 'MODIFIED' | 'DELETED';
  object: Obj;
  rv: number;
}
interface Watcher {
  kind: Kind;
  nodeName: string | undefined;
  res: http.ServerResponse;
}

export interface RecordedPatch {
  namespace: string;
  name: string;
  contentType: string;
  body: unknown;
}

export class KubeApiTestServer {
  private rv = 1;
  private compactedThrough = 0;
  private readonly objects: Record<Kind, Map<string, Obj>> = { pods: new Map(), namespaces: new Map() };
  private readonly history: Event[] = [];
  private readonly watchers = new Set<Watcher>();
  /** apps/v1 DaemonSets by namespace/name: only GET is served (the agent asks for its own). */
  readonly daemonSets = new Map<string, Obj>();
  /** core v1 Nodes by name: only GET is served (the agent reads its own node's labels). */
  readonly nodes = new Map<string, Obj>();
  readonly patches: RecordedPatch[] = [];
  /** core v1 Events, by namespace/name, as created and patched. */
  readonly events = new Map<string, Record<string, unknown>>();
  /** Every call on events: POST (create) or PATCH, with its body. */
  readonly eventCalls: { method: 'POST' | 'PATCH'; namespace: string; name: string; body: Record<string, unknown> }[] =
    [];
  /** Every request, as RBAC sees it: method, path, and whether it was a watch. */
  readonly requests: { method: string; path: string; watch: boolean }[] = [];
  /** Watch requests served (a restarted watch shows up here). */
  readonly watchRequests: { kind: Kind; resourceVersion: string | null }[] = [];
  private server: http.Server | https.Server | undefined;
  private failing = 0;
  /** Kinds whose watch events are held back (recorded in history, not sent) until released. */
  private readonly held = new Map<Kind, Event[]>();
  /** When true, reads of a single pod or namespace get no answer (until the server closes). */
  stallGets = false;
  url = '';
  /** When set, every request must carry it as a bearer token (a service account's), or gets 401. */
  token: string | undefined;

  /** Listens on 127.0.0.1 (or on `fd`, a listening socket made elsewhere, e.g. in another network
   * namespace); with `tls`, HTTPS as a real API server speaks it (clients then trust its cert). */
  async start(options: { tls?: { key: string | Buffer; cert: string | Buffer }; fd?: number } = {}): Promise<void> {
    const handler = (req: http.IncomingMessage, res: http.ServerResponse) => this.handle(req, res);
    const server = options.tls
      ? https.createServer({ key: options.tls.key, cert: options.tls.cert }, handler)
      : http.createServer(handler);
    this.server = server;
    await new Promise<void>((resolve) =>
      options.fd !== undefined ? server.listen({ fd: options.fd }, resolve) : server.listen(0, '127.0.0.1', resolve),
    );
    const address = server.address() as AddressInfo;
    this.url = `${options.tls ? 'https' : 'http'}://${address.family === 'IPv6' ? `[${address.address}]` : address.address}:${address.port}`;
  }

  async close(): Promise<void> {
    this.breakWatches();
    this.server?.closeAllConnections();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }

  /** A connection to this server, for the agent's Kubernetes client. */
  connection(): KubeConnection {
    return { server: new URL(this.url), settings: () => Promise.resolve({ headers: {} }) };
  }

  /** The same, as a kubeconfig file's text. */
  kubeconfigYaml(): string {
    return `apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: ${this.url}\n    insecure-skip-tls-verify: true\nusers:\n- name: test\n  user: {}\ncontexts:\n- name: test\n  context: { cluster: test, user: test }\ncurrent-context: test\n`;
  }

  upsert(kind: Kind, obj: Obj): void {
    const key = keyOf(obj);
    const type = this.objects[kind].has(key) ? 'MODIFIED' : 'ADDED';
    this.commit(kind, type, structuredClone(obj));
  }

  remove(kind: Kind, name: string, namespace?: string): void {
    const obj = this.objects[kind].get(namespace ? `${namespace}/${name}` : name);
    if (obj) this.commit(kind, 'DELETED', obj);
  }

  get(kind: Kind, name: string, namespace?: string): Obj | undefined {
    return this.objects[kind].get(namespace ? `${namespace}/${name}` : name);
  }

  /** Ends every watch stream (as an apiserver restart or a load balancer would). */
  breakWatches(): void {
    for (const w of this.watchers) w.res.destroy();
    this.watchers.clear();
  }

  /** Forgets history: a watch from an older resourceVersion gets 410 Gone. */
  compact(): void {
    this.compactedThrough = this.rv;
    this.history.length = 0;
  }

  bookmark(): void {
    for (const w of this.watchers) {
      w.res.write(
        JSON.stringify({
          type: 'BOOKMARK',
          object: {
            kind: w.kind === 'pods' ? 'Pod' : 'Namespace',
            apiVersion: 'v1',
            metadata: { resourceVersion: String(this.rv) },
          },
        }) + '\n',
      );
    }
  }

  private commit(kind: Kind, type: Event['type'], obj: Obj): void {
    this.rv++;
    obj.metadata.resourceVersion = String(this.rv);
    if (type === 'DELETED') this.objects[kind].delete(keyOf(obj));
    else this.objects[kind].set(keyOf(obj), obj);
    const event = { kind, type, object: obj, rv: this.rv };
    this.history.push(event);
    const held = this.held.get(kind);
    if (held) held.push(event);
    else for (const w of this.watchers) if (w.kind === kind) this.send(w, event);
  }

  /** From now on, `kind`'s watch events wait (as a lagging watch or informer would) until
   * releaseWatchEvents; reads and lists see the changes at once. */
  holdWatchEvents(kind: Kind): void {
    if (!this.held.has(kind)) this.held.set(kind, []);
  }

  /** Sends the held events of `kind`, in order, and stops holding. */
  releaseWatchEvents(kind: Kind): void {
    const events = this.held.get(kind) ?? [];
    this.held.delete(kind);
    for (const e of events) for (const w of this.watchers) if (w.kind === kind) this.send(w, e);
  }

  private send(w: Watcher, e: Event): void {
    if (w.nodeName !== undefined && e.object.spec?.nodeName !== w.nodeName) return;
    w.res.write(JSON.stringify({ type: e.type, object: e.object }) + '\n');
  }

  /** The next `n` requests fail with 503, as an API server that is down or overloaded answers. */
  failNext(n: number): void {
    this.failing = n;
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    const url = new URL(req.url ?? '/', this.url);
    this.requests.push({
      method: req.method ?? '',
      path: url.pathname,
      watch: url.searchParams.get('watch') === 'true',
    });
    if (this.token !== undefined && req.headers.authorization !== `Bearer ${this.token}`) {
      return reply(res, 401, statusObj(401, 'Unauthorized', 'Unauthorized'));
    }
    if (this.failing > 0) {
      this.failing--;
      return reply(res, 503, statusObj(503, 'ServiceUnavailable', 'the test server is failing requests'));
    }
    const daemonSet = /^\/apis\/apps\/v1\/namespaces\/([^/]+)\/daemonsets\/([^/]+)$/.exec(url.pathname);
    if (req.method === 'GET' && daemonSet) {
      const ds = this.daemonSets.get(`${decodeURIComponent(daemonSet[1]!)}/${decodeURIComponent(daemonSet[2]!)}`);
      return ds
        ? reply(res, 200, ds)
        : reply(
            res,
            404,
            statusObj(404, 'NotFound', `daemonsets.apps "${decodeURIComponent(daemonSet[2]!)}" not found`),
          );
    }
    const node = /^\/api\/v1\/nodes\/([^/]+)$/.exec(url.pathname);
    if (req.method === 'GET' && node) {
      const n = this.nodes.get(decodeURIComponent(node[1]!));
      return n
        ? reply(res, 200, n)
        : reply(res, 404, statusObj(404, 'NotFound', `nodes "${decodeURIComponent(node[1]!)}" not found`));
    }
    const events = /^\/api\/v1\/namespaces\/([^/]+)\/events(?:\/([^/]+))?$/.exec(url.pathname);
    if (events && ((req.method === 'POST' && !events[2]) || (req.method === 'PATCH' && events[2])))
      return this.event(
        req,
        res,
        decodeURIComponent(events[1]!),
        events[2] === undefined ? undefined : decodeURIComponent(events[2]),
      );
    const status = /^\/api\/v1\/namespaces\/([^/]+)\/pods\/([^/]+)\/status$/.exec(url.pathname);
    if (req.method === 'PATCH' && status)
      return this.patchStatus(req, res, decodeURIComponent(status[1]!), decodeURIComponent(status[2]!));
    const one = req.method === 'GET' ? /^\/api\/v1\/namespaces\/([^/]+)(?:\/pods\/([^/]+))?$/.exec(url.pathname) : null;
    if (one) {
      if (this.stallGets) return; // no answer: the client's timeout has to act
      const [namespace, name] = [
        decodeURIComponent(one[1]!),
        one[2] === undefined ? undefined : decodeURIComponent(one[2]),
      ];
      const obj =
        name === undefined ? this.objects.namespaces.get(namespace) : this.objects.pods.get(`${namespace}/${name}`);
      return obj
        ? reply(res, 200, obj)
        : reply(
            res,
            404,
            statusObj(
              404,
              'NotFound',
              name === undefined ? `namespaces "${namespace}" not found` : `pods "${name}" not found`,
            ),
          );
    }
    const kind: Kind | undefined =
      url.pathname === '/api/v1/pods' ? 'pods' : url.pathname === '/api/v1/namespaces' ? 'namespaces' : undefined;
    if (req.method !== 'GET' || !kind)
      return reply(res, 404, statusObj(404, 'NotFound', `no route for ${req.method} ${url.pathname}`));
    const selector = url.searchParams.get('fieldSelector');
    const nodeMatch = selector ? /^spec\.nodeName=(.*)$/.exec(selector) : null;
    if (selector && (!nodeMatch || kind !== 'pods'))
      return reply(res, 400, statusObj(400, 'BadRequest', `unsupported field selector ${selector}`));
    const nodeName = nodeMatch?.[1];
    if (url.searchParams.get('watch') !== 'true') {
      const items = [...this.objects[kind].values()].filter(
        (o) => nodeName === undefined || o.spec?.nodeName === nodeName,
      );
      return reply(res, 200, {
        kind: kind === 'pods' ? 'PodList' : 'NamespaceList',
        apiVersion: 'v1',
        metadata: { resourceVersion: String(this.rv) },
        items,
      });
    }
    const from = url.searchParams.get('resourceVersion');
    this.watchRequests.push({ kind, resourceVersion: from });
    res.writeHead(200, { 'content-type': 'application/json', 'transfer-encoding': 'chunked' });
    res.flushHeaders(); // a watch with nothing to say yet is still an answered request
    if (from && Number(from) < this.compactedThrough) {
      res.end(
        JSON.stringify({
          type: 'ERROR',
          object: statusObj(410, 'Expired', `too old resource version: ${from} (${this.compactedThrough})`),
        }) + '\n',
      );
      return;
    }
    const w: Watcher = { kind, nodeName, res };
    for (const e of this.history) if (e.kind === kind && e.rv > Number(from ?? 0)) this.send(w, e);
    this.watchers.add(w);
    res.on('close', () => this.watchers.delete(w));
  }

  /** POST creates an Event (409 if the name is taken), PATCH merge-patches one (404 if gone). */
  private event(
    req: http.IncomingMessage,
    res: http.ServerResponse,
    namespace: string,
    name: string | undefined,
  ): void {
    let raw = '';
    req.on('data', (d: Buffer) => (raw += d.toString()));
    req.on('end', () => {
      let body: Record<string, unknown>;
      try {
        body = JSON.parse(raw) as Record<string, unknown>;
      } catch {
        return reply(res, 400, statusObj(400, 'BadRequest', 'the body is not JSON'));
      }
      if (name === undefined) {
        const meta = body.metadata as { name?: string; namespace?: string } | undefined;
        if (body.kind !== 'Event' || body.apiVersion !== 'v1' || !meta?.name)
          return reply(res, 400, statusObj(400, 'BadRequest', 'not a v1 Event with a name'));
        if ((meta.namespace ?? namespace) !== namespace)
          return reply(res, 400, statusObj(400, 'BadRequest', 'the namespace of the Event does not match the path'));
        const involved = body.involvedObject as { namespace?: string } | undefined;
        if (involved?.namespace !== namespace)
          return reply(
            res,
            422,
            statusObj(422, 'Invalid', 'involvedObject.namespace: does not match the Event namespace'),
          );
        if (this.events.has(`${namespace}/${meta.name}`))
          return reply(res, 409, statusObj(409, 'AlreadyExists', `events "${meta.name}" already exists`));
        this.eventCalls.push({ method: 'POST', namespace, name: meta.name, body });
        const created = { ...body, metadata: { ...meta, namespace, resourceVersion: String(++this.rv) } };
        this.events.set(`${namespace}/${meta.name}`, created);
        return reply(res, 201, created);
      }
      const existing = this.events.get(`${namespace}/${name}`);
      if (!(req.headers['content-type'] ?? '').startsWith('application/merge-patch+json'))
        return reply(res, 415, statusObj(415, 'UnsupportedMediaType', 'unsupported patch type'));
      if (!existing) return reply(res, 404, statusObj(404, 'NotFound', `events "${name}" not found`));
      this.eventCalls.push({ method: 'PATCH', namespace, name, body });
      const patched = mergePatch(existing, body) as Record<string, unknown>;
      this.events.set(`${namespace}/${name}`, patched);
      reply(res, 200, patched);
    });
  }

  /** The Events recorded about one pod (by involvedObject). */
  eventsFor(namespace: string, name: string): { reason: string; message: string; type: string; count: number }[] {
    return [...this.events.values()]
      .filter((e) => {
        const o = e.involvedObject as { kind?: string; name?: string; namespace?: string };
        return o.kind === 'Pod' && o.name === name && o.namespace === namespace;
      })
      .map((e) => ({
        reason: e.reason as string,
        message: e.message as string,
        type: e.type as string,
        count: e.count as number,
      }));
  }

  private patchStatus(req: http.IncomingMessage, res: http.ServerResponse, namespace: string, name: string): void {
    let raw = '';
    req.on('data', (d: Buffer) => (raw += d.toString()));
    req.on('end', () => {
      const contentType = req.headers['content-type'] ?? '';
      const pod = this.objects.pods.get(`${namespace}/${name}`);
      if (!contentType.startsWith('application/merge-patch+json'))
        return reply(res, 415, statusObj(415, 'UnsupportedMediaType', `unsupported patch type ${contentType}`));
      if (!pod) return reply(res, 404, statusObj(404, 'NotFound', `pods "${name}" not found`));
      const body = JSON.parse(raw) as unknown;
      this.patches.push({ namespace, name, contentType, body });
      const patched = mergePatch(structuredClone(pod), body) as Obj;
      this.commit('pods', 'MODIFIED', patched);
      reply(res, 200, patched);
    });
  }
}

function keyOf(obj: Obj): string {
  return obj.metadata.namespace ? `${obj.metadata.namespace}/${obj.metadata.name}` : obj.metadata.name;
}

function reply(res: http.ServerResponse, code: number, body: unknown): void {
  res.writeHead(code, { 'content-type': 'application/json' }).end(JSON.stringify(body));
}

function statusObj(code: number, reason: string, message: string): object {
  return { kind: 'Status', apiVersion: 'v1', metadata: {}, status: 'Failure', message, reason, code };
}

/** RFC 7386 JSON merge patch. */
export function mergePatch(target: unknown, patch: unknown): unknown {
  if (typeof patch !== 'object' || patch === null || Array.isArray(patch)) return patch;
  const out: Record<string, unknown> =
    typeof target === 'object' && target !== null && !Array.isArray(target)
      ? { ...(target as Record<string, unknown>) }
      : {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete out[k];
    else out[k] = mergePatch(out[k], v);
  }
  return out;
}
