/* Constants and map layouts shared by the BPF programs and the native addon (and, through the
 * addon's exports, by TypeScript). One definition each: change them here only. */
#ifndef AMBIENT_SHARED_H
#define AMBIENT_SHARED_H

#include <linux/types.h>

/* The layout of the node state under a bpffs root: the pinned maps and their value layouts, what
 * pod_meta records and which hooks a pod has. Bump it (and teach native/layout.c the change) when a
 * release changes any of them. Layout 1 is v0.1.0's, which pinned no stamp. */
#define DATAPATH_LAYOUT 4

/* ztunnel's in-pod listeners. */
#define ZTUNNEL_OUTBOUND_PORT 15001
#define ZTUNNEL_INBOUND_PORT 15006
#define ZTUNNEL_HBONE_PORT 15008
#define ZTUNNEL_DNS_PORT 15053

/* Every socket ztunnel opens in the pod carries this mark (upstream: 1337). */
#define ZTUNNEL_MARK 0x539
/* Packets our egress program loops back into the pod's ingress carry this mark; a fwmark rule
 * sends them to a table whose only route is "local everything", so the stack delivers them to
 * the socket on this host that owns their (non-local) destination. Upstream uses the same. */
#define REDIRECT_MARK 0x111
#define MARK_MASK 0xfff

/* Every netns's lo (the kernel gives it the first ifindex). */
#define LOOPBACK_IFINDEX 1
#define REDIRECT_ROUTE_TABLE 100
#define REDIRECT_RULE_PRIORITY 32764

/* Kubelet probes are SNATed to these on the node, so the pod can tell them apart. */
#define PROBE_ADDR_V4 0xa9fe077f /* 169.254.7.127, host order */
#define PROBE_ADDR_V6_W0 0xfd169254 /* fd16:9254:7127:1337:ffff:ffff:ffff:ffff, host order words */
#define PROBE_ADDR_V6_W1 0x71271337
#define PROBE_ADDR_V6_W2 0xffffffff
#define PROBE_ADDR_V6_W3 0xffffffff

#define MAX_POD_IPS 8
#define MAX_PODS 8192
#define MAX_REROUTE_IFACES 4
#define MAX_ZTUNNEL_CGROUPS 64
#define MAX_STRICT_ALLOW 64
/* LRU maps are preallocated: sized for what is in flight on a node, not for every pod. */
#define MAX_STEERED_SYNS 16384 /* SYNs between the tc decision and the socket lookup */
#define MAX_PROBE_FLOWS 16384 /* node-opened connections to ambient pods at once */
#define MAX_STRICT_FRAGMENTS \
	4096 /* fragmented datagrams strict mode let out, awaiting their later fragments */

struct pod_ip {
	__u8 addr[16]; /* IPv4 as ::ffff:a.b.c.d */
};

/* pod_policy map: one entry per pod address, read by the programs on every new connection. */
#define POD_F_BYPASS_INBOUND (1u << 0) /* ambient.istio.io/bypass-inbound-capture=true */
#define POD_F_STRICT (1u << 1) /* drop what would escape ztunnel (UDP but DNS, other protocols) */
#define POD_F_DNS_CAPTURED (1u << 2) /* DNS capture hooks hold the pod's cgroup: its DNS never leaves as is */
#define POD_F_DNS_CAPTURE \
	(1u << 3) /* asked: capture DNS at the pod's cgroup (POD_F_DNS_CAPTURED once hooked) */
/* The pod's captured_ifaces entries are written: its sk_lookup program refuses connections that came
 * in on any other interface (one without hooks). Not set for pods an older release attached. */
#define POD_F_IFACES_GATED (1u << 4)

struct pod_policy {
	__u32 slot; /* index into pod_counters; 0 is the node-wide "no pod" slot */
	__u32 flags;
	__u64 netns_cookie; /* the pod netns's cookie (SO_NETNS_COOKIE): sk_lookup steering's key */
};

/* Per-pod counters (a per-CPU array indexed by slot), one connection (SYN) each unless noted. */
enum pod_counter {
	CNT_OUTBOUND_REDIRECTED, /* to ztunnel's 15001 */
	CNT_OUTBOUND_NO_ZTUNNEL, /* would have gone to 15001, no listener: refused (reset), as upstream */
	CNT_INBOUND_REDIRECTED, /* to ztunnel's 15006 */
	CNT_INBOUND_NO_ZTUNNEL, /* no 15006 listener: refused with a reset (fail closed) */
	CNT_BYPASS_ZTUNNEL, /* ztunnel's own connections leaving the pod */
	CNT_BYPASS_HBONE, /* inbound to 15008, ztunnel's HBONE listener */
	CNT_BYPASS_PROBE, /* from or to the kubelet probe address */
	CNT_BYPASS_INBOUND_ANNOTATION, /* inbound, pod annotated bypass-inbound-capture */
	CNT_FORGED_MARK, /* ztunnel's mark on a socket that is not ztunnel's: redirected anyway */
	CNT_STRICT_DROPPED, /* packets dropped by strict mode */
	CNT_REROUTED, /* inbound on a reroute-virtual-interfaces device, to 15001 */
	CNT_UNCLASSIFIED_DROPPED, /* packets that may carry TCP but cannot be classified: fragments, odd headers */
	CNT_SPOOFED_DROPPED, /* packets from outside carrying one of the pod's own addresses as source */
	CNT_LOOKUP_REFUSED, /* packets the socket lookup refused: looped outbound ones tc did not steer, any to an address the pod's record lacks */
	CNT_UNCAPTURED_DROPPED, /* layout 4: TCP the pod's sockets sent out through an interface without hooks (egress guard) */
	CNT_COUNT
};

struct pod_counters {
	__u64 value[CNT_COUNT];
};

/* settings map (one entry): node-wide switches. */
#define SETTING_MARK_ONLY_EXEMPTION (1u << 0) /* upstream's rule: any 0x539-marked packet skips */
/* Steer SYNs to ztunnel's listeners with an sk_lookup program instead of bpf_sk_assign in tc:
 * before Linux 6.6, bpf_sk_assign refuses ztunnel's SO_REUSEPORT listeners. */
#define SETTING_SK_LOOKUP_STEERING (1u << 1)

/* steer map: the tc programs' decision for a SYN, read by the pod netns's sk_lookup program. The
 * tuple as the pod receives it; IPv4 as ::ffff:a.b.c.d. */
struct steer_key {
	struct pod_ip remote;
	struct pod_ip local;
	__be16 remote_port;
	__be16 local_port;
	__u32 pad;
};

/* ztunnel_listeners sockhash key: which pod netns, which port (host order). */
struct listener_key {
	__u64 netns_cookie;
	__u32 port;
	__u32 pad;
};

struct dp_settings {
	__u32 flags;
	__u32 pad;
};

/* strict_allow map: what strict mode lets out besides TCP (captured) and DNS. port 0: any. */
struct strict_allow_key {
	__u8 protocol;
	__u8 pad;
	__be16 port;
};
#define POD_UID_LEN 64
#define NETNS_PATH_LEN 256

/* pod_meta map: user-space bookkeeping of each attachment, kept in a pinned map so that any
 * process (a restarted agent, the CLI) can detach, verify or collect it. Programs never read it. */
enum attach_mode {
	ATTACH_MODE_TCX = 1,
	ATTACH_MODE_TC = 2, /* clsact qdisc + cls_bpf, for kernels without tcx */
};

enum attach_state {
	ATTACH_STATE_ATTACHING = 1, /* written before the netns is touched: a crash leaves a trace */
	ATTACH_STATE_ATTACHED = 2,
};

/* What attach created in the pod netns (and so what detach removes). */
#define OWNS_RULE_V4 (1u << 0)
#define OWNS_RULE_V6 (1u << 1)
#define OWNS_ROUTE_V4 (1u << 2)
#define OWNS_ROUTE_V6 (1u << 3)
#define OWNS_ACCEPT_LOCAL (1u << 4)
#define OWNS_CLSACT (1u << 5)

struct pod_meta_key {
	char uid[POD_UID_LEN];
};

/* An extra interface whose inbound TCP goes to 15001 (istio.io/reroute-virtual-interfaces). */
struct reroute_iface {
	char name[16];
	__u32 ifindex; /* 0: not present in the netns when last attached */
	__u32 owns_clsact; /* tc mode: attach created this interface's clsact qdisc */
};

struct pod_meta {
	char netns_path[NETNS_PATH_LEN];
	__u64 netns_ino;
	__u64 netns_dev;
	__u64 attached_at_ns; /* CLOCK_REALTIME */
	__u32 ifindex;
	__u32 mode;
	__u32 state;
	__u32 owns;
	__u32 saved_accept_local;
	__u32 ip_count;
	__u32 tc_priority;
	__u32 slot; /* this pod's counters */
	__u32 flags; /* POD_F_* */
	__u32 reroute_count;
	__u64 pod_cgroup_id; /* the pod's cgroup v2, hooked (socket-option guard, DNS capture); 0: none */
	__u64 netns_cookie;
	__u32 steering_sk_lookup; /* an sk_lookup link on the pod netns steers SYNs (pin "sk_lookup") */
	__u32 ifaces_gated; /* layout 4: captured_ifaces holds the pod's interfaces (POD_F_IFACES_GATED) */
	/* Kubelet probes: the node side of the pod's veth, hooked in the node's netns (0: none). */
	__u32 host_ifindex;
	__u32 host_owns_clsact;
	__u64 host_netns_ino;
	__u64 host_netns_dev;
	char host_netns_path[NETNS_PATH_LEN];
	struct pod_ip ips[MAX_POD_IPS];
	struct reroute_iface reroute[MAX_REROUTE_IFACES];
};

/* pod_ifaces map (user-space bookkeeping like pod_meta): the pod netns's other interfaces, every one
 * but lo, the pod's own (pod_meta.ifindex) and the reroute ones, hooked with pod_ingress/pod_egress
 * like the pod's own (their _l3 variants on a device without a link header), so that no interface
 * of the pod reaches the app past ztunnel (Multus, a macvlan, a second veth, a VPN's tun device). Their addresses are the pod's in pod_policy too. A separate map so that
 * pod_meta keeps its layout. */
#define MAX_POD_IFACES 8

struct pod_iface {
	char name[16]; /* when hooked: for status and messages */
	__u32 ifindex;
	__u32 owns_clsact; /* tc mode: attach created this interface's clsact qdisc */
	__u32 owns_accept_local; /* attach set its accept_local (saved_accept_local is the old value) */
	__u32 saved_accept_local;
};

struct pod_ifaces {
	char own[16]; /* the name of the pod's own interface (pod_meta.ifindex), for status */
	__u32 count;
	__u32 addr_count;
	struct pod_iface iface[MAX_POD_IFACES];
	struct pod_ip addrs[MAX_POD_IPS]; /* their addresses that are not among pod_meta.ips */
};

/* captured_ifaces map: the interfaces of a pod netns that carry its hooks (its own, its other ones,
 * its reroute ones), by the pod's slot; the value is the pod netns's cookie, so that an entry left
 * by a crashed pod whose slot was reused never counts for the next holder. */
#define MAX_CAPTURED_IFACES (MAX_PODS * 4)

struct captured_key {
	__u32 slot;
	__u32 ifindex;
};

/* A captured_ifaces value: the pod netns's cookie, with this bit set for an interface whose
 * outbound has no hook (a reroute-virtual-interfaces one: ingress only). Cookies count up from 1
 * and never reach it. */
#define CAPTURED_INGRESS_ONLY (1ull << 63)
/* And this one for an interface that is not the pod's own (pod_meta.ifindex): a kubelet probe,
 * whose source the node side of the pod's veth rewrites, never arrives there. */
#define CAPTURED_SECONDARY (1ull << 62)
#define CAPTURED_FLAGS (CAPTURED_INGRESS_ONLY | CAPTURED_SECONDARY)

/* gated_netns map: the pod netns whose captured_ifaces entries are written (POD_F_IFACES_GATED),
 * by netns cookie, to the pod's slot: how the egress guard on the pod's cgroup, which knows the
 * netns of the device a packet leaves by but not the pod, finds the pod's entries. */

/* cls_bpf filter identity used in the tc fallback: ours, fixed, so only ours is replaced or
 * deleted and other users of the clsact qdisc are never touched. */
#define TC_FILTER_HANDLE 0xab1
#define TC_FILTER_PRIORITY 0x1ab1

/* tcx (Linux 6.6); defined here because bookworm's uapi headers predate it. */
#define AMB_BPF_TCX_INGRESS 46
#define AMB_BPF_TCX_EGRESS 47
#define AMB_BPF_LINK_TYPE_TCX 11

#endif
