/* The tc/tcx hook primitives of datapath.c, shared with the modules that hook more devices of a pod
 * (pod_ifaces.c). All act on the calling thread's netns unless they go through a pin. */
#ifndef AMBIENT_HOOKS_H
#define AMBIENT_HOOKS_H

#include <stdbool.h>
#include <linux/types.h>

#include "datapath.h"

enum hook_dir { HOOK_INGRESS = 0, HOOK_EGRESS = 1 };

/* tcx link info; the 6.1 uapi headers predate the tcx member of bpf_link_info's union. */
struct tcx_link_info {
	__u32 type;
	__u32 id;
	__u32 prog_id;
	__u32 pad;
	__u32 ifindex;
	__u32 attach_type;
	__u8 rest[64];
};

/* A pinned link's info (-errno if the pin holds none); `size` is info's, of any link type's struct. */
int pinned_link(const char *pin, void *info, __u32 size);
int pinned_link_info(const char *pin, struct tcx_link_info *info);
void detach_pinned_link(const char *pin);
int attach_tcx_pinned(const char *pin, int prog_fd, unsigned ifindex, unsigned type);
int tc_attach_filters(int ifindex, const int prog_fd[2], bool *created);
bool tc_detach_filters(int ifindex, bool owns_clsact);
/* Removes a device's clsact qdisc if nobody has filters on it any more; true if it did. */
bool tc_destroy_clsact_if_unused(int ifindex);

void problem(struct dp_verify_result *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void verify_program_name(struct dp_verify_result *r, __u32 prog_id, const char *hook, const char *want);

#endif
