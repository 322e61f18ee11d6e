/* The hooks on a pod's cgroup v2 (pins pods/<uid>/<program>): attached, updated in place, verified
 * and detached here, side by side. The caller holds the datapath lock. */
#ifndef AMBIENT_CGROUP_HOOKS_H
#define AMBIENT_CGROUP_HOOKS_H

#include <stdbool.h>
#include <linux/types.h>

#include <bpf/libbpf.h>

#include "datapath.h"
#include "dp_error.h"
#include "../progs/ambient_shared.h"

#define CGROUP_HOOKS 12

struct cgroup_hooks {
	const char *root; /* the bpffs root the pins live under */
	int prog_fd[CGROUP_HOOKS];
	bool egress_guard; /* programs read a device's netns cookie: the egress guard can tell the pod */
};

/* Finds the hooks' programs in the loaded object. */
void cgroup_hooks_init(struct cgroup_hooks *h, const char *root, struct bpf_object *obj, bool egress_guard);

/* First half of an attach or update: links from the cgroup at `path` to the hooks pod m wants,
 * swapped in place when they are there already; links on a new cgroup are made and pinned beside
 * the old ones, which keep running until cgroup_hooks_commit. An empty path turns them off (at
 * commit). Sets m->pod_cgroup_id. */
int cgroup_hooks_prepare(const struct cgroup_hooks *h, const char *uid, const char *path, struct pod_meta *m,
			 struct dp_error *e);
/* Second half, once the update is recorded: the prepared links replace the old ones, hooks no
 * longer wanted go (all of them when `path` was empty). */
int cgroup_hooks_commit(const struct cgroup_hooks *h, const char *uid, const char *path, struct pod_meta *m,
			struct dp_error *e);
/* Drops links prepared for an update that did not happen. */
void cgroup_hooks_abort(const struct cgroup_hooks *h, const char *uid);
void cgroup_hooks_detach(const struct cgroup_hooks *h, const char *uid, struct pod_meta *m);
/* Each hook pod m wants is linked to its cgroup, running the program it should. */
void cgroup_hooks_verify(const struct cgroup_hooks *h, const char *uid, const struct pod_meta *m,
			 struct dp_verify_result *r);

/* The cgroup and program of a pinned cgroup link (-errno if the pin holds none). */
int pinned_cgroup_link(const char *pin, __u64 *cgroup_id, __u32 *prog_id);

#endif
