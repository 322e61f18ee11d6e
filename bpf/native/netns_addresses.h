/* The addresses configured in a network namespace: how the agent finds a running pod's netns. */
#ifndef AMBIENT_NETNS_ADDRESSES_H
#define AMBIENT_NETNS_ADDRESSES_H

#include "datapath.h"

#define NETNS_MAX_ADDRESSES 64

struct netns_addresses {
	unsigned long long ino, dev;
	unsigned long long owner_userns; /* inode of the user namespace that owns the netns; 0: unknown */
	unsigned count;
	struct pod_ip addrs[NETNS_MAX_ADDRESSES];
};

/* Global-scope addresses of the netns at path (loopback and IPv6 link-local left out), and the
 * user namespace that owns it. */
int netns_addresses(const char *path, struct netns_addresses *out, struct dp_error *e);

#endif
