// Property-based fuzzing (fast-check) of every input the agent takes from outside: the CNI plugin's
// stdin and environment (through the real plugin binary and the real agent), the relay socket,
// ZDS datagrams in both directions, the local pods file, conflists, and the status socket. Nothing
// may crash or hang; every bad input gets an answer that says what is wrong. Bounded run counts;
// FUZZ_RUNS raises them (npm run soak).
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import fc from 'fast-check';
import { Agent } from '../cni-agent/src/agent.js';
import { ConflistError, hasEntryInPlace, withEntry, withoutEntry } from '../cni-agent/src/installer/conflist.js';
import { LocalPodsError, parseLocalPods } from '../cni-agent/src/pods/local-source.js';
import { fetchStatus } from '../cni-agent/src/ops/status-api.js';
import { encodeRequest } from '../ztunnel-bridge/src/protocol.js';
import { silentLogger } from '../ztunnel-bridge/src/logger.js';
import { ZtunnelStandIn } from '../ztunnel-bridge/src/standin/ztunnel.js';
import { ZdsServer } from '../ztunnel-bridge/src/zds-server.js';
import { CNI_PATH } from './helpers/cni-runtime.js';
import { kernelTest, testBpffsRoot, uniqueSuffix } from './helpers/kernel.js';
import { assertNothingLeft, removeDatapath } from './helpers/leftovers.js';
import { FakeAgent, FakeZtunnel } from './helpers/zds-peer.js';
import { until } from './helpers/wait.js';

const RUNS = Number(process.env.FUZZ_RUNS ?? 1);
const runs = (n: number) => ({ numRuns: Math.max(1, Math.round(n * RUNS)) });
const PLUGIN = CNI_PATH.split(':')[1] + '/ambient-bpf-cni';

after(assertNothingLeft);

function openFds(): number {
  return readdirSync('/proc/self/fd').length;
}

/** A CNI error as the spec prints it: {cniVersion, code, msg}. */
function assertCniError(stdout: string, context: string): void {
  let parsed: { code?: unknown; msg?: unknown };
  try {
    parsed = JSON.parse(stdout) as typeof parsed;
  } catch {
    assert.fail(`${context}: not JSON: ${JSON.stringify(stdout)}`);
  }
  assert.equal(typeof parsed.code, 'number', `${context}: no numeric code in ${stdout}`);
  assert.ok(typeof parsed.msg === 'string' && parsed.msg.length > 0, `${context}: no message in ${stdout}`);
}

function runPlugin(
  env: Record<string, string>,
  stdin: string,
): Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string }> {
  return new Promise((resolve) => {
    const child = execFile(PLUGIN, [], { env, timeout: 10_000 }, (err, stdout) => {
      const e = err as (Error & { code?: number | string; signal?: NodeJS.Signals }) | null;
      resolve({ code: e ? (typeof e.code === 'number' ? e.code : null) : 0, signal: e?.signal ?? null, stdout });
    });
    child.stdin!.on('error', () => undefined);
    child.stdin!.end(stdin);
  });
}

/** Arbitrary strings that look like what a runtime would pass, and some that do not. */
const text = fc.oneof(
  fc.string({ maxLength: 40 }),
  fc.string({ unit: 'binary', maxLength: 40 }),
  fc.constantFrom('', '../../etc', '/proc/self/ns/net', '/dev/null', '/etc/passwd', 'a'.repeat(5000)),
);

describe('fuzzing the agent’s inputs', kernelTest(), () => {
  const id = uniqueSuffix();
  const dir = mkdtempSync(join(tmpdir(), 'abt-fuzz-'));
  const root = testBpffsRoot(id);
  const pluginSocket = join(dir, 'cni.sock');
  const statusSocket = join(dir, 'status.sock');
  let agent: Agent;

  before(async () => {
    writeFileSync(
      join(dir, 'pods.yaml'),
      'apiVersion: v1\nkind: Namespace\nmetadata: { name: shop, labels: { istio.io/dataplane-mode: ambient } }\n',
    );
    agent = new Agent({
      nodeName: 'n',
      source: { localPods: join(dir, 'pods.yaml') },
      ztunnelSocket: join(dir, 'z.sock'),
      pluginSocket,
      cniPolicyFile: join(dir, 'cni-policy'),
      statusSocket,
      bpffs: root,
      hostRoot: '/',
      attachMode: 'auto',
      verifyIntervalMs: 0,
      log: silentLogger,
    });
    await agent.start();
  });

  after(async () => {
    agent?.stop();
    await removeDatapath(root);
    rmSync(dir, { recursive: true, force: true });
  });

  it('the plugin answers any stdin and environment with a result or a CNI error, through the real agent', async () => {
    const commands = fc.oneof(fc.constantFrom('ADD', 'DEL', 'CHECK', 'VERSION', 'GC', 'STATUS', ''), text);
    const cniArgs = fc.oneof(
      text,
      fc
        .record({ ns: fc.constantFrom('shop', 'plain', '', 'a;b'), name: text, uid: text })
        .map((a) => `IgnoreUnknown=1;K8S_POD_NAMESPACE=${a.ns};K8S_POD_NAME=${a.name};K8S_POD_UID=${a.uid}`),
    );
    const config = fc.oneof(
      text,
      fc
        .record({
          cniVersion: fc.oneof(fc.constantFrom('0.3.1', '0.4.0', '1.0.0', '1.1.0', '9.9.9'), text, fc.integer()),
          name: fc.oneof(text, fc.constant(undefined)),
          type: fc.constant('ambient-bpf-cni'),
          agent_socket: fc.oneof(fc.constant(pluginSocket), fc.constant(pluginSocket), text),
          policy_file: fc.oneof(fc.constant(join(dir, 'cni-policy')), fc.constant(undefined), text),
          prevResult: fc.oneof(
            fc.constant(undefined),
            fc.anything(),
            fc.record({
              cniVersion: fc.constant('1.0.0'),
              ips: fc.array(fc.record({ address: text }), { maxLength: 3 }),
            }),
          ),
        })
        .map((c) => JSON.stringify(c)),
    );
    const env = fc.record({
      CNI_COMMAND: commands,
      CNI_CONTAINERID: text,
      CNI_NETNS: text,
      CNI_IFNAME: text,
      CNI_ARGS: cniArgs,
      CNI_PATH: fc.constant(CNI_PATH),
    });
    const clean = (s: string): string => s.replace(/\0/g, ''); // an environment cannot hold NUL
    await fc.assert(
      fc.asyncProperty(env, config, async (e, stdin) => {
        const r = await runPlugin(Object.fromEntries(Object.entries(e).map(([k, v]) => [k, clean(v)])), stdin);
        assert.equal(r.signal, null, `the plugin died of ${r.signal}`);
        assert.notEqual(r.code, null, 'the plugin hung');
        if (r.code !== 0) assertCniError(r.stdout, `exit ${r.code} for ${JSON.stringify(e)} ${stdin}`);
        else assert.doesNotThrow(() => JSON.parse(r.stdout || '{}'), `exit 0 with ${r.stdout}`);
      }),
      runs(150),
    );
    assert.deepEqual(agent.notReady(), [], 'the agent is not ready any more');
  });

  it('the relay socket answers arbitrary bytes with a CNI error, and keeps serving', async () => {
    const payload = fc.oneof(
      fc.uint8Array({ maxLength: 2000 }).map((a) => Buffer.from(a)),
      fc
        .tuple(fc.array(fc.string({ maxLength: 30 }), { maxLength: 6 }), fc.string({ maxLength: 200 }))
        .map(([lines, body]) => Buffer.from(`AMBIENT-BPF-CNI 1\n${lines.join('\n')}\n\n${body}`)),
    );
    await fc.assert(
      fc.asyncProperty(payload, async (bytes) => {
        const answer = await new Promise<string>((resolve, reject) => {
          const s = net.connect(pluginSocket);
          let out = '';
          s.on('data', (d: Buffer) => (out += d.toString()));
          s.on('end', () => resolve(out));
          s.on('error', reject);
          s.end(bytes);
        });
        const [code, ...rest] = answer.split('\n');
        assert.match(code ?? '', /^\d+$/, `no exit code in ${JSON.stringify(answer)}`);
        if (code !== '0') assertCniError(rest.join('\n'), JSON.stringify(bytes.toString()));
      }),
      runs(200),
    );
  });

  it('the status socket survives garbage and still answers', async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ minLength: 1, maxLength: 3000 }), async (bytes) => {
        await new Promise<void>((resolve) => {
          const s = net.connect(statusSocket, () => s.end(Buffer.from(bytes)));
          s.on('close', () => resolve());
          s.on('error', () => resolve());
          s.resume();
          setTimeout(() => s.destroy(), 200);
        });
      }),
      runs(60),
    );
    assert.equal((await fetchStatus(statusSocket)).ztunnelConnections, 0);
  });
});

describe('fuzzing ZDS', kernelTest(), () => {
  it('the agent’s ZDS server drops a ztunnel that sends garbage, and serves the next one', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'abt-fuzz-zds-'));
    const socketPath = join(dir, 'z.sock');
    const server = new ZdsServer({ socketPath, ackTimeoutMs: 500, helloTimeoutMs: 500 });
    server.start();
    try {
      const fdsBefore = openFds();
      await fc.assert(
        fc.asyncProperty(
          fc.boolean(),
          fc.array(fc.uint8Array({ maxLength: 1024 }), { minLength: 1, maxLength: 4 }),
          async (hello, datagrams) => {
            const zt = new FakeZtunnel(socketPath);
            if (hello) zt.hello();
            for (const d of datagrams) zt.send(Buffer.from(d));
            // Either the server closes the connection, or (a datagram that decoded as a valid
            // message where one may come) it goes on; nothing it does may bring the server down.
            await zt.inbox.next(hello ? 300 : 600);
            zt.close();
          },
        ),
        runs(100),
      );
      const good = new FakeZtunnel(socketPath).hello();
      const first = await good.request(2000);
      assert.deepEqual(
        first?.request,
        { snapshotSent: {} },
        'a well-behaved ztunnel after the garbage got no snapshot',
      );
      good.ack();
      await until(() => server.connectedCount >= 1, 'connected');
      good.close();
      await until(() => openFds() <= fdsBefore + 2, `fds leaked: ${openFds()} vs ${fdsBefore}`);
    } finally {
      server.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('the stand-in answers any agent datagram with an Ack, or ends on a protocol violation with its reason', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'abt-fuzz-zt-'));
    const socketPath = join(dir, 'z.sock');
    const requests = fc.oneof(
      fc.uint8Array({ maxLength: 1024 }).map((a) => Buffer.from(a)),
      fc
        .oneof(
          fc.record({ keep: fc.record({ uid: fc.string({ maxLength: 80 }) }) }),
          fc.record({ del: fc.record({ uid: fc.string({ maxLength: 80 }) }) }),
          fc.constant({ snapshotSent: {} }),
          fc.record({ add: fc.record({ uid: fc.string({ maxLength: 80 }) }) }),
        )
        .map((r) => encodeRequest(r)),
    );
    try {
      await fc.assert(
        fc.asyncProperty(requests, fc.boolean(), async (raw, withFd) => {
          const agentSide = new FakeAgent(socketPath);
          const fatal: string[] = [];
          const standIn = new ZtunnelStandIn({ socketPath, onFatal: (r) => fatal.push(r) });
          standIn.start();
          try {
            const inbox = await agentSide.accept();
            const fd = withFd ? openSync('/dev/null', 'r') : -1;
            inbox.socket.send(raw, fd); // the sender keeps its own fd
            if (fd >= 0) closeSync(fd);
            const reply = await inbox.next(1000);
            if (reply) assert.ok(reply.data.length < 1024);
            else
              assert.equal(fatal.length > 0 || inbox.socket.isClosed, true, 'neither an answer nor a stated violation');
            if (fatal.length) assert.ok(fatal[0]!.length > 0);
          } finally {
            standIn.stop();
            agentSide.close();
          }
        }),
        runs(60),
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('fuzzing files', () => {
  it('the local pods file: parsed, or refused with a LocalPodsError that says why', () => {
    const doc = fc.oneof(
      fc.string({ maxLength: 300 }),
      fc.anything().map((v) => JSON.stringify(v) ?? ''),
      fc
        .record({
          apiVersion: fc.constantFrom('v1', 'v2', ''),
          kind: fc.constantFrom('Pod', 'Namespace', 'List', 'Service'),
          metadata: fc.anything(),
          status: fc.anything(),
          items: fc.anything(),
        })
        .map((v) => JSON.stringify(v)),
    );
    fc.assert(
      fc.property(fc.array(doc, { maxLength: 4 }), (docs) => {
        try {
          const state = parseLocalPods(docs.join('\n---\n'), 'node-a');
          for (const p of state.pods.values()) assert.equal(typeof p.metadata.uid, 'string');
        } catch (err) {
          assert.ok(err instanceof LocalPodsError, `${(err as Error).name}: ${(err as Error).message}`);
          assert.ok((err as Error).message.length > 0);
        }
      }),
      runs(500),
    );
  });

  it('conflists: our entry goes last (before istio-cni entries ending the list) and comes out again, others untouched, or the file is refused with a ConflistError', () => {
    const plugin = fc.record({
      type: fc.oneof(
        fc.constantFrom('bridge', 'portmap', 'ambient-bpf-cni', 'calico', 'istio-cni'),
        fc.string({ maxLength: 10 }),
      ),
      ipam: fc.anything(),
    });
    const conf = fc.oneof(
      fc.string({ maxLength: 200 }),
      fc.anything().map((v) => JSON.stringify(v) ?? ''),
      fc
        .record({
          cniVersion: fc.constantFrom('1.0.0', '0.3.1'),
          name: fc.string({ maxLength: 10 }),
          plugins: fc.array(plugin, { maxLength: 4 }),
        })
        .map((v) => JSON.stringify(v)),
      fc
        .record({
          cniVersion: fc.constant('0.3.1'),
          name: fc.constant('single'),
          type: fc.constantFrom('bridge', 'ptp'),
        })
        .map((v) => JSON.stringify(v)),
    );
    const entry = {
      type: 'ambient-bpf-cni',
      agent_socket: '/var/run/ambient-bpf/cni.sock',
      policy_file: '/var/lib/ambient-bpf/cni-policy',
    } as const;
    fc.assert(
      fc.property(conf, fc.constantFrom('10-net.conflist', '10-net.conf'), (text, file) => {
        let added;
        try {
          added = withEntry(text, file, entry);
        } catch (err) {
          assert.ok(err instanceof ConflistError, `${(err as Error).name}: ${(err as Error).message}`);
          return;
        }
        assert.ok(hasEntryInPlace(added.text, file), 'our entry is not in its place');
        const plugins = (JSON.parse(added.text) as { plugins: { type: unknown }[] }).plugins;
        const after = plugins.slice(plugins.findIndex((p) => p.type === 'ambient-bpf-cni') + 1);
        assert.ok(
          after.every((p) => p.type === 'istio-cni'),
          'a plugin other than istio-cni follows ours',
        );
        const others = (text: string) =>
          JSON.stringify(
            (JSON.parse(text) as { plugins?: { type: unknown }[] }).plugins?.filter(
              (p) => p.type !== 'ambient-bpf-cni',
            ),
          );
        if (file.endsWith('.conflist') && Array.isArray((JSON.parse(text) as { plugins?: unknown }).plugins))
          assert.equal(others(added.text), others(text), 'other plugins were removed or reordered');
        assert.equal(withEntry(added.text, file, entry).changed, false, 'adding twice changed the file');
        const removed = withoutEntry(added.text, file);
        assert.ok(removed === undefined || !hasEntryInPlace(removed, file), 'the entry survived removal');
      }),
      runs(500),
    );
  });
});
