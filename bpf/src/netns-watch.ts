// Changes of a netns's interfaces and addresses, on Node's event loop: a rtnetlink socket made in
// that netns (netns_watch.c), polled by libuv like the ZDS socket.
import { addon } from './native.js';

const READABLE = 1;
const RTM_NEWLINK = 16;
const RTM_DELLINK = 17;
const RTM_NEWADDR = 20;
const RTM_DELADDR = 21;
const RT_SCOPE_LINK = 253;
const NLMSG_HDRLEN = 16;
/** Messages read per readiness callback at most; libuv calls again while more are queued. */
const BATCH = 64;

export interface NetnsWatch {
  close(): void;
}

/** What the watch saw: an interface that appeared or left (the caller should not wait: a new one can
 * carry traffic at once, and a departed one's index can come back on a device without hooks), or
 * only address changes; `reason` when the watch lost messages or failed and was reopened (or cannot
 * be yet): the netns should be looked at afresh. */
export interface NetnsChange {
  interfaces: boolean;
  reason?: string;
}

/** A reopen waits at least this long after the previous one (a netns whose changes overrun the
 * socket again and again must not make the agent spin), and a failed reopen is retried after
 * RETRY_FIRST_MS, doubling up to RETRY_MAX_MS, until it succeeds or the watch is closed. */
const REOPEN_MIN_INTERVAL_MS = 1000;
const RETRY_FIRST_MS = 1000;
const RETRY_MAX_MS = 30_000;

/** Calls onChange (once per batch of messages) when an interface appears in or leaves the netns,
 * or an address that is not link- or host-scoped is added or removed: what can give the pod
 * something more to capture. Other link changes (state, settings such as our own accept_local)
 * are not reported.
 *
 * Messages lost (ENOBUFS: the socket's buffer overran) or a poll error (libuv then stops polling
 * and calls back once with the error) do not end the watch silently: the socket is replaced by a
 * new one (subscribed, then the interfaces listed afresh) and onChange is called with the reason,
 * so that a pass looks at the netns as it is. A watch that cannot be reopened says so to onChange
 * and keeps trying (the drift check covers the gap). */
export async function watchNetns(netnsPath: string, onChange: (change: NetnsChange) => void): Promise<NetnsWatch> {
  const sp = addon().seqpacket;
  let closed = false;
  let current: { fd: number; watcher: { close(): void } } | undefined;
  let known = new Set<number>();
  /** What a batch of messages changed: nothing, addresses only, or the interfaces.*/
  const relevant = (m: Buffer): 'none' | 'changed' | 'interfaces' => {
    let changed = false;
    let fresh = false;
    for (let off = 0; off + NLMSG_HDRLEN <= m.length;) {
      const len = m.readUInt32LE(off);
      const type = m.readUInt16LE(off + 4);
      if (len < NLMSG_HDRLEN || off + len > m.length) return 'interfaces'; // cannot tell: assume the worst
      if ((type === RTM_NEWLINK || type === RTM_DELLINK) && len >= NLMSG_HDRLEN + 8) {
        const ifindex = m.readInt32LE(off + NLMSG_HDRLEN + 4);
        if (type === RTM_NEWLINK && !known.has(ifindex)) fresh = (known.add(ifindex), true);
        if (type === RTM_DELLINK) fresh = known.delete(ifindex) || fresh;
      } else if ((type === RTM_NEWADDR || type === RTM_DELADDR) && len >= NLMSG_HDRLEN + 8) {
        changed ||= m.readUInt8(off + NLMSG_HDRLEN + 3) < RT_SCOPE_LINK;
      }
      off += (len + 3) & ~3;
    }
    return fresh ? 'interfaces' : changed ? 'changed' : 'none';
  };
  const drop = () => {
    if (!current) return;
    current.watcher.close();
    sp.close(current.fd);
    current = undefined;
  };
  let reopening = false;
  let lastReopen = -Infinity;
  let retryTimer: NodeJS.Timeout | undefined;
  /** A new socket in place of one that lost messages or errored; then a pass, whatever it says. */
  const reopen = (why: string, delayMs = 0) => {
    if (reopening || closed) return;
    reopening = true;
    drop();
    const wait = Math.max(0, lastReopen + REOPEN_MIN_INTERVAL_MS - performance.now());
    retryTimer = setTimeout(
      () => {
        retryTimer = undefined;
        if (closed) return;
        lastReopen = performance.now();
        open().then(
          () => {
            reopening = false;
            if (!closed) onChange({ interfaces: true, reason: `${why}: the watch was reopened` });
          },
          (err: unknown) => {
            if (closed) return;
            const next = delayMs ? Math.min(delayMs * 2, RETRY_MAX_MS) : RETRY_FIRST_MS;
            onChange({
              interfaces: false,
              reason: `${why}; the watch cannot be reopened (${(err as Error).message}), tried again in ${next} ms`,
            });
            reopening = false;
            reopen(why, next);
          },
        );
      },
      Math.max(wait, delayMs),
    );
  };
  const open = async () => {
    const { fd, ifindexes } = await addon().netnsWatch(netnsPath);
    if (closed) {
      sp.close(fd);
      return;
    }
    known = new Set(ifindexes);
    const watcher = new sp.Watcher(fd, (events) => {
      if (closed || current?.fd !== fd) return;
      if (events < 0) return reopen(`polling the netns watch failed (${events})`);
      let changed = false;
      let interfaces = false;
      for (let i = 0; i < BATCH && !closed; i++) {
        let got;
        try {
          got = sp.recv(fd, 1 << 16);
        } catch (err) {
          // ENOBUFS: messages were lost, `known` may be stale: start again from a fresh listing.
          return reopen(`the netns watch lost messages (${(err as Error).message})`);
        }
        if (got === null || 'eof' in got) break;
        const what = relevant(got.data);
        changed ||= what !== 'none';
        interfaces ||= what === 'interfaces';
      }
      if (changed && !closed) onChange({ interfaces });
    });
    current = { fd, watcher };
    watcher.start(READABLE);
  };
  await open();
  return {
    close: () => {
      if (closed) return;
      closed = true;
      clearTimeout(retryTimer);
      drop();
    },
  };
}
