/* The maps the programs read per pod (pod_policy, by address) and write per pod (pod_counters, by
 * slot), and the slot allocation that ties them together (slot_owner). Callers hold the datapath
 * lock. Functions return 0 or a negative errno. */
#ifndef AMBIENT_POD_POLICY_H
#define AMBIENT_POD_POLICY_H

#include <stdbool.h>

#include "../progs/ambient_shared.h"

struct policy_maps {
	int policy_fd;
	int counters_fd;
	int slot_owner_fd;
	int captured_fd;
	int gated_fd;
};

/* Gives m->slot a free counters slot (zeroed), unless it holds one already. */
int policy_claim_slot(const struct policy_maps *maps, const char *uid, struct pod_meta *m);
void policy_release_slot(const struct policy_maps *maps, const char *uid, const struct pod_meta *m);

/* Points every address of the pod at its slot and flags; `old` (may be NULL) is the previous record,
 * whose addresses that the pod no longer has are removed. */
__u32 policy_flags(const struct pod_meta *m);
int policy_write(const struct policy_maps *maps, const struct pod_meta *m, const struct pod_meta *old);
/* Is ip in pod_policy for a pod other than the one of `slot` (a live pod's slot, or slot 0)? */
bool policy_owned_by_other(const struct policy_maps *maps, const struct pod_ip *ip, __u32 slot);
/* policy_write for addresses found in the pod's netns (not given by the API): one that is another
 * pod's already is skipped, never overwritten. */
int policy_write_secondary(const struct policy_maps *maps, const struct pod_meta *m,
			   const struct pod_meta *old);
/* Removes the pod's addresses, except those another pod has claimed since. */
void policy_remove(const struct policy_maps *maps, const struct pod_meta *m);

/* The interfaces of a pod netns that carry its hooks: the pod's own, its other ones, its reroute
 * ones (those present: ingress hook only). */
struct captured_set {
	unsigned count;
	__u32 ifindex[1 + MAX_POD_IFACES + MAX_REROUTE_IFACES];
	bool ingress_only[1 + MAX_POD_IFACES + MAX_REROUTE_IFACES];
	bool secondary[1 + MAX_POD_IFACES + MAX_REROUTE_IFACES]; /* not the pod's own interface */
};

void captured_set_of(const struct pod_meta *m, const struct pod_ifaces *f, struct captured_set *out);
/* Writes the pod's entries in captured_ifaces (with its netns cookie), then its gated_netns entry;
 * those of `gone` (may be NULL) not in `now` are removed. */
int captured_write(const struct policy_maps *maps, const struct pod_meta *m, const struct captured_set *now,
		   const struct captured_set *gone);
/* Removes the pod's gated_netns entry, then its captured_ifaces entries (those still carrying its
 * netns cookie). */
void captured_remove(const struct policy_maps *maps, const struct pod_meta *m, const struct captured_set *s);
/* Is this interface in the pod's entries, as the set has it (ingress only or both ways)? */
bool captured_has(const struct policy_maps *maps, const struct pod_meta *m, const struct captured_set *s,
		  unsigned i);
/* Does gated_netns lead the egress guard from the pod's netns to its slot? */
bool captured_gated(const struct policy_maps *maps, const struct pod_meta *m);
/* Entries of slots nobody holds (a crash between writes). */
void captured_gc(const struct policy_maps *maps);

/* Sums a slot's per-CPU counters. */
int counters_read(const struct policy_maps *maps, __u32 slot, struct pod_counters *out);

#endif
