/* Packet parsing: Ethernet + IPv4/IPv6 + TCP into a socket-lookup tuple. */
#ifndef AMBIENT_PARSE_H
#define AMBIENT_PARSE_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct tcp_flow {
	struct bpf_sock_tuple tuple; /* as an incoming packet: saddr = peer, daddr = local */
	bool ipv6;
	bool bare_syn; /* SYN without ACK: the first packet of a new connection */
};

enum parse_result {
	PARSE_TCP = 0,
	PARSE_OTHER = 1, /* not TCP over IP, or a non-first fragment */
	PARSE_SHORT = 2, /* headers not in the linear area */
};

static __always_inline enum parse_result parse_headers(struct __sk_buff *skb, struct tcp_flow *f)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct tcphdr *tcp;

	if ((void *)(eth + 1) > end)
		return PARSE_SHORT;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end)
			return PARSE_SHORT;
		if (ip->protocol != IPPROTO_TCP || ip->ihl < 5 || (ip->frag_off & bpf_htons(0x1fff)))
			return PARSE_OTHER;
		tcp = (void *)ip + ip->ihl * 4;
		if ((void *)(tcp + 1) > end)
			return PARSE_SHORT;
		f->tuple.ipv4.saddr = ip->saddr;
		f->tuple.ipv4.daddr = ip->daddr;
		f->tuple.ipv4.sport = tcp->source;
		f->tuple.ipv4.dport = tcp->dest;
		f->ipv6 = false;
		f->bare_syn = tcp->syn && !tcp->ack;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return PARSE_SHORT;
		/* Extension headers are rare on pod traffic; such packets are left to the stack. */
		if (ip6->nexthdr != IPPROTO_TCP)
			return PARSE_OTHER;
		tcp = (void *)(ip6 + 1);
		if ((void *)(tcp + 1) > end)
			return PARSE_SHORT;
		__builtin_memcpy(f->tuple.ipv6.saddr, &ip6->saddr, 16);
		__builtin_memcpy(f->tuple.ipv6.daddr, &ip6->daddr, 16);
		f->tuple.ipv6.sport = tcp->source;
		f->tuple.ipv6.dport = tcp->dest;
		f->ipv6 = true;
		f->bare_syn = tcp->syn && !tcp->ack;
	} else {
		return PARSE_OTHER;
	}
	/* (bare_syn is read in each branch: the verifier loses the bounds of a merged pointer) */
	return PARSE_TCP;
}

/* Parses a TCP packet; pulls the headers into the linear area first when they are not there. */
static __always_inline bool parse_tcp(struct __sk_buff *skb, struct tcp_flow *f)
{
	enum parse_result r = parse_headers(skb, f);

	if (r == PARSE_SHORT) {
		if (bpf_skb_pull_data(skb, sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + sizeof(struct tcphdr) + 40))
			return false;
		r = parse_headers(skb, f);
	}
	return r == PARSE_TCP;
}

/* A constant per branch: the verifier needs the lookup size bounded. */
static __always_inline __u32 tuple_size(const struct tcp_flow *f)
{
	return f->ipv6 ? sizeof(f->tuple.ipv6) : sizeof(f->tuple.ipv4);
}

static __always_inline __be16 flow_dport(const struct tcp_flow *f)
{
	return f->ipv6 ? f->tuple.ipv6.dport : f->tuple.ipv4.dport;
}

/* What strict mode needs of a packet that is not TCP: protocol, destination port, source. */
struct l4_info {
	__u8 protocol;
	__u8 icmp6_type;
	bool is_ip;
	bool later_fragment; /* a non-first fragment: its first fragment was judged already */
	__be16 dport;
	__u8 saddr[16]; /* IPv4 as ::ffff:a.b.c.d */
};

static __always_inline void parse_l4(struct __sk_buff *skb, struct l4_info *l)
{
	void *data, *end;
	struct ethhdr *eth;
	void *l4;

	__builtin_memset(l, 0, sizeof(*l));
	if (bpf_skb_pull_data(skb, sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + 8) && skb->len > 0)
		bpf_skb_pull_data(skb, skb->len < 128 ? skb->len : 128);
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > end)
		return;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->ihl < 5)
			return;
		l->is_ip = true;
		l->protocol = ip->protocol;
		l->saddr[10] = l->saddr[11] = 0xff;
		__builtin_memcpy(&l->saddr[12], &ip->saddr, 4);
		if (ip->frag_off & bpf_htons(0x1fff)) {
			l->later_fragment = true;
			return;
		}
		l4 = (void *)ip + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return;
		l->is_ip = true;
		l->protocol = ip6->nexthdr;
		__builtin_memcpy(l->saddr, &ip6->saddr, 16);
		l4 = (void *)(ip6 + 1);
	} else {
		return;
	}
	if (l->protocol == IPPROTO_UDP || l->protocol == IPPROTO_TCP) {
		__be16 *ports = l4;

		if ((void *)(ports + 2) <= end)
			l->dport = ports[1];
	} else if (l->protocol == IPPROTO_ICMPV6) {
		__u8 *type = l4;

		if ((void *)(type + 1) <= end)
			l->icmp6_type = *type;
	}
}

#endif
