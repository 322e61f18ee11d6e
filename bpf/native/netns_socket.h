/* Sockets made inside a network namespace, with the options ztunnel uses (transparent, mark,
 * reuseport, freebind). The fd is handed to Node, which polls it like any other socket. */
#ifndef AMBIENT_NETNS_SOCKET_H
#define AMBIENT_NETNS_SOCKET_H

#include <stdbool.h>
#include <stdint.h>

#include "datapath.h"

struct netns_socket_request {
	char netns_path[NETNS_PATH_LEN]; /* empty: the caller's netns */
	int family; /* 4 or 6 */
	bool udp;
	bool has_mark;
	uint32_t mark;
	bool transparent, freebind, reuseport, v6only;
	bool bind;
	char bind_address[64];
	uint16_t bind_port;
	int listen_backlog; /* < 0: do not listen */
};

/* Returns the fd (close-on-exec, non-blocking) or -1 with e filled. */
int netns_socket(const struct netns_socket_request *req, struct dp_error *e);

#define NETNS_SOCKETS_MAX 12

struct netns_socket_result {
	int fd; /* -1: see error */
	char error[160];
};

/* Every request's socket, made on one thread inside `netns_path` (the requests' own netns_path is
 * not read; empty: the caller's netns): a proxy's listeners for a pod cost one netns entry, not
 * one each. Each request succeeds or fails on its own. Returns 0, or -1 with e filled when the
 * netns cannot be entered (then no socket was made). */
int netns_sockets(const char *netns_path, const struct netns_socket_request *reqs,
		  struct netns_socket_result *res, size_t n, struct dp_error *e);

#endif
