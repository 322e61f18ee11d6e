// The "node-netns" surface of the native addon: sockets inside network namespaces and Unix
// SEQPACKET sockets with fd passing. ztunnel-bridge uses this, never the datapath.
import { addon } from './native.js';
export { listenInNetns, connectFromNetns, udpSocketInNetns, socketsInNetns, serverOnFd } from './netns-socket.js';
export type { NetnsListenOptions, NetnsConnectOptions, NetnsSocketSpec } from './netns-socket.js';
export {
  SeqpacketServer,
  SeqpacketSocket,
  SeqpacketError,
  closeFd,
  dupFd,
  reserveFileDescriptors,
} from './seqpacket.js';
export type { PeerCredentials } from './seqpacket.js';

/** The IPv4 and IPv6 addresses configured in a netns (any interface). */
export async function netnsAddresses(path: string): Promise<string[]> {
  return (await addon().netnsAddresses(path)).addresses;
}

/** The addresses of a netns and the inode of the user namespace that owns it (0: unknown). */
export async function netnsAddressesAndOwner(path: string): Promise<{ addresses: string[]; ownerUserns: number }> {
  const r = await addon().netnsAddresses(path);
  return { addresses: r.addresses, ownerUserns: r.ownerUserns };
}

/** A path that opens the netns behind an fd this process holds. */
export function netnsPathOfFd(fd: number): string {
  return `/proc/self/fd/${fd}`;
}
