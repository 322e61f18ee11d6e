#define _GNU_SOURCE
#include "pod_ifaces.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <net/if.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/if_arp.h>

#include <bpf/libbpf.h>

#include "hooks.h"

static const char *const dir_names[2] = { "ingress", "egress" };
const char *const iface_prog_names[2][2] = {
	[LINK_ETHERNET] = { "pod_ingress", "pod_egress" },
	[LINK_NONE] = { "pod_ingress_l3", "pod_egress_l3" },
};
static const unsigned tcx_types[2] = { AMB_BPF_TCX_INGRESS, AMB_BPF_TCX_EGRESS };

static void pin_of(const char *pod_dir, unsigned ifindex, int d, char out[PATH_MAX])
{
	snprintf(out, PATH_MAX, "%s/iface-%u-%s", pod_dir, ifindex, dir_names[d]);
}

bool ifaces_pin(const char *name)
{
	return !strncmp(name, "iface-", 6);
}

static bool is_local_only(const uint8_t a[16])
{
	static const uint8_t v4_prefix[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
	static const uint8_t v6_loopback[16] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1 };

	if (memcmp(a, v4_prefix, 12) == 0)
		return a[12] == 127;
	return memcmp(a, v6_loopback, 16) == 0 || (a[0] == 0xfe && (a[1] & 0xc0) == 0x80);
}

static bool has_ip(const struct pod_ip *ips, unsigned n, const uint8_t a[16])
{
	for (unsigned i = 0; i < n; i++)
		if (!memcmp(ips[i].addr, a, 16))
			return true;
	return false;
}

static const struct pod_iface *find_iface(const struct pod_ifaces *f, unsigned ifindex)
{
	for (unsigned i = 0; i < f->count && i < MAX_POD_IFACES; i++)
		if (f->iface[i].ifindex == ifindex)
			return &f->iface[i];
	return NULL;
}

struct scan_ctx {
	const struct pod_meta *m;
	struct pod_ifaces *out;
	unsigned primary;
	bool overflow;
	uint8_t extra[16]; /* the first address that did not fit */
};

static void collect_address(const uint8_t addr[16], int ifindex, void *p)
{
	struct scan_ctx *c = p;
	struct pod_ifaces *f = c->out;

	if (((unsigned)ifindex != c->primary && !find_iface(f, (unsigned)ifindex)) || is_local_only(addr) ||
	    has_ip(c->m->ips, c->m->ip_count < MAX_POD_IPS ? c->m->ip_count : MAX_POD_IPS, addr) ||
	    has_ip(f->addrs, f->addr_count, addr))
		return;
	if (f->addr_count == MAX_POD_IPS) {
		if (!c->overflow)
			memcpy(c->extra, addr, 16);
		c->overflow = true;
		return;
	}
	memcpy(f->addrs[f->addr_count++].addr, addr, 16);
}

static const char *addr_str(const uint8_t a[16], char buf[INET6_ADDRSTRLEN])
{
	static const uint8_t v4_prefix[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };

	if (!memcmp(a, v4_prefix, 12))
		return inet_ntop(AF_INET, a + 12, buf, INET6_ADDRSTRLEN);
	return inet_ntop(AF_INET6, a, buf, INET6_ADDRSTRLEN);
}

void ifaces_refuse(struct ifaces_refused *ref, const char *fmt, ...)
{
	va_list ap;

	if (ref->count >= IFACES_MAX_REFUSED) {
		ref->more++;
		return;
	}
	va_start(ap, fmt);
	vsnprintf(ref->message[ref->count++], sizeof(ref->message[0]), fmt, ap);
	va_end(ap);
}

int ifaces_scan(struct rtnl *nl, unsigned primary, const char (*skip)[16], unsigned skip_count,
		const struct pod_meta *m, struct pod_ifaces *out, struct ifaces_refused *ref,
		struct dp_error *e)
{
	struct if_nameindex *all = if_nameindex(), *i;
	struct scan_ctx ctx = { .m = m, .out = out, .primary = primary };
	char a[INET6_ADDRSTRLEN];
	int err = 0;

	memset(out, 0, sizeof(*out));
	memset(ref, 0, sizeof(*ref));
	if_indextoname(primary, out->own);
	if (!all)
		return dp_fail(e, DPE_SYSTEM, errno, "cannot list the interfaces of the pod netns");
	/* One interface refused is no reason to leave the others unhooked: each is recorded or refused
	 * on its own. */
	for (i = all; i->if_index && !err; i++) {
		unsigned short type = 0;
		bool skipped = i->if_index == primary || i->if_index == LOOPBACK_IFINDEX;

		for (unsigned s = 0; s < skip_count; s++)
			skipped |= !strncmp(skip[s], i->if_name, 16);
		if (skipped)
			continue;
		err = rtnl_link_type(nl, (int)i->if_index, &type);
		if (err == -ENODEV) { /* gone meanwhile */
			err = 0;
			continue;
		}
		if (err)
			dp_fail(e, DPE_SYSTEM, err, "cannot read the type of interface %s", i->if_name);
		else if (type == ARPHRD_LOOPBACK)
			continue;
		else if (type != ARPHRD_ETHER && type != ARPHRD_NONE)
			/* GRE and its kin may carry their outer header at tc already (header_ops). */
			ifaces_refuse(
				ref,
				"interface %s of the pod has a link header tc cannot read past (type %u: "
				"a GRE or other tunnel device); its traffic cannot be captured: refused "
				"(list it in istio.io/reroute-virtual-interfaces if it carries a "
				"workload's outbound traffic)",
				i->if_name, type);
		else if (out->count == MAX_POD_IFACES)
			ifaces_refuse(
				ref,
				"interface %s: the pod has more than %d interfaces besides its own: refused",
				i->if_name, MAX_POD_IFACES);
		else {
			struct pod_iface *f = &out->iface[out->count++];

			snprintf(f->name, sizeof(f->name), "%s", i->if_name);
			f->ifindex = i->if_index;
		}
	}
	if_freenameindex(all);
	if (err)
		return -1;
	if ((err = rtnl_list_addresses(nl, collect_address, &ctx)))
		return dp_fail(e, DPE_SYSTEM, err, "cannot list the addresses of the pod netns");
	/* Capture does not need them (any destination arriving on a hooked interface is the pod's):
	 * the first MAX_POD_IPS are kept, the others dropped and said. */
	if (ctx.overflow) {
		ref->dropped_addresses = true;
		ifaces_refuse(
			ref,
			"the pod's interfaces carry more than %d addresses besides its IPs (%s is one too "
			"many): "
			"those are not recorded",
			MAX_POD_IPS, addr_str(ctx.extra, a));
	}
	return 0;
}

static int set_accept_local(struct pod_iface *f)
{
	struct rtnl nl;
	uint32_t cur = 0;
	int err = rtnl_open(&nl);

	if (err)
		return err;
	/* Looped-back packets carry the pod's own address as source: without accept_local the stack
	 * drops them as martians (as on the pod's own interface). */
	if (!(err = rtnl_get_accept_local(&nl, (int)f->ifindex, &cur)) && cur != 1) {
		if (!f->owns_accept_local)
			f->saved_accept_local = cur;
		if (!(err = rtnl_set_accept_local(&nl, (int)f->ifindex, 1)))
			f->owns_accept_local = 1;
	}
	rtnl_close(&nl);
	return err;
}

/* TEST ONLY: AMBIENT_BPF_FAULT_IFACE=<name> makes hooking that interface in an update of an attached
 * pod fail before any work, so tests can show what a failure to hook one interface leaves.
 * Never set in production; a first attach and the restore of a failed update ignore it. */
static int injected_failure(const struct pod_iface *f)
{
	const char *name = getenv("AMBIENT_BPF_FAULT_IFACE");

	return name && !strncmp(name, f->name, sizeof(f->name)) ? -EIO : 0;
}

static int hook_one(const char *pod_dir, int prog_fd[2][2], unsigned mode, struct pod_iface *f)
{
	enum link_layer l2;
	char pin[PATH_MAX];
	struct rtnl nl;
	int err = rtnl_open(&nl);

	if (err)
		return err;
	err = rtnl_link_layer(&nl, (int)f->ifindex, &l2);
	rtnl_close(&nl);
	if (err)
		return err;
	if (mode == ATTACH_MODE_TCX) {
		for (int d = 0; d < 2 && !err; d++) {
			pin_of(pod_dir, f->ifindex, d, pin);
			err = attach_tcx_pinned(pin, prog_fd[l2][d], f->ifindex, tcx_types[d]);
		}
	} else {
		bool created = false;

		err = tc_attach_filters((int)f->ifindex, prog_fd[l2], &created);
		if (created)
			f->owns_clsact = 1;
	}
	return err ? err : set_accept_local(f);
}

/* Are both of this interface's hooks of `mode` in place (run in the pod netns)? */
static bool still_hooked(const char *pod_dir, const struct pod_iface *f, unsigned mode)
{
	for (int d = 0; d < 2; d++) {
		if (mode == ATTACH_MODE_TCX) {
			struct tcx_link_info info;
			char pin[PATH_MAX];

			pin_of(pod_dir, f->ifindex, d, pin);
			if (pinned_link_info(pin, &info) || info.ifindex != f->ifindex)
				return false;
		} else {
			LIBBPF_OPTS(bpf_tc_hook, tch, .ifindex = (int)f->ifindex,
				    .attach_point = d == HOOK_INGRESS ? BPF_TC_INGRESS : BPF_TC_EGRESS);
			LIBBPF_OPTS(bpf_tc_opts, opts, .handle = TC_FILTER_HANDLE,
				    .priority = TC_FILTER_PRIORITY);

			if (bpf_tc_query(&tch, &opts))
				return false;
		}
	}
	return true;
}

/* The hooks of one mode; `all`: its accept_local too. */
static void unhook_one(const char *pod_dir, struct pod_iface *f, unsigned mode, bool in_netns, bool all)
{
	char pin[PATH_MAX];

	if (mode == ATTACH_MODE_TCX) {
		for (int d = 0; d < 2; d++) {
			pin_of(pod_dir, f->ifindex, d, pin);
			detach_pinned_link(pin);
		}
	} else if (in_netns && tc_detach_filters((int)f->ifindex, f->owns_clsact)) {
		f->owns_clsact = 0;
	}
	if (all && in_netns && f->owns_accept_local) {
		struct rtnl nl;

		if (rtnl_open(&nl) == 0) {
			rtnl_set_accept_local(&nl, (int)f->ifindex, f->saved_accept_local);
			rtnl_close(&nl);
		}
		f->owns_accept_local = 0;
	}
}

void ifaces_carry_owned(struct pod_ifaces *next, unsigned mode, const struct pod_ifaces *prev,
			unsigned prev_mode)
{
	for (unsigned j = 0; j < next->count && j < MAX_POD_IFACES; j++) {
		struct pod_iface *f = &next->iface[j];
		const struct pod_iface *was = find_iface(prev, f->ifindex);

		f->owns_accept_local = was ? was->owns_accept_local : 0;
		f->saved_accept_local = was ? was->saved_accept_local : 0;
		f->owns_clsact = was && prev_mode == mode ? was->owns_clsact : 0;
	}
}

int ifaces_hook(const char *pod_dir, int prog_fd[2][2], unsigned mode, struct pod_ifaces *next,
		const struct pod_ifaces *prev, unsigned prev_mode, struct ifaces_refused *ref,
		struct dp_error *e)
{
	unsigned n = next->count < MAX_POD_IFACES ? next->count : MAX_POD_IFACES, done = 0;
	int err = 0;

	ifaces_carry_owned(next, mode, prev, prev_mode);
	for (; done < n && !err; done++) {
		struct pod_iface *f = &next->iface[done];
		int one = ref ? injected_failure(f) : 0;
		const struct pod_iface *was;

		if (!one)
			one = hook_one(pod_dir, prog_fd, mode, f);

		if (!one)
			continue;
		if (!ref) {
			err = dp_fail(e, DPE_SYSTEM, one, "cannot hook interface %s", f->name);
			continue;
		}
		/* Partial: this one is said and the others hooked all the same. An interface that was
		 * hooked in this mode, and whose hooks are still there (a failed update of a live link
		 * or filter leaves it), keeps its record and its hooks: dropping the record would make
		 * the loop below unhook it. One whose hooks are gone (its device was re-created, its
		 * qdisc deleted) or a new one is left out: without a record, the socket lookup refuses
		 * what comes in on it. */
		was = find_iface(prev, f->ifindex);
		if (was && prev_mode != mode) {
			/* Its old-mode hooks cannot stay alone (one mode per pod): the update fails
			 * and the previous attachment is restored, never this interface unhooked. */
			err = dp_fail(e, DPE_SYSTEM, one, "cannot hook interface %s in the new mode",
				      f->name);
			continue;
		}
		if (was && still_hooked(pod_dir, f, mode)) {
			ifaces_refuse(ref, "cannot hook interface %s again (%s): its previous hooks are kept",
				      f->name, strerror(-one));
			*f = *was;
			continue;
		}
		ifaces_refuse(ref, "cannot hook interface %s: %s", f->name, strerror(-one));
		unhook_one(pod_dir, f, mode, true, !was);
		f->ifindex = 0; /* dropped below */
	}
	if (err) {
		for (unsigned j = 0; j < done; j++) {
			const struct pod_iface *was = find_iface(prev, next->iface[j].ifindex);

			if (!was || prev_mode != mode)
				unhook_one(pod_dir, &next->iface[j], mode, true, !was);
		}
		return -1;
	}
	if (ref) {
		unsigned k = 0;

		for (unsigned j = 0; j < n; j++)
			if (next->iface[j].ifindex)
				next->iface[k++] = next->iface[j];
		for (unsigned j = k; j < n; j++)
			memset(&next->iface[j], 0, sizeof(next->iface[j]));
		next->count = k;
	}
	/* Then what is gone from the netns, replaced, or hooked in the other mode. */
	for (unsigned i = 0; i < prev->count && i < MAX_POD_IFACES; i++) {
		struct pod_iface was = prev->iface[i];
		bool kept = find_iface(next, was.ifindex) != NULL;

		if (kept && prev_mode == mode)
			continue;
		/* (A kept interface's accept_local now belongs to next's entry.) */
		unhook_one(pod_dir, &was, prev_mode, true, !kept);
	}
	return 0;
}

void ifaces_unhook(const char *pod_dir, struct pod_ifaces *f, unsigned mode, bool in_netns)
{
	for (unsigned i = 0; i < f->count && i < MAX_POD_IFACES; i++)
		unhook_one(pod_dir, &f->iface[i], mode, in_netns, true);
}

void ifaces_verify(struct rtnl *nl, const char *pod_dir, unsigned mode, const struct pod_ifaces *f,
		   const struct pod_ifaces *now, struct dp_verify_result *r)
{
	char a[INET6_ADDRSTRLEN];

	for (unsigned i = 0; i < f->count && i < MAX_POD_IFACES; i++) {
		const struct pod_iface *x = &f->iface[i];
		uint32_t al = 0;
		char hook[48];
		bool exists = false;
		enum link_layer l2;

		if (rtnl_link_exists(nl, (int)x->ifindex, &exists) || !exists ||
		    rtnl_link_layer(nl, (int)x->ifindex, &l2)) {
			problem(r, "captured interface %s (%u) is gone from the netns", x->name, x->ifindex);
			continue;
		}
		for (int d = 0; d < 2; d++) {
			snprintf(hook, sizeof(hook), "the %s hook of interface %s", dir_names[d], x->name);
			if (mode == ATTACH_MODE_TCX) {
				struct tcx_link_info info;
				char pin[PATH_MAX];

				pin_of(pod_dir, x->ifindex, d, pin);
				if (pinned_link_info(pin, &info) || info.ifindex != x->ifindex)
					problem(r, "%s is missing or detached", hook);
				else
					verify_program_name(r, info.prog_id, hook, iface_prog_names[l2][d]);
			} else {
				LIBBPF_OPTS(bpf_tc_hook, tch, .ifindex = (int)x->ifindex,
					    .attach_point =
						    d == HOOK_INGRESS ? BPF_TC_INGRESS : BPF_TC_EGRESS);
				LIBBPF_OPTS(bpf_tc_opts, opts, .handle = TC_FILTER_HANDLE,
					    .priority = TC_FILTER_PRIORITY);

				if (bpf_tc_query(&tch, &opts))
					problem(r, "%s (tc filter) is missing", hook);
				else
					verify_program_name(r, opts.prog_id, hook, iface_prog_names[l2][d]);
			}
		}
		if (rtnl_get_accept_local(nl, (int)x->ifindex, &al) == 0 && al != 1)
			problem(r, "accept_local is %u on interface %s", al, x->name);
	}
	for (unsigned i = 0; now && i < now->count && i < MAX_POD_IFACES; i++)
		if (!find_iface(f, now->iface[i].ifindex))
			problem(r, "interface %s appeared and is not captured yet", now->iface[i].name);
	for (unsigned i = 0; now && i < now->addr_count && i < MAX_POD_IPS; i++)
		if (!has_ip(f->addrs, f->addr_count < MAX_POD_IPS ? f->addr_count : MAX_POD_IPS,
			    now->addrs[i].addr))
			problem(r, "address %s appeared on the pod's interfaces and is not the pod's yet",
				addr_str(now->addrs[i].addr, a));
}
