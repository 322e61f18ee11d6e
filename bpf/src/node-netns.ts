// The "node-netns" surface of the native addon: sockets inside network namespaces and Unix
// SEQPACKET sockets with fd passing. ztunnel-bridge uses this, never the datapath.
import { addon } from './native.js';
export { listenInNetns, connectFromNetns, udpSocketInNetns, socketsInNetns, serverOnFd } from './netns-socket.js';
export type { NetnsListenOptions, NetnsConnectOptions, NetnsSocketSpec } from './netns-socket.js';
export { SeqpacketServer, SeqpacketSocket, SeqpacketError, closeFd, dupFd, reserveFileDescriptors } from './seqpacket.js';
export type { PeerCredentials } from './seqpacket.js';

/** The IPv4 and IPv6 addresses configured in a netns (any interface). */
export async function netnsAddresses(path: string): Promise<string[]> {
  return (await addon().netnsAddresses(path)).addresses;
}

/** A path that opens the netns behind an fd this process holds. */
export function netnsPathOfFd(fd: number): string {
  return `/proc/self/fd/${fd}`;
}
