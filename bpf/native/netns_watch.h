/* A rtnetlink socket opened inside a pod netns and subscribed to its interface and address changes:
 * what tells the agent at once that the pod has an interface (or address) to capture. */
#ifndef AMBIENT_NETNS_WATCH_H
#define AMBIENT_NETNS_WATCH_H

#include "dp_error.h"

#define NETNS_WATCH_MAX_LINKS 64

struct netns_watch {
	int fd; /* non-blocking, close-on-exec; readable whenever a link or an address changed */
	unsigned link_count; /* the interfaces there when it was opened (after it was subscribed) */
	unsigned links[NETNS_WATCH_MAX_LINKS];
};

/* Returns 0, or -1 with e filled. */
int netns_watch(const char *path, struct netns_watch *out, struct dp_error *e);

#endif
