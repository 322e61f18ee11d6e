/* Runs work inside a network namespace on a short-lived thread: setns(CLONE_NEWNET) is per thread,
 * so the caller's thread (and Node's main thread) never changes namespace, and a thread that could
 * not switch back simply ends. */
#ifndef AMBIENT_NETNS_THREAD_H
#define AMBIENT_NETNS_THREAD_H

typedef int (*netns_fn)(void *arg);

/* Runs fn(arg) in the netns of netns_fd; returns fn's result, or a negative errno if the thread
 * could not be started or could not enter the namespace. */
int run_in_netns(int netns_fd, netns_fn fn, void *arg);

/* Opens a netns path (O_CLOEXEC) and checks that it is a network namespace. Returns the fd, -ENOENT,
 * -EINVAL when the path is not a network namespace, or another negative errno. */
int open_netns(const char *path, unsigned long long *ino, unsigned long long *dev);

#endif
