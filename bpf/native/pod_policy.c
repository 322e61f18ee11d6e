#define _GNU_SOURCE
#include "pod_policy.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

static struct pod_meta_key owner_key(const char *uid)
{
	struct pod_meta_key k;

	memset(&k, 0, sizeof(k));
	strncpy(k.uid, uid, sizeof(k.uid) - 1);
	return k;
}

/* FNV-1a: where a uid's slot search starts, so most claims take one lookup. */
static __u32 uid_hash(const char *uid)
{
	__u32 h = 2166136261u;

	for (; *uid; uid++)
		h = (h ^ (unsigned char)*uid) * 16777619u;
	return h;
}

static int counters_zero(const struct policy_maps *maps, __u32 slot)
{
	int cpus = libbpf_num_possible_cpus();
	struct pod_counters *zero;
	int err = 0;

	if (cpus <= 0)
		return cpus ? cpus : -EINVAL;
	zero = calloc((size_t)cpus, sizeof(*zero));
	if (!zero)
		return -ENOMEM;
	if (bpf_map_update_elem(maps->counters_fd, &slot, zero, BPF_ANY))
		err = -errno;
	free(zero);
	return err;
}

int policy_claim_slot(const struct policy_maps *maps, const char *uid, struct pod_meta *m)
{
	struct pod_meta_key mine = owner_key(uid), owner;
	__u32 start = uid_hash(uid);

	if (m->slot) {
		if (bpf_map_lookup_elem(maps->slot_owner_fd, &m->slot, &owner) == 0 &&
		    !strcmp(owner.uid, mine.uid))
			return 0;
		m->slot = 0; /* lost (a crash between writes): claim again */
	}
	/* Slot 0 is the node-wide slot, never a pod's. */
	for (__u32 i = 0; i < MAX_PODS - 1; i++) {
		__u32 slot = 1 + (start + i) % (MAX_PODS - 1);
		int err;

		if (bpf_map_lookup_elem(maps->slot_owner_fd, &slot, &owner))
			return -errno;
		if (owner.uid[0] && strcmp(owner.uid, mine.uid))
			continue;
		if ((err = counters_zero(maps, slot)))
			return err;
		if (bpf_map_update_elem(maps->slot_owner_fd, &slot, &mine, BPF_ANY))
			return -errno;
		m->slot = slot;
		return 0;
	}
	return -ENOSPC;
}

void policy_release_slot(const struct policy_maps *maps, const char *uid, const struct pod_meta *m)
{
	struct pod_meta_key mine = owner_key(uid), owner, empty;

	if (!m->slot || bpf_map_lookup_elem(maps->slot_owner_fd, &m->slot, &owner) ||
	    strcmp(owner.uid, mine.uid))
		return;
	memset(&empty, 0, sizeof(empty));
	bpf_map_update_elem(maps->slot_owner_fd, &m->slot, &empty, BPF_ANY);
}

static bool has_ip(const struct pod_meta *m, const struct pod_ip *ip)
{
	for (unsigned i = 0; i < m->ip_count && i < MAX_POD_IPS; i++)
		if (!memcmp(&m->ips[i], ip, sizeof(*ip)))
			return true;
	return false;
}

static void remove_ip(const struct policy_maps *maps, const struct pod_ip *ip, __u32 slot)
{
	struct pod_policy p;

	if (bpf_map_lookup_elem(maps->policy_fd, ip, &p) == 0 && p.slot == slot)
		bpf_map_delete_elem(maps->policy_fd, ip);
}

/* The flags the programs read: the pod's options, whether its DNS is captured at the socket (then
 * strict mode lets no DNS of the app's leave as is), and whether its captured interfaces are
 * recorded (then its socket lookup refuses what came in elsewhere). */
__u32 policy_flags(const struct pod_meta *m)
{
	return m->flags | (m->pod_cgroup_id && (m->flags & POD_F_DNS_CAPTURE) ? POD_F_DNS_CAPTURED : 0) |
	       (m->ifaces_gated ? POD_F_IFACES_GATED : 0);
}

int policy_write(const struct policy_maps *maps, const struct pod_meta *m, const struct pod_meta *old)
{
	struct pod_policy p = { .slot = m->slot, .flags = policy_flags(m), .netns_cookie = m->netns_cookie };

	for (unsigned i = 0; i < m->ip_count && i < MAX_POD_IPS; i++)
		if (bpf_map_update_elem(maps->policy_fd, &m->ips[i], &p, BPF_ANY))
			return -errno;
	for (unsigned i = 0; old && i < old->ip_count && i < MAX_POD_IPS; i++)
		if (!has_ip(m, &old->ips[i]))
			remove_ip(maps, &old->ips[i], old->slot);
	return 0;
}

bool policy_owned_by_other(const struct policy_maps *maps, const struct pod_ip *ip, __u32 slot)
{
	struct pod_meta_key owner;
	struct pod_policy p;

	if (bpf_map_lookup_elem(maps->policy_fd, ip, &p) || p.slot == slot)
		return false;
	/* Slot 0 is never a pod's; an entry of a slot nobody holds any more is a crash's leftover. */
	return !p.slot || bpf_map_lookup_elem(maps->slot_owner_fd, &p.slot, &owner) || owner.uid[0];
}

int policy_write_secondary(const struct policy_maps *maps, const struct pod_meta *m,
			   const struct pod_meta *old)
{
	struct pod_policy p = { .slot = m->slot, .flags = policy_flags(m), .netns_cookie = m->netns_cookie };

	for (unsigned i = 0; i < m->ip_count && i < MAX_POD_IPS; i++) {
		if (policy_owned_by_other(maps, &m->ips[i], m->slot))
			continue; /* never taken from its pod: verify reports it */
		if (bpf_map_update_elem(maps->policy_fd, &m->ips[i], &p, BPF_ANY))
			return -errno;
	}
	for (unsigned i = 0; old && i < old->ip_count && i < MAX_POD_IPS; i++)
		if (!has_ip(m, &old->ips[i]))
			remove_ip(maps, &old->ips[i], old->slot);
	return 0;
}

void policy_remove(const struct policy_maps *maps, const struct pod_meta *m)
{
	for (unsigned i = 0; i < m->ip_count && i < MAX_POD_IPS; i++)
		remove_ip(maps, &m->ips[i], m->slot);
}

void captured_set_of(const struct pod_meta *m, const struct pod_ifaces *f, struct captured_set *out)
{
	memset(out, 0, sizeof(*out));
	if (m->ifindex)
		out->ifindex[out->count++] = m->ifindex;
	for (unsigned i = 0; f && i < f->count && i < MAX_POD_IFACES; i++)
		if (f->iface[i].ifindex) {
			out->secondary[out->count] = true;
			out->ifindex[out->count++] = f->iface[i].ifindex;
		}
	for (unsigned i = 0; i < m->reroute_count && i < MAX_REROUTE_IFACES; i++)
		if (m->reroute[i].ifindex) {
			out->ingress_only[out->count] = true;
			out->secondary[out->count] = true;
			out->ifindex[out->count++] = m->reroute[i].ifindex;
		}
}

static bool set_has(const struct captured_set *s, __u32 ifindex)
{
	for (unsigned i = 0; i < s->count; i++)
		if (s->ifindex[i] == ifindex)
			return true;
	return false;
}

/* The pod's gated_netns entry goes (if it is still this pod's): the egress guard stands down. */
static void gated_remove(const struct policy_maps *maps, const struct pod_meta *m)
{
	if (m->netns_cookie && captured_gated(maps, m))
		bpf_map_delete_elem(maps->gated_fd, &m->netns_cookie);
}

/* The captured_ifaces value of the set's interface i. */
static __u64 captured_value(const struct pod_meta *m, const struct captured_set *s, unsigned i)
{
	return m->netns_cookie | (s->ingress_only[i] ? CAPTURED_INGRESS_ONLY : 0) |
	       (s->secondary[i] ? CAPTURED_SECONDARY : 0);
}

int captured_write(const struct policy_maps *maps, const struct pod_meta *m, const struct captured_set *now,
		   const struct captured_set *gone)
{
	for (unsigned i = 0; i < now->count; i++) {
		struct captured_key k = { .slot = m->slot, .ifindex = now->ifindex[i] };
		__u64 v = captured_value(m, now, i);

		if (bpf_map_update_elem(maps->captured_fd, &k, &v, BPF_ANY)) {
			int err = -errno;

			/* The entries are not the pod's interfaces any more: the guard stands down with
			 * the socket lookup's check (the caller's pod is not gated), as verify says. */
			gated_remove(maps, m);
			return err;
		}
	}
	for (unsigned i = 0; gone && i < gone->count; i++) {
		struct captured_key k = { .slot = m->slot, .ifindex = gone->ifindex[i] };

		if (!set_has(now, gone->ifindex[i]))
			bpf_map_delete_elem(maps->captured_fd, &k);
	}
	/* Last: the egress guard acts on the netns only once its interfaces are all there. */
	if (m->netns_cookie && bpf_map_update_elem(maps->gated_fd, &m->netns_cookie, &m->slot, BPF_ANY)) {
		int err = -errno;

		gated_remove(maps, m); /* (an update's, standing: down with the caller's gate) */
		return err;
	}
	return 0;
}

static bool captured_entry(const struct policy_maps *maps, const struct pod_meta *m, __u32 ifindex, __u64 *v)
{
	struct captured_key k = { .slot = m->slot, .ifindex = ifindex };

	return bpf_map_lookup_elem(maps->captured_fd, &k, v) == 0 &&
	       (*v & ~CAPTURED_FLAGS) == m->netns_cookie;
}

bool captured_has(const struct policy_maps *maps, const struct pod_meta *m, const struct captured_set *s,
		  unsigned i)
{
	__u64 v;

	return captured_entry(maps, m, s->ifindex[i], &v) && v == captured_value(m, s, i);
}

bool captured_gated(const struct policy_maps *maps, const struct pod_meta *m)
{
	__u32 slot;

	return bpf_map_lookup_elem(maps->gated_fd, &m->netns_cookie, &slot) == 0 && slot == m->slot;
}

void captured_remove(const struct policy_maps *maps, const struct pod_meta *m, const struct captured_set *s)
{
	__u64 v;

	gated_remove(maps, m); /* first: never a netns the guard acts on with entries missing */
	for (unsigned i = 0; i < s->count; i++)
		if (captured_entry(maps, m, s->ifindex[i], &v)) {
			struct captured_key k = { .slot = m->slot, .ifindex = s->ifindex[i] };

			bpf_map_delete_elem(maps->captured_fd, &k);
		}
}

static bool slot_unowned(const struct policy_maps *maps, __u32 slot)
{
	struct pod_meta_key owner;

	return bpf_map_lookup_elem(maps->slot_owner_fd, &slot, &owner) || !owner.uid[0];
}

void captured_gc(const struct policy_maps *maps)
{
	struct captured_key k, next;
	__u64 cookie, next_cookie;
	void *prev = NULL;
	__u32 slot;

	while (bpf_map_get_next_key(maps->gated_fd, prev, &next_cookie) == 0) {
		cookie = next_cookie;
		prev = &cookie;
		if (bpf_map_lookup_elem(maps->gated_fd, &cookie, &slot) == 0 && slot_unowned(maps, slot))
			bpf_map_delete_elem(maps->gated_fd, &cookie);
	}
	prev = NULL;
	while (bpf_map_get_next_key(maps->captured_fd, prev, &next) == 0) {
		k = next;
		prev = &k;
		if (slot_unowned(maps, k.slot))
			bpf_map_delete_elem(maps->captured_fd, &k);
	}
}

int counters_read(const struct policy_maps *maps, __u32 slot, struct pod_counters *out)
{
	int cpus = libbpf_num_possible_cpus();
	struct pod_counters *per_cpu;
	int err = 0;

	memset(out, 0, sizeof(*out));
	if (cpus <= 0)
		return cpus ? cpus : -EINVAL;
	per_cpu = calloc((size_t)cpus, sizeof(*per_cpu));
	if (!per_cpu)
		return -ENOMEM;
	if (bpf_map_lookup_elem(maps->counters_fd, &slot, per_cpu))
		err = -errno;
	for (int c = 0; !err && c < cpus; c++)
		for (int i = 0; i < CNT_COUNT; i++)
			out->value[i] += per_cpu[c].value[i];
	free(per_cpu);
	return err;
}
