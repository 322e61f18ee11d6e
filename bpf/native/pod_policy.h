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

/* Sums a slot's per-CPU counters. */
int counters_read(const struct policy_maps *maps, __u32 slot, struct pod_counters *out);

#endif
