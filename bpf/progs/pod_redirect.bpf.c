// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* In-pod redirection to ztunnel, attached to the pod's interface (ingress and egress).
 *
 * Outbound: a new TCP connection leaving the pod is looped back into the pod's ingress with
 * REDIRECT_MARK; a fwmark rule routes such packets locally, and the SYN is assigned to ztunnel's
 * wildcard transparent listener on 15001, so the accepted socket's local address is the original
 * destination. Later packets of the flow are found to terminate locally (ztunnel's accepted socket)
 * and are looped the same way; the stack's own lookup delivers them.
 *
 * Inbound: a new TCP connection to a pod IP (not 15008, not from the probe address) is assigned to
 * the 15006 listener; the destination is local, so no routing change is involved.
 *
 * Return path of ztunnel's spoofed connections to the app: the app's replies are addressed to the
 * real client, but the flow terminates at ztunnel's local socket, so they are looped like above.
 *
 * ztunnel's own traffic (SO_MARK 0x539) is never touched. Packets that are not ours continue to the
 * next program (TC_ACT_UNSPEC, i.e. TCX_NEXT), so a primary CNI's programs keep working. */
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_packet.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ambient_shared.h"
#include "parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PODS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pod_meta_key);
	__type(value, struct pod_meta);
} pod_meta SEC(".maps");

static __always_inline bool is_marked(const struct __sk_buff *skb, __u32 mark)
{
	return (skb->mark & MARK_MASK) == mark;
}

static __always_inline bool is_probe_or_loopback_v4(__be32 addr)
{
	__u32 a = bpf_ntohl(addr);

	return a == PROBE_ADDR_V4 || (a >> 24) == 127;
}

static __always_inline bool is_probe_or_loopback_v6(const __be32 *a)
{
	if (a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == bpf_htonl(1))
		return true;
	return a[0] == bpf_htonl(PROBE_ADDR_V6_W0) && a[1] == bpf_htonl(PROBE_ADDR_V6_W1) &&
	       a[2] == bpf_htonl(PROBE_ADDR_V6_W2) && a[3] == bpf_htonl(PROBE_ADDR_V6_W3);
}

static __always_inline bool is_probe_or_loopback(const struct tcp_flow *f, bool source)
{
	if (f->ipv6)
		return is_probe_or_loopback_v6(source ? f->tuple.ipv6.saddr : f->tuple.ipv6.daddr);
	return is_probe_or_loopback_v4(source ? f->tuple.ipv4.saddr : f->tuple.ipv4.daddr);
}

/* Is there a local, non-listening socket for this packet (seen as incoming)? Then the flow ends on
 * this host even though its destination is not a local address: ztunnel's accepted outbound socket,
 * or ztunnel's spoofed-source connection to the app. */
static __always_inline bool flow_terminates_locally(struct __sk_buff *skb, struct tcp_flow *f)
{
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &f->tuple, tuple_size(f), BPF_F_CURRENT_NETNS, 0);
	bool local;

	if (!sk)
		return false;
	local = sk->state != BPF_TCP_LISTEN;
	bpf_sk_release(sk);
	return local;
}

enum assign_result {
	ASSIGNED,
	KNOWN_CONNECTION, /* e.g. a retransmitted SYN: the stack's own lookup finds its socket */
	NO_LISTENER,
};

/* Hands a SYN to ztunnel's wildcard-bound listener on `port`. */
static __always_inline enum assign_result assign_to_listener(struct __sk_buff *skb, struct tcp_flow *f,
							     __u16 port)
{
	struct bpf_sock_tuple listener = {};
	struct bpf_sock *sk;
	long err;

	if (flow_terminates_locally(skb, f))
		return KNOWN_CONNECTION;
	/* Only the port: addresses zero find wildcard listeners, which is how ztunnel binds. */
	if (f->ipv6)
		listener.ipv6.dport = bpf_htons(port);
	else
		listener.ipv4.dport = bpf_htons(port);
	sk = bpf_skc_lookup_tcp(skb, &listener, tuple_size(f), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return NO_LISTENER;
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return NO_LISTENER;
	}
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	return err ? NO_LISTENER : ASSIGNED;
}

static __always_inline int loop_to_ingress(struct __sk_buff *skb)
{
	skb->mark = (skb->mark & ~MARK_MASK) | REDIRECT_MARK;
	return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}

SEC("tc")
int pod_egress(struct __sk_buff *skb)
{
	struct tcp_flow f;

	if (is_marked(skb, ZTUNNEL_MARK) || !parse_tcp(skb, &f))
		return TC_ACT_UNSPEC;
	if (is_probe_or_loopback(&f, false))
		return TC_ACT_UNSPEC;
	/* A new connection: to ztunnel. (Connections to the pod's own addresses leave through lo,
	 * never through this interface.) */
	if (f.bare_syn)
		return loop_to_ingress(skb);
	/* Redirected outbound flows and the app's replies to ztunnel's spoofed connections; flows that
	 * existed before the pod was enrolled find no local socket and keep going out. */
	if (flow_terminates_locally(skb, &f))
		return loop_to_ingress(skb);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int pod_ingress(struct __sk_buff *skb)
{
	struct tcp_flow f;

	if (is_marked(skb, REDIRECT_MARK)) {
		/* Looped back by pod_egress: the destination MAC is the gateway's, so the stack would
		 * drop it as another host's packet. */
		bpf_skb_change_type(skb, PACKET_HOST);
		/* Without a listener the stack answers the SYN with a reset, as upstream's REDIRECT to a
		 * closed port does. */
		if (parse_tcp(skb, &f) && f.bare_syn)
			assign_to_listener(skb, &f, ZTUNNEL_OUTBOUND_PORT);
		return TC_ACT_OK;
	}
	if (is_marked(skb, ZTUNNEL_MARK) || !parse_tcp(skb, &f) || !f.bare_syn)
		return TC_ACT_UNSPEC;
	/* Like upstream's PREROUTING rule, any destination: only the pod's addresses arrive here. */
	if (flow_dport(&f) == bpf_htons(ZTUNNEL_HBONE_PORT) || is_probe_or_loopback(&f, true))
		return TC_ACT_UNSPEC;
	switch (assign_to_listener(skb, &f, ZTUNNEL_INBOUND_PORT)) {
	case ASSIGNED:
		return TC_ACT_OK;
	case KNOWN_CONNECTION:
		return TC_ACT_UNSPEC;
	default:
		/* Fail closed: without ztunnel, inbound traffic must not reach the app unproxied. The
		 * client's SYN retries land once ztunnel listens. */
		return TC_ACT_SHOT;
	}
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
