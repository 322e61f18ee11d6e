/* The pod netns's other interfaces (struct pod_ifaces): found, hooked with the pod's own programs,
 * unhooked and verified. Everything but the pin functions runs inside the pod netns. */
#ifndef AMBIENT_POD_IFACES_H
#define AMBIENT_POD_IFACES_H

#include <stdbool.h>

#include "../progs/ambient_shared.h"
#include "datapath.h"
#include "rtnl.h"

/* Every interface of the netns but lo, `primary` and the reroute ones (skip[], skip_count names),
 * and every address on them or on `primary` that is not one of m->ips. Refuses (-1, e filled) what
 * cannot be captured: an interface without an Ethernet header, more than MAX_POD_IFACES interfaces
 * or MAX_POD_IPS such addresses. */
int ifaces_scan(struct rtnl *nl, unsigned primary, const char (*skip)[16], unsigned skip_count,
		const struct pod_meta *m, struct pod_ifaces *out, struct dp_error *e);

/* Hooks next's interfaces (pod_ingress and pod_egress: prog_fd[2]) in `mode` and sets their
 * accept_local; prev is what is hooked now, in prev_mode. New hooks first, stale ones removed
 * after, so an interface kept is never without its hook. On failure the hooks this call made are
 * removed again and -1 is returned. Pins go to pod_dir/iface-<ifindex>-<ingress|egress>. */
int ifaces_hook(const char *pod_dir, const int prog_fd[2], unsigned mode, struct pod_ifaces *next,
		const struct pod_ifaces *prev, unsigned prev_mode, struct dp_error *e);

/* Removes every hook of f: tcx links through their pins from anywhere; tc filters and accept_local
 * only from inside the netns (in_netns). */
void ifaces_unhook(const char *pod_dir, struct pod_ifaces *f, unsigned mode, bool in_netns);

/* Is this pin file name one of an interface's links? */
bool ifaces_pin(const char *name);

/* Problems: a recorded interface gone or unhooked, an interface or address the record lacks. */
void ifaces_verify(struct rtnl *nl, const char *pod_dir, unsigned mode, const struct pod_ifaces *f,
		   const struct pod_ifaces *now, struct dp_verify_result *r);

#endif
