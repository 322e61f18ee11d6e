// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* sk_lookup steering, for kernels whose bpf_sk_assign in tc refuses SO_REUSEPORT listeners (before
 * Linux 6.6), which is how ztunnel binds 15001/15006. The tc programs still decide which SYNs go to
 * ztunnel (pod_redirect.bpf.c) but only record the decision in the steer map; the socket lookup the
 * stack then makes runs this netns's sk_lookup program, which assigns the SYN to ztunnel's listener
 * (reuseport selection follows, as for any lookup).
 *   ztunnel_sockops (on ztunnel's cgroup): each listener ztunnel opens on 15001/15006 goes into a
 *     sockhash keyed by its netns cookie and port; closed sockets leave it by themselves.
 *   pod_sk_lookup (on each pod netns): a SYN with a recorded decision gets that listener; when
 *     ztunnel does not listen the lookup fails and the stack resets the connection (fail closed:
 *     the app never sees it). */
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ambient_shared.h"
#include "pod_policy_map.h"

extern STEER_MAP steer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_PODS * 2);
	__type(key, struct listener_key);
	__type(value, __u64);
} ztunnel_listeners SEC(".maps");

SEC("sockops")
int ztunnel_sockops(struct bpf_sock_ops *skops)
{
	struct listener_key k = {};

	if (skops->op != BPF_SOCK_OPS_TCP_LISTEN_CB)
		return 1;
	if (skops->local_port != ZTUNNEL_OUTBOUND_PORT && skops->local_port != ZTUNNEL_INBOUND_PORT)
		return 1;
	k.netns_cookie = bpf_get_netns_cookie(skops);
	k.port = skops->local_port;
	bpf_sock_hash_update(skops, &ztunnel_listeners, &k, BPF_ANY);
	return 1;
}

static __always_inline void v4_mapped(struct pod_ip *a, __u32 addr)
{
	__builtin_memset(a, 0, sizeof(*a));
	a->addr[10] = a->addr[11] = 0xff;
	__builtin_memcpy(&a->addr[12], &addr, 4);
}

SEC("sk_lookup")
int pod_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct steer_key k = {};
	struct listener_key *target;
	struct bpf_sock *sk;
	long err;

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	if (ctx->family == 2 /* AF_INET */) {
		v4_mapped(&k.remote, ctx->remote_ip4);
		v4_mapped(&k.local, ctx->local_ip4);
	} else {
		__builtin_memcpy(k.remote.addr, (void *)ctx->remote_ip6, 16);
		__builtin_memcpy(k.local.addr, (void *)ctx->local_ip6, 16);
	}
	k.remote_port = ctx->remote_port;
	k.local_port = bpf_htons((__u16)ctx->local_port);
	target = bpf_map_lookup_elem(&steer, &k);
	if (!target)
		return SK_PASS;
	sk = bpf_map_lookup_elem(&ztunnel_listeners, target);
	if (!sk)
		return SK_DROP; /* ztunnel is not listening in this pod: no socket at all, not the app's */
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
