// Where a pod's netns is: one scan of all namespaces serves every pod reconciled around the same
// time (concurrent callers share it; a miss on an older scan triggers a fresh one).
import { netnsAddresses } from '../../../bpf/src/node-netns.js';
import { findPodNetns, scanNetns, type NetnsCandidate } from '../pods/netns-discovery.js';

export class NetnsLocator {
  private last: { at: number; candidates: NetnsCandidate[] } | undefined;
  private inflight: Promise<NetnsCandidate[]> | undefined;

  constructor(
    private readonly hostRoot = '/',
    /** A scan younger than this is trusted for a miss. */
    private readonly freshMs = 100,
  ) {}

  /** The path of the netns holding these IPs, or undefined. */
  async find(ips: string[]): Promise<string | undefined> {
    if (this.last) {
      const hit = findPodNetns(this.last.candidates, ips);
      if (hit && (await this.holds(hit.path, ips))) return hit.path;
      if (Date.now() - this.last.at < this.freshMs) return undefined;
    }
    return findPodNetns(await this.scan(), ips)?.path;
  }

  /** Does the netns at `path` (still) hold all these IPs? */
  async holds(path: string, ips: string[]): Promise<boolean> {
    try {
      const addresses = await netnsAddresses(path);
      return ips.every((ip) => addresses.includes(ip));
    } catch {
      return false;
    }
  }

  private scan(): Promise<NetnsCandidate[]> {
    this.inflight ??= scanNetns(this.hostRoot)
      .then((candidates) => {
        this.last = { at: Date.now(), candidates };
        return candidates;
      })
      .finally(() => (this.inflight = undefined));
    return this.inflight;
  }
}
