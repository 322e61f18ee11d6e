// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The egress guard, on the pod's cgroup v2 (every socket of the pod's processes; ztunnel lives in
 * another cgroup): TCP that a pod socket sends out through an interface of the pod netns without
 * the pod's egress hook is dropped, never sent past ztunnel.
 *
 * The apps' connections normally never get there: the connect hook (outbound_route.bpf.c) routes
 * them over lo to ztunnel, and the interfaces' own programs loop the rest to it. What is left is a
 * socket that takes its own route out through an interface with no egress hook: bound to one
 * (SO_BINDTODEVICE needs no capability), marked by the app, or given a source of its choosing, on a
 * tun or wireguard device, one beyond the interface limit, one that has just appeared, or a
 * reroute-virtual-interfaces one (an ingress hook only). Raw sockets' hand-made TCP too (the hook
 * runs for every IP packet a local socket sends, before fragmentation).
 *
 * The pod is found by the netns of the device the packet leaves by (gated_netns): a packet of a
 * netns nested in the pod (a container runtime inside it) or of a pod whose interfaces are not
 * recorded (attached by an older release) is not this guard's. lo is never guarded (the pod's own
 * connections, and the ones routed to ztunnel). Attached only where the netns cookie can be read
 * (tc_netns_cookie). */
#include <stdbool.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "ambient_shared.h"
#include "netns_cookie.h"
#include "parse.h"
#include "pod_policy_map.h"

extern POD_COUNTERS_MAP pod_counters SEC(".maps");
extern CAPTURED_IFACES_MAP captured_ifaces SEC(".maps");
extern GATED_NETNS_MAP gated_netns SEC(".maps");

#define CG_PASS 1
#define CG_DROP 0

/* Does the interface carry the egress hook of the pod whose netns has this cookie? */
static __always_inline bool egress_hooked(__u32 slot, __u32 ifindex, __u64 cookie)
{
	struct captured_key k = { .slot = slot, .ifindex = ifindex };
	__u64 *v = bpf_map_lookup_elem(&captured_ifaces, &k);

	return v &&
	       (*v & ~CAPTURED_SECONDARY) == cookie; /* (an ingress-only one has CAPTURED_INGRESS_ONLY set) */
}

SEC("cgroup_skb/egress")
int pod_egress_guard(struct __sk_buff *skb)
{
	struct ip_info ip;
	struct pod_counters *c;
	__u64 cookie;
	__u32 *slot;

	if (!tc_netns_cookie || skb->ifindex == LOOPBACK_IFINDEX)
		return CG_PASS;
	cookie = this_netns_cookie(skb);
	slot = bpf_map_lookup_elem(&gated_netns, &cookie);
	if (!slot || egress_hooked(*slot, skb->ifindex, cookie))
		return CG_PASS;
	parse_ip(skb, L2_NONE, &ip);
	if (!may_carry_tcp(&ip))
		return CG_PASS; /* UDP, ICMP, ...: ztunnel carries TCP only (strict mode is the interfaces') */
	c = bpf_map_lookup_elem(&pod_counters, slot);
	if (c)
		c->value[CNT_UNCAPTURED_DROPPED]++;
	return CG_DROP;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
