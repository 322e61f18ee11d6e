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

/** The options, and what was ignored in the pod's annotations (each a one-line warning). */
export interface ParsedCaptureOptions extends CaptureOptions {
  warnings: string[];
}

const IFNAME = /^[^\s/:]{1,15}$/;
const MAX_REROUTE_INTERFACES = 4;

/** The pod's capture options. As upstream does, a malformed annotation is ignored with a warning
 * (its default applies), never an error: a pod must not be stuck in ContainerCreating for a typo. */
export function captureOptions(pod: Pod, defaults: CaptureDefaults): ParsedCaptureOptions {
  const a = pod.metadata.annotations ?? {};
  const warnings: string[] = [];
  let reroute = (a[REROUTE_INTERFACES_ANNOTATION] ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '');
  reroute = reroute.filter((name) => {
    // Linux counts bytes (IFNAMSIZ 16 with the NUL), as the datapath does: 15 at most.
    const ok = IFNAME.test(name) && Buffer.byteLength(name) <= 15 && name !== '.' && name !== '..';
    if (!ok) warnings.push(`annotation ${REROUTE_INTERFACES_ANNOTATION}: "${name}" is not an interface name, ignored`);
    return ok;
  });
  reroute = [...new Set(reroute)];
  if (reroute.length > MAX_REROUTE_INTERFACES) {
    warnings.push(
      `annotation ${REROUTE_INTERFACES_ANNOTATION}: at most ${MAX_REROUTE_INTERFACES} interfaces, got ${reroute.length}; the annotation is ignored`,
    );
    reroute = [];
  }
  return {
    bypassInbound: flag(a, BYPASS_INBOUND_ANNOTATION, false, warnings),
    strict: defaults.strict,
    dnsCapture: flag(a, DNS_CAPTURE_ANNOTATION, defaults.dnsCapture, warnings),
    rerouteInterfaces: reroute,
    warnings,
  };
}

/** Go's strconv.ParseBool, which upstream parses these annotations with. */
const TRUE = new Set(['1', 't', 'T', 'TRUE', 'true', 'True']);
const FALSE = new Set(['0', 'f', 'F', 'FALSE', 'false', 'False']);

function flag(annotations: Record<string, string>, name: string, fallback: boolean, warnings: string[]): boolean {
  const v = annotations[name];
  if (v === undefined) return fallback;
  if (TRUE.has(v)) return true;
  if (FALSE.has(v)) return false;
  warnings.push(
    `annotation ${name}: "${v}" is not a boolean (true, false, 1, 0, ...), ignored: ${String(fallback)} applies`,
  );
  return fallback;
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
    if (port !== 0 && protocol !== 17 && protocol !== 132 && protocol !== 6)
      throw new Error(`"${text}": only udp, tcp and sctp have ports`);
    return { protocol, port };
  });
}
