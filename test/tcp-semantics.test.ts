// TCP's semantics through the ztunnel stand-in, with the real datapath and real namespaces: what
// two ends connected directly see (half-close each way, resets each way, no byte lost on a close
// right after a write, bulk and parallel transfers by sha256, backpressure to a slow reader, idle
// connections kept) they must see through the stand-in too. Every case runs on eight paths: through
// the stand-in (outbound from the pod's app, captured at 15001; inbound to it, captured at 15006) and
// directly between a pod and a remote host that are not enrolled (the control that shows what the
// test expects is what TCP does), each over IPv4 and IPv6. Then real programs over the same paths:
// nc with and without stdin, curl to Python's http.server, socat held open interactively, iperf3
// both directions.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, openSync, rmSync, writeFileSync } from 'node:fs';
import type net from 'node:net';
import { after, before, describe, it, type TestContext } from 'node:test';
import { Datapath } from '../bpf/src/index.js';
import { connectFromNetns, listenInNetns } from '../bpf/src/node-netns.js';
import { ZdsServer } from '../ztunnel-bridge/src/zds-server.js';
import { testRunnerCgroup } from './helpers/app.js';
import { kernelTest, TEST_PREFIX, testBpffsRoot } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { StandInProcess } from './helpers/standin-process.js';
import { digest, outcome, send, type Digest } from './helpers/tcp-streams.js';
import { podWithRemote, sh, Topology, type PodNet } from './helpers/topology.js';
import { sleep, until } from './helpers/wait.js';

const MiB = 1 << 20;
const IDLE_MS = Number(process.env.TCP_IDLE_MS ?? 15_000);

type Way = 'outbound' | 'inbound';
interface Path {
  label: string;
  mesh: boolean;
  way: Way;
  clientNs: string;
  serverNs: string;
  host: string;
}

after(async () => {
  await assertNothingLeft();
});

describe('TCP semantics through the ztunnel stand-in', kernelTest(), () => {
  const topo = new Topology();
  const root = testBpffsRoot(topo.id);
  const dir = `/tmp/${TEST_PREFIX}-tcp-${topo.id}`;
  const uid = `pod-tcp-${topo.id}`;
  let mesh: PodNet;
  let plain: PodNet;
  let dp: Datapath | undefined;
  let zds: ZdsServer | undefined;
  let standIn: StandInProcess | undefined;
  const sockets = new Set<net.Socket>();
  const listeners = new Set<net.Server>(); // closed by the test, or at the end when it failed
  let nextPort = 20000;

  const paths: Path[] = [];

  before(async () => {
    mkdirSync(dir, { recursive: true });
    mesh = await podWithRemote(topo, 60, 'm');
    plain = await podWithRemote(topo, 61, 'p');
    dp = await Datapath.open({ bpffsRoot: root });
    dp.trustZtunnelCgroup(testRunnerCgroup()); // the stand-in is a child of the test runner
    await dp.attach({ uid, netnsPath: mesh.podPath, ips: [mesh.podV4, mesh.podV6] });
    zds = new ZdsServer({ socketPath: `${dir}/ztunnel.sock` });
    zds.start();
    standIn = StandInProcess.start(`${dir}/ztunnel.sock`);
    await until(() => zds!.connectedCount === 1, 'stand-in connected', 10_000);
    assert.deepEqual(
      await zds.enroll({
        uid,
        info: { name: 'tcp', namespace: 'demo', serviceAccount: 'default' },
        netnsFd: openSync(mesh.podPath, 'r'),
      }),
      { status: 'acked' },
    );
    for (const [net, isMesh] of [
      [mesh, true],
      [plain, false],
    ] as const) {
      const remote = Topology.netnsPath(net.remote);
      for (const [family, podIp, remoteIp] of [
        ['IPv4', net.podV4, net.remoteV4],
        ['IPv6', net.podV6, net.remoteV6],
      ] as const) {
        const how = isMesh ? 'through the stand-in' : 'direct (control)';
        paths.push({
          label: `outbound ${family} ${how}`,
          mesh: isMesh,
          way: 'outbound',
          clientNs: net.podPath,
          serverNs: remote,
          host: remoteIp,
        });
        paths.push({
          label: `inbound ${family} ${how}`,
          mesh: isMesh,
          way: 'inbound',
          clientNs: remote,
          serverNs: net.podPath,
          host: podIp,
        });
      }
    }
  });

  after(async () => {
    for (const l of listeners) l.close();
    for (const s of sockets) s.destroy();
    await standIn?.stop();
    zds?.close();
    if (dp) {
      await dp.detach(uid);
      dp.close();
    }
    await topo.cleanup();
    rmSync(root, { recursive: true, force: true });
    rmSync(dir, { recursive: true, force: true });
  });

  const keep = (s: net.Socket): net.Socket => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => undefined); // each test reads errors through outcome()/digest()
    s.allowHalfOpen = true; // as a C program: the peer's FIN does not end our side
    return s;
  };

  /** A listener in the path's server netns; `handler` gets each connection. */
  async function serve(path: Path, handler: (s: net.Socket) => void): Promise<{ port: number; close: () => void }> {
    const port = nextPort++;
    const server = await listenInNetns({ netns: path.serverNs, family: 6, address: '::', port });
    listeners.add(server);
    server.on('connection', (s) => handler(keep(s)));
    return {
      port,
      close: () => {
        listeners.delete(server);
        server.close();
      },
    };
  }

  async function dial(path: Path, port: number): Promise<net.Socket> {
    return keep(await connectFromNetns({ netns: path.clientNs, host: path.host, port }));
  }

  /** One connection on `path`: both ends. */
  async function connection(path: Path): Promise<{ client: net.Socket; server: net.Socket }> {
    let accepted!: (s: net.Socket) => void;
    const server = new Promise<net.Socket>((r) => (accepted = r));
    const listener = await serve(path, accepted);
    const client = await dial(path, listener.port);
    const s = await server;
    listener.close();
    return { client, server: s };
  }

  /** Runs `fn` and checks that the stand-in carried `count` more connections of the path's way (or,
   * for a direct path, none of the enrolled pod's). */
  async function carried<T>(path: Path, count: number, fn: () => Promise<T>): Promise<T> {
    const connections = async () => {
      const [pod] = await standIn!.stats();
      return pod?.stats[path.way].connections ?? 0;
    };
    const before = await connections();
    const result = await fn();
    const after = await connections();
    if (path.mesh)
      assert.ok(
        after - before >= count,
        `${path.label}: the stand-in carried ${after - before} of ${count} connections`,
      );
    else assert.equal(after, before, `${path.label}: went through the stand-in`);
    return result;
  }

  const forEachPath = (name: string, fn: (path: Path, t: TestContext) => Promise<void>, timeout = 60_000) => {
    for (const i of [0, 1, 2, 3, 4, 5, 6, 7]) {
      it(`${name} [path ${i}]`, { timeout }, async (t) => {
        const path = paths[i]!;
        await fn(path, t).catch((err: Error) => {
          err.message = `${path.label}: ${err.message}`;
          throw err;
        });
      });
    }
  };

  it('has the eight paths', () => {
    assert.deepEqual(
      paths.map((p) => p.label),
      [
        'outbound IPv4 through the stand-in',
        'inbound IPv4 through the stand-in',
        'outbound IPv6 through the stand-in',
        'inbound IPv6 through the stand-in',
        'outbound IPv4 direct (control)',
        'inbound IPv4 direct (control)',
        'outbound IPv6 direct (control)',
        'inbound IPv6 direct (control)',
      ],
    );
  });

  forEachPath(
    'client half-close: the server reads to EOF, then replies, and the client reads all of it',
    async (path) => {
      await carried(path, 1, async () => {
        const { client, server } = await connection(path);
        const atServer = outcome(server);
        const atClient = outcome(client);
        client.end('request'); // shutdown(SHUT_WR), as nc does when its stdin ends
        const request = await atServer;
        assert.deepEqual([request.data.toString(), request.end], ['request', 'eof']);
        await sleep(100); // the reply comes well after the client's FIN went through
        server.end('reply after your FIN');
        const reply = await atClient;
        assert.deepEqual([reply.data.toString(), reply.end], ['reply after your FIN', 'eof']);
      });
    },
  );

  forEachPath(
    'server half-close: the client reads to EOF, then still sends, and the server reads all of it',
    async (path) => {
      await carried(path, 1, async () => {
        const { client, server } = await connection(path);
        const atServer = outcome(server);
        const atClient = outcome(client);
        server.end('banner'); // the server is done sending, not done reading
        const banner = await atClient;
        assert.deepEqual([banner.data.toString(), banner.end], ['banner', 'eof']);
        await sleep(100);
        client.end('sent after the server’s FIN');
        const late = await atServer;
        assert.deepEqual([late.data.toString(), late.end], ['sent after the server’s FIN', 'eof']);
      });
    },
  );

  forEachPath('client reset: the server sees ECONNRESET, not EOF', async (path) => {
    await carried(path, 1, async () => {
      const { client, server } = await connection(path);
      const atServer = outcome(server);
      let got = 0;
      server.on('data', (d: Buffer) => (got += d.length));
      client.write('x');
      await until(() => got === 1, 'the first byte at the server');
      client.resetAndDestroy(); // SO_LINGER 0 + close: an RST
      assert.equal((await atServer).end, 'ECONNRESET');
    });
  });

  forEachPath('server reset: the client sees ECONNRESET, not EOF', async (path) => {
    await carried(path, 1, async () => {
      const { client, server } = await connection(path);
      const atClient = outcome(client);
      let got = 0;
      server.on('data', (d: Buffer) => (got += d.length));
      client.write('x');
      await until(() => got === 1, 'the first byte at the server');
      server.resetAndDestroy();
      assert.equal((await atClient).end, 'ECONNRESET');
    });
  });

  forEachPath('a close right after a write loses no byte, either way, with the reader late or slow', async (path) => {
    await carried(path, 4, async () => {
      for (const closer of ['server', 'client'] as const) {
        // 64 KiB fits in the buffers on the way: written and closed before the reader reads at all.
        // 8 MiB does not: the reader reads slowly throughout, so whatever relays it has data queued
        // toward the reader when the writer's FIN comes.
        for (const size of [64 << 10, 8 * MiB]) {
          const ends = await connection(path);
          const [writer, reader] = closer === 'server' ? [ends.server, ends.client] : [ends.client, ends.server];
          reader.pause();
          const sending = send(writer, size, { close: true, seed: size }); // write, shutdown, close(2)
          if (size < MiB) await sending;
          await sleep(300);
          const received = digest(reader, size < MiB ? 0 : 5);
          reader.resume();
          assert.deepEqual(await received, await sending, `${closer} closed right after writing ${size} bytes`);
        }
      }
    });
  });

  forEachPath(
    '64 MiB each way at once, by sha256',
    async (path) => {
      await carried(path, 1, async () => {
        const { client, server } = await connection(path);
        const [atServer, atClient] = [digest(server), digest(client)];
        const [up, down] = await Promise.all([send(client, 64 * MiB), send(server, 64 * MiB)]);
        assert.deepEqual(await atServer, up, 'client to server');
        assert.deepEqual(await atClient, down, 'server to client');
      });
    },
    120_000,
  );

  forEachPath(
    '20 connections at once, 2 MiB each way, by sha256',
    async (path) => {
      await carried(path, 20, async () => {
        // Each stream is its own (seeded): the server answers connection n with seed 1000 + n.
        const atServer: Promise<[Digest, Digest]>[] = [];
        const listener = await serve(path, (s) =>
          atServer.push(Promise.all([digest(s), send(s, 2 * MiB, { seed: 1000 + atServer.length })])),
        );
        const clients = await Promise.all(Array.from({ length: 20 }, () => dial(path, listener.port)));
        const atClients = await Promise.all(
          clients.map((c, n) => Promise.all([send(c, 2 * MiB, { seed: n }), digest(c)])),
        );
        listener.close();
        const servers = await Promise.all(atServer);
        assert.equal(servers.length, 20);
        // Which server socket is which client's is not known here: compare as sets, every stream distinct.
        const key = (d: Digest) => `${d.bytes}:${d.sha256}:${d.end}`;
        const sorted = (ds: Digest[]) => ds.map(key).sort();
        assert.equal(new Set(sorted(atClients.map(([sent]) => sent))).size, 20);
        assert.deepEqual(
          sorted(servers.map(([got]) => got)),
          sorted(atClients.map(([sent]) => sent)),
          'client to server',
        );
        assert.deepEqual(
          sorted(atClients.map(([, got]) => got)),
          sorted(servers.map(([, sent]) => sent)),
          'server to client',
        );
      });
    },
    120_000,
  );

  forEachPath(
    'a slow reader holds the writer back (backpressure), and then gets every byte',
    async (path, t) => {
      await carried(path, 1, async () => {
        const { client, server } = await connection(path);
        client.pause(); // reads nothing for a while
        const progress = { bytes: 0 };
        const rssBefore = standIn!.rss();
        const sending = send(server, 128 * MiB, { progress });
        await sleep(1500);
        const stalled = progress.bytes;
        const rssGrowth = standIn!.rss() - rssBefore;
        t.diagnostic(
          `${path.label}: ${(stalled / MiB).toFixed(1)} MiB out while the reader stalled; stand-in RSS ${(rssGrowth / MiB).toFixed(1)} MiB more`,
        );
        // Only socket buffers (the server's send buffer, the client's receive buffer and, through the
        // stand-in, its two sockets' buffers) hold what the reader has not read: a few MiB, not 128.
        assert.ok(stalled < 32 * MiB, `the writer got ${stalled / MiB} MiB out to a reader that reads nothing`);
        if (path.mesh) assert.ok(rssGrowth < 32 * MiB, `the stand-in grew by ${rssGrowth / MiB} MiB`);
        const received = digest(client);
        client.resume();
        assert.deepEqual(await received, await sending);
      });
    },
    120_000,
  );

  it('keeps idle connections on every path, then carries both ways', { timeout: IDLE_MS + 30_000 }, async () => {
    await Promise.all(
      paths.map(async (path) => {
        const { client, server } = await connection(path);
        server.on('data', (d: Buffer) => server.write(d)); // echo
        const echo = async (text: string) => {
          const got = new Promise<string>((r) => client.once('data', (d: Buffer) => r(d.toString())));
          client.write(text);
          assert.equal(await got, text, path.label);
        };
        await echo('before');
        await sleep(IDLE_MS);
        await echo('after being idle');
        const [atServer, atClient] = [outcome(server), outcome(client)];
        server.write('unasked');
        client.end();
        assert.equal((await atServer).end, 'eof');
        server.end();
        assert.deepEqual(await atClient, { data: Buffer.from('unasked'), end: 'eof' }, path.label);
      }),
    );
  });

  describe('real programs', () => {
    /** Runs a program in a netns with a bound time; its exit code and stdout. */
    function run(
      netns: string,
      argv: string[],
      options: { input?: string | Buffer; seconds?: number } = {},
    ): Promise<{ code: number | null; stdout: Buffer; stderr: string }> {
      return new Promise((resolve) => {
        const child = spawn(
          'nsenter',
          [`--net=${netns}`, 'timeout', '-s', 'KILL', String(options.seconds ?? 30), ...argv],
          { stdio: ['pipe', 'pipe', 'pipe'] },
        );
        const out: Buffer[] = [];
        let stderr = '';
        child.stdout.on('data', (d: Buffer) => out.push(d));
        child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
        child.on('close', (code) => resolve({ code, stdout: Buffer.concat(out), stderr }));
        if (options.input === undefined) child.stdin.end();
        else child.stdin.end(options.input);
      });
    }

    /** A long-running program in a netns, stopped (by its pid) when the test ends. */
    async function daemon(
      t: { after: (fn: () => Promise<void>) => void },
      netns: string,
      argv: string[],
      port: number,
    ) {
      const child = spawn('nsenter', [`--net=${netns}`, ...argv], { stdio: ['ignore', 'pipe', 'pipe'] });
      child.stdout.resume();
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      const exited = new Promise<void>((r) => child.once('exit', () => r()));
      t.after(async () => {
        if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
        await exited;
      });
      await until(
        async () =>
          (await sh('nsenter', [`--net=${netns}`, 'ss', '-Hltn', `sport = :${port}`])).trim() !== '' ||
          child.exitCode !== null,
        `${argv[0]} listening on ${port}`,
        10_000,
      );
      assert.equal(child.exitCode, null, `${argv.join(' ')} exited: ${stderr}`);
      return { child, exited };
    }

    const bracket = (host: string) => (host.includes(':') ? `[${host}]` : host);

    forEachPath('nc -N with stdin: the reply the server sends after nc’s FIN is printed', async (path) => {
      await carried(path, 1, async () => {
        const listener = await serve(path, (s) => {
          void outcome(s).then((r) => s.end(`got ${r.data.length} bytes: ${r.data.toString().trim()}\n`));
        });
        const r = await run(path.clientNs, ['nc', '-N', path.host, String(listener.port)], {
          input: 'hello from nc\n',
          seconds: 10,
        });
        listener.close();
        assert.deepEqual([r.code, r.stdout.toString()], [0, 'got 14 bytes: hello from nc\n'], r.stderr);
      });
    });

    forEachPath('nc -N with an empty stdin, and nc -d without stdin: the server’s answer is printed', async (path) => {
      await carried(path, 2, async () => {
        const listener = await serve(path, (s) => {
          s.write('banner\n');
          void outcome(s).then((r) => s.end(`bye after ${r.data.length} bytes\n`));
        });
        const empty = await run(path.clientNs, ['nc', '-N', path.host, String(listener.port)], {
          input: '',
          seconds: 10,
        });
        assert.deepEqual([empty.code, empty.stdout.toString()], [0, 'banner\nbye after 0 bytes\n'], empty.stderr);
        // -d: nc never reads stdin (and so never half-closes): the server ends the connection.
        const closing = await serve(path, (s) => s.end('only a banner\n'));
        const noStdin = await run(path.clientNs, ['nc', '-d', path.host, String(closing.port)], { seconds: 10 });
        assert.deepEqual([noStdin.code, noStdin.stdout.toString()], [0, 'only a banner\n'], noStdin.stderr);
        listener.close();
        closing.close();
      });
    });

    forEachPath('curl downloads a file from Python’s http.server, by sha256', async (path) => {
      const t = { after: (fn: () => Promise<void>) => cleanups.push(fn) };
      const cleanups: (() => Promise<void>)[] = [];
      try {
        const files = `${dir}/www-${nextPort}`;
        mkdirSync(files, { recursive: true });
        cleanups.push(() => Promise.resolve(rmSync(files, { recursive: true, force: true })));
        const body = Buffer.alloc(16 * MiB);
        for (let i = 0; i < body.length; i += 4) body.writeUInt32LE((i * 2654435761) >>> 0, i);
        writeFileSync(`${files}/blob`, body);
        const port = nextPort++;
        await daemon(
          t,
          path.serverNs,
          ['/usr/bin/python3', '-m', 'http.server', '--bind', '::', '--directory', files, String(port)],
          port,
        );
        await carried(path, 2, async () => {
          for (const file of ['blob', '']) {
            const r = await run(
              path.clientNs,
              ['curl', '-sS', '--fail', '--max-time', '20', `http://${bracket(path.host)}:${port}/${file}`],
              { seconds: 25 },
            );
            assert.equal(r.code, 0, r.stderr);
            if (file)
              assert.equal(
                createHash('sha256').update(r.stdout).digest('hex'),
                createHash('sha256').update(body).digest('hex'),
              );
            else assert.match(r.stdout.toString(), /href="blob"/);
          }
        });
      } finally {
        for (const fn of cleanups.reverse()) await fn();
      }
    });

    forEachPath(
      'socat holds an interactive connection open across idle gaps',
      async (path) => {
        await carried(path, 1, async () => {
          const listener = await serve(path, (s) =>
            s.on('data', (d: Buffer) => s.write(d.toString().toUpperCase())).on('end', () => s.end('bye\n')),
          );
          const target = path.host.includes(':')
            ? `TCP6:[${path.host}]:${listener.port}`
            : `TCP4:${path.host}:${listener.port}`;
          const child = spawn(
            'nsenter',
            [`--net=${path.clientNs}`, 'timeout', '-s', 'KILL', '30', 'socat', '-', target],
            { stdio: ['pipe', 'pipe', 'pipe'] },
          );
          let out = '';
          child.stdout.on('data', (d: Buffer) => (out += d.toString()));
          const exited = new Promise<number | null>((r) => child.once('close', r));
          try {
            for (const [i, line] of ['first line', 'after an idle gap', 'and another'].entries()) {
              if (i > 0) await sleep(2000);
              const expected = out + line.toUpperCase() + '\n';
              child.stdin.write(line + '\n');
              await until(() => out === expected, `"${line}" echoed (have ${JSON.stringify(out)})`, 5000);
            }
            child.stdin.end(); // socat half-closes, the server says bye and closes
            assert.equal(await exited, 0);
            assert.match(out, /AND ANOTHER\nbye\n$/);
          } finally {
            listener.close();
            if (child.exitCode === null) child.kill('SIGKILL');
            await exited;
          }
        });
      },
      60_000,
    );

    forEachPath(
      'iperf3 bulk both ways (-R)',
      async (path) => {
        const cleanups: (() => Promise<void>)[] = [];
        const t = { after: (fn: () => Promise<void>) => cleanups.push(fn) };
        try {
          for (const reverse of [false, true]) {
            const port = nextPort++;
            const { exited } = await daemon(t, path.serverNs, ['iperf3', '-s', '-1', '-p', String(port)], port);
            await carried(path, 2, async () => {
              const r = await run(
                path.clientNs,
                ['iperf3', '-c', path.host, '-p', String(port), '-t', '2', '-J', ...(reverse ? ['-R'] : [])],
                { seconds: 30 },
              );
              const report = JSON.parse(r.stdout.toString()) as {
                error?: string;
                end: { sum_sent: { bytes: number }; sum_received: { bytes: number } };
              };
              assert.equal(report.error, undefined, `iperf3 ${reverse ? '-R' : ''}: ${report.error}`);
              assert.equal(r.code, 0, r.stderr);
              assert.ok(
                report.end.sum_received.bytes > 10 * MiB,
                `only ${report.end.sum_received.bytes} bytes received`,
              );
            });
            await exited;
          }
        } finally {
          for (const fn of cleanups.reverse()) await fn();
        }
      },
      90_000,
    );
  });
});
