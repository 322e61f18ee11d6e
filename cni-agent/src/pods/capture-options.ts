// How a pod's traffic is captured, from its annotations (upstream's names) and the node's settings.
import type { StrictAllowEntry } from '../../../bpf/src/index.js';
import type { Pod } from './pod.js';

export const BYPASS_INBOUND_ANNOTATION = 'ambient.istio.io/bypass-inbound-capture';
export const REROUTE_INTERFACES_ANNOTATION = 'istio.io/reroute-virtual-interfaces';
export const DNS_CAPTURE_ANNOTATION = 'ambient.istio.io/dns-capture';

/** Node-wide defaults the annotations refine. */
export interface CaptureDefaults {
  strict: boolean;
  dnsCapture: boolean;
}

export interface CaptureOptions {
  bypassInbound: boolean;
  strict: boolean;
  dnsCapture: boolean;
  rerouteInterfaces: string[];
}

const IFNAME = /^[^\s/:]{1,15}$/;

/** The pod's capture options; a malformed annotation is an error naming it (the pod's reconcile
 * fails with that reason, as a pod with an impossible spec should). */
export function captureOptions(pod: Pod, defaults: CaptureDefaults): CaptureOptions {
  const a = pod.metadata.annotations ?? {};
  const reroute = (a[REROUTE_INTERFACES_ANNOTATION] ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '');
  for (const name of reroute) {
    // Linux counts bytes (IFNAMSIZ 16 with the NUL), as the datapath does: 15 at most.
    if (!IFNAME.test(name) || Buffer.byteLength(name) > 15 || name === '.' || name === '..') throw new Error(`annotation ${REROUTE_INTERFACES_ANNOTATION}: not an interface name: "${name}"`);
  }
  if (reroute.length > 4) throw new Error(`annotation ${REROUTE_INTERFACES_ANNOTATION}: at most 4 interfaces, got ${reroute.length}`);
  return {
    bypassInbound: flag(a, BYPASS_INBOUND_ANNOTATION, false),
    strict: defaults.strict,
    dnsCapture: flag(a, DNS_CAPTURE_ANNOTATION, defaults.dnsCapture),
    rerouteInterfaces: [...new Set(reroute)],
  };
}

function flag(annotations: Record<string, string>, name: string, fallback: boolean): boolean {
  const v = annotations[name];
  if (v === undefined) return fallback;
  if (v === 'true') return true;
  if (v === 'false') return false;
  throw new Error(`annotation ${name} must be "true" or "false", got "${v}"`);
}

const PROTOCOLS: Record<string, number> = { icmp: 1, tcp: 6, udp: 17, icmpv6: 58, sctp: 132 };

/** Parses strict mode's allow list: "udp/123", "icmp", "sctp/5000", or a protocol number ("47"). */
export function parseStrictAllow(entries: string[]): StrictAllowEntry[] {
  return entries.map((text) => {
    const m = /^([a-z0-9]+)(?:\/(\d{1,5}))?$/.exec(text.trim().toLowerCase());
    const protocol = m ? (PROTOCOLS[m[1]!] ?? (/^\d+$/.test(m[1]!) ? Number(m[1]) : NaN)) : NaN;
    const port = m?.[2] === undefined ? 0 : Number(m[2]);
    if (!Number.isInteger(protocol) || protocol < 0 || protocol > 255 || port > 65535) {
      throw new Error(`not a strict-mode allow entry: "${text}" (examples: udp/123, icmp, icmpv6, sctp/5000, 47)`);
    }
    if (port !== 0 && protocol !== 17 && protocol !== 132 && protocol !== 6) throw new Error(`"${text}": only udp, tcp and sctp have ports`);
    return { protocol, port };
  });
}
