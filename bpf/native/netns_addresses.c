#define _GNU_SOURCE
#include "netns_addresses.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <linux/nsfs.h>

#include "netns_thread.h"
#include "rtnl.h"

static bool is_local_only(const uint8_t a[16])
{
	static const uint8_t v4_prefix[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
	static const uint8_t v6_loopback[16] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1 };

	if (memcmp(a, v4_prefix, 12) == 0)
		return a[12] == 127;
	return memcmp(a, v6_loopback, 16) == 0 || (a[0] == 0xfe && (a[1] & 0xc0) == 0x80);
}

static void collect(const uint8_t addr[16], int ifindex, void *p)
{
	struct netns_addresses *out = p;

	(void)ifindex;
	if (is_local_only(addr) || out->count >= NETNS_MAX_ADDRESSES)
		return;
	memcpy(out->addrs[out->count++].addr, addr, 16);
}

static int list_job(void *p)
{
	struct rtnl nl;
	int err = rtnl_open(&nl);

	if (err)
		return err;
	err = rtnl_list_addresses(&nl, collect, p);
	rtnl_close(&nl);
	return err;
}

int netns_addresses(const char *path, struct netns_addresses *out, struct dp_error *e)
{
	int fd = open_netns(path, &out->ino, &out->dev), err;

	out->count = 0;
	if (fd < 0) {
		e->code = DPE_NETNS;
		snprintf(e->message, sizeof(e->message), "%s: %s", path,
			 fd == -EINVAL ? "not a network namespace" : strerror(-fd));
		return -1;
	}
	/* Who owns it: a netns a process made in a user namespace of its own (unprivileged) is owned
	 * by that namespace, not by the node's. */
	out->owner_userns = 0;
	int owner = ioctl(fd, NS_GET_USERNS);
	if (owner >= 0) {
		struct stat st;

		if (fstat(owner, &st) == 0)
			out->owner_userns = st.st_ino;
		close(owner);
	}
	err = run_in_netns(fd, list_job, out);
	close(fd);
	if (err) {
		e->code = DPE_SYSTEM;
		snprintf(e->message, sizeof(e->message), "cannot list addresses in %s: %s", path,
			 strerror(-err));
		return -1;
	}
	return 0;
}
