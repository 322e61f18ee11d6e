/* The cookie of the netns a packet's device is in, read by programs that run on packets (tc, and the
 * pod's cgroup egress guard). */
#ifndef AMBIENT_NETNS_COOKIE_H
#define AMBIENT_NETNS_COOKIE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

/* Set by the loader (datapath.c) where programs can read it (probed: the feature tcNetnsCookie);
 * defined in pod_redirect.bpf.c. A frozen read-only constant: where it is 0 the verifier prunes the
 * branches that read the cookie, so the object loads on any kernel, BTF or not. */
extern const volatile __u32 tc_netns_cookie;

/* The kernel's structures, as far as the netns of the packet's device goes (CO-RE: libbpf relocates
 * the offsets against the running kernel's BTF). */
struct net___amb {
	__u64 net_cookie;
} __attribute__((preserve_access_index));

struct net_device___amb {
	struct {
		struct net___amb *net;
	} nd_net;
} __attribute__((preserve_access_index));

struct sk_buff___amb {
	struct net_device___amb *dev;
} __attribute__((preserve_access_index));

/* The cookie of the netns of the packet's device: in tc the pod's interface, in a cgroup egress
 * program the device the packet leaves by (0 if it cannot be read). Not bpf_get_netns_cookie(skb):
 * in tc that is the netns of the packet's socket, and the initial netns's for a packet without one,
 * which is every packet coming in. */
static __always_inline __u64 this_netns_cookie(struct __sk_buff *skb)
{
	struct sk_buff___amb *kskb = (void *)skb;

	return BPF_CORE_READ(kskb, dev, nd_net.net, net_cookie);
}

#endif
