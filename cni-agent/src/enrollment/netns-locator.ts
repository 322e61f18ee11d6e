// Where a running pod's netns is (outside CNI ADD), by the pod's identity (pods/pod-identity.ts):
// one scan of all namespaces serves every pod reconciled around the same time (concurrent callers
// share it; an answer from an older scan is looked up again on a fresh one).
import { netnsAddresses } from '../../../bpf/src/node-netns.js';
import { DEFAULT_NETNS_DIRECTORIES } from '../cni/netns-path.js';
import { scanNetns, type NetnsScan } from '../pods/netns-discovery.js';
import { resolvePodNetns } from '../pods/pod-identity.js';

/** A pod whose netns cannot be told for sure (the message is the one-line reason). */
export class NetnsRefused extends Error {
  override readonly name = 'NetnsRefused';
}

export class NetnsLocator {
  private last: { at: number; scan: NetnsScan } | undefined;
  private inflight: Promise<NetnsScan> | undefined;

  constructor(
    private readonly hostRoot = '/',
    /** A scan younger than this is trusted as it is. */
    private readonly freshMs = 100,
    /** A hit on a scan younger than this is trusted once its netns still holds the IPs. */
    private readonly hitMs = 1000,
    /** The node's directories of named pod network namespaces (--netns-dir). */
    private readonly netnsDirs: readonly string[] = DEFAULT_NETNS_DIRECTORIES,
  ) {}

  /** The path of the pod's netns; undefined when none holds its IPs yet; throws NetnsRefused when
   * the pod's netns cannot be told for sure. */
  async find(uid: string, ips: string[]): Promise<string | undefined> {
    if (this.last) {
      const age = Date.now() - this.last.at;
      const r = resolvePodNetns(this.last.scan, uid, ips);
      if (age < this.freshMs && !('found' in r)) return answer(r);
      if (age < this.hitMs && 'found' in r && (await this.holds(r.found.path, ips))) return r.found.path;
    }
    return answer(resolvePodNetns(await this.scan(), uid, ips));
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

  private scan(): Promise<NetnsScan> {
    this.inflight ??= scanNetns(this.hostRoot, this.netnsDirs)
      .then((scan) => {
        this.last = { at: Date.now(), scan };
        return scan;
      })
      .finally(() => (this.inflight = undefined));
    return this.inflight;
  }
}

function answer(r: ReturnType<typeof resolvePodNetns>): string | undefined {
  if ('found' in r) return r.found.path;
  if ('refused' in r) throw new NetnsRefused(r.refused);
  return undefined;
}
