// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Socket options that would carry a pod's packets past its interface's hooks, refused for the
 * pod's own processes (attached to the pod's cgroup v2; ztunnel lives in another cgroup).
 *
 * PACKET_QDISC_BYPASS makes a packet socket hand its frames straight to the driver
 * (__dev_direct_xmit), skipping tc and tcx egress: an app with NET_RAW (a default container
 * capability) could then speak TCP to a remote host without ztunnel. Refusing the option leaves
 * packet sockets working; their frames take the normal path through the pod's egress program.
 * AF_XDP sockets (NET_RAW too) send the same way past tc (xsk_generic_xmit), and nothing without
 * their options (the UMEM, the rings): every SOL_XDP option is refused. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define SOL_PACKET 263
#define PACKET_QDISC_BYPASS 20
#define SOL_XDP 283

SEC("cgroup/setsockopt")
int pod_setsockopt(struct bpf_sockopt *ctx)
{
	if ((ctx->level == SOL_PACKET && ctx->optname == PACKET_QDISC_BYPASS) || ctx->level == SOL_XDP)
		return 0; /* EPERM */
	ctx->optlen = 0; /* untouched: the kernel uses the caller's own buffer */
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
