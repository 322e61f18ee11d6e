/* Kernel feature probing: what the datapath's modes need, asked of the running kernel (libbpf's
 * program type and helper probes, and real minimal attempts where libbpf has no probe) instead of
 * read from its version string, which misjudges distribution kernels with backports. */
#ifndef AMBIENT_PROBE_H
#define AMBIENT_PROBE_H

#include <stdbool.h>
#include <stddef.h>

enum kernel_feature {
	KF_TC_PROGRAMS, /* sched_cls programs with bpf_skc_lookup_tcp, bpf_sk_assign and bpf_redirect */
	KF_TCX, /* tcx links: BPF_TCX_INGRESS on lo of a throwaway netns */
	KF_SK_ASSIGN_REUSEPORT, /* tc's bpf_sk_assign takes an SO_REUSEPORT listener (a SYN steered on lo) */
	KF_SK_LOOKUP, /* sk_lookup programs with bpf_sk_assign */
	KF_NETNS_COOKIES, /* SO_NETNS_COOKIE, bpf_get_netns_cookie in sockops and cgroup sock_addr */
	KF_CGROUP_SOCK_ADDR, /* cgroup connect, sendmsg, recvmsg and getpeername hooks */
	KF_CGROUP_SOCKOPT, /* the cgroup setsockopt hook */
	KF_SOCK_OPS, /* sockops programs */
	KF_TC_NETNS_COOKIE, /* tc programs read their netns's cookie (skb->dev's, CO-RE) */
	KF_COUNT,
};

extern const char *const kernel_feature_names[KF_COUNT];

struct kernel_probe {
	bool present[KF_COUNT];
	char detail[KF_COUNT][160]; /* what was tried, and what the kernel said */
	double elapsed_ms;
};

/* Probes every feature. Blocks (tens of syscalls, a short-lived thread in a throwaway netns that
 * it leaves by ending): call it off the JS main thread. Leaves no netns, pin, link, program or fd. */
void kernel_probe_run(struct kernel_probe *p);

/* Can tc programs read the cookie of the netns they run in, as pod_redirect.bpf.c does (a CO-RE read
 * of skb->dev->nd_net.net->net_cookie with bpf_probe_read_kernel from the context)? Says what was
 * tried in detail. (bpf_get_netns_cookie is no substitute: in tc it is the netns of the packet's
 * socket, and the initial netns's for a packet without one.) */
bool tc_reads_netns_cookie(char *detail, size_t len);

#endif
