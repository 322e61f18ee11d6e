#define _GNU_SOURCE
#include "iface_guard.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/if_arp.h>

#include <bpf/libbpf.h>

#include "hooks.h"

const char *const guard_prog_names[2] = {
	[LINK_ETHERNET] = "pod_guard_egress",
	[LINK_NONE] = "pod_guard_egress_l3",
};

/* Its own cls_bpf priority: on an interface that is becoming captured, both run for a moment. */
#define GUARD_TC_PRIORITY (TC_FILTER_PRIORITY + 1)

static void pin_of(const char *pod_dir, unsigned ifindex, char out[PATH_MAX])
{
	snprintf(out, PATH_MAX, "%s/guard-%u", pod_dir, ifindex);
}

bool guards_pin(const char *name)
{
	return !strncmp(name, "guard-", 6);
}

/* Which interfaces of the netns carry no pod_egress; false for the rest (lo among them). */
struct guard_set {
	unsigned count;
	unsigned ifindex[64];
	char name[64][IF_NAMESIZE];
	enum link_layer l2[64];
};

static bool is_captured(unsigned ifindex, unsigned primary, const struct pod_ifaces *captured)
{
	if (ifindex == primary)
		return true;
	for (unsigned i = 0; captured && i < captured->count && i < MAX_POD_IFACES; i++)
		if (captured->iface[i].ifindex == ifindex)
			return true;
	return false;
}

static bool in_set(const struct guard_set *s, unsigned ifindex)
{
	for (unsigned i = 0; i < s->count; i++)
		if (s->ifindex[i] == ifindex)
			return true;
	return false;
}

/* The interfaces to guard; -errno when the netns cannot be read. An interface gone meanwhile is
 * left out; past the set's size the rest are said as missing by verify and refused by sync. */
static int wanted(struct rtnl *nl, unsigned primary, const struct pod_ifaces *captured, struct guard_set *s,
		  unsigned *overflow)
{
	struct if_nameindex *all = if_nameindex(), *i;
	int err = 0;

	s->count = 0;
	*overflow = 0;
	if (!all)
		return -errno;
	for (i = all; i->if_index && !err; i++) {
		unsigned short type = 0;

		if (i->if_index == LOOPBACK_IFINDEX || is_captured(i->if_index, primary, captured))
			continue;
		err = rtnl_link_type(nl, (int)i->if_index, &type);
		if (err == -ENODEV) {
			err = 0;
			continue;
		}
		if (err || type == ARPHRD_LOOPBACK)
			continue;
		if (s->count == sizeof(s->ifindex) / sizeof(s->ifindex[0])) {
			(*overflow)++;
			continue;
		}
		s->ifindex[s->count] = i->if_index;
		snprintf(s->name[s->count], IF_NAMESIZE, "%s", i->if_name);
		s->l2[s->count++] = type == ARPHRD_ETHER ? LINK_ETHERNET : LINK_NONE;
	}
	if_freenameindex(all);
	return err;
}

static int guard_one(const char *pod_dir, const int prog_fd[2], unsigned mode, unsigned ifindex,
		     enum link_layer l2)
{
	char pin[PATH_MAX];

	if (mode == ATTACH_MODE_TCX) {
		pin_of(pod_dir, ifindex, pin);
		return attach_tcx_pinned(pin, prog_fd[l2], ifindex, AMB_BPF_TCX_EGRESS);
	}
	LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = (int)ifindex, .attach_point = BPF_TC_EGRESS);
	LIBBPF_OPTS(bpf_tc_opts, opts, .handle = TC_FILTER_HANDLE, .priority = GUARD_TC_PRIORITY,
		    .prog_fd = prog_fd[l2], .flags = BPF_TC_F_REPLACE);
	int err;

	hook.attach_point = BPF_TC_INGRESS | BPF_TC_EGRESS; /* clsact: made if missing */
	err = bpf_tc_hook_create(&hook);
	if (err && err != -EEXIST)
		return err;
	hook.attach_point = BPF_TC_EGRESS;
	return bpf_tc_attach(&hook, &opts);
}

/* The guard's cls_bpf filter off one device, and the clsact qdisc with it if that leaves it empty
 * (a captured interface keeps its own filters, so its qdisc stays). */
static void unguard_tc(unsigned ifindex)
{
	LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = (int)ifindex, .attach_point = BPF_TC_EGRESS);
	LIBBPF_OPTS(bpf_tc_opts, opts, .handle = TC_FILTER_HANDLE, .priority = GUARD_TC_PRIORITY);

	if (bpf_tc_detach(&hook, &opts) == 0)
		tc_destroy_clsact_if_unused((int)ifindex);
}

/* Guard pins of the pod directory whose interface `keep` does not hold (all of them without keep). */
static void unpin_stale(const char *pod_dir, const struct guard_set *keep)
{
	char pin[PATH_MAX];
	struct dirent *de;
	DIR *dir = opendir(pod_dir);

	if (!dir)
		return;
	while ((de = readdir(dir))) {
		char *end;
		unsigned long ifindex;

		if (!guards_pin(de->d_name))
			continue;
		ifindex = strtoul(de->d_name + 6, &end, 10);
		if (keep && *end == '\0' && in_set(keep, (unsigned)ifindex))
			continue;
		snprintf(pin, sizeof(pin), "%s/%s", pod_dir, de->d_name);
		detach_pinned_link(pin);
	}
	closedir(dir);
}

/* Every device's guard filter, but those `keep` holds (all of them without keep). */
static void unguard_tc_all(const struct guard_set *keep)
{
	struct if_nameindex *all = if_nameindex(), *i;

	for (i = all; i && i->if_index; i++)
		if (!keep || !in_set(keep, i->if_index))
			unguard_tc(i->if_index);
	if (all)
		if_freenameindex(all);
}

int guards_sync(const char *pod_dir, const int prog_fd[2], unsigned mode, unsigned primary,
		const struct pod_ifaces *captured, bool prune, struct ifaces_refused *ref, struct dp_error *e)
{
	struct guard_set *want = calloc(1, sizeof(*want));
	struct rtnl nl;
	unsigned overflow = 0;
	int err;

	if (!want)
		return dp_fail(e, DPE_SYSTEM, ENOMEM, "guards");
	if ((err = rtnl_open(&nl))) {
		free(want);
		return dp_fail(e, DPE_SYSTEM, err, "cannot open rtnetlink in the pod netns");
	}
	err = wanted(&nl, primary, captured, want, &overflow);
	rtnl_close(&nl);
	if (err) {
		free(want);
		return dp_fail(e, DPE_SYSTEM, err, "cannot list the interfaces of the pod netns");
	}
	if (overflow && !ref) {
		dp_fail(e, DPE_POD_IP, 0, "the pod netns has more than %u uncaptured interfaces to guard",
			want->count);
		free(want);
		return -1;
	}
	if (overflow && prune)
		ifaces_refuse(ref, "%u interfaces of the pod beyond %u are left without the egress guard",
			      overflow, want->count);
	for (unsigned i = 0; i < want->count; i++) {
		int one = guard_one(pod_dir, prog_fd, mode, want->ifindex[i], want->l2[i]);

		if (one == -ENODEV || !one)
			continue;
		if (!ref) {
			dp_fail(e, DPE_SYSTEM, one, "cannot put the egress guard on interface %s",
				want->name[i]);
			free(want);
			return -1;
		}
		if (prune) /* (said once, by the last call) */
			ifaces_refuse(ref, "cannot put the egress guard on interface %s: %s", want->name[i],
				      strerror(-one));
	}
	if (prune) {
		unpin_stale(pod_dir, mode == ATTACH_MODE_TCX ? want : NULL);
		unguard_tc_all(mode == ATTACH_MODE_TCX ? NULL : want);
	}
	free(want);
	return 0;
}

void guards_remove(const char *pod_dir, bool in_netns)
{
	unpin_stale(pod_dir, NULL);
	if (in_netns)
		unguard_tc_all(NULL);
}

void guards_verify(struct rtnl *nl, const char *pod_dir, unsigned mode, unsigned primary,
		   const struct pod_ifaces *captured, struct dp_verify_result *r)
{
	struct guard_set *want = calloc(1, sizeof(*want));
	unsigned overflow = 0;

	if (!want || wanted(nl, primary, captured, want, &overflow)) {
		problem(r, "cannot list the interfaces of the pod netns to check their egress guards");
		free(want);
		return;
	}
	if (overflow)
		problem(r, "%u interfaces of the pod beyond %u are without the egress guard", overflow,
			want->count);
	for (unsigned i = 0; i < want->count; i++) {
		const char *name = want->name[i], *prog = guard_prog_names[want->l2[i]];
		char hook[48];

		snprintf(hook, sizeof(hook), "the egress guard of interface %s", name);
		if (mode == ATTACH_MODE_TCX) {
			struct tcx_link_info info;
			char pin[PATH_MAX];

			pin_of(pod_dir, want->ifindex[i], pin);
			if (pinned_link_info(pin, &info) || info.ifindex != want->ifindex[i])
				problem(r, "interface %s has no egress guard", name);
			else
				verify_program_name(r, info.prog_id, hook, prog);
		} else {
			LIBBPF_OPTS(bpf_tc_hook, tch, .ifindex = (int)want->ifindex[i],
				    .attach_point = BPF_TC_EGRESS);
			LIBBPF_OPTS(bpf_tc_opts, opts, .handle = TC_FILTER_HANDLE,
				    .priority = GUARD_TC_PRIORITY);

			if (bpf_tc_query(&tch, &opts))
				problem(r, "interface %s has no egress guard", name);
			else
				verify_program_name(r, opts.prog_id, hook, prog);
		}
	}
	free(want);
}
