// The agent's ZDS server against a scripted ztunnel over real SEQPACKET sockets: snapshot order and
// contents, Ack after every message, newest-connection Add and all-connection Del, and every way a
// peer can misbehave; nothing leaks.
import assert from 'node:assert/strict';
import { mkdirSync, openSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { closeFd } from '../bpf/src/node-netns.js';
import { after, describe, it } from 'node:test';
import { ZdsServer, type ZtunnelResult } from '../ztunnel-bridge/src/zds-server.js';
import { TEST_PREFIX, uniqueSuffix } from './helpers/kernel.js';
import { FakeZtunnel } from './helpers/zds-peer.js';
import { sleep, until } from './helpers/wait.js';

const info = (name: string) => ({ name, namespace: 'default', serviceAccount: 'sa' });
const netnsFd = () => openSync('/proc/self/ns/net', 'r');
const openFds = () => readdirSync('/proc/self/fd').length;

function fixture(t: { after: (fn: () => void) => void }, options: ConstructorParameters<typeof ZdsServer>[0] = {}) {
  const dir = `/tmp/${TEST_PREFIX}-zds-${uniqueSuffix()}`;
  const statuses: [string, ZtunnelResult][] = [];
  const server = new ZdsServer({
    socketPath: `${dir}/ztunnel.sock`,
    onStatus: (uid, r) => statuses.push([uid, r]),
    ...options,
  });
  server.start();
  const peers: FakeZtunnel[] = [];
  const connect = () => {
    const p = new FakeZtunnel(server.socketPath);
    peers.push(p);
    return p;
  };
  t.after(() => {
    peers.forEach((p) => p.close());
    server.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return { server, statuses, connect, dir };
}

describe('ZDS server', () => {
  after(() =>
    assert.deepEqual(
      readdirSync('/tmp').filter((n) => n.startsWith(`${TEST_PREFIX}-zds-`)),
      [],
    ),
  );

  it('bound by listen() before it knows its pods: ztunnel connects at once, and its hello is served by start()', async (t) => {
    const dir = `/tmp/${TEST_PREFIX}-zds-${uniqueSuffix()}`;
    const server = new ZdsServer({ socketPath: `${dir}/ztunnel.sock` });
    server.listen();
    const zt = new FakeZtunnel(server.socketPath).hello(); // the connect succeeds: the socket listens
    t.after(() => {
      zt.close();
      server.close();
      rmSync(dir, { recursive: true, force: true });
    });
    await sleep(200);
    assert.equal(server.connectedCount, 0, 'a hello served before start()');
    await server.enroll({ uid: 'a', info: info('a'), netnsFd: netnsFd() }); // known before serving
    server.start();
    assert.deepEqual(
      await zt.request(),
      { request: { add: { uid: 'a', workloadInfo: info('a') } }, fdCount: 1 },
      'the snapshot holds the pod known before start()',
    );
    zt.ack();
    assert.deepEqual(await zt.request(), { request: { snapshotSent: {} }, fdCount: 0 });
    zt.ack();
    await until(() => server.connectedCount === 1, 'connected');
  });

  it('sends a snapshot of Add+fd and Keep, then SnapshotSent, waiting for each Ack', async (t) => {
    const { server, statuses, connect } = fixture(t);
    assert.deepEqual(await server.enroll({ uid: 'a', info: info('a'), netnsFd: netnsFd() }), {
      status: 'unreachable',
      reason: 'ztunnel is not connected',
    });
    await server.enroll({ uid: 'b', info: info('b') });
    const zt = connect().hello();
    assert.deepEqual(await zt.request(), { request: { add: { uid: 'a', workloadInfo: info('a') } }, fdCount: 1 });
    assert.equal(await zt.request(200), undefined, 'the next message came before the Ack');
    zt.ack();
    assert.deepEqual(await zt.request(), { request: { keep: { uid: 'b' } }, fdCount: 0 });
    zt.ack();
    assert.deepEqual(await zt.request(), { request: { snapshotSent: {} }, fdCount: 0 });
    zt.ack();
    await until(() => statuses.length === 3, 'status');
    assert.deepEqual(statuses, [
      ['a', { status: 'unreachable', reason: 'ztunnel is not connected' }],
      ['b', { status: 'unreachable', reason: 'ztunnel is not connected' }],
      ['a', { status: 'acked' }],
    ]);
    assert.equal(server.connectedCount, 1);
  });

  it('passes the netns with the Add, and the received fd is close-on-exec and names that netns', async (t) => {
    const { server, connect } = fixture(t);
    const zt = connect().hello();
    assert.ok(await zt.request());
    zt.ack();
    const raw = zt.inbox.next();
    void server.enroll({ uid: 'x', info: info('x'), netnsFd: netnsFd() });
    const got = await raw;
    assert.equal(got?.fds.length, 1);
    const fd = got.fds[0]!;
    const flags = Number.parseInt(/flags:\s+(\d+)/.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))![1]!, 8);
    assert.ok(flags & 0o2000000, `O_CLOEXEC not set: flags ${flags.toString(8)}`);
    assert.equal(statSync(`/proc/self/fd/${fd}`).ino, statSync('/proc/self/ns/net').ino);
    closeFd(fd);
    zt.ack();
  });

  it('always sends SnapshotSent, also for an empty snapshot', async (t) => {
    const zt = fixture(t).connect().hello();
    assert.deepEqual(await zt.request(), { request: { snapshotSent: {} }, fdCount: 0 });
  });

  it('sends Add to the newest connection only and Del to all', async (t) => {
    const { server, connect } = fixture(t);
    const old = connect().hello();
    const oldSeen = old.autoAck();
    await until(() => oldSeen.length === 1, 'old snapshot');
    const fresh = connect().hello();
    const freshSeen = fresh.autoAck();
    await until(() => freshSeen.length === 1, 'new snapshot');
    assert.deepEqual(await server.enroll({ uid: 'c', info: info('c'), netnsFd: netnsFd() }), { status: 'acked' });
    await server.remove('c');
    assert.deepEqual(oldSeen, [{ snapshotSent: {} }, { del: { uid: 'c' } }]);
    assert.deepEqual(freshSeen, [
      { snapshotSent: {} },
      { add: { uid: 'c', workloadInfo: info('c') } },
      { del: { uid: 'c' } },
    ]);
  });

  it('reports a nack with ztunnel’s error, and a pod enrolled before the snapshot with its result', async (t) => {
    const { server, connect } = fixture(t);
    const zt = connect();
    await sleep(50); // accepted, but no hello yet: the enrollment waits for the snapshot's answer
    const pending = server.enroll({ uid: 'd', info: info('d'), netnsFd: netnsFd() });
    zt.hello();
    assert.equal((await zt.request())?.fdCount, 1);
    zt.ack('cannot create the proxy');
    assert.deepEqual(await pending, { status: 'nacked', error: 'cannot create the proxy' });
    assert.deepEqual(server.status('d'), { status: 'nacked', error: 'cannot create the proxy' });
  });

  it('answers an Add of a pod the unanswered snapshot hands over in the same netns with the snapshot’s answer, not a second Add; another netns gets its own', async (t) => {
    const { server, connect } = fixture(t);
    const otherNetns = `/tmp/${TEST_PREFIX}-zds-netns-${uniqueSuffix()}`;
    writeFileSync(otherNetns, ''); // another file: another identity than the pod's netns
    t.after(() => rmSync(otherNetns, { force: true }));
    for (const uid of ['g1', 'g2']) server.remember({ uid, info: info(uid), netnsFd: netnsFd() });
    const zt = connect().hello();
    const add = (uid: string) => ({ request: { add: { uid, workloadInfo: info(uid) } }, fdCount: 1 });
    assert.deepEqual(await zt.request(), add('g1'));
    // A restarted agent's pass reaches both pods while the snapshot's first Add is unanswered.
    const same = server.enroll({ uid: 'g1', info: info('g1'), netnsFd: netnsFd() });
    const moved = server.enroll({ uid: 'g2', info: info('g2'), netnsFd: openSync(otherNetns, 'r') });
    zt.ack('not yet');
    assert.deepEqual(await same, { status: 'nacked', error: 'not yet' }, 'the snapshot’s answer');
    assert.deepEqual(await zt.request(), add('g2'));
    zt.ack();
    assert.deepEqual(await zt.request(), { request: { snapshotSent: {} }, fdCount: 0 });
    zt.ack();
    assert.deepEqual(await zt.request(), add('g2'), 'the moved pod’s own Add');
    zt.ack();
    assert.deepEqual(await moved, { status: 'acked' });
    assert.equal(await zt.request(200), undefined, 'no second Add for g1');
  });

  it('closes a connection whose Ack is late and reports the pod unreachable', async (t) => {
    const { server, connect } = fixture(t, { ackTimeoutMs: 200 });
    const zt = connect().hello();
    await zt.request();
    zt.ack();
    const result = server.enroll({ uid: 'e', info: info('e'), netnsFd: netnsFd() });
    assert.ok(await zt.request());
    assert.deepEqual(await result, { status: 'unreachable', reason: 'no Ack within 200 ms' });
    await zt.inbox.closed;
    assert.equal(server.connectedCount, 0);
  });

  it('survives a disconnect mid-snapshot and gives the next connection the full snapshot', async (t) => {
    const { server, connect } = fixture(t);
    for (const uid of ['f1', 'f2']) await server.enroll({ uid, info: info(uid), netnsFd: netnsFd() });
    const first = connect().hello();
    assert.ok(await first.request());
    first.close();
    await until(() => server.connectedCount === 0, 'close detected');
    const second = connect().hello();
    const seen = second.autoAck();
    await until(() => seen.length === 3, 'snapshot');
    assert.deepEqual(
      seen.map((r) => Object.keys(r)[0]),
      ['add', 'add', 'snapshotSent'],
    );
  });

  it('closes connections that misbehave, and keeps serving others', async (t) => {
    const { server, connect } = fixture(t, { helloTimeoutMs: 300 });
    const cases: [string, (zt: FakeZtunnel) => Promise<void> | void][] = [
      ['garbage instead of a hello', (zt) => zt.send(Buffer.from('ffffffff', 'hex'))],
      ['an unknown version', (zt) => void zt.hello(2)],
      ['no hello at all', () => undefined],
      [
        'an oversize datagram',
        async (zt) => {
          zt.hello();
          await zt.request();
          zt.send(Buffer.alloc(2000, 1));
        },
      ],
      [
        'an unsolicited message',
        async (zt) => {
          zt.hello();
          await zt.request();
          zt.ack();
          await sleep(50);
          zt.ack();
        },
      ],
      [
        'a reply that is not an Ack',
        async (zt) => {
          zt.hello();
          await zt.request();
          zt.send(Buffer.from('1a00', 'hex'));
        },
      ],
    ];
    for (const [what, act] of cases) {
      const zt = connect();
      await act(zt);
      const closed = await Promise.race([zt.inbox.closed.then(() => true), sleep(2000).then(() => false)]);
      assert.ok(closed, `not closed after ${what}`);
    }
    await until(() => server.connectedCount === 0, 'all closed');
    const good = connect().hello();
    assert.deepEqual(await good.request(), { request: { snapshotSent: {} }, fdCount: 0 });
  });

  it('never sends Keep after SnapshotSent', async (t) => {
    const { server, connect } = fixture(t);
    const zt = connect().hello();
    const seen = zt.autoAck();
    await until(() => seen.length === 1, 'snapshot');
    assert.deepEqual(await server.enroll({ uid: 'g', info: info('g') }), {
      status: 'unreachable',
      reason: 'no netns to hand over',
    });
    await sleep(100);
    assert.deepEqual(seen, [{ snapshotSent: {} }]);
    await assert.rejects(
      server.enroll({ uid: 'h', info: { name: '', namespace: 'x', serviceAccount: '' }, netnsFd: netnsFd() }),
      /a name and a namespace/,
    );
  });

  it('replaces a stale socket file, creates the socket 0600 in a directory that is not world-writable', (t) => {
    const dir = `/tmp/${TEST_PREFIX}-zds-${uniqueSuffix()}`;
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    const first = new ZdsServer({ socketPath: `${dir}/z.sock` });
    first.start();
    const stale = new ZdsServer({ socketPath: `${dir}/z.sock` });
    stale.start(); // the first server's file is stale from its point of view: replaced
    assert.equal(statSync(`${dir}/z.sock`).mode & 0o777, 0o600);
    assert.equal(statSync(dir).mode & 0o002, 0);
    stale.close();
    first.close();
    mkdirSync(`${dir}/blocked`);
    writeFileSync(`${dir}/blocked/z.sock`, 'not a socket');
    assert.throws(() => new ZdsServer({ socketPath: `${dir}/blocked/z.sock` }).start(), /not a socket/);
  });

  it('leaks no file descriptors over thousands of add/del', async (t) => {
    const { server, connect } = fixture(t);
    const zt = connect().hello();
    const seen = zt.autoAck();
    await until(() => seen.length === 1, 'snapshot');
    const before = openFds();
    for (let i = 0; i < 2000; i++) {
      assert.deepEqual(await server.enroll({ uid: `p${i}`, info: info(`p${i}`), netnsFd: netnsFd() }), {
        status: 'acked',
      });
      await server.remove(`p${i}`);
    }
    assert.equal(seen.length, 4001);
    assert.equal(openFds(), before);
  });
});
