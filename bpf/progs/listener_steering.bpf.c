// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The pod netns's sk_lookup program: it runs for every listener lookup in the pod netns, that is
 * for every packet the stack has no connection for, after IPv4/IPv6 reassembly and extension
 * headers, and also for a SYN that meets a TIME_WAIT socket. Two jobs:
 *   Backstop (every kernel, every steering mode): a lookup for a connection from one of the pod's
 *     own addresses to an address that is not the pod's can only be an outbound SYN that pod_egress
 *     looped back (the fwmark rule made its destination local) and that tc did not hand to ztunnel:
 *     it is refused, never given to a listener of the app's that happens to own the remote's port.
 *     (Inbound lookups cannot be told from the pod's own connections over lo here: for a local
 *     destination the kernel reports the address's device, not lo, as the ingress interface. tc
 *     guards inbound alone: every TCP packet classified or dropped, TIME_WAIT SYNs to ztunnel.)
 *     And a lookup for an address the pod's record does not hold is refused: only an interface
 *     without hooks (tc never saw the packet) delivers one.
 *   Steering, for kernels whose bpf_sk_assign in tc refuses SO_REUSEPORT listeners (before Linux
 *     6.6), which is how ztunnel binds 15001/15006: tc records its decision for each SYN in the
 *     steer map, and this program assigns the SYN to ztunnel's listener, learnt by ztunnel_sockops
 *     (on ztunnel's cgroup) in a sockhash keyed by netns cookie and port.
 * The lookups tc itself makes (bpf_skc_lookup_tcp, zero addresses for ztunnel's listeners) pass. */
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "addr.h"
#include "pod_policy_map.h"

extern STEER_MAP steer SEC(".maps");

ZTUNNEL_LISTENERS_MAP ztunnel_listeners SEC(".maps");

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

extern POD_POLICY_MAP pod_policy SEC(".maps");

extern POD_COUNTERS_MAP pod_counters SEC(".maps");

extern CAPTURED_IFACES_MAP captured_ifaces SEC(".maps");

static __always_inline bool ztunnel_port(__u32 port)
{
	return port == ZTUNNEL_OUTBOUND_PORT || port == ZTUNNEL_INBOUND_PORT || port == ZTUNNEL_HBONE_PORT;
}

/* Counted for pod p, or node-wide (slot 0) when the lookup names no pod. */
static __always_inline void count(const struct pod_policy *p, enum pod_counter c)
{
	__u32 slot = p ? p->slot : 0;
	struct pod_counters *v = bpf_map_lookup_elem(&pod_counters, &slot);

	if (v)
		v->value[c]++;
}

/* Is `a` one of the addresses of pod `p` (whose netns this lookup runs in)? */
static __always_inline bool same_pod(const struct pod_policy *p, const struct pod_ip *a)
{
	struct pod_policy *owner = bpf_map_lookup_elem(&pod_policy, a);

	return owner && owner->slot == p->slot;
}

/* An outbound connection routed over lo (outbound_route.bpf.c) to ztunnel's 15001 listener, never
 * to a listener of the app's that owns the remote's port. Without ztunnel's listener the SYN is
 * dropped (the stack sends no reset from an address that is not its own) and TCP retries it; a
 * retry reaches ztunnel once it listens again. The connect hook routes over lo only while ztunnel
 * listens, so this is the window of a ztunnel going away between a connect and its SYN; a connect
 * made while ztunnel is away takes pod_egress's path, which refuses it at once. */
static __always_inline int to_outbound_listener(struct bpf_sk_lookup *ctx, const struct pod_policy *p)
{
	struct listener_key k = {};
	struct bpf_sock *sk;
	long err;

	k.netns_cookie = p->netns_cookie;
	k.port = ZTUNNEL_OUTBOUND_PORT;
	sk = bpf_map_lookup_elem(&ztunnel_listeners, &k);
	if (!sk) {
		count(p, CNT_OUTBOUND_NO_ZTUNNEL);
		return SK_DROP;
	}
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	count(p, err ? CNT_OUTBOUND_NO_ZTUNNEL : CNT_OUTBOUND_REDIRECTED);
	return err ? SK_DROP : SK_PASS;
}

static __always_inline int refuse(const struct pod_policy *p)
{
	count(p, CNT_LOOKUP_REFUSED);
	return SK_DROP;
}

/* Did the connection come in on an interface that carries pod p's hooks? (Where tc saw it.) */
static __always_inline bool on_captured_interface(const struct pod_policy *p, __u32 ifindex)
{
	struct captured_key k = { .slot = p->slot, .ifindex = ifindex };
	__u64 *cookie = bpf_map_lookup_elem(&captured_ifaces, &k);

	return cookie && (*cookie & ~CAPTURED_FLAGS) == p->netns_cookie; /* ingress is hooked on all */
}

SEC("sk_lookup")
int pod_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct steer_key k = {};
	struct listener_key *target;
	struct pod_policy *p;
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
	if (unspecified_or_loopback(&k.local))
		return SK_PASS;
	k.remote_port = ctx->remote_port;
	k.local_port = bpf_htons((__u16)ctx->local_port);
	target = bpf_map_lookup_elem(&steer, &k);
	if (target) {
		sk = bpf_map_lookup_elem(&ztunnel_listeners, target);
		if (!sk)
			return SK_DROP; /* ztunnel is not listening in this pod: no socket at all, not the app's */
		err = bpf_sk_assign(ctx, sk, 0);
		bpf_sk_release(sk);
		return err ? SK_DROP : SK_PASS;
	}
	/* Routed over lo by the fwmark rule (outbound_route.bpf.c): an address this netns does not
	 * have, whatever its port (a remote's 15006 or 15008 is still outbound, as pod_egress treats
	 * it, never ztunnel's inbound listeners). The connect hook marks only sockets whose source is
	 * this pod's; any other source here is an app that marked its socket itself (NET_ADMIN). */
	if (ctx->ingress_ifindex == LOOPBACK_IFINDEX && !is_probe_address(&k.local)) {
		p = bpf_map_lookup_elem(&pod_policy, &k.remote);
		if (p && !same_pod(p, &k.local))
			return to_outbound_listener(ctx, p);
		if (!p && !bpf_map_lookup_elem(&pod_policy, &k.local))
			return refuse(NULL); /* never a listener of the app's */
	}
	/* ztunnel's own listeners (HBONE on 15008, connections within the pod) are found by the
	 * ordinary lookup. */
	if (ztunnel_port(ctx->local_port))
		return SK_PASS;
	/* An interface without hooks (a tun or wireguard device, one beyond the interface limit, one
	 * that has just appeared) delivers connections to any address of the netns, the pod's own
	 * included (Linux takes any local address on any interface), that tc never saw: refused, fail
	 * closed. The pod's own connections to its recorded addresses (ztunnel's to the app among
	 * them) name the address's device, a captured one, or lo. */
	p = bpf_map_lookup_elem(&pod_policy, &k.local);
	if (p && (p->flags & POD_F_IFACES_GATED) && ctx->ingress_ifindex != LOOPBACK_IFINDEX &&
	    !on_captured_interface(p, ctx->ingress_ifindex))
		return refuse(p);
	/* The backstop: from a pod address to a destination that is no pod address (nor the probe's). */
	if (p || is_probe_address(&k.local))
		return SK_PASS;
	p = bpf_map_lookup_elem(&pod_policy, &k.remote);
	if (p)
		return refuse(p);
	/* An address the pod's record does not hold: on an interface that is not captured (a tun or
	 * wireguard device, one over the interface limit, one that appeared and has no hooks yet),
	 * where tc never saw the packet, or one past the record's limit or link-local (tc sends
	 * those to ztunnel, whose own connection onward to the app then ends here too). Refused,
	 * fail closed, unless it is the pod connecting to itself (an IPv4 packet from outside with
	 * the destination as source is a martian; a spoofed IPv6 one cannot complete the handshake
	 * without TCP Fast Open cookies turned off). */
	if (same_address(&k.local, &k.remote))
		return SK_PASS;
	return refuse(NULL);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
