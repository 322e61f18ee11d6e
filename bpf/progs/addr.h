/* Address helpers for every program. Pod-side addresses are kept as 16 bytes (struct pod_ip),
 * IPv4 as IPv4-mapped (::ffff:a.b.c.d), so one map key and one comparison serve both families. */
#ifndef AMBIENT_ADDR_H
#define AMBIENT_ADDR_H

#include <stdbool.h>
#include <linux/types.h>
#include <bpf/bpf_endian.h>

#include "ambient_shared.h"

/* Are these four address words (network order, as in struct pod_ip or bpf_sock_addr's user_ip6)
 * an IPv4-mapped IPv6 address? */
static __always_inline bool words_v4_mapped(const __u32 *w)
{
	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff);
}

static __always_inline void v4_mapped(struct pod_ip *a, __be32 addr)
{
	__builtin_memset(a, 0, sizeof(*a));
	a->addr[10] = a->addr[11] = 0xff;
	__builtin_memcpy(&a->addr[12], &addr, 4);
}

static __always_inline __be32 v4_of(const struct pod_ip *a)
{
	__be32 v;

	__builtin_memcpy(&v, &a->addr[12], 4);
	return v;
}

static __always_inline bool same_address(const struct pod_ip *a, const struct pod_ip *b)
{
	const __u32 *x = (const __u32 *)a->addr, *y = (const __u32 *)b->addr;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* 0.0.0.0, 127.0.0.0/8, :: or ::1: the pod's own loopback, or a lookup with no address. */
static __always_inline bool unspecified_or_loopback(const struct pod_ip *a)
{
	const __u32 *w = (const __u32 *)a->addr;

	if (words_v4_mapped(w))
		return w[3] == 0 || (bpf_ntohl(w[3]) >> 24) == 127;
	return w[0] == 0 && w[1] == 0 && w[2] == 0 && (w[3] == 0 || w[3] == bpf_htonl(1));
}

/* The probe source address of this address's family (node_probe.bpf.c SNATs kubelet's probes to it). */
static __always_inline void set_probe_address(struct pod_ip *a, bool ipv6)
{
	if (!ipv6) {
		v4_mapped(a, bpf_htonl(PROBE_ADDR_V4));
		return;
	}
	__be32 *w = (__be32 *)a->addr;

	w[0] = bpf_htonl(PROBE_ADDR_V6_W0);
	w[1] = bpf_htonl(PROBE_ADDR_V6_W1);
	w[2] = bpf_htonl(PROBE_ADDR_V6_W2);
	w[3] = bpf_htonl(PROBE_ADDR_V6_W3);
}

static __always_inline bool is_probe_address(const struct pod_ip *a)
{
	struct pod_ip probe;

	set_probe_address(&probe, !words_v4_mapped((const __u32 *)a->addr));
	return same_address(a, &probe);
}

#endif
