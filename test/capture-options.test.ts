// Capture options from pod annotations and the strict-mode allow list: parsing and its errors.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { captureOptions, parseStrictAllow } from '../cni-agent/src/pods/capture-options.js';
import type { Pod } from '../cni-agent/src/pods/pod.js';

const pod = (annotations: Record<string, string>): Pod => ({ metadata: { name: 'p', namespace: 'n', uid: 'u', annotations } });
const defaults = { strict: false, dnsCapture: true };

describe('capture options', () => {
  it('reads upstream’s annotations, falling back to the node’s defaults', () => {
    assert.deepEqual(captureOptions(pod({}), defaults), { bypassInbound: false, strict: false, dnsCapture: true, rerouteInterfaces: [] });
    assert.deepEqual(
      captureOptions(pod({ 'ambient.istio.io/bypass-inbound-capture': 'true', 'ambient.istio.io/dns-capture': 'false', 'istio.io/reroute-virtual-interfaces': ' tap0,tap1 ,tap0,' }), { strict: true, dnsCapture: true }),
      { bypassInbound: true, strict: true, dnsCapture: false, rerouteInterfaces: ['tap0', 'tap1'] },
    );
  });

  it('rejects malformed values, naming the annotation', () => {
    assert.throws(() => captureOptions(pod({ 'ambient.istio.io/bypass-inbound-capture': 'yes' }), defaults), /bypass-inbound-capture must be "true" or "false", got "yes"/);
    assert.throws(() => captureOptions(pod({ 'istio.io/reroute-virtual-interfaces': 'a/b' }), defaults), /reroute-virtual-interfaces: not an interface name: "a\/b"/);
    assert.throws(() => captureOptions(pod({ 'istio.io/reroute-virtual-interfaces': 'averyveryverylongname' }), defaults), /not an interface name/);
    // 15 bytes fit (IFNAMSIZ), 16 do not; the datapath counts bytes, so does the agent.
    assert.deepEqual(captureOptions(pod({ 'istio.io/reroute-virtual-interfaces': 'abcdefghijklmno' }), defaults).rerouteInterfaces, ['abcdefghijklmno']);
    assert.throws(() => captureOptions(pod({ 'istio.io/reroute-virtual-interfaces': 'abcdefghijklmnop' }), defaults), /not an interface name/);
    assert.throws(() => captureOptions(pod({ 'istio.io/reroute-virtual-interfaces': 'tap\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9' }), defaults), /not an interface name/);
    assert.throws(() => captureOptions(pod({ 'istio.io/reroute-virtual-interfaces': 'a,b,c,d,e' }), defaults), /at most 4 interfaces, got 5/);
  });

  it('parses strict mode’s allow list', () => {
    assert.deepEqual(parseStrictAllow(['udp/123', 'ICMP', 'icmpv6', 'sctp/5000', '47']), [
      { protocol: 17, port: 123 },
      { protocol: 1, port: 0 },
      { protocol: 58, port: 0 },
      { protocol: 132, port: 5000 },
      { protocol: 47, port: 0 },
    ]);
    for (const bad of ['udp/70000', 'icmp/8', 'foo', '256', 'udp/', '']) assert.throws(() => parseStrictAllow([bad]), /allow entry|have ports/, bad);
  });
});
