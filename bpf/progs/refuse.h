/* Refusing a connection at once, as a closed port would: the SYN is turned, in place, into the
 * RST|ACK its sender expects, so a connect() fails with ECONNREFUSED instead of retrying its SYN for
 * minutes. Upstream's REDIRECT to a port nobody listens on behaves the same. */
#ifndef AMBIENT_REFUSE_H
#define AMBIENT_REFUSE_H

#include "parse.h"

static __always_inline __u16 csum_fold(__s64 sum)
{
	__u32 c = (__u32)sum;

	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return (__u16)~c;
}

struct pseudo_v4 {
	__be32 saddr, daddr;
	__u8 zero, proto;
	__be16 len;
};

struct pseudo_v6 {
	__u8 saddr[16], daddr[16];
	__be32 len;
	__u8 zero[3], nexthdr;
};

/* The RST's TCP header and checksum: from the SYN's destination back to its source. */
static __always_inline int write_reset_tcp(struct __sk_buff *skb, const struct tcp_flow *f)
{
	struct tcphdr th = {};
	__s64 sum;

	th.source = flow_dport(f);
	th.dest = flow_sport(f);
	th.ack_seq = bpf_htonl(bpf_ntohl(f->seq) + 1); /* acknowledges the SYN: acceptable in SYN-SENT */
	th.doff = 5;
	th.rst = 1;
	th.ack = 1;
	if (f->ipv6) {
		struct pseudo_v6 ph = {};

		__builtin_memcpy(ph.saddr, f->ip.daddr.addr, 16);
		__builtin_memcpy(ph.daddr, f->ip.saddr.addr, 16);
		ph.len = bpf_htonl(sizeof(th));
		ph.nexthdr = IPPROTO_TCP;
		sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	} else {
		struct pseudo_v4 ph = {};

		ph.saddr = f->tuple.ipv4.daddr;
		ph.daddr = f->tuple.ipv4.saddr;
		ph.proto = IPPROTO_TCP;
		ph.len = bpf_htons(sizeof(th));
		sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	}
	if (sum < 0)
		return -1;
	sum = bpf_csum_diff(0, 0, (__be32 *)&th, sizeof(th), (__u32)sum);
	if (sum < 0)
		return -1;
	th.check = csum_fold(sum);
	return bpf_skb_store_bytes(skb, f->ip.l4_off, &th, sizeof(th), BPF_F_RECOMPUTE_CSUM) ? -1 : 0;
}

/* The IP header with source and destination swapped, sized for a bare TCP header. */
static __always_inline int write_reset_ip(struct __sk_buff *skb, const struct tcp_flow *f)
{
	__u32 l3 = f->ip.l3_off;

	if (f->ipv6) {
		struct ipv6hdr h;

		if (bpf_skb_load_bytes(skb, l3, &h, sizeof(h)))
			return -1;
		__builtin_memcpy(&h.saddr, f->ip.daddr.addr, 16);
		__builtin_memcpy(&h.daddr, f->ip.saddr.addr, 16);
		h.payload_len = bpf_htons(sizeof(struct tcphdr));
		h.hop_limit = 64;
		return bpf_skb_store_bytes(skb, l3, &h, sizeof(h), BPF_F_RECOMPUTE_CSUM) ? -1 : 0;
	}
	struct iphdr h;
	__s64 sum;

	if (bpf_skb_load_bytes(skb, l3, &h, sizeof(h)))
		return -1;
	h.saddr = f->tuple.ipv4.daddr;
	h.daddr = f->tuple.ipv4.saddr;
	h.tot_len = bpf_htons(sizeof(struct iphdr) + sizeof(struct tcphdr));
	h.id = 0;
	h.frag_off = bpf_htons(0x4000); /* DF */
	h.ttl = 64;
	h.check = 0;
	sum = bpf_csum_diff(0, 0, (__be32 *)&h, sizeof(h), 0);
	if (sum < 0)
		return -1;
	h.check = csum_fold(sum);
	return bpf_skb_store_bytes(skb, l3, &h, sizeof(h), BPF_F_RECOMPUTE_CSUM) ? -1 : 0;
}

/* Turns the SYN `f` into the reset its sender gets from a closed port. With `swap_mac` the
 * Ethernet addresses are swapped too (on a device that has them), for a reset sent back out of the
 * interface the SYN came in on. Only plain headers (no IPv4 options or IPv6 extension headers); -1
 * otherwise. */
static __always_inline int syn_to_reset(struct __sk_buff *skb, const struct tcp_flow *f, bool swap_mac)
{
	if (!f->ip.plain)
		return -1;
	if (bpf_skb_change_tail(skb, f->ip.l4_off + sizeof(struct tcphdr), 0))
		return -1;
	if (swap_mac && f->ip.l3_off == L2_ETHERNET) {
		__u8 mac[12], swapped[12];

		if (bpf_skb_load_bytes(skb, 0, mac, sizeof(mac)))
			return -1;
		__builtin_memcpy(swapped, mac + 6, 6);
		__builtin_memcpy(swapped + 6, mac, 6);
		if (bpf_skb_store_bytes(skb, 0, swapped, sizeof(swapped), 0))
			return -1;
	}
	if (write_reset_ip(skb, f) || write_reset_tcp(skb, f))
		return -1;
	return 0;
}

#endif
