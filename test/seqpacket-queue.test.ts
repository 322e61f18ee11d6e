// A datagram that waits for room in a SEQPACKET socket passes the fd the caller gave, even though
// the caller closes its fd as soon as send() returns (as the ZDS server does) and the number then
// names another file.
import assert from 'node:assert/strict';
import { closeSync, fstatSync, openSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { SeqpacketServer, type SeqpacketSocket } from '../bpf/src/node-netns.js';
import { addon } from '../bpf/src/native.js';
import { kernelTest, TEST_PREFIX } from './helpers/kernel.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { Topology } from './helpers/topology.js';
import { sleep, until } from './helpers/wait.js';

after(assertNothingLeft);

describe('SEQPACKET send queue', kernelTest(), () => {
  it('passes the caller’s netns with every queued datagram, though the caller closed its fd at once', async (t) => {
    const topo = new Topology();
    const path = join(tmpdir(), `${TEST_PREFIX}-sp-${topo.id}.sock`);
    const server = new SeqpacketServer(path, 0o600, 2048);
    let reader = -1;
    t.after(async () => {
      if (reader >= 0) addon().seqpacket.close(reader);
      server.close();
      rmSync(path, { force: true });
      await topo.cleanup();
    });
    const names = [await topo.netns('spa'), await topo.netns('spb')];
    const inodes = names.map((n) => statSync(Topology.netnsPath(n)).ino);
    let sender: SeqpacketSocket | undefined;
    server.onConnection = (s) => (sender = s);
    reader = addon().seqpacket.connect(path); // a peer that does not read yet
    await until(() => sender !== undefined, 'the connection');

    const count = 400;
    const payload = Buffer.alloc(1000, 'x');
    for (let i = 0; i < count; i++) {
      // Alternate namespaces: the number just closed is the one the next open gets.
      const fd = openSync(Topology.netnsPath(names[i % 2]!), 'r');
      sender!.send(Buffer.concat([Buffer.from(`${i};`), payload]), fd);
      closeSync(fd);
    }
    let received = 0;
    const wrong: string[] = [];
    while (received < count) {
      const msg = addon().seqpacket.recv(reader, 2048);
      if (msg === null) {
        assert.equal(sender!.isClosed, false, 'the sender closed (a queued fd was no longer open)');
        await sleep(5); // the sender flushes its queue once there is room
        continue;
      }
      assert.ok(!('eof' in msg), 'the sender hung up');
      const i = Number(msg.data.toString().split(';')[0]);
      assert.equal(i, received, 'datagrams in order');
      assert.equal(msg.fds.length, 1);
      if (fstatSync(msg.fds[0]!).ino !== inodes[i % 2]) wrong.push(`datagram ${i}`);
      msg.fds.forEach((fd) => addon().seqpacket.close(fd));
      received++;
    }
    assert.deepEqual(wrong, [], 'datagrams that passed the wrong netns');
  });
});
