/* The pod netns's other interfaces (struct pod_ifaces): found, hooked with the pod's own programs,
 * unhooked and verified. Everything but the pin functions runs inside the pod netns. */
#ifndef AMBIENT_POD_IFACES_H
#define AMBIENT_POD_IFACES_H

#include <stdbool.h>

#include "../progs/ambient_shared.h"
#include "datapath.h"
#include "rtnl.h"

/* The programs of an interface, by its link layer (enum link_layer), then hook_dir: pod_ingress
 * and pod_egress, or their _l3 variants on a tun or wireguard device. */
extern const char *const iface_prog_names[2][2];

/* What a scan or a partial hook left out, each said in a message (for verify and the attach's
 * warning). */
#define IFACES_MAX_REFUSED 4
struct ifaces_refused {
	unsigned count; /* messages */
	unsigned more; /* refusals beyond IFACES_MAX_REFUSED */
	bool dropped_addresses; /* addresses beyond MAX_POD_IPS left out of the record */
	char message[IFACES_MAX_REFUSED][200];
};

/* Adds a message to `ref` (counted in `more` past IFACES_MAX_REFUSED). */
void ifaces_refuse(struct ifaces_refused *ref, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Every interface of the netns but lo, `primary` and the reroute ones (skip[], skip_count names),
 * and every address on them or on `primary` that is not one of m->ips. What cannot be captured (an
 * interface whose link header tc cannot read past, more than MAX_POD_IFACES interfaces) is left out
 * and said in ref, as are addresses beyond MAX_POD_IPS; every other interface is in out all the
 * same. -1 (e filled) only when the netns cannot be read. */
int ifaces_scan(struct rtnl *nl, unsigned primary, const char (*skip)[16], unsigned skip_count,
		const struct pod_meta *m, struct pod_ifaces *out, struct ifaces_refused *ref,
		struct dp_error *e);

/* What prev's interfaces that next keeps own (accept_local set by us, and its old value; the clsact
 * qdisc, in the same mode) copied to next: before next is recorded, so that a crash before the
 * hooks are done leaves a record that still restores them. */
void ifaces_carry_owned(struct pod_ifaces *next, unsigned mode, const struct pod_ifaces *prev,
			unsigned prev_mode);

/* Hooks next's interfaces (prog_fd[link_layer][hook_dir]: pod_ingress and pod_egress, or their L3
 * variants, by each one's link layer) in `mode` and sets their
 * accept_local; prev is what is hooked now, in prev_mode. New hooks first, stale ones removed
 * after, so an interface kept is never without its hook. Without ref, all or nothing: on failure
 * the hooks this call made are removed again and -1 is returned. With ref, an interface that
 * cannot be hooked is said in ref and left out of next, the others hooked all the same (an
 * attached pod never keeps a hookable interface unhooked for another's sake). Pins go to
 * pod_dir/iface-<ifindex>-<ingress|egress>. */
int ifaces_hook(const char *pod_dir, int prog_fd[2][2], unsigned mode, struct pod_ifaces *next,
		const struct pod_ifaces *prev, unsigned prev_mode, struct ifaces_refused *ref,
		struct dp_error *e);

/* Removes every hook of f: tcx links through their pins from anywhere; tc filters and accept_local
 * only from inside the netns (in_netns). */
void ifaces_unhook(const char *pod_dir, struct pod_ifaces *f, unsigned mode, bool in_netns);

/* Is this pin file name one of an interface's links? */
bool ifaces_pin(const char *name);

/* Problems: a recorded interface gone or unhooked, an interface or address the record lacks. */
void ifaces_verify(struct rtnl *nl, const char *pod_dir, unsigned mode, const struct pod_ifaces *f,
		   const struct pod_ifaces *now, struct dp_verify_result *r);

#endif
