// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* DNS capture for one pod, attached to the pod's cgroup v2 (so only its apps' sockets see it;
 * ztunnel lives in another cgroup). UDP cannot be steered with bpf_sk_assign: ztunnel answers from
 * 127.0.0.1:15053 and a connected resolver drops a reply from another address. So the socket
 * calls are rewritten instead, with no packet NAT:
 *   connect, sendmsg      to port 53  -> to ztunnel's 127.0.0.1:15053 ([::1] for IPv6), the
 *                                        original destination kept in the socket's storage;
 *   recvmsg, getpeername  from 15053  -> the original destination again.
 * TCP DNS is caught by connect the same way. Destinations on loopback (a resolver cache inside the
 * pod) are left alone. */
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "addr.h"

#define DNS_PORT 53
#define LOOPBACK_V4 0x7f000001 /* 127.0.0.1 */

struct dns_destination {
	__u32 ip6[4]; /* IPv4 in ip6[3] for AF_INET sockets */
	__u16 port; /* network order */
	__u16 v4;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct dns_destination);
} dns_destination SEC(".maps");

static __always_inline bool is_dns(struct bpf_sock_addr *ctx)
{
	return ctx->user_port == bpf_htons(DNS_PORT) &&
	       (ctx->protocol == IPPROTO_UDP || ctx->protocol == IPPROTO_TCP);
}

static __always_inline struct dns_destination *storage(struct bpf_sock_addr *ctx, bool create)
{
	return bpf_sk_storage_get(&dns_destination, ctx->sk, 0, create ? BPF_SK_STORAGE_GET_F_CREATE : 0);
}

static __always_inline void redirect4(struct bpf_sock_addr *ctx)
{
	struct dns_destination *d;

	if (!is_dns(ctx) || (bpf_ntohl(ctx->user_ip4) >> 24) == 127)
		return;
	d = storage(ctx, true);
	if (!d)
		return; /* no memory: the query goes where it was sent, uncaptured but working */
	d->ip6[3] = ctx->user_ip4;
	d->port = (__u16)ctx->user_port;
	d->v4 = 1;
	ctx->user_ip4 = bpf_htonl(LOOPBACK_V4);
	ctx->user_port = bpf_htons(ZTUNNEL_DNS_PORT);
}

static __always_inline void redirect6(struct bpf_sock_addr *ctx)
{
	struct dns_destination *d;
	__u32 a[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	bool mapped = words_v4_mapped(a);

	if (!is_dns(ctx))
		return;
	if ((!mapped && a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == bpf_htonl(1)) ||
	    (mapped && (bpf_ntohl(a[3]) >> 24) == 127))
		return;
	d = storage(ctx, true);
	if (!d)
		return;
	__builtin_memcpy(d->ip6, a, sizeof(a));
	d->port = (__u16)ctx->user_port;
	d->v4 = 0;
	/* A dual-stack socket talking to an IPv4 server reaches ztunnel's IPv4 listener. */
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	ctx->user_ip6[2] = mapped ? bpf_htonl(0xffff) : 0;
	ctx->user_ip6[3] = mapped ? bpf_htonl(LOOPBACK_V4) : bpf_htonl(1);
	ctx->user_port = bpf_htons(ZTUNNEL_DNS_PORT);
}

static __always_inline bool from_ztunnel_dns4(struct bpf_sock_addr *ctx)
{
	return ctx->user_port == bpf_htons(ZTUNNEL_DNS_PORT) && ctx->user_ip4 == bpf_htonl(LOOPBACK_V4);
}

static __always_inline void restore4(struct bpf_sock_addr *ctx)
{
	struct dns_destination *d;

	if (!from_ztunnel_dns4(ctx) || !(d = storage(ctx, false)) || !d->v4)
		return;
	ctx->user_ip4 = d->ip6[3];
	ctx->user_port = d->port;
}

static __always_inline void restore6(struct bpf_sock_addr *ctx)
{
	struct dns_destination *d;
	__u32 a[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	bool loopback = a[0] == 0 && a[1] == 0 &&
			((a[2] == 0 && a[3] == bpf_htonl(1)) ||
			 (words_v4_mapped(a) && a[3] == bpf_htonl(LOOPBACK_V4)));

	if (ctx->user_port != bpf_htons(ZTUNNEL_DNS_PORT) || !loopback || !(d = storage(ctx, false)) || d->v4)
		return;
	ctx->user_ip6[0] = d->ip6[0];
	ctx->user_ip6[1] = d->ip6[1];
	ctx->user_ip6[2] = d->ip6[2];
	ctx->user_ip6[3] = d->ip6[3];
	ctx->user_port = d->port;
}

SEC("cgroup/connect4")
int dns_connect4(struct bpf_sock_addr *ctx)
{
	redirect4(ctx);
	return 1;
}

SEC("cgroup/connect6")
int dns_connect6(struct bpf_sock_addr *ctx)
{
	redirect6(ctx);
	return 1;
}

SEC("cgroup/sendmsg4")
int dns_sendmsg4(struct bpf_sock_addr *ctx)
{
	redirect4(ctx);
	return 1;
}

SEC("cgroup/sendmsg6")
int dns_sendmsg6(struct bpf_sock_addr *ctx)
{
	redirect6(ctx);
	return 1;
}

SEC("cgroup/recvmsg4")
int dns_recvmsg4(struct bpf_sock_addr *ctx)
{
	restore4(ctx);
	return 1;
}

SEC("cgroup/recvmsg6")
int dns_recvmsg6(struct bpf_sock_addr *ctx)
{
	restore6(ctx);
	return 1;
}

SEC("cgroup/getpeername4")
int dns_getpeername4(struct bpf_sock_addr *ctx)
{
	restore4(ctx);
	return 1;
}

SEC("cgroup/getpeername6")
int dns_getpeername6(struct bpf_sock_addr *ctx)
{
	restore6(ctx);
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
