// Capture options from pod annotations and the strict-mode allow list: parsing and its errors.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { captureOptions, parseStrictAllow } from '../cni-agent/src/pods/capture-options.js';
import type { Pod } from '../cni-agent/src/pods/pod.js';

const pod = (annotations: Record<string, string>): Pod => ({
  metadata: { name: 'p', namespace: 'n', uid: 'u', annotations },
});
const defaults = { strict: false, dnsCapture: true };

describe('capture options', () => {
  it('reads upstream’s annotations, falling back to the node’s defaults', () => {
    assert.deepEqual(captureOptions(pod({}), defaults), {
      bypassInbound: false,
      strict: false,
      dnsCapture: true,
      rerouteInterfaces: [],
      warnings: [],
    });
    assert.deepEqual(
      captureOptions(
        pod({
          'ambient.istio.io/bypass-inbound-capture': 'true',
          'ambient.istio.io/dns-capture': 'false',
          'istio.io/reroute-virtual-interfaces': ' tap0,tap1 ,tap0,',
        }),
        { strict: true, dnsCapture: true },
      ),
      { bypassInbound: true, strict: true, dnsCapture: false, rerouteInterfaces: ['tap0', 'tap1'], warnings: [] },
    );
  });

  it('reads booleans as Go’s ParseBool does, as upstream', () => {
    for (const v of ['1', 't', 'T', 'TRUE', 'true', 'True'])
      assert.equal(
        captureOptions(pod({ 'ambient.istio.io/bypass-inbound-capture': v }), defaults).bypassInbound,
        true,
        v,
      );
    for (const v of ['0', 'f', 'F', 'FALSE', 'false', 'False'])
      assert.equal(captureOptions(pod({ 'ambient.istio.io/dns-capture': v }), defaults).dnsCapture, false, v);
  });

  it('ignores malformed values with a warning naming the annotation, never an error', () => {
    const warns = (annotations: Record<string, string>) => captureOptions(pod(annotations), defaults);
    let r = warns({ 'ambient.istio.io/bypass-inbound-capture': 'yes', 'ambient.istio.io/dns-capture': 'tRUE' });
    assert.deepEqual([r.bypassInbound, r.dnsCapture], [false, true], 'the defaults apply');
    assert.match(r.warnings[0]!, /bypass-inbound-capture: "yes" is not a boolean .*ignored: false applies/);
    assert.match(r.warnings[1]!, /dns-capture: "tRUE" is not a boolean .*ignored: true applies/);
    r = warns({ 'istio.io/reroute-virtual-interfaces': 'a/b,tap0,averyveryverylongname' });
    assert.deepEqual(r.rerouteInterfaces, ['tap0']);
    assert.equal(r.warnings.length, 2);
    assert.match(r.warnings[0]!, /reroute-virtual-interfaces: "a\/b" is not an interface name, ignored/);
    // 15 bytes fit (IFNAMSIZ), 16 do not; the datapath counts bytes, so does the agent.
    assert.deepEqual(warns({ 'istio.io/reroute-virtual-interfaces': 'abcdefghijklmno' }).rerouteInterfaces, [
      'abcdefghijklmno',
    ]);
    assert.deepEqual(warns({ 'istio.io/reroute-virtual-interfaces': 'abcdefghijklmnop' }).rerouteInterfaces, []);
    assert.deepEqual(
      warns({ 'istio.io/reroute-virtual-interfaces': 'tap\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9' })
        .rerouteInterfaces,
      [],
    );
    r = warns({ 'istio.io/reroute-virtual-interfaces': 'a,b,c,d,e' });
    assert.deepEqual(r.rerouteInterfaces, []);
    assert.match(r.warnings[0]!, /at most 4 interfaces, got 5; the annotation is ignored/);
  });

  it('parses strict mode’s allow list', () => {
    assert.deepEqual(parseStrictAllow(['udp/123', 'ICMP', 'icmpv6', 'sctp/5000', '47']), [
      { protocol: 17, port: 123 },
      { protocol: 1, port: 0 },
      { protocol: 58, port: 0 },
      { protocol: 132, port: 5000 },
      { protocol: 47, port: 0 },
    ]);
    for (const bad of ['udp/70000', 'icmp/8', 'foo', '256', 'udp/', ''])
      assert.throws(() => parseStrictAllow([bad]), /allow entry|have ports/, bad);
  });
});
