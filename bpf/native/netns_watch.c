#define _GNU_SOURCE
#include "netns_watch.h"

#include <errno.h>
#include <net/if.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>

#include "netns_thread.h"

/* The socket belongs to the netns it was made in, wherever it is read from. */
static int open_job(void *p)
{
	struct sockaddr_nl sa = {
		.nl_family = AF_NETLINK,
		.nl_groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR,
	};
	struct netns_watch *w = p;
	int *fd = &w->fd, rcvbuf = 1 << 20;
	/* TEST ONLY: a small buffer, so that a test can overrun it. Never set in production. */
	const char *test_rcvbuf = getenv("AMBIENT_BPF_TEST_WATCH_RCVBUF");
	struct if_nameindex *all, *i;

	*fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, NETLINK_ROUTE);
	if (*fd < 0)
		return -errno;
	/* A burst (an interface with its addresses) fits; an overrun reads as ENOBUFS: a change too. */
	if (test_rcvbuf && atoi(test_rcvbuf) > 0)
		rcvbuf = atoi(test_rcvbuf);
	setsockopt(*fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
	if (bind(*fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int err = -errno;

		close(*fd);
		*fd = -1;
		return err;
	}
	/* Listed once subscribed: an interface is either listed or announced. */
	if ((all = if_nameindex())) {
		for (i = all; i->if_index && w->link_count < NETNS_WATCH_MAX_LINKS; i++)
			w->links[w->link_count++] = i->if_index;
		if_freenameindex(all);
	}
	return 0;
}

int netns_watch(const char *path, struct netns_watch *out, struct dp_error *e)
{
	unsigned long long ino, dev;
	int ns = open_netns(path, &ino, &dev), err;

	out->fd = -1;
	out->link_count = 0;
	if (ns < 0)
		return dp_fail(e, DPE_NETNS, -ns, "cannot open netns %s", path);
	err = run_in_netns(ns, open_job, out);
	close(ns);
	if (err)
		return dp_fail(e, DPE_SYSTEM, -err, "cannot watch the interfaces of netns %s", path);
	return 0;
}
