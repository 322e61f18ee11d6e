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

/** Calls onChange (once per batch of messages) when an interface appears in or leaves the netns,
 * or an address that is not link- or host-scoped is added or removed: what can give the pod
 * something more to capture. Other link changes (state, settings such as our own accept_local)
 * are not reported.
 *
 * Messages lost (ENOBUFS: the socket's buffer overran) or a poll error (libuv then stops polling
 * and calls back once with the error) do not end the watch silently: the socket is replaced by a
 * new one (subscribed, then the interfaces listed afresh) and onChange is called with the reason,
 * so that a pass looks at the netns as it is. If the watch cannot be reopened, onChange gets that
 * reason too (the drift check is then what notices new interfaces). */
export async function watchNetns(netnsPath: string, onChange: (reason?: string) => void): Promise<NetnsWatch> {
  const sp = addon().seqpacket;
  let closed = false;
  let current: { fd: number; watcher: { close(): void } } | undefined;
  let known = new Set<number>();
  const relevant = (m: Buffer): boolean => {
    let changed = false;
    for (let off = 0; off + NLMSG_HDRLEN <= m.length;) {
      const len = m.readUInt32LE(off);
      const type = m.readUInt16LE(off + 4);
      if (len < NLMSG_HDRLEN || off + len > m.length) return true; // cannot tell: look
      if ((type === RTM_NEWLINK || type === RTM_DELLINK) && len >= NLMSG_HDRLEN + 8) {
        const ifindex = m.readInt32LE(off + NLMSG_HDRLEN + 4);
        if (type === RTM_NEWLINK && !known.has(ifindex)) changed = (known.add(ifindex), true);
        if (type === RTM_DELLINK) changed = known.delete(ifindex) || changed;
      } else if ((type === RTM_NEWADDR || type === RTM_DELADDR) && len >= NLMSG_HDRLEN + 8) {
        changed ||= m.readUInt8(off + NLMSG_HDRLEN + 3) < RT_SCOPE_LINK;
      }
      off += (len + 3) & ~3;
    }
    return changed;
  };
  const drop = () => {
    if (!current) return;
    current.watcher.close();
    sp.close(current.fd);
    current = undefined;
  };
  let reopening = false;
  /** A new socket in place of one that lost messages or errored; then a pass, whatever it says. */
  const reopen = (why: string) => {
    if (reopening || closed) return;
    reopening = true;
    drop();
    open().then(
      () => {
        reopening = false;
        if (!closed) onChange(`${why}: the watch was reopened`);
      },
      (err: unknown) => {
        reopening = false;
        if (!closed) onChange(`${why}; the watch cannot be reopened (${(err as Error).message})`);
      },
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
      for (let i = 0; i < BATCH && !closed; i++) {
        let got;
        try {
          got = sp.recv(fd, 1 << 16);
        } catch (err) {
          // ENOBUFS: messages were lost, `known` may be stale: start again from a fresh listing.
          return reopen(`the netns watch lost messages (${(err as Error).message})`);
        }
        if (got === null || 'eof' in got) break;
        changed = relevant(got.data) || changed;
      }
      if (changed && !closed) onChange();
    });
    current = { fd, watcher };
    watcher.start(READABLE);
  };
  await open();
  return {
    close: () => {
      if (closed) return;
      closed = true;
      drop();
    },
  };
}
