// A DNS server for tests: answers every query, over UDP and TCP, with one A record, and counts
// what it answered.
import type dgram from 'node:dgram';
import type net from 'node:net';
import { listenInNetns } from '../../bpf/src/index.js';
import { udpInNetns } from './traffic.js';

export class TestDnsServer {
  queries = 0;

  private constructor(
    private readonly udp: dgram.Socket,
    private readonly tcp: net.Server,
  ) {}

  /** Listens on [::]:53 (dual stack) in `netns`, answering `address` to every A query. */
  static async start(netns: string, address: string): Promise<TestDnsServer> {
    const udp = await udpInNetns(netns, '::', 53);
    const tcp = await listenInNetns({ netns, family: 6, address: '::', port: 53 });
    const server = new TestDnsServer(udp, tcp);
    udp.on('message', (q, from) => {
      server.queries++;
      udp.send(answer(q, address), from.port, from.address);
    });
    tcp.on('connection', (s) => {
      let buf = Buffer.alloc(0);
      s.on('error', () => undefined);
      s.on('data', (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        if (buf.length < 2 || buf.length < 2 + buf.readUInt16BE(0)) return;
        server.queries++;
        const a = answer(buf.subarray(2, 2 + buf.readUInt16BE(0)), address);
        const len = Buffer.alloc(2);
        len.writeUInt16BE(a.length);
        s.end(Buffer.concat([len, a]));
      });
    });
    return server;
  }

  async close(): Promise<void> {
    this.udp.close();
    await new Promise<void>((resolve) => this.tcp.close(() => resolve()));
  }
}

/** The query with QR set and one A answer (a pointer to the question's name). */
function answer(query: Buffer, address: string): Buffer {
  const header = Buffer.from(query.subarray(0, 12));
  header.writeUInt16BE(0x8180, 2); // response, recursion desired + available
  header.writeUInt16BE(1, 6); // one answer
  const record = Buffer.from([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, ...address.split('.').map(Number)]);
  return Buffer.concat([header, query.subarray(12), record]);
}
