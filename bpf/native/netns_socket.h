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

#endif
