#define _GNU_SOURCE
#include "netns_thread.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>
#include <linux/nsfs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

#define NETNS_THREAD_STACK (256 * 1024)

struct netns_call {
	int netns_fd;
	netns_fn fn;
	void *arg;
	int result;
};

static void *netns_thread_main(void *p)
{
	struct netns_call *call = p;

	if (setns(call->netns_fd, CLONE_NEWNET) < 0)
		call->result = -errno;
	else
		call->result = call->fn(call->arg);
	return NULL;
}

int run_in_netns(int netns_fd, netns_fn fn, void *arg)
{
	struct netns_call call = { .netns_fd = netns_fd, .fn = fn, .arg = arg, .result = 0 };
	pthread_attr_t attr;
	pthread_t thread;
	int err;

	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, NETNS_THREAD_STACK);
	err = pthread_create(&thread, &attr, netns_thread_main, &call);
	pthread_attr_destroy(&attr);
	if (err)
		return -err;
	pthread_join(thread, NULL);
	return call.result;
}

int open_netns(const char *path, unsigned long long *ino, unsigned long long *dev)
{
	struct stat st;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	int type;

	if (fd < 0)
		return -errno;
	type = ioctl(fd, NS_GET_NSTYPE);
	if (type != CLONE_NEWNET || fstat(fd, &st) < 0) {
		close(fd);
		return -EINVAL;
	}
	*ino = st.st_ino;
	*dev = st.st_dev;
	return fd;
}
