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
 * are not reported. */
export async function watchNetns(netnsPath: string, onChange: () => void): Promise<NetnsWatch> {
  const { fd, ifindexes } = await addon().netnsWatch(netnsPath);
  const sp = addon().seqpacket;
  const known = new Set(ifindexes);
  let closed = false;
  const relevant = (m: Buffer): boolean => {
    let changed = false;
    for (let off = 0; off + NLMSG_HDRLEN <= m.length; ) {
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
  const watcher = new sp.Watcher(fd, () => {
    let changed = false;
    for (let i = 0; i < BATCH && !closed; i++) {
      let got;
      try {
        got = sp.recv(fd, 1 << 16);
      } catch {
        changed = true; // ENOBUFS: messages were lost; whatever they said, look
        continue;
      }
      if (got === null || 'eof' in got) break;
      changed = relevant(got.data) || changed;
    }
    if (changed && !closed) onChange();
  });
  watcher.start(READABLE);
  return {
    close: () => {
      if (closed) return;
      closed = true;
      watcher.close();
      sp.close(fd);
    },
  };
}
