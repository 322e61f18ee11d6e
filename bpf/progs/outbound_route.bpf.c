// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The fast path for a pod's outbound TCP: the app's socket is routed over the pod's loopback to
 * ztunnel, as upstream's REDIRECT to 127.0.0.1 is, instead of having each of its packets looped
 * through the pod's interface by pod_egress. Attached to the pod's cgroup v2 (its apps' sockets
 * only; ztunnel lives in another cgroup), at connect, before the kernel picks the route:
 *   the socket gets REDIRECT_MARK; the fwmark rule routes it to the local table's "local default
 *   dev lo"; its SYN arrives on lo with the original destination, and the pod netns's sk_lookup
 *   program (listener_steering.bpf.c) hands it to ztunnel's 15001 listener, or refuses it.
 * Why: a flow looped through the veth is cut at the veth's MTU (1500) and its segments go through
 * each CPU's backlog twice, where they can be reordered: bulk throughput fell to ~0.75x of the
 * iptables path. Over lo the route's MTU is 64 KiB, as with REDIRECT.
 * The socket is left to pod_egress (the slower path, same guarantee) when ztunnel's 15001 listener
 * in this netns is not known yet (a ztunnel that listened before the agent hooked its cgroup), when
 * the app marked the socket itself (CAP_NET_ADMIN) or bound it to a source that is not this pod's
 * (IP_FREEBIND, IP_TRANSPARENT), and for loopback, probe and the pod's own destinations, which
 * pod_egress lets go too. */
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "addr.h"
#include "pod_policy_map.h"

#define SOL_SOCKET 1
#define SO_MARK 36
#define SOCK_STREAM 1

extern ZTUNNEL_LISTENERS_MAP ztunnel_listeners SEC(".maps");

extern POD_POLICY_MAP pod_policy SEC(".maps");

/* Is ztunnel's outbound listener there for this socket's netns? */
static __always_inline bool ztunnel_listens(struct bpf_sock_addr *ctx)
{
	struct listener_key k = {};
	struct bpf_sock *sk;

	k.netns_cookie = bpf_get_netns_cookie(ctx);
	k.port = ZTUNNEL_OUTBOUND_PORT;
	sk = bpf_map_lookup_elem(&ztunnel_listeners, &k);
	if (!sk)
		return false;
	bpf_sk_release(sk);
	return true;
}

/* This pod's own address (the pod whose netns the socket is in)? */
static __always_inline bool own_address(const struct pod_ip *a, __u64 netns_cookie)
{
	struct pod_policy *own = bpf_map_lookup_elem(&pod_policy, a);

	return own && own->netns_cookie == netns_cookie;
}

/* A destination pod_egress lets go: loopback, unspecified, the probe address, this pod's own. */
static __always_inline bool left_alone(const struct pod_ip *dst, __u64 netns_cookie)
{
	return unspecified_or_loopback(dst) || is_probe_address(dst) || own_address(dst, netns_cookie);
}

/* Is the socket bound to a source that is not this pod's (IP_FREEBIND, IP_TRANSPARENT)? The
 * socket lookup would take such a SYN for another pod's, or for no pod's: left to pod_egress,
 * which hands it to this netns's ztunnel whatever its source. */
static __always_inline bool foreign_source(struct bpf_sock_addr *ctx, __u64 netns_cookie)
{
	struct bpf_sock *sk = ctx->sk;
	struct pod_ip src = {};
	__u32 w[4];

	if (!sk)
		return true;
	if (ctx->family == 2 /* AF_INET */) {
		__u32 a = sk->src_ip4;

		if (a == 0)
			return false; /* unbound: the route's source, the pod's */
		v4_mapped(&src, a);
	} else {
		w[0] = sk->src_ip6[0];
		w[1] = sk->src_ip6[1];
		w[2] = sk->src_ip6[2];
		w[3] = sk->src_ip6[3];
		if ((w[0] | w[1] | w[2] | w[3]) == 0)
			return false;
		__builtin_memcpy(src.addr, w, sizeof(w));
	}
	return !own_address(&src, netns_cookie);
}

static __always_inline int route_to_ztunnel(struct bpf_sock_addr *ctx, const struct pod_ip *dst)
{
	int mark = REDIRECT_MARK;
	__u64 netns_cookie;

	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP || !ctx->sk || ctx->sk->mark)
		return 1;
	netns_cookie = bpf_get_netns_cookie(ctx);
	if (left_alone(dst, netns_cookie) || foreign_source(ctx, netns_cookie) || !ztunnel_listens(ctx))
		return 1;
	/* On failure the socket keeps the interface's route: pod_egress loops it. */
	bpf_setsockopt(ctx, SOL_SOCKET, SO_MARK, &mark, sizeof(mark));
	return 1;
}

SEC("cgroup/connect4")
int pod_connect4(struct bpf_sock_addr *ctx)
{
	struct pod_ip dst;

	v4_mapped(&dst, ctx->user_ip4);
	return route_to_ztunnel(ctx, &dst);
}

SEC("cgroup/connect6")
int pod_connect6(struct bpf_sock_addr *ctx)
{
	__u32 w[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	struct pod_ip dst;

	/* (An IPv4-mapped destination reads as the IPv4 address does in pod_policy.) */
	__builtin_memcpy(dst.addr, w, sizeof(w));
	return route_to_ztunnel(ctx, &dst);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
