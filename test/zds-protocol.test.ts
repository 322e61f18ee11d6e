// ZDS wire format: golden bytes for every message (checked by hand against proto3 encoding and
// upstream's field numbers), and malformed input rejected with a clear error.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  decodeHello,
  decodeRequest,
  decodeResponse,
  encodeHello,
  encodeRequest,
  encodeResponse,
  ProtocolError,
} from '../ztunnel-bridge/src/protocol.js';

const info = { name: 'n', namespace: 'ns', serviceAccount: 'sa' };

describe('ZDS protocol', () => {
  it('encodes and decodes every message to golden bytes', () => {
    const requests = [
      // WorkloadRequest.add = 1 { uid = 1, workload_info = 2 { name = 1, namespace = 2, service_account = 3 } }
      [{ add: { uid: 'u1', workloadInfo: info } }, '0a110a027531120b0a016e12026e731a027361'],
      // WorkloadRequest.del = 2 { uid = 2 } (DelWorkload.uid is field 2 upstream)
      [{ del: { uid: 'u1' } }, '120412027531'],
      // WorkloadRequest.snapshot_sent = 3 {}
      [{ snapshotSent: {} }, '1a00'],
      // WorkloadRequest.keep = 5 { uid = 1 }
      [{ keep: { uid: 'u1' } }, '2a040a027531'],
    ] as const;
    for (const [message, hex] of requests) {
      assert.equal(encodeRequest(message).toString('hex'), hex, JSON.stringify(message));
      assert.deepEqual(decodeRequest(Buffer.from(hex, 'hex')), message);
    }
    assert.equal(encodeHello({ version: 1 }).toString('hex'), '0801');
    assert.deepEqual(decodeHello(Buffer.from('0801', 'hex')), { version: 1 });
    assert.deepEqual(decodeHello(Buffer.alloc(0)), { version: 0 });
    // WorkloadResponse.ack = 1 { error = 1 }; an empty error is success and encodes as an empty Ack
    assert.equal(encodeResponse({ ack: { error: '' } }).toString('hex'), '0a00');
    assert.equal(encodeResponse({ ack: { error: 'boom' } }).toString('hex'), '0a060a04626f6f6d');
    assert.deepEqual(decodeResponse(Buffer.from('0a00', 'hex')), { error: '' });
    assert.deepEqual(decodeResponse(Buffer.from('0a060a04626f6f6d', 'hex')), { error: 'boom' });
  });

  it('rejects malformed and ambiguous messages', () => {
    const bad: [() => unknown, RegExp][] = [
      [() => decodeRequest(Buffer.alloc(0)), /no payload/],
      [() => decodeRequest(Buffer.from('ffffffff', 'hex')), /malformed WorkloadRequest/],
      [() => decodeResponse(Buffer.alloc(0)), /without an Ack/],
      [() => decodeResponse(Buffer.from('0a05', 'hex')), /malformed WorkloadResponse/],
      [() => decodeHello(Buffer.from('08', 'hex')), /malformed ZdsHello/],
    ];
    for (const [fn, message] of bad)
      assert.throws(fn, (err: Error) => err instanceof ProtocolError && message.test(err.message));
  });

  it('takes the last oneof member on the wire, as proto3 (and ztunnel’s decoder) do', () => {
    assert.deepEqual(decodeRequest(Buffer.from('1a00' + '2a040a027531', 'hex')), { keep: { uid: 'u1' } });
  });
});
