#define _GNU_SOURCE
#include "layout.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bpf/bpf.h>

#include "../progs/ambient_shared.h"
#include "netns_thread.h"
#include "pod_ifaces.h"

/* What changed in each layout. A map whose value layout changed gets a new pin name, so the older
 * release's map stays pinned as it was (its programs keep running in pods until each is swapped,
 * and a rollback finds it). */
enum map_change { MAP_CHANGED, MAP_ADDED };
static const struct {
	const char *map;
	unsigned layout;
	enum map_change change;
} map_changes[] = {
	{ "pod_counters", 2, MAP_CHANGED }, /* counters for unclassified, spoofed, lookup-refused */
	{ "probe_nat", 2, MAP_CHANGED }, /* the translation records which side closed */
	{ "strict_fragments", 2, MAP_ADDED },
	{ "pod_ifaces", 3, MAP_ADDED }, /* the pod's other interfaces, captured too */
	{ "captured_ifaces", 4, MAP_ADDED }, /* interfaces with hooks: the socket lookup refuses others */
	{ "gated_netns", 4, MAP_ADDED }, /* the egress guard finds a pod's captured_ifaces by its netns */
	{ "pod_counters", 4, MAP_CHANGED }, /* uncapturedDropped (the egress guard) */
};

/* Hooks on a pod (pins under pods/<uid>/) that appeared in a layout: an older release knows nothing
 * of them, so a downgrade removes them. */
static const struct {
	const char *pin;
	unsigned layout;
} pod_pin_changes[] = {
	/* The outbound connect hooks route sockets over lo to a listener only layout 2's sk_lookup
	 * program hands them to; v0.1.0 removes that link under sk-assign steering. */
	{ "pod_connect4", 2 },
	{ "pod_connect6", 2 },
	{ "pod_setsockopt", 2 },
	/* Drops TCP out of interfaces without hooks, by gated_netns. */
	{ "pod_egress_guard", 4 },
};

#define N(a) (sizeof(a) / sizeof((a)[0]))

static void stamp_path(const char *root, char out[PATH_MAX])
{
	snprintf(out, PATH_MAX, "%s/maps/layout", root);
}

int layout_read(const char *root, unsigned *layout, struct dp_error *e)
{
	char path[PATH_MAX];
	__u32 zero = 0, value = 0;
	struct stat st;
	int fd;

	stamp_path(root, path);
	fd = bpf_obj_get(path);
	if (fd >= 0) {
		int err = bpf_map_lookup_elem(fd, &zero, &value) ? -errno : 0;

		close(fd);
		if (err || value == 0)
			return dp_fail(e, DPE_LAYOUT, err, "cannot read the layout stamp %s", path);
		*layout = value;
		return 0;
	}
	if (errno != ENOENT)
		return dp_fail(e, DPE_LAYOUT, errno, "cannot open the layout stamp %s", path);
	snprintf(path, sizeof(path), "%s/maps/pod_meta", root);
	*layout = stat(path, &st) == 0 ? 1 : 0;
	return 0;
}

int layout_refuse_newer(const char *root, unsigned found, struct dp_error *e)
{
	return dp_fail(
		e, DPE_LAYOUT, 0,
		"the pins under %s are of datapath layout %u, written by a newer ambient-bpf; this release "
		"knows layouts 1 to %u. They are left as they are (pods stay redirected). Run the newer "
		"release "
		"again, or hand the node back with its `ambient-bpf datapath downgrade --layout %u --bpffs "
		"%s` "
		"(agent stopped) before starting this one",
		root, found, DATAPATH_LAYOUT, DATAPATH_LAYOUT, root);
}

void layout_pin_name(const char *map, unsigned layout, char out[64])
{
	unsigned changed = 0;

	for (size_t i = 0; i < N(map_changes); i++)
		if (map_changes[i].change == MAP_CHANGED && !strcmp(map_changes[i].map, map) &&
		    map_changes[i].layout <= layout && map_changes[i].layout > changed)
			changed = map_changes[i].layout;
	if (changed > 1)
		snprintf(out, 64, "%s_v%u", map, changed);
	else
		snprintf(out, 64, "%s", map);
}

static bool is_percpu(__u32 type)
{
	return type == BPF_MAP_TYPE_PERCPU_ARRAY || type == BPF_MAP_TYPE_PERCPU_HASH ||
	       type == BPF_MAP_TYPE_LRU_PERCPU_HASH;
}

/* Copies every entry of one map into another of the same type and key whose value layout grew or
 * shrank at its end: each value's common prefix, the rest zero. Entries of an array that are all
 * zero are skipped. */
static int copy_map(int from, int to)
{
	struct bpf_map_info a, b;
	__u32 la = sizeof(a), lb = sizeof(b);
	unsigned cpus = 1, sa, sb;
	char *key = NULL, *next = NULL, *va = NULL, *vb = NULL;
	bool have_key = false;
	int err = 0;

	memset(&a, 0, sizeof(a));
	memset(&b, 0, sizeof(b));
	if (bpf_obj_get_info_by_fd(from, &a, &la) || bpf_obj_get_info_by_fd(to, &b, &lb))
		return -errno;
	if (a.type != b.type || a.key_size != b.key_size)
		return -EINVAL;
	if (is_percpu(a.type)) {
		int n = libbpf_num_possible_cpus();

		if (n < 0)
			return n;
		cpus = (unsigned)n;
	}
	/* Per-CPU values are 8-byte aligned slots, one per possible CPU. */
	sa = is_percpu(a.type) ? (a.value_size + 7) / 8 * 8 : a.value_size;
	sb = is_percpu(a.type) ? (b.value_size + 7) / 8 * 8 : b.value_size;
	key = calloc(1, a.key_size);
	next = calloc(1, a.key_size);
	va = calloc(cpus, sa);
	vb = calloc(cpus, sb);
	if (!key || !next || !va || !vb) {
		err = -ENOMEM;
		goto out;
	}
	while (bpf_map_get_next_key(from, have_key ? key : NULL, next) == 0) {
		bool zero = true;

		memcpy(key, next, a.key_size);
		have_key = true;
		if (bpf_map_lookup_elem(from, key, va))
			continue; /* gone meanwhile (an LRU entry) */
		memset(vb, 0, (size_t)cpus * sb);
		for (unsigned c = 0; c < cpus; c++)
			memcpy(vb + (size_t)c * sb, va + (size_t)c * sa, sa < sb ? sa : sb);
		for (size_t i = 0; i < (size_t)cpus * sb && zero; i++)
			zero = vb[i] == 0;
		if (zero && (a.type == BPF_MAP_TYPE_ARRAY || a.type == BPF_MAP_TYPE_PERCPU_ARRAY))
			continue;
		if (bpf_map_update_elem(to, key, vb, BPF_ANY)) {
			err = -errno;
			break;
		}
	}
out:
	free(key);
	free(next);
	free(va);
	free(vb);
	return err;
}

static int write_stamp(const char *root, unsigned layout, struct dp_error *e)
{
	char path[PATH_MAX];
	__u32 zero = 0, value = layout;
	int fd, err = 0;

	stamp_path(root, path);
	fd = bpf_obj_get(path);
	if (fd < 0) {
		fd = bpf_map_create(BPF_MAP_TYPE_ARRAY, "layout", sizeof(zero), sizeof(value), 1, NULL);
		if (fd < 0)
			return dp_fail(e, DPE_SYSTEM, errno, "cannot create the layout stamp");
		/* Written before it is pinned: nobody reads a stamp of 0. */
		if (bpf_map_update_elem(fd, &zero, &value, BPF_ANY) || bpf_obj_pin(fd, path))
			err = -errno;
	} else if (bpf_map_update_elem(fd, &zero, &value, BPF_ANY)) {
		err = -errno;
	}
	close(fd);
	return err ? dp_fail(e, DPE_SYSTEM, err, "cannot write the layout stamp %s", path) : 0;
}

int layout_adopt(const char *root, unsigned from, struct bpf_object *obj, struct dp_error *e)
{
	char name[64], path[PATH_MAX];

	for (size_t i = 0; from && i < N(map_changes); i++) {
		int src, err;

		if (map_changes[i].change != MAP_CHANGED || map_changes[i].layout <= from)
			continue;
		layout_pin_name(map_changes[i].map, from, name);
		snprintf(path, sizeof(path), "%s/maps/%s", root, name);
		if ((src = bpf_obj_get(path)) < 0)
			continue; /* the older release never made it */
		err = copy_map(src, bpf_map__fd(bpf_object__find_map_by_name(obj, map_changes[i].map)));
		close(src);
		if (err)
			return dp_fail(e, DPE_LAYOUT, err, "cannot carry %s over from layout %u", path, from);
	}
	return write_stamp(root, DATAPATH_LAYOUT, e);
}

/* Detaches and unpins a pinned link, if there is one. */
static void drop_link(const char *pin)
{
	int fd = bpf_obj_get(pin);

	if (fd >= 0) {
		bpf_link_detach(fd);
		close(fd);
	}
	unlink(pin);
}

/* pod_meta as layout 1 reads it: pod_cgroup_id was DNS capture's cgroup, and flags had no DNS bits. */
static void pod_meta_for_layout1(struct pod_meta *m)
{
	if (!m->pod_cgroup_id || !(m->flags & POD_F_DNS_CAPTURE))
		m->pod_cgroup_id = 0;
	m->flags &= POD_F_BYPASS_INBOUND | POD_F_STRICT;
}

struct unhook_job {
	char dir[PATH_MAX];
	struct pod_ifaces *f;
	unsigned mode;
};

static int unhook_in_netns(void *p)
{
	struct unhook_job *j = p;

	ifaces_unhook(j->dir, j->f, j->mode, true);
	return 0;
}

/* Layout 3's hooks on the pod's other interfaces (layout 2 hooks the pod's own only, and would leave
 * them running with records it cannot read): removed, inside the pod netns where it is still the
 * attached one (tc filters and accept_local are reached from there only); the policy of their
 * addresses goes with them. */
static void unhook_ifaces(const char *root, const char *uid, const struct pod_meta *m)
{
	struct unhook_job j = { .mode = m->mode };
	struct pod_meta_key k;
	struct pod_ifaces f;
	struct pod_policy pol;
	unsigned long long ino = 0, dev = 0;
	char path[PATH_MAX];
	int map, policy, fd;

	snprintf(path, sizeof(path), "%s/maps/pod_ifaces", root);
	if ((map = bpf_obj_get(path)) < 0)
		return;
	memset(&k, 0, sizeof(k));
	memcpy(k.uid, uid, sizeof(k.uid));
	if (bpf_map_lookup_elem(map, &k, &f)) {
		close(map);
		return;
	}
	j.f = &f;
	snprintf(j.dir, sizeof(j.dir), "%s/pods/%.*s", root, POD_UID_LEN, uid);
	fd = open_netns(m->netns_path, &ino, &dev);
	if (fd >= 0 && ino == m->netns_ino && dev == m->netns_dev)
		run_in_netns(fd, unhook_in_netns, &j);
	else
		ifaces_unhook(j.dir, &f, m->mode, false);
	if (fd >= 0)
		close(fd);
	snprintf(path, sizeof(path), "%s/maps/pod_policy", root);
	if ((policy = bpf_obj_get(path)) >= 0) {
		for (unsigned i = 0; i < f.addr_count && i < MAX_POD_IPS; i++)
			if (bpf_map_lookup_elem(policy, &f.addrs[i], &pol) == 0 && pol.slot == m->slot)
				bpf_map_delete_elem(policy, &f.addrs[i]);
		close(policy);
	}
	bpf_map_delete_elem(map, &k);
	close(map);
}

/* Every pod: the hooks layout `to` does not know go, and its record is rewritten for `to`. The keys
 * are read first: rewriting a hash map's entry moves it to the head of its bucket, so a walk that
 * rewrote as it went would revisit the entries of any bucket holding two pods, forever. */
static int downgrade_pods(const char *root, unsigned to, struct dp_error *e)
{
	struct pod_meta_key *keys = NULL, next;
	struct pod_meta m;
	char path[PATH_MAX];
	size_t n = 0, cap = 0;
	int meta, rc = 0;

	snprintf(path, sizeof(path), "%s/maps/pod_meta", root);
	if ((meta = bpf_obj_get(path)) < 0)
		return errno == ENOENT ? 0 : dp_fail(e, DPE_SYSTEM, errno, "cannot open %s", path);
	while (bpf_map_get_next_key(meta, n ? &keys[n - 1] : NULL, &next) == 0) {
		if (n == cap) {
			struct pod_meta_key *grown =
				realloc(keys, (cap = cap ? cap * 2 : 256) * sizeof(*keys));

			if (!grown) {
				rc = dp_fail(e, DPE_SYSTEM, ENOMEM, "cannot list the pods");
				goto out;
			}
			keys = grown;
		}
		keys[n++] = next;
	}
	for (size_t k = 0; k < n; k++) {
		struct pod_meta_key *key = &keys[k];

		for (size_t i = 0; i < N(pod_pin_changes); i++) {
			if (pod_pin_changes[i].layout <= to)
				continue;
			snprintf(path, sizeof(path), "%s/pods/%.*s/%s", root, POD_UID_LEN, key->uid,
				 pod_pin_changes[i].pin);
			drop_link(path);
			/* (and one an update left prepared when it was stopped) */
			snprintf(path, sizeof(path), "%s/pods/%.*s/%s_next", root, POD_UID_LEN, key->uid,
				 pod_pin_changes[i].pin);
			drop_link(path);
		}
		if (to < 3 && bpf_map_lookup_elem(meta, key, &m) == 0)
			unhook_ifaces(root, key->uid, &m);
		/* Layout 3 keeps the field as padding; a later layout 4 starts with no entries. */
		if (to < 4 && bpf_map_lookup_elem(meta, key, &m) == 0 && m.ifaces_gated) {
			m.ifaces_gated = 0;
			if (bpf_map_update_elem(meta, key, &m, BPF_EXIST) && errno != ENOENT) {
				rc = dp_fail(e, DPE_SYSTEM, errno, "cannot rewrite the record of pod %.*s",
					     POD_UID_LEN, key->uid);
				goto out;
			}
		}
		if (to < 2 && bpf_map_lookup_elem(meta, key, &m) == 0) {
			pod_meta_for_layout1(&m);
			if (bpf_map_update_elem(meta, key, &m, BPF_EXIST) && errno != ENOENT) {
				rc = dp_fail(e, DPE_SYSTEM, errno, "cannot rewrite the record of pod %.*s",
					     POD_UID_LEN, key->uid);
				goto out;
			}
		}
	}
out:
	free(keys);
	close(meta);
	return rc;
}

/* The maps: changed ones copied back into their older pins (when those are still there), then
 * every pin of a layout newer than `to` removed (a map changed twice has one pin per change).
 * Programs still running keep their maps. */
static int downgrade_maps(const char *root, unsigned from, unsigned to, struct dp_error *e)
{
	char name[64], newer[PATH_MAX], older[PATH_MAX], own[PATH_MAX];

	for (size_t i = 0; i < N(map_changes); i++) {
		int src, dst, err = 0;

		if (map_changes[i].layout <= to)
			continue;
		layout_pin_name(map_changes[i].map, from, name);
		snprintf(newer, sizeof(newer), "%s/maps/%s", root, name);
		layout_pin_name(map_changes[i].map, map_changes[i].layout, name);
		snprintf(own, sizeof(own), "%s/maps/%s", root, name);
		/* Copied once, from the pin `from` uses, when this is the change that made it. */
		if (map_changes[i].change == MAP_CHANGED && !strcmp(newer, own)) {
			layout_pin_name(map_changes[i].map, to, name);
			snprintf(older, sizeof(older), "%s/maps/%s", root, name);
			src = bpf_obj_get(newer);
			dst = bpf_obj_get(older);
			if (src >= 0 && dst >= 0)
				err = copy_map(src, dst);
			if (src >= 0)
				close(src);
			if (dst >= 0)
				close(dst);
			if (err)
				return dp_fail(e, DPE_LAYOUT, err, "cannot copy %s back into %s", newer,
					       older);
		}
		if (unlink(own) && errno != ENOENT)
			return dp_fail(e, DPE_SYSTEM, errno, "cannot unpin %s", own);
	}
	return 0;
}

int dp_layout_downgrade(const char *root, unsigned to, unsigned *from, struct dp_error *e)
{
	char path[PATH_MAX];
	int root_fd, rc = 0;

	if (to < 1 || to > DATAPATH_LAYOUT)
		return dp_fail(e, DPE_INVALID, 0, "this release can hand the node to layouts 1 to %u, not %u",
			       DATAPATH_LAYOUT, to);
	root_fd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (root_fd < 0)
		return dp_fail(e, DPE_BPFFS, errno, "cannot open %s", root);
	flock(root_fd, LOCK_EX); /* the datapath's own lock: no attach runs meanwhile */
	if (layout_read(root, from, e))
		rc = -1;
	else if (*from > DATAPATH_LAYOUT)
		rc = layout_refuse_newer(root, *from, e);
	else if (*from > to) {
		/* The stamp goes last: a downgrade stopped half-way is simply run again. */
		if (downgrade_pods(root, to, e) || downgrade_maps(root, *from, to, e))
			rc = -1;
		else if (to == 1) {
			stamp_path(root, path);
			if (unlink(path) && errno != ENOENT)
				rc = dp_fail(e, DPE_SYSTEM, errno, "cannot unpin %s", path);
		} else {
			rc = write_stamp(root, to, e);
		}
	}
	flock(root_fd, LOCK_UN);
	close(root_fd);
	return rc;
}
