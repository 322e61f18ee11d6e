#define _GNU_SOURCE
#include "netns_socket.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "netns_thread.h"

struct socket_job {
	const struct netns_socket_request *req;
	struct dp_error *e;
	int fd;
};

static int sock_fail(struct socket_job *job, const char *what)
{
	int err = errno;

	job->e->code = DPE_SYSTEM;
	snprintf(job->e->message, sizeof(job->e->message), "%s: %s", what, strerror(err));
	if (job->fd >= 0)
		close(job->fd);
	job->fd = -1;
	return -err;
}

static int make_socket(void *p)
{
	struct socket_job *job = p;
	const struct netns_socket_request *r = job->req;
	int af = r->family == 6 ? AF_INET6 : AF_INET, one = 1;
	struct sockaddr_storage ss;
	socklen_t len;

	memset(&ss, 0, sizeof(ss));
	job->fd = socket(af, (r->udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (job->fd < 0)
		return sock_fail(job, "socket");
	if (setsockopt(job->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)))
		return sock_fail(job, "SO_REUSEADDR");
	if (r->reuseport && setsockopt(job->fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)))
		return sock_fail(job, "SO_REUSEPORT");
	if (r->has_mark && setsockopt(job->fd, SOL_SOCKET, SO_MARK, &r->mark, sizeof(r->mark)))
		return sock_fail(job, "SO_MARK");
	if (r->transparent &&
	    setsockopt(job->fd, af == AF_INET6 ? SOL_IPV6 : SOL_IP,
		       af == AF_INET6 ? IPV6_TRANSPARENT : IP_TRANSPARENT, &one, sizeof(one)))
		return sock_fail(job, "IP_TRANSPARENT");
	if (r->freebind && setsockopt(job->fd, af == AF_INET6 ? SOL_IPV6 : SOL_IP,
				      af == AF_INET6 ? IPV6_FREEBIND : IP_FREEBIND, &one, sizeof(one)))
		return sock_fail(job, "IP_FREEBIND");
	if (af == AF_INET6) {
		int v6only = r->v6only;

		if (setsockopt(job->fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof(v6only)))
			return sock_fail(job, "IPV6_V6ONLY");
	}
	if (r->bind) {
		if (af == AF_INET) {
			struct sockaddr_in *sin = (struct sockaddr_in *)&ss;

			sin->sin_family = AF_INET;
			sin->sin_port = htons(r->bind_port);
			if (r->bind_address[0] && inet_pton(AF_INET, r->bind_address, &sin->sin_addr) != 1) {
				errno = EINVAL;
				return sock_fail(job, "bind address");
			}
			len = sizeof(*sin);
		} else {
			struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;

			sin6->sin6_family = AF_INET6;
			sin6->sin6_port = htons(r->bind_port);
			if (r->bind_address[0] &&
			    inet_pton(AF_INET6, r->bind_address, &sin6->sin6_addr) != 1) {
				errno = EINVAL;
				return sock_fail(job, "bind address");
			}
			len = sizeof(*sin6);
		}
		if (bind(job->fd, (struct sockaddr *)&ss, len))
			return sock_fail(job, "bind");
	}
	if (r->listen_backlog >= 0 && listen(job->fd, r->listen_backlog))
		return sock_fail(job, "listen");
	return 0;
}

/* Runs fn(arg) on a thread inside the netns at `path`; -1 with e filled when it cannot enter. */
static int in_netns(const char *path, netns_fn fn, void *arg, struct dp_error *e)
{
	unsigned long long ino, dev;
	int ns = open_netns(path, &ino, &dev), rc;

	if (ns < 0) {
		e->code = DPE_NETNS;
		snprintf(e->message, sizeof(e->message), "cannot open netns %s: %s", path,
			 ns == -EINVAL ? "not a network namespace" : strerror(-ns));
		return -1;
	}
	rc = run_in_netns(ns, fn, arg);
	close(ns);
	if (rc < 0 && !e->code) {
		e->code = DPE_NETNS;
		snprintf(e->message, sizeof(e->message), "cannot enter netns %s: %s", path, strerror(-rc));
	}
	return rc < 0 ? -1 : 0;
}

int netns_socket(const struct netns_socket_request *req, struct dp_error *e)
{
	struct socket_job job = { .req = req, .e = e, .fd = -1 };

	if (!req->netns_path[0])
		make_socket(&job);
	else
		in_netns(req->netns_path, make_socket, &job, e);
	return job.fd;
}

struct socket_batch {
	const struct netns_socket_request *reqs;
	struct netns_socket_result *res;
	size_t n;
};

static int make_sockets(void *p)
{
	struct socket_batch *b = p;

	for (size_t i = 0; i < b->n; i++) {
		struct dp_error e = { 0 };
		struct socket_job job = { .req = &b->reqs[i], .e = &e, .fd = -1 };

		make_socket(&job);
		b->res[i].fd = job.fd;
		snprintf(b->res[i].error, sizeof(b->res[i].error), "%s", job.fd < 0 ? e.message : "");
	}
	return 0;
}

int netns_sockets(const char *netns_path, const struct netns_socket_request *reqs,
		  struct netns_socket_result *res, size_t n, struct dp_error *e)
{
	struct socket_batch batch = { .reqs = reqs, .res = res, .n = n };

	if (!netns_path[0])
		return make_sockets(&batch);
	return in_netns(netns_path, make_sockets, &batch, e);
}
