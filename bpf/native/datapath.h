/* The pod datapath: the BPF object loaded once per bpffs root, attached to many pods.
 * Every function may block (syscalls, a netns thread): call them off the JS main thread. */
#ifndef AMBIENT_DATAPATH_H
#define AMBIENT_DATAPATH_H

#include <stdbool.h>
#include <stddef.h>

#include "../progs/ambient_shared.h"
#include "dp_error.h"

struct datapath;

enum dp_mode_request {
	DP_MODE_AUTO = 0, /* tcx where the kernel has it, else tc */
	DP_MODE_TCX = ATTACH_MODE_TCX,
	DP_MODE_TC = ATTACH_MODE_TC,
};

/* tc_netns_cookie: whether the tc programs read the cookie of the netns they run in, and so honour a
 * pod_policy entry only in the netns it was written for (1), or not (0: a kernel where they cannot,
 * or a test); -1: probed here (probe.h, tc_reads_netns_cookie). Asking 1 of a kernel where they
 * cannot fails the load. */
int dp_open(const char *root, const char *object_path, int tc_netns_cookie, struct datapath **out,
	    struct dp_error *e);
/* Does the loaded object check pod_policy entries' netns cookies (dp_open's tc_netns_cookie)? */
bool dp_tc_netns_cookie(const struct datapath *dp);
void dp_close(struct datapath *dp);

struct dp_attach_request {
	char uid[POD_UID_LEN];
	char netns_path[NETNS_PATH_LEN];
	struct pod_ip ips[MAX_POD_IPS];
	unsigned ip_count;
	enum dp_mode_request mode;
	unsigned flags; /* POD_F_* */
	char reroute[MAX_REROUTE_IFACES][16]; /* interface names whose inbound TCP goes to 15001 */
	unsigned reroute_count;
	char pod_cgroup
		[NETNS_PATH_LEN]; /* the pod's cgroup v2 directory: socket-option guard, and DNS capture with POD_F_DNS_CAPTURE; empty: no hooks there */
	char host_netns
		[NETNS_PATH_LEN]; /* the node's netns, where the pod's veth peer is; empty: no probe SNAT */
};

struct dp_attach_result {
	unsigned mode;
	int ifindex;
	bool updated; /* the pod was attached already (same netns): updated in place */
	int host_ifindex; /* kubelet probes handled on this node-side device; 0: not (no veth peer there) */
	char warning[1024]; /* an attached pod's interfaces (or addresses) left out, each said; "": none */
};

int dp_attach(struct datapath *dp, const struct dp_attach_request *req, struct dp_attach_result *res,
	      struct dp_error *e);

struct dp_detach_result {
	bool found;
	char warning[512]; /* set when the netns could not be entered to undo its changes */
};

int dp_detach(struct datapath *dp, const char *uid, struct dp_detach_result *res, struct dp_error *e);

struct dp_pod {
	char uid[POD_UID_LEN];
	struct pod_meta meta;
	struct pod_ifaces ifaces; /* its other interfaces, captured like its own */
	bool netns_present; /* the netns path still names the attached namespace */
	bool links_pinned; /* tcx: both link pins present */
	struct pod_counters counters;
};

/* Fills *pods (malloc'd, caller frees). */
int dp_list(struct datapath *dp, struct dp_pod **pods, size_t *count, struct dp_error *e);

#define DP_MAX_PROBLEMS 12
struct dp_verify_result {
	bool found;
	unsigned problem_count;
	char problems[DP_MAX_PROBLEMS][200];
};

int dp_verify(struct datapath *dp, const char *uid, struct dp_verify_result *res, struct dp_error *e);

/* Removes pins and records of pods whose netns is gone; fills *uids (malloc'd, caller frees). */
int dp_gc(struct datapath *dp, char (**uids)[POD_UID_LEN], size_t *count, struct dp_error *e);

/* Node-wide settings the programs read: SETTING_* flags, and what strict mode lets out. */
struct dp_settings_request {
	unsigned flags;
	struct strict_allow_key allow[MAX_STRICT_ALLOW];
	unsigned allow_count;
};
int dp_configure(struct datapath *dp, const struct dp_settings_request *req, struct dp_error *e);

/* Sockets of this cgroup v2 (by id) are ztunnel's: their 0x539-marked traffic skips redirection. */
/* With sk_lookup steering, also hooks the cgroup (sockops) to learn ztunnel's listeners. */
int dp_trust_ztunnel_cgroup(struct datapath *dp, const char *cgroup_dir, struct dp_error *e);

/* Counters of traffic not attributed to any pod (slot 0). */
int dp_node_counters(struct datapath *dp, struct pod_counters *out, struct dp_error *e);

#endif
