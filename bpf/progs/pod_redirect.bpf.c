// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* In-pod redirection to ztunnel, attached to every interface of the pod but lo (ingress and egress).
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
 * The capture guarantee: a packet that may carry TCP but cannot be classified here (a fragment, an
 * IPv6 routing header with segments left, a chain of extension headers too long to walk) is dropped
 * and counted, never passed; a SYN that meets a TIME_WAIT socket is a new connection and goes to
 * ztunnel; without a ztunnel listener a new connection is refused at once with a reset, in both
 * directions. Behind these programs the pod netns's sk_lookup program (listener_steering.bpf.c)
 * refuses any looped outbound connection that tc did not hand to ztunnel.
 *
 * ztunnel's own traffic (SO_MARK 0x539 on a socket of ztunnel's cgroup) is never touched; the mark
 * alone is not enough unless the node runs in mark-only mode. Each new connection is counted per
 * pod (pod_counters), found by the pod-side address of the packet (pod_policy), which also carries
 * the pod's options: bypass-inbound-capture and strict mode; where the kernel lets tc programs read
 * their netns's cookie, an entry counts only in the netns it was written for (policy_of_address).
 * Packets that are not ours continue to the next program (TC_ACT_UNSPEC, i.e. TCX_NEXT), so a
 * primary CNI's programs keep working. */
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_packet.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#include "ambient_shared.h"
#include "netns_cookie.h"
#include "parse.h"
#include "refuse.h"
#include "pod_policy_map.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PODS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pod_meta_key);
	__type(value, struct pod_meta);
} pod_meta SEC(".maps");

/* The pod's other interfaces and their addresses: user-space bookkeeping, like pod_meta. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PODS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pod_meta_key);
	__type(value, struct pod_ifaces);
} pod_ifaces SEC(".maps");

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

POD_COUNTERS_MAP pod_counters SEC(".maps");

/* The pod netns whose interfaces the egress guard knows, by cookie (egress_guard.bpf.c). Defined in
 * this, the first object linked: the linker resolves an extern map only to one defined before it. */
GATED_NETNS_MAP gated_netns SEC(".maps");

/* The interfaces with the pod's hooks, per pod slot (the socket lookup's and the egress guard's
 * check; here: which of them is not the pod's own). Defined here for the same reason. */
CAPTURED_IFACES_MAP captured_ifaces SEC(".maps");

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

/* Fragments of datagrams strict mode let out: the first fragment's verdict, for the later ones
 * (which carry no ports). Keyed by source, destination, protocol and fragment id. */
struct frag_key {
	struct pod_ip saddr, daddr;
	__be32 id;
	__u8 proto;
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_STRICT_FRAGMENTS);
	__type(key, struct frag_key);
	__type(value, __u8);
} strict_fragments SEC(".maps");

static __always_inline bool is_marked(const struct __sk_buff *skb, __u32 mark)
{
	return (skb->mark & MARK_MASK) == mark;
}

static __always_inline __u32 setting_flags(void)
{
	__u32 zero = 0;
	struct dp_settings *s = bpf_map_lookup_elem(&settings, &zero);

	return s ? s->flags : 0;
}

/* ---- per-pod policy and counters ---- */

/* Set by the loader (datapath.c, before the object is loaded) where tc programs can read the
 * cookie of the netns they run in (probed: the feature tcNetnsCookie); declared in netns_cookie.h. */
const volatile __u32 tc_netns_cookie = 0;

/* In a policy read through policy_of_address only, never in the map: the entry is another netns's. */
#define POD_F_FOREIGN (1u << 31)

/* The policy a pod_policy entry gives a packet of this netns (NULL: the address is no pod's).
 * An entry is written for one pod netns (its netns_cookie, which user space always sets with the
 * entry: 0 only where the kernel has no netns cookies, and then this check is off too). Another
 * pod may hold the same address on one of its interfaces (a second network whose range overlaps the
 * pod network's): in that pod's netns the entry is foreign, and so is one whose cookie is 0. A
 * foreign entry fails closed; it reads as `*foreign`, filled here:
 *   - slot 0: counted node-wide, never for the entry's pod;
 *   - no bypass-inbound-capture: an inbound SYN goes to this netns's ztunnel (15006), or is
 *     refused without a listener, like any other;
 *   - strict mode: what strict mode drops is dropped (only DNS, IPv6 neighbour discovery and the
 *     allow list leave), as this pod's own strictness cannot be told from the address;
 *   - the netns cookie of this netns, so that sk_lookup steering steers to this netns's ztunnel;
 *   - POD_F_FOREIGN, so that it is never taken for this pod's own address (the spoofed-source check).
 * Where tc cannot read the cookie (tc_netns_cookie 0) the entry is taken as is: user space says so
 * for each address of another pod's found on a pod's interface (datapath.c, foreign_addresses). */
static __always_inline struct pod_policy *policy_of_address(struct __sk_buff *skb, const struct pod_ip *a,
							    struct pod_policy *foreign)
{
	struct pod_policy *p = bpf_map_lookup_elem(&pod_policy, a);
	__u64 cookie;

	if (!p || !tc_netns_cookie)
		return p;
	cookie = this_netns_cookie(skb);
	if (p->netns_cookie && p->netns_cookie == cookie)
		return p;
	foreign->slot = 0;
	foreign->flags = POD_F_STRICT | POD_F_FOREIGN;
	foreign->netns_cookie = cookie;
	return foreign;
}

/* The policy of the pod that owns the pod-side address of a flow (NULL: not a pod's). */
static __always_inline struct pod_policy *policy_of(struct __sk_buff *skb, const struct tcp_flow *f,
						    bool local_is_source, struct pod_policy *foreign)
{
	return policy_of_address(skb, local_is_source ? &f->ip.saddr : &f->ip.daddr, foreign);
}

/* Are both this netns's pod's own entries, of the same pod? (Two foreign ones are not.) */
static __always_inline bool same_pod(const struct pod_policy *a, const struct pod_policy *b)
{
	return a->slot == b->slot && !(a->flags & POD_F_FOREIGN) && !(b->flags & POD_F_FOREIGN);
}

static __always_inline void count(const struct pod_policy *p, enum pod_counter c)
{
	__u32 slot = p ? p->slot : 0;
	struct pod_counters *v = bpf_map_lookup_elem(&pod_counters, &slot);

	if (v && c < CNT_COUNT)
		v->value[c]++;
}

/* Counts for the pod whose netns this is where that is known (gated_netns: the egress guard's pods),
 * else for the pod that holds address `a`: a hand-made packet's source may be anybody's. */
static __always_inline void count_in_netns(struct __sk_buff *skb, const struct pod_ip *a, enum pod_counter c)
{
	struct pod_policy foreign, in_netns = {};
	__u64 cookie;
	__u32 *slot;

	if (tc_netns_cookie) {
		cookie = this_netns_cookie(skb);
		slot = bpf_map_lookup_elem(&gated_netns, &cookie);
		if (slot) {
			in_netns.slot = *slot;
			count(&in_netns, c);
			return;
		}
	}
	count(policy_of_address(skb, a, &foreign), c);
}

/* ---- ztunnel's own traffic ---- */

/* Is this ztunnel-marked packet really ztunnel's? By default only sockets of ztunnel's cgroups count
 * (and packets with no full socket: time-wait acks, the kernel's replies): an app with NET_ADMIN that
 * sets SO_MARK 0x539 is still redirected. The root cgroup is trusted only when ztunnel runs in it,
 * which on a node whose pods do not use cgroup v2 makes this upstream's mark-only rule (the agent
 * says so). The kernel's reply sockets need no trust: they never open connections. */
static __always_inline bool ztunnel_owns(struct __sk_buff *skb)
{
	__u64 cgroup;

	if (setting_flags() & SETTING_MARK_ONLY_EXEMPTION)
		return true;
	cgroup = bpf_skb_cgroup_id(skb);
	if (cgroup == 0)
		return true;
	return bpf_map_lookup_elem(&ztunnel_cgroups, &cgroup) != NULL;
}

/* Was this packet built by hand: by a raw IP socket or a packet socket (AF_PACKET, which no cgroup
 * hook sees)? ztunnel builds none; the stack's own connections never are. */
#define HAND_MADE_SOCK_RAW 3 /* SOCK_RAW */
#define HAND_MADE_AF_PACKET 17 /* AF_PACKET */
static __always_inline bool hand_made(const struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;

	if (!sk)
		return false;
	sk = bpf_sk_fullsock(sk);
	return sk && (sk->type == HAND_MADE_SOCK_RAW || sk->family == HAND_MADE_AF_PACKET);
}

/* Is this a segment as the kernel sends it from a raw control socket of its own (IPv4 resets for no
 * socket; before Linux 6.13 also the ACKs of TIME_WAIT and SYN_RECV), which hand_made cannot tell
 * from an app's: a reset or a bare ACK, without data, urgent pointer or IP options, with no more
 * TCP options than timestamps or a signature take? It opens and carries nothing; what its
 * header fields could still say (sequence, window) is less than strict mode lets out as DNS. */
static __always_inline bool inert(const struct tcp_flow *f)
{
	return !f->data && !f->syn && !f->fin && !f->urg && f->ip.plain && f->doff <= 10 &&
	       (f->rst || f->ack);
}

/* Is this marked packet ztunnel's own? As ztunnel_owns says; a hand-made one only by its socket's
 * cgroup, never by the mark alone: with the mark-only rule any process with NET_RAW can set the
 * mark (SO_MARK, or per packet in a control message), and ztunnel makes no packet by hand. */
static __always_inline bool from_ztunnel(struct __sk_buff *skb, bool marked)
{
	__u64 cgroup;

	if (!marked)
		return false;
	if (!hand_made(skb))
		return ztunnel_owns(skb);
	cgroup = bpf_skb_cgroup_id(skb);
	return cgroup && bpf_map_lookup_elem(&ztunnel_cgroups, &cgroup);
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

/* The state of the local socket this packet (seen as incoming) belongs to; -1: none. A listener is
 * returned for a packet that only a listener would take. */
static __always_inline int local_socket_state(struct __sk_buff *skb, struct tcp_flow *f)
{
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &f->tuple, tuple_size(f), BPF_F_CURRENT_NETNS, 0);
	int state;

	if (!sk)
		return -1;
	state = (int)sk->state;
	bpf_sk_release(sk);
	return state;
}

/* Is there a local connection for this packet (seen as incoming)? Then the flow ends on this host
 * even though its destination is not a local address: ztunnel's accepted outbound socket, or
 * ztunnel's spoofed-source connection to the app. */
static __always_inline bool flow_terminates_locally(struct __sk_buff *skb, struct tcp_flow *f)
{
	int state = local_socket_state(skb, f);

	return state >= 0 && state != BPF_TCP_LISTEN;
}

enum assign_result {
	ASSIGNED, /* to ztunnel's listener (or, with sk_lookup steering, left to the sk_lookup program) */
	KNOWN_CONNECTION, /* e.g. a retransmitted SYN: the stack's own lookup finds its socket */
	NO_LISTENER,
};

/* sk_lookup steering: records the decision for the pod netns's sk_lookup program
 * (listener_steering.bpf.c), which assigns the SYN to ztunnel's listener when the stack looks up
 * its socket. */
static __always_inline enum assign_result steer_later(const struct tcp_flow *f, const struct pod_policy *p,
						      __u16 port)
{
	struct listener_key target = {};
	struct steer_key k = {};

	if (!p || !p->netns_cookie)
		return NO_LISTENER;
	k.remote = f->ip.saddr;
	k.local = f->ip.daddr;
	k.remote_port = flow_sport(f);
	k.local_port = flow_dport(f);
	target.netns_cookie = p->netns_cookie;
	target.port = port;
	return bpf_map_update_elem(&steer, &k, &target, BPF_ANY) ? NO_LISTENER : ASSIGNED;
}

/* Hands a new connection (a bare SYN) to ztunnel's wildcard-bound listener on `port` (of pod `p`).
 * A SYN that meets a TIME_WAIT socket starts a new connection: it goes to ztunnel too (the stack
 * would otherwise hand it to whichever listener owns the port, the app's). It is always left to
 * the sk_lookup program: the stack's TIME_WAIT path ends that socket and then looks up a listener,
 * while a SYN assigned here would be dropped, as its request could not be hashed beside the
 * TIME_WAIT socket of the same tuple. */
static __always_inline enum assign_result assign_to_listener(struct __sk_buff *skb, struct tcp_flow *f,
							     __u16 port, const struct pod_policy *p)
{
	struct bpf_sock_tuple listener = {};
	struct bpf_sock *sk;
	int state;
	long err;

	state = local_socket_state(skb, f);
	if (state >= 0 && state != BPF_TCP_LISTEN && state != BPF_TCP_TIME_WAIT)
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
	if ((setting_flags() & SETTING_SK_LOOKUP_STEERING) || state == BPF_TCP_TIME_WAIT) {
		bpf_sk_release(sk); /* before 6.6 tc cannot assign ztunnel's SO_REUSEPORT listeners */
		return steer_later(f, p, port);
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

/* A packet that may carry TCP and cannot be classified: dropped, never passed. */
static __always_inline int drop_unclassified(const struct pod_policy *p)
{
	count(p, CNT_UNCLASSIFIED_DROPPED);
	return TC_ACT_SHOT;
}

/* ---- strict mode ---- */

static __always_inline bool link_local_or_multicast_v6(const struct pod_ip *a)
{
	return a->addr[0] == 0xff || (a->addr[0] == 0xfe && (a->addr[1] & 0xc0) == 0x80);
}

/* Is the destination in the source's /64? On-link neighbours are (the FIB cannot say: bpf_fib_lookup
 * refuses to answer in a netns that does not forward). Further than that a router would carry it. */
static __always_inline bool same_prefix64(const struct ip_info *ip)
{
	const __u32 *s = (const __u32 *)ip->saddr.addr, *d = (const __u32 *)ip->daddr.addr;

	return s[0] == d[0] && s[1] == d[1];
}

/* Is this non-TCP packet one strict mode lets out? Later fragments follow their first fragment. */
static __always_inline bool strict_allows(struct __sk_buff *skb, const struct ip_info *ip,
					  const struct pod_policy *p)
{
	struct strict_allow_key k = {};
	struct frag_key fk = {};
	__u8 yes = 1;
	bool allowed = false;

	fk.saddr = ip->saddr;
	fk.daddr = ip->daddr;
	fk.id = ip->frag_id;
	fk.proto = ip->proto;
	if (ip->later_fragment)
		return bpf_map_lookup_elem(&strict_fragments, &fk) != NULL;
	if (ip->unwalkable)
		return false;
	k.protocol = ip->proto;
	k.port = l4_dport(skb, ip);
	if (ip->proto == IPPROTO_ICMPV6) {
		__u8 type = icmp6_type(skb, ip);

		/* Neighbour discovery (without it the pod has no IPv6 at all): link-scoped by RFC 4861
		 * (hop limit 255), and only to a link-local or multicast address or a neighbour in the
		 * pod's own /64, so that no router carries it (or data in its options) off the pod network. */
		allowed = type >= 133 && type <= 137 && ip->hop_limit == 255 &&
			  (link_local_or_multicast_v6(&ip->daddr) || same_prefix64(ip));
	} else if (ip->proto == IPPROTO_UDP && k.port == bpf_htons(53)) {
		/* DNS, unless the pod's DNS is captured at the socket: then the app's own never leaves as
		 * is, and a UDP/53 packet is a hand-made one (ztunnel's own passed before this). */
		allowed = !(p->flags & POD_F_DNS_CAPTURED);
	}
	if (!allowed)
		allowed = bpf_map_lookup_elem(&strict_allow, &k) != NULL;
	if (!allowed) {
		k.port = 0;
		allowed = bpf_map_lookup_elem(&strict_allow, &k) != NULL;
	}
	if (allowed && ip->first_fragment)
		bpf_map_update_elem(&strict_fragments, &fk, &yes, BPF_ANY);
	return allowed;
}

/* A packet leaving the pod that ztunnel cannot carry (not TCP): with strict mode on for its pod,
 * dropped unless it is allowed (DNS, IPv6 neighbour discovery, the allow list). */
static __always_inline int strict_egress(struct __sk_buff *skb, const struct ip_info *ip)
{
	struct pod_policy foreign, *p;

	if (!ip->is_ip)
		return TC_ACT_UNSPEC;
	p = policy_of_address(skb, &ip->saddr, &foreign);
	if (!p || !(p->flags & POD_F_STRICT) || strict_allows(skb, ip, p))
		return TC_ACT_UNSPEC;
	count(p, CNT_STRICT_DROPPED);
	return TC_ACT_SHOT;
}

/* ---- programs ---- */

/* pod_egress, with the IP header at `l3_off`: L2_ETHERNET, or L2_NONE on a device without a link
 * header (tun, wireguard). */
static __always_inline int egress_at(struct __sk_buff *skb, __u32 l3_off)
{
	bool marked = is_marked(skb, ZTUNNEL_MARK);
	struct pod_policy foreign;
	bool forged = false;
	struct tcp_flow f;

	switch (parse_tcp_at(skb, l3_off, &f)) {
	case PKT_TCP:
		break;
	case PKT_OTHER:
		return from_ztunnel(skb, marked) ? TC_ACT_UNSPEC : strict_egress(skb, &f.ip);
	default:
		return from_ztunnel(skb, marked)
			       ? TC_ACT_UNSPEC
			       : drop_unclassified(policy_of_address(skb, &f.ip.saddr, &foreign));
	}
	/* Hand-made TCP is no connection of the stack's: but for a new connection's bare SYN, which
	 * goes to ztunnel like any other (below), and segments that carry nothing, it is dropped,
	 * whatever its destination (a user-space TCP answering an inbound SYN that ztunnel was given,
	 * or speaking from an address the pod does not hold, would be past ztunnel). */
	if (hand_made(skb) && !f.bare_syn && !inert(&f) && !from_ztunnel(skb, marked)) {
		count_in_netns(skb, &f.ip.saddr, CNT_UNCAPTURED_DROPPED);
		return TC_ACT_SHOT;
	}
	if (is_probe_or_loopback(&f, false)) {
		if (f.bare_syn)
			count(policy_of(skb, &f, true, &foreign), CNT_BYPASS_PROBE);
		return TC_ACT_UNSPEC;
	}
	if (marked) {
		if (from_ztunnel(skb, true)) {
			if (f.bare_syn)
				count(policy_of(skb, &f, true, &foreign), CNT_BYPASS_ZTUNNEL);
			return TC_ACT_UNSPEC;
		}
		forged = true;
	}
	/* A new connection: to ztunnel. (Connections to the pod's own addresses leave through lo,
	 * never through this interface.) */
	if (f.bare_syn) {
		if (forged)
			count(policy_of(skb, &f, true, &foreign), CNT_FORGED_MARK);
		return loop_to_ingress(skb);
	}
	/* Redirected outbound flows and the app's replies to ztunnel's spoofed connections; flows that
	 * existed before the pod was enrolled find no local socket and keep going out. */
	if (flow_terminates_locally(skb, &f))
		return loop_to_ingress(skb);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int pod_egress(struct __sk_buff *skb)
{
	return egress_at(skb, L2_ETHERNET);
}

SEC("tc")
int pod_egress_l3(struct __sk_buff *skb)
{
	return egress_at(skb, L2_NONE);
}

/* A looped outbound packet (REDIRECT_MARK, from pod_egress): a new connection goes to ztunnel's
 * 15001, or is refused at once when ztunnel does not listen. */
static __always_inline int looped_ingress(struct __sk_buff *skb, __u32 l3_off)
{
	struct pod_policy foreign, *p;
	struct tcp_flow f;

	/* The destination MAC is the gateway's, so the stack would drop it as another host's packet. */
	bpf_skb_change_type(skb, PACKET_HOST);
	if (parse_tcp_at(skb, l3_off, &f) != PKT_TCP)
		return drop_unclassified(
			policy_of_address(skb, &f.ip.saddr, &foreign)); /* pod_egress loops TCP only */
	if (!f.bare_syn)
		return TC_ACT_OK;
	p = policy_of(skb, &f, true, &foreign);
	switch (assign_to_listener(skb, &f, ZTUNNEL_OUTBOUND_PORT, p)) {
	case ASSIGNED:
		count(p, CNT_OUTBOUND_REDIRECTED);
		return TC_ACT_OK;
	case KNOWN_CONNECTION:
		return TC_ACT_OK;
	default:
		/* Delivered to the app's socket as the remote's reset (its destination is the pod). */
		count(p, CNT_OUTBOUND_NO_ZTUNNEL);
		if (syn_to_reset(skb, &f, false))
			return TC_ACT_SHOT;
		skb->mark &= ~MARK_MASK;
		return TC_ACT_OK;
	}
}

/* Can a kubelet probe arrive on this interface? Only on the pod's own veth, whose node side rewrites
 * the probe's source to the probe address: never on a device without a link header, nor on one the
 * pod's captured_ifaces entries mark as another of its interfaces. (A pod whose entries are not
 * written, attached by an older release, keeps the exemption until its next pass writes them.) */
static __always_inline bool probes_arrive_here(struct __sk_buff *skb, const struct pod_policy *p,
					       __u32 l3_off)
{
	struct captured_key k = {};
	__u64 *v;

	if (l3_off != L2_ETHERNET)
		return false;
	if (!p)
		return true;
	k.slot = p->slot;
	k.ifindex = skb->ifindex;
	v = bpf_map_lookup_elem(&captured_ifaces, &k);
	return !v || !(*v & CAPTURED_SECONDARY);
}

static __always_inline int ingress_at(struct __sk_buff *skb, __u32 l3_off)
{
	struct pod_policy foreign_from, foreign, *p, *from;
	struct tcp_flow f;

	if (is_marked(skb, REDIRECT_MARK))
		return looped_ingress(skb, l3_off);
	switch (parse_tcp_at(skb, l3_off, &f)) {
	case PKT_TCP:
		break;
	case PKT_OTHER:
		return TC_ACT_UNSPEC;
	default:
		return drop_unclassified(policy_of_address(skb, &f.ip.daddr, &foreign));
	}
	/* The pod's own address as the source of a packet from outside: the pod accepts local sources
	 * on this interface only for what pod_egress looped (accept_local), never for anyone else. */
	from = policy_of_address(skb, &f.ip.saddr, &foreign_from);
	p = from ? policy_of(skb, &f, false, &foreign) : NULL;
	if (from && p && same_pod(from, p)) {
		count(p, CNT_SPOOFED_DROPPED);
		return TC_ACT_SHOT;
	}
	if (!from)
		p = NULL; /* looked up below, for new connections only */
	if (is_marked(skb, ZTUNNEL_MARK) || !f.bare_syn)
		return TC_ACT_UNSPEC;
	/* Like upstream's PREROUTING rule, any destination: only the pod's addresses arrive here. */
	if (!p)
		p = policy_of(skb, &f, false, &foreign);
	if (flow_dport(&f) == bpf_htons(ZTUNNEL_HBONE_PORT)) {
		count(p, CNT_BYPASS_HBONE);
		return TC_ACT_UNSPEC;
	}
	if (is_probe_or_loopback(&f, true) && probes_arrive_here(skb, p, l3_off)) {
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
		 * client is refused at once, as by a closed port, and retries once ztunnel listens. */
		count(p, CNT_INBOUND_NO_ZTUNNEL);
		if (syn_to_reset(skb, &f, true))
			return TC_ACT_SHOT;
		return bpf_redirect(skb->ifindex, 0);
	}
}

SEC("tc")
int pod_ingress(struct __sk_buff *skb)
{
	return ingress_at(skb, L2_ETHERNET);
}

SEC("tc")
int pod_ingress_l3(struct __sk_buff *skb)
{
	return ingress_at(skb, L2_NONE);
}

/* On an interface named by istio.io/reroute-virtual-interfaces (a VM's tap, a tunnel): TCP coming in
 * is outbound traffic of the workload behind it, so it goes to 15001 like the pod's own. The
 * REDIRECT_MARK routes it locally (the fwmark rule) instead of forwarding it. `l3_off` is where the
 * IP header starts: tap devices carry Ethernet, tun and wireguard devices do not. */
static __always_inline int reroute_ingress(struct __sk_buff *skb, __u32 l3_off)
{
	struct tcp_flow f;

	switch (parse_tcp_at(skb, l3_off, &f)) {
	case PKT_TCP:
		break;
	case PKT_OTHER:
		return TC_ACT_UNSPEC;
	default:
		return drop_unclassified(NULL);
	}
	if (is_probe_or_loopback(&f, false))
		return TC_ACT_UNSPEC;
	if (!f.bare_syn && !flow_terminates_locally(skb, &f))
		return TC_ACT_UNSPEC; /* a flow from before the pod was enrolled */
	skb->mark = (skb->mark & ~MARK_MASK) | REDIRECT_MARK;
	/* (With sk_lookup steering there is no pod to steer for: reroute needs Linux 6.6+.) */
	if (f.bare_syn) {
		switch (assign_to_listener(skb, &f, ZTUNNEL_OUTBOUND_PORT, NULL)) {
		case ASSIGNED:
			count(NULL, CNT_REROUTED); /* node-wide: the source is not a pod address */
			break;
		case NO_LISTENER:
			return TC_ACT_SHOT; /* never forwarded past ztunnel */
		default:
			break;
		}
	}
	return TC_ACT_OK;
}

SEC("tc")
int pod_reroute_ingress(struct __sk_buff *skb)
{
	return reroute_ingress(skb, L2_ETHERNET);
}

SEC("tc")
int pod_reroute_ingress_l3(struct __sk_buff *skb)
{
	return reroute_ingress(skb, L2_NONE);
}

/* On an interface of the pod without pod_egress (a reroute-virtual-interfaces one, hooked at ingress
 * only; one an update could not capture: a tun or wireguard device, one past the interface limit):
 * hand-made frames that may carry TCP are dropped, but for segments that carry nothing (inert: the
 * kernel's own resets are hand-made too). A user-space TCP on a packet socket (NET_RAW, a
 * default capability) has to send to open or answer any connection, so this closes it both ways.
 * The pod's kernel sockets are the egress guard's (egress_guard.bpf.c, on its cgroup); ztunnel's
 * traffic (as pod_egress knows it), forwarded packets and the kernel's own segments are not
 * touched. (On a device without a link header, a frame that is not IP by skb->protocol may carry
 * TCP: parse_ip.) */
static __always_inline int guard_egress(struct __sk_buff *skb, __u32 l3_off)
{
	struct tcp_flow f;

	if (!hand_made(skb) || from_ztunnel(skb, is_marked(skb, ZTUNNEL_MARK)))
		return TC_ACT_UNSPEC;
	switch (parse_tcp_at(skb, l3_off, &f)) {
	case PKT_TCP:
		if (inert(&f))
			return TC_ACT_UNSPEC;
		break;
	case PKT_OTHER:
		return TC_ACT_UNSPEC;
	default:
		break;
	}
	count_in_netns(skb, &f.ip.saddr, CNT_UNCAPTURED_DROPPED);
	return TC_ACT_SHOT;
}

SEC("tc")
int pod_guard_egress(struct __sk_buff *skb)
{
	return guard_egress(skb, L2_ETHERNET);
}

SEC("tc")
int pod_guard_egress_l3(struct __sk_buff *skb)
{
	return guard_egress(skb, L2_NONE);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
