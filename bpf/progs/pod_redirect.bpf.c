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
 * ztunnel's own traffic (SO_MARK 0x539 on a socket of ztunnel's cgroup) is never touched; the mark
 * alone is not enough unless the node runs in mark-only mode. Each new connection is counted per
 * pod (pod_counters), found by the pod-side address of the packet (pod_policy), which also carries
 * the pod's options: bypass-inbound-capture and strict mode. Packets that are not ours continue to the
 * next program (TC_ACT_UNSPEC, i.e. TCX_NEXT), so a primary CNI's programs keep working. */
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_packet.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ambient_shared.h"
#include "parse.h"
#include "pod_policy_map.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PODS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pod_meta_key);
	__type(value, struct pod_meta);
} pod_meta SEC(".maps");

/* Which pod (uid) owns each pod_counters slot: user-space bookkeeping, like pod_meta. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_PODS);
	__type(key, __u32);
	__type(value, struct pod_meta_key);
} slot_owner SEC(".maps");

/* Per pod address: its counters slot and its options (annotations, strict mode). */
POD_POLICY_MAP pod_policy SEC(".maps");

STEER_MAP steer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_PODS);
	__type(key, __u32);
	__type(value, struct pod_counters);
} pod_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dp_settings);
} settings SEC(".maps");

/* cgroup v2 ids of the ztunnel processes the agent has seen connect over ZDS. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_ZTUNNEL_CGROUPS);
	__type(key, __u64);
	__type(value, __u8);
} ztunnel_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_STRICT_ALLOW);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct strict_allow_key);
	__type(value, __u8);
} strict_allow SEC(".maps");

static __always_inline bool is_marked(const struct __sk_buff *skb, __u32 mark)
{
	return (skb->mark & MARK_MASK) == mark;
}

/* ---- per-pod policy and counters ---- */

static __always_inline void v4_key(struct pod_ip *k, __be32 addr)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->addr[10] = k->addr[11] = 0xff;
	__builtin_memcpy(&k->addr[12], &addr, 4);
}

/* The policy of the pod that owns `local`, the pod-side address of a flow (NULL: not a pod's). */
static __always_inline struct pod_policy *policy_of(const struct tcp_flow *f, bool local_is_source)
{
	struct pod_ip k;

	if (f->ipv6)
		__builtin_memcpy(k.addr, local_is_source ? f->tuple.ipv6.saddr : f->tuple.ipv6.daddr, 16);
	else
		v4_key(&k, local_is_source ? f->tuple.ipv4.saddr : f->tuple.ipv4.daddr);
	return bpf_map_lookup_elem(&pod_policy, &k);
}

static __always_inline void count(const struct pod_policy *p, enum pod_counter c)
{
	__u32 slot = p ? p->slot : 0;
	struct pod_counters *v = bpf_map_lookup_elem(&pod_counters, &slot);

	if (v && c < CNT_COUNT)
		v->value[c]++;
}

/* ---- ztunnel's own traffic ---- */

/* Is this ztunnel-marked packet really ztunnel's? By default only sockets of ztunnel's cgroup (and
 * the node's root cgroup, which holds the kernel's reply sockets and never a pod) count: an app
 * with NET_ADMIN that sets SO_MARK 0x539 is still redirected. */
static __always_inline bool ztunnel_owns(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct dp_settings *s = bpf_map_lookup_elem(&settings, &zero);
	__u64 cgroup;

	if (s && (s->flags & SETTING_MARK_ONLY_EXEMPTION))
		return true;
	cgroup = bpf_skb_cgroup_id(skb);
	if (cgroup == 0 || cgroup == CGROUP_V2_ROOT_ID)
		return true;
	return bpf_map_lookup_elem(&ztunnel_cgroups, &cgroup) != NULL;
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

static __always_inline bool steering_with_sk_lookup(void)
{
	__u32 zero = 0;
	struct dp_settings *s = bpf_map_lookup_elem(&settings, &zero);

	return s && (s->flags & SETTING_SK_LOOKUP_STEERING);
}

/* sk_lookup steering: leaves the decision for the pod netns's sk_lookup program (listener_steering
 * .bpf.c), which assigns the SYN to ztunnel's listener when the stack looks up its socket. */
static __always_inline enum assign_result steer_later(const struct tcp_flow *f, const struct pod_policy *p, __u16 port)
{
	struct listener_key target = {};
	struct steer_key k = {};

	if (!p || !p->netns_cookie)
		return NO_LISTENER;
	if (f->ipv6) {
		__builtin_memcpy(k.remote.addr, f->tuple.ipv6.saddr, 16);
		__builtin_memcpy(k.local.addr, f->tuple.ipv6.daddr, 16);
		k.remote_port = f->tuple.ipv6.sport;
		k.local_port = f->tuple.ipv6.dport;
	} else {
		v4_key(&k.remote, f->tuple.ipv4.saddr);
		v4_key(&k.local, f->tuple.ipv4.daddr);
		k.remote_port = f->tuple.ipv4.sport;
		k.local_port = f->tuple.ipv4.dport;
	}
	target.netns_cookie = p->netns_cookie;
	target.port = port;
	return bpf_map_update_elem(&steer, &k, &target, BPF_ANY) ? NO_LISTENER : ASSIGNED;
}

/* Hands a SYN to ztunnel's wildcard-bound listener on `port` (of the pod `p`). */
static __always_inline enum assign_result assign_to_listener(struct __sk_buff *skb, struct tcp_flow *f,
							     __u16 port, const struct pod_policy *p)
{
	struct bpf_sock_tuple listener = {};
	struct bpf_sock *sk;
	long err;

	if (flow_terminates_locally(skb, f))
		return KNOWN_CONNECTION;
	if (steering_with_sk_lookup())
		return steer_later(f, p, port);
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

/* ---- strict mode ---- */

/* A packet leaving the pod that ztunnel cannot carry (not TCP): with strict mode on for its pod,
 * dropped unless it is DNS, IPv6 neighbour discovery, or on the allow list. */
static __always_inline int strict_egress(struct __sk_buff *skb)
{
	struct strict_allow_key k = {};
	struct pod_policy *p;
	struct l4_info l;

	parse_l4(skb, &l);
	if (!l.is_ip || l.later_fragment || l.protocol == IPPROTO_TCP)
		return TC_ACT_UNSPEC;
	p = bpf_map_lookup_elem(&pod_policy, l.saddr);
	if (!p || !(p->flags & POD_F_STRICT))
		return TC_ACT_UNSPEC;
	if (l.protocol == IPPROTO_ICMPV6 && l.icmp6_type >= 133 && l.icmp6_type <= 137)
		return TC_ACT_UNSPEC; /* without neighbour discovery the pod has no IPv6 at all */
	if (l.protocol == IPPROTO_UDP && l.dport == bpf_htons(53))
		return TC_ACT_UNSPEC;
	k.protocol = l.protocol;
	k.port = l.dport;
	if (bpf_map_lookup_elem(&strict_allow, &k))
		return TC_ACT_UNSPEC;
	k.port = 0;
	if (bpf_map_lookup_elem(&strict_allow, &k))
		return TC_ACT_UNSPEC;
	count(p, CNT_STRICT_DROPPED);
	return TC_ACT_SHOT;
}

/* ---- programs ---- */

SEC("tc")
int pod_egress(struct __sk_buff *skb)
{
	bool marked = is_marked(skb, ZTUNNEL_MARK);
	bool forged = false;
	struct tcp_flow f;

	if (!parse_tcp(skb, &f))
		return marked && ztunnel_owns(skb) ? TC_ACT_UNSPEC : strict_egress(skb);
	if (is_probe_or_loopback(&f, false)) {
		if (f.bare_syn)
			count(policy_of(&f, true), CNT_BYPASS_PROBE);
		return TC_ACT_UNSPEC;
	}
	if (marked) {
		if (ztunnel_owns(skb)) {
			if (f.bare_syn)
				count(policy_of(&f, true), CNT_BYPASS_ZTUNNEL);
			return TC_ACT_UNSPEC;
		}
		forged = true;
	}
	/* A new connection: to ztunnel. (Connections to the pod's own addresses leave through lo,
	 * never through this interface.) */
	if (f.bare_syn) {
		if (forged)
			count(policy_of(&f, true), CNT_FORGED_MARK);
		return loop_to_ingress(skb);
	}
	/* Redirected outbound flows and the app's replies to ztunnel's spoofed connections; flows that
	 * existed before the pod was enrolled find no local socket and keep going out. */
	if (flow_terminates_locally(skb, &f))
		return loop_to_ingress(skb);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int pod_ingress(struct __sk_buff *skb)
{
	struct pod_policy *p;
	struct tcp_flow f;

	if (is_marked(skb, REDIRECT_MARK)) {
		/* Looped back by pod_egress: the destination MAC is the gateway's, so the stack would
		 * drop it as another host's packet. */
		bpf_skb_change_type(skb, PACKET_HOST);
		/* Without a listener the stack answers the SYN with a reset, as upstream's REDIRECT to a
		 * closed port does. */
		if (parse_tcp(skb, &f) && f.bare_syn) {
			p = policy_of(&f, true);
			enum assign_result r = assign_to_listener(skb, &f, ZTUNNEL_OUTBOUND_PORT, p);

			if (r != KNOWN_CONNECTION)
				count(p, r == ASSIGNED ? CNT_OUTBOUND_REDIRECTED : CNT_OUTBOUND_NO_ZTUNNEL);
		}
		return TC_ACT_OK;
	}
	if (is_marked(skb, ZTUNNEL_MARK) || !parse_tcp(skb, &f) || !f.bare_syn)
		return TC_ACT_UNSPEC;
	/* Like upstream's PREROUTING rule, any destination: only the pod's addresses arrive here. */
	p = policy_of(&f, false);
	if (flow_dport(&f) == bpf_htons(ZTUNNEL_HBONE_PORT)) {
		count(p, CNT_BYPASS_HBONE);
		return TC_ACT_UNSPEC;
	}
	if (is_probe_or_loopback(&f, true)) {
		count(p, CNT_BYPASS_PROBE);
		return TC_ACT_UNSPEC;
	}
	if (p && (p->flags & POD_F_BYPASS_INBOUND)) {
		count(p, CNT_BYPASS_INBOUND_ANNOTATION);
		return TC_ACT_UNSPEC;
	}
	switch (assign_to_listener(skb, &f, ZTUNNEL_INBOUND_PORT, p)) {
	case ASSIGNED:
		count(p, CNT_INBOUND_REDIRECTED);
		return TC_ACT_OK;
	case KNOWN_CONNECTION:
		return TC_ACT_UNSPEC;
	default:
		/* Fail closed: without ztunnel, inbound traffic must not reach the app unproxied. The
		 * client's SYN retries land once ztunnel listens. */
		count(p, CNT_INBOUND_NO_ZTUNNEL);
		return TC_ACT_SHOT;
	}
}

/* On an interface named by istio.io/reroute-virtual-interfaces (a VM's tap, a tunnel): TCP coming in
 * is outbound traffic of the workload behind it, so it goes to 15001 like the pod's own. The
 * REDIRECT_MARK routes it locally (the fwmark rule) instead of forwarding it. */
SEC("tc")
int pod_reroute_ingress(struct __sk_buff *skb)
{
	struct tcp_flow f;

	if (!parse_tcp(skb, &f) || is_probe_or_loopback(&f, false))
		return TC_ACT_UNSPEC;
	if (!f.bare_syn && !flow_terminates_locally(skb, &f))
		return TC_ACT_UNSPEC; /* a flow from before the pod was enrolled */
	skb->mark = (skb->mark & ~MARK_MASK) | REDIRECT_MARK;
	/* (With sk_lookup steering there is no pod to steer for: reroute needs Linux 6.6+.) */
	if (f.bare_syn && assign_to_listener(skb, &f, ZTUNNEL_OUTBOUND_PORT, NULL) == ASSIGNED)
		count(NULL, CNT_REROUTED); /* node-wide: the source is not a pod address */
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
