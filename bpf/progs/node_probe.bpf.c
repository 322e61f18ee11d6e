// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Kubelet probes, on the node's side of an ambient pod's veth (in the node's netns). Traffic a
 * process on the node itself opens to the pod is given the probe source address (169.254.7.127,
 * or fd16:9254:7127:1337:ffff:ffff:ffff:ffff), so that inside the pod it bypasses capture, as
 * upstream's host SNAT rule does; the pod's replies get the node's address back. Forwarded traffic
 * (other nodes, NodePort traffic masqueraded to the node's address) carries no local socket and is
 * left alone: the pod captures it like any other.
 *   node_to_pod (egress, toward the pod): locally opened TCP to an enrolled pod address -> SNAT.
 *   pod_to_node (ingress, from the pod): TCP to the probe address -> the node address it replaced.
 * The translations live in an LRU map keyed by the pod side of the flow. */
#include <stdbool.h>
#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ambient_shared.h"
#include "pod_policy_map.h"

extern POD_POLICY_MAP pod_policy SEC(".maps");

struct probe_flow {
	struct pod_ip pod;
	__be16 pod_port;
	__be16 node_port;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_PROBE_FLOWS);
	__type(key, struct probe_flow);
	__type(value, struct pod_ip); /* the node address the probe address replaced */
} probe_nat SEC(".maps");

struct l3 {
	bool ipv6;
	__u32 saddr_off, daddr_off, ip_csum_off, tcp_off;
	struct pod_ip saddr, daddr;
	__be16 sport, dport;
	bool syn;
};

static __always_inline bool parse(struct __sk_buff *skb, struct l3 *p)
{
	void *data, *end;
	struct ethhdr *eth;
	struct tcphdr *tcp;

	bpf_skb_pull_data(skb, sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + sizeof(struct tcphdr));
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > end)
		return false;
	__builtin_memset(p, 0, sizeof(*p));
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP || ip->ihl != 5 || (ip->frag_off & bpf_htons(0x1fff)))
			return false;
		tcp = (void *)(ip + 1);
		p->saddr.addr[10] = p->saddr.addr[11] = p->daddr.addr[10] = p->daddr.addr[11] = 0xff;
		__builtin_memcpy(&p->saddr.addr[12], &ip->saddr, 4);
		__builtin_memcpy(&p->daddr.addr[12], &ip->daddr, 4);
		p->saddr_off = ETH_HLEN + offsetof(struct iphdr, saddr);
		p->daddr_off = ETH_HLEN + offsetof(struct iphdr, daddr);
		p->ip_csum_off = ETH_HLEN + offsetof(struct iphdr, check);
		p->tcp_off = ETH_HLEN + sizeof(struct iphdr);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_TCP)
			return false;
		tcp = (void *)(ip6 + 1);
		__builtin_memcpy(p->saddr.addr, &ip6->saddr, 16);
		__builtin_memcpy(p->daddr.addr, &ip6->daddr, 16);
		p->ipv6 = true;
		p->saddr_off = ETH_HLEN + offsetof(struct ipv6hdr, saddr);
		p->daddr_off = ETH_HLEN + offsetof(struct ipv6hdr, daddr);
		p->tcp_off = ETH_HLEN + sizeof(struct ipv6hdr);
	} else {
		return false;
	}
	if ((void *)(tcp + 1) > end)
		return false;
	p->sport = tcp->source;
	p->dport = tcp->dest;
	p->syn = tcp->syn && !tcp->ack;
	return true;
}

static __always_inline bool same_address(const struct pod_ip *a, const struct pod_ip *b)
{
	const __u32 *x = (const __u32 *)a->addr, *y = (const __u32 *)b->addr;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline void probe_address(struct pod_ip *a, bool ipv6)
{
	__builtin_memset(a, 0, sizeof(*a));
	if (ipv6) {
		__be32 *w = (__be32 *)a->addr;

		w[0] = bpf_htonl(PROBE_ADDR_V6_W0);
		w[1] = bpf_htonl(PROBE_ADDR_V6_W1);
		w[2] = bpf_htonl(PROBE_ADDR_V6_W2);
		w[3] = bpf_htonl(PROBE_ADDR_V6_W3);
	} else {
		__be32 v4 = bpf_htonl(PROBE_ADDR_V4);

		a->addr[10] = a->addr[11] = 0xff;
		__builtin_memcpy(&a->addr[12], &v4, 4);
	}
}

/* Rewrites the address at `off` from `from` to `to`, with the IPv4 header and TCP checksums
 * (the TCP one through the pseudo header, which also works for CHECKSUM_PARTIAL packets). */
static __always_inline int rewrite(struct __sk_buff *skb, const struct l3 *p, __u32 off, const struct pod_ip *from,
				   const struct pod_ip *to)
{
	__u32 tcp_csum = p->tcp_off + offsetof(struct tcphdr, check);

	if (p->ipv6) {
		__s64 diff = bpf_csum_diff((__be32 *)from->addr, 16, (__be32 *)to->addr, 16, 0);

		if (diff < 0 || bpf_l4_csum_replace(skb, tcp_csum, 0, (__u32)diff, BPF_F_PSEUDO_HDR))
			return -1;
		return bpf_skb_store_bytes(skb, off, to->addr, 16, 0) ? -1 : 0;
	}
	__be32 old, new;

	__builtin_memcpy(&old, &from->addr[12], 4);
	__builtin_memcpy(&new, &to->addr[12], 4);
	if (bpf_l4_csum_replace(skb, tcp_csum, old, new, BPF_F_PSEUDO_HDR | sizeof(new)) ||
	    bpf_l3_csum_replace(skb, p->ip_csum_off, old, new, sizeof(new)))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, 4, 0) ? -1 : 0;
}

SEC("tc")
int node_to_pod(struct __sk_buff *skb)
{
	struct probe_flow key = {};
	struct pod_ip probe, *known;
	struct l3 p;

	/* Only what a process on this node opened: forwarded packets carry no socket. */
	if (!skb->sk || !parse(skb, &p) || !bpf_map_lookup_elem(&pod_policy, &p.daddr))
		return TC_ACT_UNSPEC;
	key.pod = p.daddr;
	key.pod_port = p.dport;
	key.node_port = p.sport;
	known = bpf_map_lookup_elem(&probe_nat, &key);
	if (known) {
		if (!same_address(known, &p.saddr))
			return TC_ACT_UNSPEC; /* another node address took this port pair: left as is */
	} else {
		if (!p.syn)
			return TC_ACT_UNSPEC; /* a connection from before the pod was enrolled */
		if (bpf_map_update_elem(&probe_nat, &key, &p.saddr, BPF_ANY))
			return TC_ACT_UNSPEC;
	}
	probe_address(&probe, p.ipv6);
	rewrite(skb, &p, p.saddr_off, &p.saddr, &probe);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int pod_to_node(struct __sk_buff *skb)
{
	struct probe_flow key = {};
	struct pod_ip probe, *node;
	struct l3 p;

	if (!parse(skb, &p))
		return TC_ACT_UNSPEC;
	probe_address(&probe, p.ipv6);
	if (!same_address(&p.daddr, &probe))
		return TC_ACT_UNSPEC;
	key.pod = p.saddr;
	key.pod_port = p.sport;
	key.node_port = p.dport;
	node = bpf_map_lookup_elem(&probe_nat, &key);
	if (!node)
		return TC_ACT_UNSPEC;
	rewrite(skb, &p, p.daddr_off, &probe, node);
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
