export * from './datapath.js';
export { constants } from './native.js';
export { listenInNetns, connectFromNetns } from './netns-socket.js';
export type { NetnsListenOptions, NetnsConnectOptions } from './netns-socket.js';
