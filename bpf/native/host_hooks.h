/* Kubelet probes: the node side of a pod's veth, hooked in the node's netns (pod_to_node on its
 * ingress: what the pod sends; node_to_pod on its egress: what goes to the pod), verified and
 * detached here, side by side. tcx links are pinned at pods/<uid>/host-ingress and host-egress; tc
 * filters are recorded in pod_meta (host_ifindex, host_netns_*, host_owns_clsact). The caller holds
 * the datapath lock. */
#ifndef AMBIENT_HOST_HOOKS_H
#define AMBIENT_HOST_HOOKS_H

#include <bpf/libbpf.h>

#include "datapath.h"
#include "dp_error.h"
#include "../progs/ambient_shared.h"

struct host_hooks {
	const char *root; /* the bpffs root the pins live under */
	int prog_fd[2]; /* by enum hook_dir */
};

/* Finds the hooks' programs in the loaded object. */
void host_hooks_init(struct host_hooks *h, const char *root, struct bpf_object *obj);

/* Hooks the pod's veth peer (`peer`, an index in the node's netns `host_netns`) in m->mode; with no
 * node netns or no peer, removes the hooks instead. A peer that is not the pod interface's in that
 * netns is not hooked (m->host_ifindex 0: kubelet probes are not handled). */
int host_hooks_attach(const struct host_hooks *h, const char *uid, const char *host_netns, int peer,
		      struct pod_meta *m, struct dp_error *e);

/* Removes the hooks: links through their pins, tc filters inside the node's netns. */
void host_hooks_detach(const struct host_hooks *h, const char *uid, struct pod_meta *m);

/* Each recorded hook is in place, running the program it should. */
void host_hooks_verify(const struct host_hooks *h, const char *uid, const struct pod_meta *m,
		       struct dp_verify_result *r);

#endif
