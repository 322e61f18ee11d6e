// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Kubelet probes, on the node's side of an ambient pod's veth (in the node's netns). Traffic a
 * process on the node itself opens to the pod is given the probe source address (169.254.7.127,
 * or fd16:9254:7127:1337:ffff:ffff:ffff:ffff), so that inside the pod it bypasses capture, as
 * upstream's host SNAT rule does; the pod's replies get the node's address back. Forwarded traffic
 * (other nodes, NodePort traffic masqueraded to the node's address) carries no local socket and was
 * received on an interface: it is left alone, and the pod captures it like any other.
 *   node_to_pod (egress, toward the pod): locally opened TCP to an enrolled pod address -> SNAT.
 *   pod_to_node (ingress, from the pod): TCP to the probe address -> the node address it replaced.
 * The translations live in an LRU map keyed by the pod side of the flow. */
#include <stdbool.h>
#include <stddef.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ambient_shared.h"
#include "parse.h"
#include "pod_policy_map.h"

extern POD_POLICY_MAP pod_policy SEC(".maps");

struct probe_flow {
	struct pod_ip pod;
	__be16 pod_port;
	__be16 node_port;
};

#define CLOSING_NODE_FIN 1
#define CLOSING_POD_FIN 2

struct probe_translation {
	struct pod_ip node; /* the node address the probe address replaced */
	__u32 closing; /* CLOSING_*: which sides sent their FIN */
	__u32 pad;
};

/* Entries leave when their connection ends (a reset, or the last ACK after both FINs), so that a
 * churn of short probes never evicts a live long connection from the LRU. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_PROBE_FLOWS);
	__type(key, struct probe_flow);
	__type(value, struct probe_translation);
} probe_nat SEC(".maps");

/* Where a flow's addresses and checksums are in the packet. */
struct rewrite_at {
	__u32 saddr, daddr, ip_csum, tcp_csum;
};

static __always_inline void offsets(const struct tcp_flow *f, struct rewrite_at *at)
{
	__u32 l3 = f->ip.l3_off;

	at->saddr = l3 + (f->ipv6 ? offsetof(struct ipv6hdr, saddr) : offsetof(struct iphdr, saddr));
	at->daddr = l3 + (f->ipv6 ? offsetof(struct ipv6hdr, daddr) : offsetof(struct iphdr, daddr));
	at->ip_csum = l3 + offsetof(struct iphdr, check);
	at->tcp_csum = f->ip.l4_off + offsetof(struct tcphdr, check);
}

/* Rewrites the address at `off` from `from` to `to`, with the IPv4 header and TCP checksums
 * (the TCP one through the pseudo header, which also works for CHECKSUM_PARTIAL packets). */
static __always_inline int rewrite(struct __sk_buff *skb, const struct tcp_flow *f, bool source,
				   const struct pod_ip *from, const struct pod_ip *to)
{
	struct rewrite_at at;
	__u32 off, tcp_csum;

	offsets(f, &at);
	off = source ? at.saddr : at.daddr;
	tcp_csum = at.tcp_csum;
	if (f->ipv6) {
		__s64 diff = bpf_csum_diff((__be32 *)from->addr, 16, (__be32 *)to->addr, 16, 0);

		if (diff < 0 || bpf_l4_csum_replace(skb, tcp_csum, 0, (__u32)diff, BPF_F_PSEUDO_HDR))
			return -1;
		return bpf_skb_store_bytes(skb, off, to->addr, 16, 0) ? -1 : 0;
	}
	__be32 old = v4_of(from), new = v4_of(to);

	if (bpf_l4_csum_replace(skb, tcp_csum, old, new, BPF_F_PSEUDO_HDR | sizeof(new)) ||
	    bpf_l3_csum_replace(skb, at.ip_csum, old, new, sizeof(new)))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, 4, 0) ? -1 : 0;
}

/* Ends a translation with its connection: after a reset, or on the last ACK once both sides sent FIN. */
static __always_inline void track_close(const struct tcp_flow *f, struct probe_flow *key,
					struct probe_translation *t, __u32 fin_bit)
{
	if (f->rst || (t->closing == (CLOSING_NODE_FIN | CLOSING_POD_FIN) && f->ack && !f->fin))
		bpf_map_delete_elem(&probe_nat, key);
	else if (f->fin)
		t->closing |= fin_bit; /* a lost race leaves the entry to the LRU, as before */
}

/* A segment the node's TIME_WAIT socket sends (its last ACK, or a reset): on Linux 6.1 (not 6.18) an
 * IPv6 one leaves without a socket (tcp_v6_send_response), so the flow's last ACK would go
 * untranslated and its translation never end. Only one the node made itself (received on no
 * interface: forwarded packets, spoofed ones included, were), for a translation that exists, and
 * only a bare ACK or RST: no SYN, no FIN, no data. */
static __always_inline bool timewait_control(struct __sk_buff *skb, const struct tcp_flow *f)
{
	struct tcphdr th;

	if (skb->ingress_ifindex || bpf_skb_load_bytes(skb, f->ip.l4_off, &th, sizeof(th)))
		return false;
	return !th.syn && !th.fin && (th.ack || th.rst) && skb->len == f->ip.l4_off + th.doff * 4u;
}

SEC("tc")
int node_to_pod(struct __sk_buff *skb)
{
	struct probe_translation fresh = {}, *t;
	struct probe_flow key = {};
	struct pod_ip probe;
	struct tcp_flow f;

	if (parse_tcp(skb, &f) != PKT_TCP || !bpf_map_lookup_elem(&pod_policy, &f.ip.daddr))
		return TC_ACT_UNSPEC;
	key.pod = f.ip.daddr;
	key.pod_port = flow_dport(&f);
	key.node_port = flow_sport(&f);
	t = bpf_map_lookup_elem(&probe_nat, &key);
	/* Only what a process on this node opened: forwarded packets carry no socket. */
	if (!skb->sk && !(t && timewait_control(skb, &f)))
		return TC_ACT_UNSPEC;
	if (t) {
		if (!same_address(&t->node, &f.ip.saddr))
			return TC_ACT_UNSPEC; /* another node address took this port pair: left as is */
	} else {
		if (!f.bare_syn)
			return TC_ACT_UNSPEC; /* a connection from before the pod was enrolled */
		fresh.node = f.ip.saddr;
		if (bpf_map_update_elem(&probe_nat, &key, &fresh, BPF_ANY))
			return TC_ACT_UNSPEC;
		t = bpf_map_lookup_elem(&probe_nat, &key);
		if (!t)
			return TC_ACT_UNSPEC;
	}
	set_probe_address(&probe, f.ipv6);
	rewrite(skb, &f, true, &f.ip.saddr, &probe);
	track_close(&f, &key, t, CLOSING_NODE_FIN);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int pod_to_node(struct __sk_buff *skb)
{
	struct probe_translation *t;
	struct probe_flow key = {};
	struct pod_ip probe, node;
	struct tcp_flow f;

	if (parse_tcp(skb, &f) != PKT_TCP)
		return TC_ACT_UNSPEC;
	set_probe_address(&probe, f.ipv6);
	if (!same_address(&f.ip.daddr, &probe))
		return TC_ACT_UNSPEC;
	key.pod = f.ip.saddr;
	key.pod_port = flow_sport(&f);
	key.node_port = flow_dport(&f);
	t = bpf_map_lookup_elem(&probe_nat, &key);
	if (!t)
		return TC_ACT_UNSPEC;
	node = t->node;
	rewrite(skb, &f, false, &probe, &node);
	track_close(&f, &key, t, CLOSING_POD_FIN);
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
