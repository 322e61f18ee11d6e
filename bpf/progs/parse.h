/* Packet parsing: Ethernet + IPv4/IPv6 + TCP into a socket-lookup tuple. */
#ifndef AMBIENT_PARSE_H
#define AMBIENT_PARSE_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
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

#endif
