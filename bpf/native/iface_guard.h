/* The guard on the egress of every interface of a pod netns that carries no pod_egress (a
 * reroute-virtual-interfaces one, hooked at ingress only; one an update could not capture): the
 * pod_guard_egress program drops the TCP that a process builds by hand there (pod_redirect.bpf.c).
 * Attached, updated, verified and removed here; the set is found in the netns each time, so no
 * record is needed: tcx links are pinned as pods/<uid>/guard-<ifindex>, cls_bpf filters are found by
 * their handle and priority. Everything but guards_pin runs inside the pod netns. */
#ifndef AMBIENT_IFACE_GUARD_H
#define AMBIENT_IFACE_GUARD_H

#include <stdbool.h>

#include "../progs/ambient_shared.h"
#include "datapath.h"
#include "pod_ifaces.h"
#include "rtnl.h"

/* The guard's programs, by the link layer of the device (enum link_layer). */
extern const char *const guard_prog_names[2];

/* Every interface but lo, the pod's own (`primary`) and `captured`'s gets the guard in `mode`; with
 * `prune`, only those: the guard goes from any other (one now captured) and every guard of the
 * other mode goes. An update calls it without prune before it changes the interfaces' hooks (so an
 * interface that loses pod_egress has its guard first) and with prune once they are done. Without
 * ref, all or nothing: the first interface that cannot be guarded fails the call (its caller
 * undoes). With ref, such an interface is said there and the others guarded all the same. */
int guards_sync(const char *pod_dir, const int prog_fd[2], unsigned mode, unsigned primary,
		const struct pod_ifaces *captured, bool prune, struct ifaces_refused *ref,
		struct dp_error *e);

/* Removes every guard of the pod: tcx links through their pins from anywhere, cls_bpf filters only
 * from inside the netns (in_netns). */
void guards_remove(const char *pod_dir, bool in_netns);

/* Is this pin file name a guard's link? */
bool guards_pin(const char *name);

/* Problems: an interface that should be guarded and is not, or runs another program. */
void guards_verify(struct rtnl *nl, const char *pod_dir, unsigned mode, unsigned primary,
		   const struct pod_ifaces *captured, struct dp_verify_result *r);

#endif
