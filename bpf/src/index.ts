export * from './datapath.js';
export { listenInNetns, connectFromNetns } from './netns-socket.js';
export type { NetnsListenOptions, NetnsConnectOptions } from './netns-socket.js';
export * from './cgroup.js';
export * from './kernel-features.js';
export { watchNetns, type NetnsChange, type NetnsWatch } from './netns-watch.js';
