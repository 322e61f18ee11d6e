/* Packet parsing for every program: IPv4 (with options) and IPv6 (with its extension headers walked,
 * as the stack walks them) down to the transport header. One rule for all callers: a packet that
 * may carry TCP but whose TCP header cannot be read here as the stack will read it (a fragment, a
 * routing header still to be followed, a chain too long to walk, a truncated header, an Ethernet
 * frame whose type field says something else than skb->protocol or hides IP behind VLAN tags, an IP
 * header of another version than skb->protocol says) is PKT_UNCLASSIFIED, and the callers drop it
 * rather than pass it. */
#ifndef AMBIENT_PARSE_H
#define AMBIENT_PARSE_H

#include <stdbool.h>
#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "addr.h"

/* Where the IP header starts: after the Ethernet header, or at once on L3 devices (tun, wireguard). */
#define L2_ETHERNET ETH_HLEN
#define L2_NONE 0

/* Extension headers walked before giving up (the stack has no limit; a longer chain is dropped). */
#define MAX_IPV6_EXT_HEADERS 8

#define IP4_MF 0x2000
#define IP4_OFFSET 0x1fff
#define IP6_FRAG_OFFSET 0xfff8
#define IP6_FRAG_MF 0x0001

enum pkt_class {
	PKT_TCP, /* a whole TCP header, not a fragment: the tuple is valid */
	PKT_OTHER, /* not IP, or IP that carries no TCP (UDP, ICMP, ...) */
	PKT_UNCLASSIFIED, /* may carry TCP, cannot be classified: callers drop it */
};

/* What the IP layer says about a packet. Addresses IPv4-mapped (::ffff:a.b.c.d) for both families. */
struct ip_info {
	struct pod_ip saddr, daddr;
	__u32 l3_off; /* the IP header, from skb->data */
	__u32 l4_off; /* the upper-layer header, after options and extension headers */
	__u32 end; /* where the IP header's length says the packet ends, from skb->data */
	__be32 frag_id; /* IPv4 id (zero-extended) or IPv6 fragment identification */
	__u8 proto; /* the upper-layer protocol; for a later fragment, the fragment header's next header */
	__u8 hop_limit; /* TTL or hop limit */
	bool is_ip;
	bool ipv6;
	bool plain; /* no IPv4 options, no IPv6 extension headers */
	bool first_fragment; /* offset 0, more fragments follow */
	bool later_fragment; /* offset > 0: no transport header */
	bool unwalkable; /* IPv6 chain that cannot be followed (routing with segments left, too long, cut) */
	bool hidden; /* the link layer or the IP version hides what the packet carries (see parse_ip) */
};

static __always_inline bool ip_fragment(const struct ip_info *ip)
{
	return ip->first_fragment || ip->later_fragment;
}

static __always_inline bool ipv6_ext_header(__u8 next)
{
	return next == IPPROTO_HOPOPTS || next == IPPROTO_DSTOPTS || next == IPPROTO_ROUTING ||
	       next == IPPROTO_FRAGMENT || next == IPPROTO_AH;
}

struct ipv6_frag {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 id;
};

/* Follows the extension headers after the fixed IPv6 header, bounded like Cilium's ipv6_hdrlen. */
static __always_inline void walk_ipv6(struct __sk_buff *skb, struct ip_info *ip, __u8 next)
{
	__u32 off = ip->l3_off + sizeof(struct ipv6hdr);

#pragma unroll
	for (int i = 0; i < MAX_IPV6_EXT_HEADERS; i++) {
		if (!ipv6_ext_header(next)) {
			ip->proto = next;
			ip->l4_off = off;
			return;
		}
		ip->plain = false;
		if (next == IPPROTO_FRAGMENT) {
			struct ipv6_frag fh;
			__u16 fo;

			if (bpf_skb_load_bytes(skb, off, &fh, sizeof(fh)))
				break;
			fo = bpf_ntohs(fh.frag_off);
			ip->frag_id = fh.id;
			off += sizeof(fh);
			next = fh.nexthdr;
			if (fo & IP6_FRAG_OFFSET) {
				ip->later_fragment = true;
				ip->proto = next;
				ip->l4_off = off;
				return;
			}
			if (fo & IP6_FRAG_MF)
				ip->first_fragment = true;
			/* else an atomic fragment: the stack reads past it without reassembly */
			continue;
		}
		__u8 h[4]; /* next header, length, and for a routing header its type and segments left */

		if (bpf_skb_load_bytes(skb, off, h, sizeof(h)))
			break;
		/* Segments left: the stack would forward it on (or drop it); its destination is not final. */
		if (next == IPPROTO_ROUTING && h[3] != 0)
			break;
		off += next == IPPROTO_AH ? ((__u32)h[1] + 2) * 4 : ((__u32)h[1] + 1) * 8;
		next = h[0];
	}
	ip->unwalkable = true;
	ip->proto = next;
}

/* Does an Ethernet frame hide what it carries from a parser that goes by skb->protocol? The stack
 * that receives the frame (the veth peer, the pod) goes by the frame's own type field instead: a
 * packet socket can send an IP frame labelled as another protocol (skb->protocol is the socket's),
 * and VLAN tags the receiver strips (a priority tag with VID 0, a second tag after the first was
 * stripped) put IP behind a type that is not IP. */
static __always_inline bool link_hides(struct __sk_buff *skb)
{
	__be16 type;

	if (bpf_skb_load_bytes(skb, 12, &type, sizeof(type)))
		return true;
	return type != skb->protocol || type == bpf_htons(ETH_P_8021Q) || type == bpf_htons(ETH_P_8021AD) ||
	       type == bpf_htons(0x9100 /* pre-standard QinQ */);
}

/* Reads the IP header at `l3_off` (L2_ETHERNET or L2_NONE). Non-IP packets have is_ip false; an
 * Ethernet frame whose type field does not say what skb->protocol says is `hidden`, and so is an IP
 * header whose version is not the one skb->protocol says (a raw socket of one family can send the
 * other's packet, as skb->protocol is the socket's, and a tun device's reader, like
 * the receiving stack, goes by the version). */
static __always_inline void parse_ip(struct __sk_buff *skb, __u32 l3_off, struct ip_info *ip)
{
	__builtin_memset(ip, 0, sizeof(*ip));
	ip->l3_off = l3_off;
	if (l3_off == L2_ETHERNET && link_hides(skb)) {
		ip->hidden = true;
		return;
	}
	/* Without a link header nothing says what a frame is but skb->protocol, which a packet socket
	 * sets as it likes, while a tun device's reader goes by the version nibble. */
	if (l3_off == L2_NONE && skb->protocol != bpf_htons(ETH_P_IP) &&
	    skb->protocol != bpf_htons(ETH_P_IPV6)) {
		ip->hidden = true;
		return;
	}
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr h;
		__u16 fo;

		if (bpf_skb_load_bytes(skb, l3_off, &h, sizeof(h))) {
			ip->hidden = l3_off == L2_NONE; /* (nothing else says what it is) */
			return;
		}
		if (h.version != 4) {
			ip->hidden = true; /* what it carries is not what skb->protocol says */
			return;
		}
		ip->is_ip = true;
		ip->proto = h.protocol;
		ip->hop_limit = h.ttl;
		v4_mapped(&ip->saddr, h.saddr);
		v4_mapped(&ip->daddr, h.daddr);
		if (h.ihl < 5) {
			ip->unwalkable =
				true; /* malformed: the stack drops it, and so do we if it says TCP */
			return;
		}
		ip->plain = h.ihl == 5;
		ip->end = l3_off + bpf_ntohs(h.tot_len);
		ip->l4_off = l3_off + (__u32)h.ihl * 4;
		ip->frag_id = (__be32)h.id;
		fo = bpf_ntohs(h.frag_off);
		if (fo & IP4_OFFSET)
			ip->later_fragment = true;
		else if (fo & IP4_MF)
			ip->first_fragment = true;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr h;

		if (bpf_skb_load_bytes(skb, l3_off, &h, sizeof(h))) {
			ip->hidden = l3_off == L2_NONE;
			return;
		}
		if (h.version != 6) {
			ip->hidden = true; /* what it carries is not what skb->protocol says */
			return;
		}
		ip->is_ip = true;
		ip->ipv6 = true;
		ip->plain = true;
		ip->hop_limit = h.hop_limit;
		ip->end = l3_off + sizeof(h) + bpf_ntohs(h.payload_len);
		__builtin_memcpy(ip->saddr.addr, &h.saddr, 16);
		__builtin_memcpy(ip->daddr.addr, &h.daddr, 16);
		walk_ipv6(skb, ip, h.nexthdr);
	}
}

/* May the stack deliver TCP out of this packet without us having read its TCP header? */
static __always_inline bool may_carry_tcp(const struct ip_info *ip)
{
	if (ip->hidden)
		return true;
	if (!ip->is_ip)
		return false;
	if (ip->proto == IPPROTO_TCP)
		return true;
	/* An IPv6 chain we could not finish, or a later fragment whose first header is another
	 * extension header, may end in TCP. */
	return ip->ipv6 && (ip->unwalkable || (ip->later_fragment && ipv6_ext_header(ip->proto)));
}

struct tcp_flow {
	struct bpf_sock_tuple tuple; /* as an incoming packet: saddr = peer, daddr = local */
	struct ip_info ip;
	__be32 seq;
	bool ipv6;
	bool bare_syn; /* SYN without ACK: the first packet of a new connection */
	bool syn;
	bool urg;
	__u8 doff; /* the TCP header's length in 32-bit words */
	bool data; /* bytes after the TCP header, in the skb or by the IP header's length */
	bool rst;
	bool fin;
	bool ack;
};

/* Classifies a packet whose IP header is at `l3_off`; for PKT_TCP fills the flow. */
static __always_inline enum pkt_class parse_tcp_at(struct __sk_buff *skb, __u32 l3_off, struct tcp_flow *f)
{
	struct tcphdr th;

	parse_ip(skb, l3_off, &f->ip);
	if (!may_carry_tcp(&f->ip))
		return PKT_OTHER;
	if (f->ip.hidden || f->ip.unwalkable || ip_fragment(&f->ip) || f->ip.proto != IPPROTO_TCP)
		return PKT_UNCLASSIFIED;
	if (bpf_skb_load_bytes(skb, f->ip.l4_off, &th, sizeof(th)) || th.doff < 5)
		return PKT_UNCLASSIFIED;
	f->ipv6 = f->ip.ipv6;
	if (f->ipv6) {
		__builtin_memcpy(f->tuple.ipv6.saddr, f->ip.saddr.addr, 16);
		__builtin_memcpy(f->tuple.ipv6.daddr, f->ip.daddr.addr, 16);
		f->tuple.ipv6.sport = th.source;
		f->tuple.ipv6.dport = th.dest;
	} else {
		f->tuple.ipv4.saddr = v4_of(&f->ip.saddr);
		f->tuple.ipv4.daddr = v4_of(&f->ip.daddr);
		f->tuple.ipv4.sport = th.source;
		f->tuple.ipv4.dport = th.dest;
	}
	f->seq = th.seq;
	f->bare_syn = th.syn && !th.ack;
	f->syn = th.syn;
	f->urg = th.urg;
	f->doff = th.doff;
	/* (A driver may pad a short frame: the IP header's length counts where the skb's may not.) */
	f->data =
		skb->len > f->ip.l4_off + (__u32)th.doff * 4 || f->ip.end > f->ip.l4_off + (__u32)th.doff * 4;
	f->rst = th.rst;
	f->fin = th.fin;
	f->ack = th.ack;
	return PKT_TCP;
}

static __always_inline enum pkt_class parse_tcp(struct __sk_buff *skb, struct tcp_flow *f)
{
	return parse_tcp_at(skb, L2_ETHERNET, f);
}

/* A constant per branch: the verifier needs the lookup size bounded. */
static __always_inline __u32 tuple_size(const struct tcp_flow *f)
{
	return f->ipv6 ? sizeof(f->tuple.ipv6) : sizeof(f->tuple.ipv4);
}

static __always_inline __be16 flow_sport(const struct tcp_flow *f)
{
	return f->ipv6 ? f->tuple.ipv6.sport : f->tuple.ipv4.sport;
}

static __always_inline __be16 flow_dport(const struct tcp_flow *f)
{
	return f->ipv6 ? f->tuple.ipv6.dport : f->tuple.ipv4.dport;
}

/* The upper-layer ports of a UDP/TCP first fragment or whole packet (0 when there are none). */
static __always_inline __be16 l4_dport(struct __sk_buff *skb, const struct ip_info *ip)
{
	__be16 ports[2] = {};

	if (ip->later_fragment || ip->unwalkable || (ip->proto != IPPROTO_UDP && ip->proto != IPPROTO_TCP))
		return 0;
	if (bpf_skb_load_bytes(skb, ip->l4_off, ports, sizeof(ports)))
		return 0;
	return ports[1];
}

static __always_inline __u8 icmp6_type(struct __sk_buff *skb, const struct ip_info *ip)
{
	__u8 type = 0;

	if (ip->proto == IPPROTO_ICMPV6 && !ip->later_fragment && !ip->unwalkable)
		bpf_skb_load_bytes(skb, ip->l4_off, &type, 1);
	return type;
}

#endif
