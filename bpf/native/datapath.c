#define _GNU_SOURCE
#include "datapath.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <net/if.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <time.h>
#include <unistd.h>
#include <linux/if_arp.h>
#include <linux/pkt_sched.h>

#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>

#include "cgroup_hooks.h"
#include "hooks.h"
#include "host_hooks.h"
#include "iface_guard.h"
#include "layout.h"
#include "netns_thread.h"
#include "pod_ifaces.h"
#include "pod_policy.h"
#include "probe.h"
#include "rtnl.h"

#define BPF_FS_MAGIC 0xcafe4a11

static const char *const hook_names[2] = { "ingress", "egress" };
static const char *const prog_names[2] = { "pod_ingress", "pod_egress" };
static const unsigned tcx_types[2] = { AMB_BPF_TCX_INGRESS, AMB_BPF_TCX_EGRESS };

struct datapath {
	char root[PATH_MAX];
	int root_fd; /* flock'ed around every operation: other processes share the pins */
	struct bpf_object *obj;
	int prog_fd[2]
		   [2]; /* by enum link_layer, then hook_dir: the pod's own interface takes [LINK_ETHERNET] */
	int reroute_prog_fd[2]; /* by enum link_layer */
	int guard_prog_fd[2]; /* by enum link_layer */
	int sk_lookup_prog_fd;
	int sockops_prog_fd;
	struct host_hooks host; /* the node side of the pod's veth (kubelet probes) */
	struct cgroup_hooks cgroup;
	int meta_fd;
	int ifaces_fd;
	int settings_fd;
	int ztunnel_cgroups_fd;
	int strict_allow_fd;
	struct policy_maps policy;
	bool tc_netns_cookie; /* the tc programs check pod_policy entries' netns cookies */
	pthread_mutex_t lock;
};

static __u64 netns_cookie(void);

static int map_fd(struct bpf_object *obj, const char *name)
{
	return bpf_map__fd(bpf_object__find_map_by_name(obj, name));
}

/* ---- errors and libbpf's log ---- */

static __thread char libbpf_log[2048];

static int libbpf_log_cb(enum libbpf_print_level level, const char *fmt, va_list args)
{
	char line[512];
	size_t have = strlen(libbpf_log), add;

	if (level == LIBBPF_DEBUG)
		return 0;
	vsnprintf(line, sizeof(line), fmt, args);
	add = strlen(line);
	if (have + add >= sizeof(libbpf_log)) { /* keep the tail: the verifier's verdict is last */
		size_t drop = have + add - sizeof(libbpf_log) + 1;

		if (drop > have)
			drop = have;
		memmove(libbpf_log, libbpf_log + drop, have - drop + 1);
	}
	strncat(libbpf_log, line, sizeof(libbpf_log) - strlen(libbpf_log) - 1);
	return 0;
}

static bool ip_is_v4(const struct pod_ip *ip)
{
	static const uint8_t v4_prefix[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };

	return memcmp(ip->addr, v4_prefix, sizeof(v4_prefix)) == 0;
}

static const char *ip_str(const struct pod_ip *ip, char buf[INET6_ADDRSTRLEN])
{
	if (ip_is_v4(ip))
		return inet_ntop(AF_INET, ip->addr + 12, buf, INET6_ADDRSTRLEN);
	return inet_ntop(AF_INET6, ip->addr, buf, INET6_ADDRSTRLEN);
}

/* ---- paths, pins and the meta map ---- */

static bool uid_valid(const char *uid)
{
	size_t n = strnlen(uid, POD_UID_LEN);

	if (n == 0 || n >= POD_UID_LEN || uid[0] == '.')
		return false;
	for (size_t i = 0; i < n; i++) {
		char c = uid[i];

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '-' || c == '_' || c == '.'))
			return false;
	}
	return true;
}

static void pod_dir(const struct datapath *dp, const char *uid, char out[PATH_MAX])
{
	snprintf(out, PATH_MAX, "%s/pods/%s", dp->root, uid);
}

static void pin_path(const struct datapath *dp, const char *uid, enum hook_dir d, char out[PATH_MAX])
{
	snprintf(out, PATH_MAX, "%s/pods/%s/%s", dp->root, uid, hook_names[d]);
}

static struct pod_meta_key meta_key(const char *uid)
{
	struct pod_meta_key k;

	memset(&k, 0, sizeof(k));
	strncpy(k.uid, uid, sizeof(k.uid) - 1);
	return k;
}

static int meta_get(struct datapath *dp, const char *uid, struct pod_meta *m)
{
	struct pod_meta_key k = meta_key(uid);

	return bpf_map_lookup_elem(dp->meta_fd, &k, m) ? -errno : 0;
}

static int meta_put(struct datapath *dp, const char *uid, const struct pod_meta *m)
{
	struct pod_meta_key k = meta_key(uid);

	return bpf_map_update_elem(dp->meta_fd, &k, m, BPF_ANY) ? -errno : 0;
}

static void meta_del(struct datapath *dp, const char *uid)
{
	struct pod_meta_key k = meta_key(uid);

	bpf_map_delete_elem(dp->meta_fd, &k);
}

/* The pod's other interfaces as recorded (none if there is no record). */
static void ifaces_get(struct datapath *dp, const char *uid, struct pod_ifaces *f)
{
	struct pod_meta_key k = meta_key(uid);

	if (bpf_map_lookup_elem(dp->ifaces_fd, &k, f))
		memset(f, 0, sizeof(*f));
}

static int ifaces_put(struct datapath *dp, const char *uid, const struct pod_ifaces *f)
{
	struct pod_meta_key k = meta_key(uid);

	return bpf_map_update_elem(dp->ifaces_fd, &k, f, BPF_ANY) ? -errno : 0;
}

/* m with the addresses of its other interfaces (f) as its IPs: what pod_policy holds for them. */
static struct pod_meta with_iface_addrs(const struct pod_meta *m, const struct pod_ifaces *f)
{
	struct pod_meta a = *m;

	a.ip_count = f->addr_count < MAX_POD_IPS ? f->addr_count : MAX_POD_IPS;
	memcpy(a.ips, f->addrs, sizeof(a.ips));
	return a;
}

/* The policy of the addresses of the pod's other interfaces, as of its IPs; those of `old` it no
 * longer has (and that are not among its IPs now) removed. */
static int ifaces_policy_write(struct datapath *dp, const struct pod_meta *m, const struct pod_ifaces *f,
			       const struct pod_ifaces *old)
{
	struct pod_meta now = with_iface_addrs(m, f), gone = with_iface_addrs(m, old);
	unsigned n = 0;

	for (unsigned i = 0; i < gone.ip_count; i++) {
		bool pod_ip = false;

		for (unsigned j = 0; j < m->ip_count && j < MAX_POD_IPS; j++)
			pod_ip |= !memcmp(&gone.ips[i], &m->ips[j], sizeof(m->ips[j]));
		if (!pod_ip)
			gone.ips[n++] = gone.ips[i];
	}
	gone.ip_count = n;
	/* Found in the netns, not given: one another pod holds is never taken (a pod could otherwise
	 * put a neighbour's IP on a second interface and overwrite its entry); removal is by slot. */
	return policy_write_secondary(&dp->policy, &now, &gone);
}

/* Drops the record of the pod's other interfaces (unhooked already, their captured_ifaces entries
 * with them: detach_iface_programs) and their addresses' policy. */
static void ifaces_forget(struct datapath *dp, const char *uid, const struct pod_meta *m)
{
	struct pod_meta_key k = meta_key(uid);
	struct pod_ifaces f;
	struct pod_meta a;

	ifaces_get(dp, uid, &f);
	a = with_iface_addrs(m, &f);
	policy_remove(&dp->policy, &a);
	bpf_map_delete_elem(dp->ifaces_fd, &k);
}

static int mkdir_p(const char *path)
{
	char buf[PATH_MAX];

	snprintf(buf, sizeof(buf), "%s", path);
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(buf, 0700) && errno != EEXIST)
			return -errno;
		*p = '/';
	}
	return mkdir(buf, 0700) && errno != EEXIST ? -errno : 0;
}

static const char *const reroute_prog_names[2] = {
	[LINK_ETHERNET] = "pod_reroute_ingress",
	[LINK_NONE] = "pod_reroute_ingress_l3",
};

static void reroute_pin_path(const struct datapath *dp, const char *uid, const char *ifname,
			     char out[PATH_MAX])
{
	snprintf(out, PATH_MAX, "%s/pods/%s/reroute-%s", dp->root, uid, ifname);
}

/* Calls fn on every pin in a pod's directory. */
static void for_each_pin(struct datapath *dp, const char *uid, void (*fn)(const char *pin))
{
	char dirpath[PATH_MAX], pin[PATH_MAX];
	struct dirent *de;
	DIR *dir;

	pod_dir(dp, uid, dirpath);
	if (!(dir = opendir(dirpath)))
		return;
	while ((de = readdir(dir))) {
		if (de->d_name[0] == '.')
			continue;
		snprintf(pin, sizeof(pin), "%s/%s", dirpath, de->d_name);
		fn(pin);
	}
	closedir(dir);
}

static void unpin(const char *pin)
{
	unlink(pin);
}

/* Detaches the link a pin holds (even if another process still holds the link) and unpins it. */
void detach_pinned_link(const char *pin)
{
	int fd = bpf_obj_get(pin);

	if (fd >= 0) {
		bpf_link_detach(fd);
		close(fd);
	}
	unlink(pin);
}

/* Unpins a pod's link pins and removes its directory (ignores what is already gone). */
static void remove_pod_dir(struct datapath *dp, const char *uid)
{
	char path[PATH_MAX];

	for_each_pin(dp, uid, unpin);
	pod_dir(dp, uid, path);
	rmdir(path);
}

/* Does the netns path still name the namespace the pod was attached in? */
static bool netns_present(const struct pod_meta *m)
{
	struct stat st;

	return stat(m->netns_path, &st) == 0 && st.st_ino == m->netns_ino && st.st_dev == m->netns_dev;
}

/* Reads the info of the link a pin holds into `info` (`size` bytes: struct bpf_link_info, or the
 * tcx layout below for tcx links). */
int pinned_link(const char *pin, void *info, __u32 size)
{
	int fd = bpf_obj_get(pin);
	int err = 0;

	if (fd < 0)
		return -errno;
	memset(info, 0, size);
	if (bpf_obj_get_info_by_fd(fd, info, &size))
		err = -errno;
	close(fd);
	return err;
}

int pinned_link_info(const char *pin, struct tcx_link_info *info)
{
	return pinned_link(pin, info, sizeof(*info));
}

#define PROG_NAME_LEN 64

/* A program's name: the kernel's (cut at BPF_OBJ_NAME_LEN - 1 characters), or with `full` its
 * function's name in its BTF when it has one (pod_reroute_ingress and pod_reroute_ingress_l3 are
 * the same cut short). */
static int prog_name_by_id(__u32 id, bool full, char name[PROG_NAME_LEN])
{
	struct bpf_prog_info info;
	__u32 len = sizeof(info);
	int fd = bpf_prog_get_fd_by_id(id);
	int err = 0;

	if (fd < 0)
		return -errno;
	memset(&info, 0, sizeof(info));
	if (bpf_obj_get_info_by_fd(fd, &info, &len)) {
		err = -errno;
		goto out;
	}
	snprintf(name, PROG_NAME_LEN, "%.*s", BPF_OBJ_NAME_LEN, info.name);
	if (full && info.btf_id && info.nr_func_info) {
		struct bpf_func_info fi = { 0 };
		struct bpf_prog_info finfo;

		memset(&finfo, 0, sizeof(finfo));
		len = sizeof(finfo);
		finfo.nr_func_info = 1;
		finfo.func_info_rec_size = sizeof(fi);
		finfo.func_info = (__u64)(unsigned long)&fi;
		if (bpf_obj_get_info_by_fd(fd, &finfo, &len) == 0) {
			struct btf *btf = btf__load_from_kernel_by_id(info.btf_id);
			const struct btf_type *t = btf ? btf__type_by_id(btf, fi.type_id) : NULL;
			const char *n = t ? btf__name_by_offset(btf, t->name_off) : NULL;

			if (n && *n)
				snprintf(name, PROG_NAME_LEN, "%s", n);
			btf__free(btf);
		}
	}
out:
	close(fd);
	return err;
}

/* ---- open / close ---- */

static int check_bpffs(const char *root, struct dp_error *e)
{
	char path[PATH_MAX];
	struct statfs sfs;
	char *slash;

	snprintf(path, sizeof(path), "%s", root);
	while (statfs(path, &sfs) != 0) {
		if (errno != ENOENT || !(slash = strrchr(path, '/')) || slash == path)
			return dp_fail(e, DPE_BPFFS, errno, "cannot inspect %s", path);
		*slash = '\0';
	}
	if ((unsigned long)sfs.f_type != BPF_FS_MAGIC)
		return dp_fail(e, DPE_BPFFS, 0,
			       "%s is not on a bpffs (%s is not bpffs; mount one with: mount -t bpf bpf "
			       "/sys/fs/bpf)",
			       root, path);
	return 0;
}

static int check_kernel(struct dp_error *e)
{
	static const struct {
		enum bpf_func_id id;
		const char *name;
		const char *since;
	} helpers[] = {
		{ BPF_FUNC_skc_lookup_tcp, "bpf_skc_lookup_tcp", "5.2" },
		{ BPF_FUNC_sk_assign, "bpf_sk_assign", "5.7" },
		{ BPF_FUNC_redirect, "bpf_redirect", "4.4" },
	};

	for (size_t i = 0; i < sizeof(helpers) / sizeof(helpers[0]); i++) {
		int ok = libbpf_probe_bpf_helper(BPF_PROG_TYPE_SCHED_CLS, helpers[i].id, NULL);

		if (ok == 0)
			return dp_fail(e, DPE_KERNEL, 0,
				       "the kernel lacks the BPF helper %s for tc programs (Linux %s+)",
				       helpers[i].name, helpers[i].since);
		if (ok < 0)
			return dp_fail(e, DPE_KERNEL, ok,
				       "cannot probe the kernel for BPF support (is this root?)");
	}
	return 0;
}

/* Sets a `const volatile` __u32 of the object's .rodata, found by name in its BTF (before the load,
 * which freezes it: the verifier then prunes what the value rules out). */
static int set_rodata_u32(struct bpf_object *obj, const char *var, __u32 value)
{
	struct btf *btf = bpf_object__btf(obj);
	const struct btf_var_secinfo *vs;
	const struct btf_type *sec;
	struct bpf_map *map, *rodata = NULL;
	const void *init;
	size_t size = 0;
	int id, err = -ENOENT;

	bpf_object__for_each_map(map, obj)
	{
		const char *n = bpf_map__name(map);
		size_t len = strlen(n);

		if (bpf_map__is_internal(map) && len >= 7 && !strcmp(n + len - 7, ".rodata"))
			rodata = map;
	}
	if (!btf || !rodata || (id = btf__find_by_name_kind(btf, ".rodata", BTF_KIND_DATASEC)) < 0 ||
	    !(init = bpf_map__initial_value(rodata, &size)))
		return -ENOENT;
	sec = btf__type_by_id(btf, (__u32)id);
	vs = btf_var_secinfos(sec);
	for (unsigned i = 0; i < btf_vlen(sec); i++, vs++) {
		const struct btf_type *t = btf__type_by_id(btf, vs->type);
		char *copy;

		if (strcmp(btf__name_by_offset(btf, t->name_off), var) || vs->size != sizeof(value) ||
		    vs->offset + sizeof(value) > size)
			continue;
		if (!(copy = malloc(size)))
			return -ENOMEM;
		memcpy(copy, init, size);
		memcpy(copy + vs->offset, &value, sizeof(value));
		err = bpf_map__set_initial_value(rodata, copy, size);
		free(copy);
		break;
	}
	return err;
}

bool dp_tc_netns_cookie(const struct datapath *dp)
{
	return dp->tc_netns_cookie;
}

int dp_open(const char *root, const char *object_path, int tc_netns_cookie, struct datapath **out,
	    struct dp_error *e)
{
	char path[PATH_MAX];
	struct datapath *dp;
	struct bpf_map *map;
	unsigned layout = 0;
	int err;

	if (root[0] != '/' || strlen(root) > PATH_MAX - 128)
		return dp_fail(e, DPE_INVALID, 0, "bpffs root must be an absolute path: %s", root);
	if (check_bpffs(root, e) || check_kernel(e))
		return -1;
	snprintf(path, sizeof(path), "%s/maps", root);
	if ((err = mkdir_p(path)))
		return dp_fail(e, DPE_BPFFS, err, "cannot create %s", path);
	snprintf(path, sizeof(path), "%s/pods", root);
	if ((err = mkdir_p(path)))
		return dp_fail(e, DPE_BPFFS, err, "cannot create %s", path);

	dp = calloc(1, sizeof(*dp));
	if (!dp)
		return dp_fail(e, DPE_SYSTEM, ENOMEM, "datapath");
	snprintf(dp->root, sizeof(dp->root), "%s", root);
	pthread_mutex_init(&dp->lock, NULL);
	dp->root_fd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dp->root_fd < 0) {
		dp_fail(e, DPE_BPFFS, errno, "cannot open %s", root);
		goto out_free;
	}

	libbpf_set_print(libbpf_log_cb);
	libbpf_log[0] = '\0';
	dp->obj = bpf_object__open_file(object_path, NULL);
	if (!dp->obj) {
		dp_fail(e, DPE_LOAD, errno, "cannot open BPF object %s (was `npm run build` run?)",
			object_path);
		goto out_close;
	}
	/* Maps are shared through pins by every process using this root, so a restarted agent and
	 * the CLI see the same records; those whose layout changed since an older release are pinned
	 * beside that release's (layout.c). */
	bpf_object__for_each_map(map, dp->obj)
	{
		char name[64];

		if (bpf_map__is_internal(map)) /* .rodata and friends: per load, never shared */
			continue;
		layout_pin_name(bpf_map__name(map), DATAPATH_LAYOUT, name);
		snprintf(path, sizeof(path), "%s/maps/%s", root, name);
		bpf_map__set_pin_path(map, path);
	}
	/* Entries of pod_policy checked against the netns the programs run in (pod_redirect.bpf.c,
	 * policy_of_address) where tc programs can read its cookie; user space writes every entry with
	 * the pod netns's cookie (SO_NETNS_COOKIE), so both are needed. */
	if (tc_netns_cookie < 0) {
		char detail[160];

		tc_netns_cookie = netns_cookie() != 0 && tc_reads_netns_cookie(detail, sizeof(detail));
	}
	dp->tc_netns_cookie = tc_netns_cookie > 0;
	if ((err = set_rodata_u32(dp->obj, "tc_netns_cookie", dp->tc_netns_cookie))) {
		dp_fail(e, DPE_LOAD, err, "BPF object %s has no tc_netns_cookie constant (an older build?)",
			object_path);
		goto out_obj;
	}
	flock(dp->root_fd, LOCK_EX);
	if (layout_read(root, &layout, e) ||
	    (layout > DATAPATH_LAYOUT && layout_refuse_newer(root, layout, e))) {
		flock(dp->root_fd, LOCK_UN);
		goto out_obj;
	}
	err = bpf_object__load(dp->obj);
	if (err)
		dp_fail(e, DPE_LOAD, err, "cannot load BPF object %s (%s)%s", object_path, libbpf_log,
			strstr(libbpf_log, "reuse")
				? "; a pinned map does not match its layout (a build of another version "
				  "with the same layout number?)"
				: "");
	else if (layout != DATAPATH_LAYOUT && layout_adopt(root, layout, dp->obj, e))
		err = -1;
	flock(dp->root_fd, LOCK_UN);
	if (err)
		goto out_obj;
	for (int d = 0; d < 2; d++)
		for (int k = 0; k < 2; k++)
			dp->prog_fd[k][d] = bpf_program__fd(
				bpf_object__find_program_by_name(dp->obj, iface_prog_names[k][d]));
	for (int k = 0; k < 2; k++)
		dp->reroute_prog_fd[k] =
			bpf_program__fd(bpf_object__find_program_by_name(dp->obj, reroute_prog_names[k]));
	for (int k = 0; k < 2; k++)
		dp->guard_prog_fd[k] =
			bpf_program__fd(bpf_object__find_program_by_name(dp->obj, guard_prog_names[k]));
	dp->sk_lookup_prog_fd = bpf_program__fd(bpf_object__find_program_by_name(dp->obj, "pod_sk_lookup"));
	dp->sockops_prog_fd = bpf_program__fd(bpf_object__find_program_by_name(dp->obj, "ztunnel_sockops"));
	host_hooks_init(&dp->host, dp->root, dp->obj);
	cgroup_hooks_init(&dp->cgroup, dp->root, dp->obj, dp->tc_netns_cookie);
	dp->meta_fd = map_fd(dp->obj, "pod_meta");
	dp->ifaces_fd = map_fd(dp->obj, "pod_ifaces");
	dp->settings_fd = map_fd(dp->obj, "settings");
	dp->ztunnel_cgroups_fd = map_fd(dp->obj, "ztunnel_cgroups");
	dp->strict_allow_fd = map_fd(dp->obj, "strict_allow");
	dp->policy.policy_fd = map_fd(dp->obj, "pod_policy");
	dp->policy.counters_fd = map_fd(dp->obj, "pod_counters");
	dp->policy.slot_owner_fd = map_fd(dp->obj, "slot_owner");
	dp->policy.captured_fd = map_fd(dp->obj, "captured_ifaces");
	dp->policy.gated_fd = map_fd(dp->obj, "gated_netns");
	*out = dp;
	return 0;

out_obj:
	bpf_object__close(dp->obj);
out_close:
	close(dp->root_fd);
out_free:
	pthread_mutex_destroy(&dp->lock);
	free(dp);
	return -1;
}

void dp_close(struct datapath *dp)
{
	if (!dp)
		return;
	bpf_object__close(dp->obj);
	close(dp->root_fd);
	pthread_mutex_destroy(&dp->lock);
	free(dp);
}

static void dp_lock(struct datapath *dp)
{
	pthread_mutex_lock(&dp->lock);
	flock(dp->root_fd, LOCK_EX);
}

static void dp_unlock(struct datapath *dp)
{
	flock(dp->root_fd, LOCK_UN);
	pthread_mutex_unlock(&dp->lock);
}

/* ---- work inside the pod netns ---- */

static const struct fwmark_rule redirect_rule_v4 = { AF_INET, REDIRECT_MARK, MARK_MASK, REDIRECT_ROUTE_TABLE,
						     REDIRECT_RULE_PRIORITY };
static const struct fwmark_rule redirect_rule_v6 = { AF_INET6, REDIRECT_MARK, MARK_MASK, REDIRECT_ROUTE_TABLE,
						     REDIRECT_RULE_PRIORITY };

/* The families of the pod's IPs and of the addresses of its other interfaces (f, may be NULL). */
static void pod_families(const struct pod_meta *m, const struct pod_ifaces *f, bool *v4, bool *v6)
{
	*v4 = *v6 = false;
	for (unsigned i = 0; i < m->ip_count && i < MAX_POD_IPS; i++) {
		if (ip_is_v4(&m->ips[i]))
			*v4 = true;
		else
			*v6 = true;
	}
	for (unsigned i = 0; f && i < f->addr_count && i < MAX_POD_IPS; i++) {
		if (ip_is_v4(&f->addrs[i]))
			*v4 = true;
		else
			*v6 = true;
	}
}

/* The redirect table's local route for pod m: its first address of the family as source (its
 * primary one, as the pod's status lists them; else the first of its other interfaces', f) and its
 * interface's MTU. */
static int wanted_local_route(struct rtnl *nl, const struct pod_meta *m, const struct pod_ifaces *f,
			      int family, struct local_route *want)
{
	const struct pod_ip *src = NULL;

	memset(want, 0, sizeof(*want));
	for (unsigned i = 0; !src && i < m->ip_count && i < MAX_POD_IPS; i++)
		if (ip_is_v4(&m->ips[i]) == (family == AF_INET))
			src = &m->ips[i];
	for (unsigned i = 0; !src && f && i < f->addr_count && i < MAX_POD_IPS; i++)
		if (ip_is_v4(&f->addrs[i]) == (family == AF_INET))
			src = &f->addrs[i];
	if (src && family == AF_INET)
		memcpy(want->prefsrc, &src->addr[12], 4);
	else if (src)
		memcpy(want->prefsrc, src->addr, 16);
	return rtnl_link_mtu(nl, (int)m->ifindex, &want->mtu);
}

static void detach_main_tcx(struct datapath *dp, const char *uid);

/* Detaches a pinned tcx link of the pod's interfaces: its own, its other ones, its reroute ones, the
 * guards of the uncaptured ones and the node side of its veth (not the netns's sk_lookup link, nor
 * the cgroup's hooks). */
static void detach_tcx_pin(const char *pin)
{
	const char *name = strrchr(pin, '/') + 1;

	if (!strcmp(name, "ingress") || !strcmp(name, "egress") || !strncmp(name, "reroute-", 8) ||
	    !strncmp(name, "host-", 5) || ifaces_pin(name) || guards_pin(name))
		detach_pinned_link(pin);
}

/* Removes the pod's interfaces' tcx links through their pins (works from any netns). */
static void detach_tcx_links(struct datapath *dp, const char *uid)
{
	for_each_pin(dp, uid, detach_tcx_pin);
}

/* Removes the clsact qdisc of a device if nobody has filters on it any more; true if it did. */
bool tc_destroy_clsact_if_unused(int ifindex)
{
	LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = ifindex, .attach_point = BPF_TC_INGRESS | BPF_TC_EGRESS);
	struct rtnl nl;
	int in = 1, eg = 1;

	if (rtnl_open(&nl))
		return false;
	rtnl_count_filters(&nl, ifindex, TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS), &in);
	rtnl_count_filters(&nl, ifindex, TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS), &eg);
	rtnl_close(&nl);
	return in == 0 && eg == 0 && bpf_tc_hook_destroy(&hook) == 0;
}

/* Puts our cls_bpf filters (fixed handle and priority: only ours are ever replaced) on a device's
 * clsact hooks, prog_fd[HOOK_INGRESS] and prog_fd[HOOK_EGRESS] (-1: leave that hook alone), making
 * the qdisc if it is missing (*created then). Runs in the device's netns. */
int tc_attach_filters(int ifindex, const int prog_fd[2], bool *created)
{
	LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = ifindex, .attach_point = BPF_TC_INGRESS | BPF_TC_EGRESS);
	int err = bpf_tc_hook_create(&hook);

	if (err == 0)
		*created = true;
	else if (err != -EEXIST)
		return err;
	for (int d = 0; d < 2; d++) {
		LIBBPF_OPTS(bpf_tc_opts, opts, .handle = TC_FILTER_HANDLE, .priority = TC_FILTER_PRIORITY,
			    .prog_fd = prog_fd[d], .flags = BPF_TC_F_REPLACE);

		if (prog_fd[d] < 0)
			continue;
		hook.attach_point = d == HOOK_INGRESS ? BPF_TC_INGRESS : BPF_TC_EGRESS;
		if ((err = bpf_tc_attach(&hook, &opts)))
			return err;
	}
	return 0;
}

/* Removes our filters from a device's hooks, and its clsact qdisc if we made it and nobody else
 * has filters on it; true if the qdisc went. Runs in the device's netns. */
bool tc_detach_filters(int ifindex, bool owns_clsact)
{
	LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = ifindex);
	LIBBPF_OPTS(bpf_tc_opts, opts, .handle = TC_FILTER_HANDLE, .priority = TC_FILTER_PRIORITY);

	for (int d = 0; d < 2; d++) {
		hook.attach_point = d == HOOK_INGRESS ? BPF_TC_INGRESS : BPF_TC_EGRESS;
		bpf_tc_detach(&hook, &opts);
	}
	return owns_clsact && tc_destroy_clsact_if_unused(ifindex);
}

/* The pod interface's filters (from inside the netns). */
static void detach_tc_filters(struct pod_meta *m)
{
	if (tc_detach_filters((int)m->ifindex, m->owns & OWNS_CLSACT))
		m->owns &= ~OWNS_CLSACT;
}

/* Removes the reroute hook of one extra interface (tc filters only from inside the netns). */
/* Removes an extra interface's reroute hook of one mode: its tcx link through the pin, or its tc
 * filters (only from inside the netns). */
static void detach_reroute(struct datapath *dp, const char *uid, struct reroute_iface *r, unsigned mode,
			   bool in_netns)
{
	char pin[PATH_MAX];

	if (mode == ATTACH_MODE_TCX) {
		reroute_pin_path(dp, uid, r->name, pin);
		detach_pinned_link(pin);
	} else if (mode == ATTACH_MODE_TC && in_netns && r->ifindex &&
		   tc_detach_filters((int)r->ifindex, r->owns_clsact)) {
		r->owns_clsact = 0;
	}
}

/* Removes the programs on the pod's interfaces (links from anywhere, tc filters only from inside the
 * netns), their captured_ifaces entries first (while the record still names every interface). */
static void detach_iface_programs(struct datapath *dp, const char *uid, struct pod_meta *m, bool in_netns)
{
	struct captured_set captured;
	struct pod_ifaces f;
	char dir[PATH_MAX];

	ifaces_get(dp, uid, &f);
	captured_set_of(m, &f, &captured);
	captured_remove(&dp->policy, m, &captured);
	pod_dir(dp, uid, dir);
	ifaces_unhook(dir, &f, m->mode, in_netns);
	for (unsigned i = 0; i < m->reroute_count && i < MAX_REROUTE_IFACES; i++) {
		detach_reroute(dp, uid, &m->reroute[i], m->mode, in_netns);
		m->reroute[i].ifindex = 0;
	}
	detach_tcx_links(dp, uid); /* (also any reroute pin left from another mode, and the guards') */
	guards_remove(dir, in_netns);
	if (in_netns && (m->mode == ATTACH_MODE_TC || (m->owns & OWNS_CLSACT)))
		detach_tc_filters(m);
}

static void sk_lookup_pin_path(const struct datapath *dp, const char *uid, char out[PATH_MAX]);

/* Removes all of the pod's programs: its cgroup's hooks, its interfaces' and its netns's sk_lookup
 * link. */
static void detach_programs(struct datapath *dp, const char *uid, struct pod_meta *m, bool in_netns)
{
	char pin[PATH_MAX];

	cgroup_hooks_detach(&dp->cgroup, uid, m);
	detach_iface_programs(dp, uid, m, in_netns);
	sk_lookup_pin_path(dp, uid, pin);
	detach_pinned_link(pin);
}

/* Undoes, best effort, everything the meta record says attach did in this netns. */
static void undo_in_netns(struct datapath *dp, const char *uid, struct pod_meta *m)
{
	struct rtnl nl;

	detach_programs(dp, uid, m, true);
	if (rtnl_open(&nl))
		return;
	if (m->owns & OWNS_RULE_V4)
		rtnl_rule_del(&nl, &redirect_rule_v4);
	if (m->owns & OWNS_RULE_V6)
		rtnl_rule_del(&nl, &redirect_rule_v6);
	if (m->owns & OWNS_ROUTE_V4)
		rtnl_local_default_route_del(&nl, AF_INET, REDIRECT_ROUTE_TABLE);
	if (m->owns & OWNS_ROUTE_V6)
		rtnl_local_default_route_del(&nl, AF_INET6, REDIRECT_ROUTE_TABLE);
	if (m->owns & OWNS_ACCEPT_LOCAL)
		rtnl_set_accept_local(&nl, (int)m->ifindex, m->saved_accept_local);
	rtnl_close(&nl);
}

struct netns_job {
	struct datapath *dp;
	const char *uid;
	struct pod_meta *meta;
	const struct dp_attach_request *req;
	struct dp_error *e;
	struct dp_verify_result *verify;
	int host_peer; /* attach: the pod interface's veth peer index (0: none) */
	const struct pod_meta *old; /* attach: the attachment being updated in place; NULL: a first attach */
	struct pod_ifaces
		*ifaces; /* attach: the pod's other interfaces found in its netns; verify: recorded */
	const struct pod_ifaces *old_ifaces; /* attach: those hooked before (none on a first attach) */
	bool restored; /* attach: a failed update was already restored inside the netns */
	unsigned ifaces_mode; /* attach: the mode the pod_ifaces record's interfaces are hooked in */
	struct ifaces_refused refused; /* attach: interfaces (and addresses) left out, said */
	struct ifaces_refused foreign; /* attach: addresses of its other interfaces another pod holds */
};

/* An address of the pod's other interfaces that is another enrolled pod's in pod_policy (never
 * taken from it), found by `nl` in the pod netns: said in the attach's warning and by verify, with
 * what the pod's traffic on it gets, which depends on whether the tc programs can tell the two pods
 * apart (pod_redirect.bpf.c, policy_of_address). */
static void foreign_addresses(struct datapath *dp, struct rtnl *nl, const struct pod_meta *m,
			      const struct pod_ifaces *f, void (*say)(void *, const char *), void *to)
{
	for (unsigned i = 0; i < f->addr_count && i < MAX_POD_IPS; i++) {
		char ip[INET6_ADDRSTRLEN], name[IF_NAMESIZE] = "?", msg[200];
		int idx = 0;

		if (!policy_owned_by_other(&dp->policy, &f->addrs[i], m->slot))
			continue;
		if (rtnl_find_address(nl, f->addrs[i].addr, &idx) == 0 && idx)
			if_indextoname((unsigned)idx, name);
		if (dp->tc_netns_cookie)
			snprintf(msg, sizeof(msg),
				 "address %s on %s belongs to another pod: not taken; here it has the "
				 "node-wide "
				 "policy (no bypass-inbound-capture, strict mode)",
				 ip_str(&f->addrs[i], ip), name);
		else
			snprintf(msg, sizeof(msg),
				 "address %s on %s belongs to another pod, whose options "
				 "(bypass-inbound-capture, "
				 "strict mode) apply here too: tc cannot read the netns cookie here",
				 ip_str(&f->addrs[i], ip), name);
		say(to, msg);
	}
}

static void say_refused(void *to, const char *msg)
{
	ifaces_refuse(to, "%s", msg);
}

/* TEST ONLY: AMBIENT_BPF_FAULT_STEP=<step> makes that step of an update of an attached pod fail
 * once its work is done ("routing", "programs", "mode-switch", "ifaces", "reroutes", "policy", "sk_lookup",
 * "host", "dns", "record"), so tests can show that a failed update restores the previous
 * attachment. Never set in production; a first attach and the restore itself ignore it. */
static bool fault(const struct netns_job *job, const char *step)
{
	const char *f;

	if (!job->old)
		return false;
	f = getenv("AMBIENT_BPF_FAULT_STEP");
	if (!f || strcmp(f, step))
		return false;
	dp_fail(job->e, DPE_SYSTEM, EIO, "injected failure at step %s (AMBIENT_BPF_FAULT_STEP)", step);
	return true;
}

static int undo_job(void *p)
{
	struct netns_job *job = p;

	undo_in_netns(job->dp, job->uid, job->meta);
	return 0;
}

/* Locates the pod's interface, the one with its first IP; every IP must be on one besides lo (the
 * others are captured as the pod's other interfaces). */
static int find_pod_interface(struct rtnl *nl, const struct pod_meta *m, const char *netns, int *ifindex,
			      struct dp_error *e)
{
	char a[INET6_ADDRSTRLEN];
	int first = 0;

	for (unsigned i = 0; i < m->ip_count; i++) {
		int idx = 0, err = rtnl_find_address(nl, m->ips[i].addr, &idx);

		if (err == -ENOENT)
			return dp_fail(e, DPE_POD_IP, 0, "pod IP %s is not configured in netns %s",
				       ip_str(&m->ips[i], a), netns);
		if (err)
			return dp_fail(e, DPE_SYSTEM, err, "cannot list addresses in netns %s", netns);
		if (idx == (int)if_nametoindex("lo"))
			return dp_fail(e, DPE_POD_IP, 0, "pod IP %s is on the loopback device in netns %s",
				       ip_str(&m->ips[i], a), netns);
		if (!first)
			first = idx;
	}
	*ifindex = first;
	return 0;
}

/* Adds what is missing of the fwmark rules, local routes and accept_local; records in m->owns
 * what this created, so detach removes exactly that. */
static int configure_routing(struct rtnl *nl, struct pod_meta *m, const struct pod_ifaces *f,
			     struct dp_error *e)
{
	struct local_route have, want;
	bool v4, v6, exists;
	int err;
	const struct {
		const struct fwmark_rule *rule;
		unsigned rule_bit, route_bit;
		const char *name;
	} fam[2] = {
		{ &redirect_rule_v4, OWNS_RULE_V4, OWNS_ROUTE_V4, "IPv4" },
		{ &redirect_rule_v6, OWNS_RULE_V6, OWNS_ROUTE_V6, "IPv6" },
	};

	pod_families(m, f, &v4, &v6);
	for (int i = 0; i < 2; i++) {
		if (!(i == 0 ? v4 : v6))
			continue;
		err = rtnl_rule_add(nl, fam[i].rule);
		if (err == 0)
			m->owns |= fam[i].rule_bit;
		else if (err != -EEXIST)
			return dp_fail(e, DPE_SYSTEM, err, "cannot add the %s fwmark rule", fam[i].name);
		if ((err = rtnl_local_default_route_get(nl, fam[i].rule->family, REDIRECT_ROUTE_TABLE,
							&exists, &have)))
			return dp_fail(e, DPE_SYSTEM, err, "cannot read table %d", REDIRECT_ROUTE_TABLE);
		if ((err = wanted_local_route(nl, m, f, fam[i].rule->family, &want)))
			return dp_fail(e, DPE_SYSTEM, err, "cannot read the MTU of interface %u", m->ifindex);
		if (exists && !memcmp(&have, &want, sizeof(want)))
			continue;
		if ((err = rtnl_local_default_route_set(nl, fam[i].rule->family, REDIRECT_ROUTE_TABLE,
							&want)))
			return dp_fail(e, DPE_SYSTEM, err, "cannot set the %s local route in table %d",
				       fam[i].name, REDIRECT_ROUTE_TABLE);
		if (!exists)
			m->owns |= fam[i].route_bit;
	}
	if (v4) {
		uint32_t cur = 0;

		/* Looped-back packets carry the pod's own address as source: without accept_local the
		 * stack drops them as martians. (IPv6 has no such check.) */
		if ((err = rtnl_get_accept_local(nl, (int)m->ifindex, &cur)))
			return dp_fail(e, DPE_SYSTEM, err, "cannot read accept_local");
		if (cur != 1) {
			if (!(m->owns & OWNS_ACCEPT_LOCAL))
				m->saved_accept_local = cur;
			if ((err = rtnl_set_accept_local(nl, (int)m->ifindex, 1)))
				return dp_fail(e, DPE_SYSTEM, err, "cannot set accept_local");
			m->owns |= OWNS_ACCEPT_LOCAL;
		}
	}
	return 0;
}

/* Attaches prog to a device with a pinned tcx link, or swaps the program of the pinned link in place
 * when it is on that device already (same code or newer: no gap). */
int attach_tcx_pinned(const char *pin, int prog_fd, unsigned ifindex, unsigned type)
{
	struct tcx_link_info info;
	int fd, err = 0;

	if (pinned_link_info(pin, &info) == 0) {
		if (info.type == AMB_BPF_LINK_TYPE_TCX && info.ifindex == ifindex &&
		    info.attach_type == type) {
			fd = bpf_obj_get(pin);
			if (fd < 0)
				return -errno;
			if (bpf_link_update(fd, prog_fd, NULL))
				err = -errno;
			close(fd);
			return err;
		}
		detach_pinned_link(pin);
	}
	fd = bpf_link_create(prog_fd, (int)ifindex, type, NULL);
	if (fd < 0)
		return -errno;
	if (bpf_obj_pin(fd, pin))
		err = -errno;
	if (err)
		bpf_link_detach(fd);
	close(fd);
	return err;
}

static int attach_tcx(struct datapath *dp, const char *uid, struct pod_meta *m, enum hook_dir d)
{
	char pin[PATH_MAX];

	pin_path(dp, uid, d, pin);
	return attach_tcx_pinned(pin, dp->prog_fd[LINK_ETHERNET][d], m->ifindex, tcx_types[d]);
}

static int attach_tc(struct datapath *dp, struct pod_meta *m)
{
	bool created = false;
	int err = tc_attach_filters((int)m->ifindex, dp->prog_fd[LINK_ETHERNET], &created);

	if (created)
		m->owns |= OWNS_CLSACT;
	return err;
}

static int attach_programs(struct datapath *dp, const char *uid, struct pod_meta *m,
			   enum dp_mode_request want, struct dp_error *e)
{
	char dir[PATH_MAX];
	int err;

	pod_dir(dp, uid, dir);
	if (mkdir(dir, 0700) && errno != EEXIST)
		return dp_fail(e, DPE_BPFFS, errno, "cannot create %s", dir);
	if (want != DP_MODE_TC) {
		err = attach_tcx(dp, uid, m, HOOK_INGRESS);
		if (!err)
			err = attach_tcx(dp, uid, m, HOOK_EGRESS);
		if (!err) {
			m->mode = ATTACH_MODE_TCX;
			return 0;
		}
		if (want == DP_MODE_TCX || err != -EINVAL)
			return dp_fail(e, err == -EINVAL ? DPE_KERNEL : DPE_SYSTEM, err,
				       err == -EINVAL
					       ? "cannot attach with tcx (the kernel needs tcx, Linux 6.6+; "
						 "the tc fallback works on older kernels)"
					       : "cannot attach tcx links");
		detach_main_tcx(dp, uid);
	}
	m->mode = ATTACH_MODE_TC;
	if ((err = attach_tc(dp, m)))
		return dp_fail(e, DPE_SYSTEM, err, "cannot attach cls_bpf filters to the clsact qdisc");
	return 0;
}

static int attach_reroute_tc(int prog_fd, struct reroute_iface *r)
{
	const int progs[2] = { [HOOK_INGRESS] = prog_fd, [HOOK_EGRESS] = -1 };
	bool created = false;
	int err = tc_attach_filters((int)r->ifindex, progs, &created);

	if (created)
		r->owns_clsact = 1;
	return err;
}

/* Hooks the pod's extra interfaces (istio.io/reroute-virtual-interfaces: names[]) in the pod's mode
 * (m->mode; old_mode: the mode they are hooked in now). New hooks first, stale ones removed after:
 * an interface listed before and after is never without its hook. On failure the hooks this call
 * made are removed again and m->reroute is left as it was. One that does not exist yet is recorded
 * with ifindex 0; verify reports it once it appears, and the next attach hooks it. */
static int attach_reroutes(struct netns_job *job, unsigned old_mode, const char (*names)[16], unsigned count)
{
	struct pod_meta *m = job->meta;
	struct reroute_iface next[MAX_REROUTE_IFACES], *prev = m->reroute;
	unsigned prev_count = m->reroute_count < MAX_REROUTE_IFACES ? m->reroute_count : MAX_REROUTE_IFACES;
	unsigned mode = m->mode;
	char pin[PATH_MAX];
	struct rtnl nl;
	int err = 0;

	if (count > MAX_REROUTE_IFACES)
		count = MAX_REROUTE_IFACES;
	for (unsigned j = 0; j < count; j++)
		if (if_nametoindex(names[j]) == m->ifindex)
			return dp_fail(job->e, DPE_INVALID, 0,
				       "reroute interface %s is the pod's own interface", names[j]);
	if ((err = rtnl_open(&nl)))
		return dp_fail(job->e, DPE_SYSTEM, err, "cannot open rtnetlink in the pod netns");
	memset(next, 0, sizeof(next));
	for (unsigned j = 0; j < count && !err; j++) {
		struct reroute_iface *r = &next[j];
		enum link_layer l2;

		snprintf(r->name, sizeof(r->name), "%s", names[j]);
		r->ifindex = if_nametoindex(r->name);
		for (unsigned i = 0; i < prev_count; i++)
			if (!strcmp(prev[i].name, r->name) && prev[i].ifindex == r->ifindex)
				r->owns_clsact = prev[i].owns_clsact;
		if (r->ifindex == 0)
			continue;
		err = rtnl_link_layer(&nl, (int)r->ifindex, &l2);
		if (err == -ENODEV) { /* gone since if_nametoindex: as if it did not exist yet */
			r->ifindex = 0;
			err = 0;
			continue;
		}
		if (!err && mode == ATTACH_MODE_TCX) {
			reroute_pin_path(job->dp, job->uid, r->name, pin);
			err = attach_tcx_pinned(pin, job->dp->reroute_prog_fd[l2], r->ifindex,
						AMB_BPF_TCX_INGRESS);
		} else if (!err) {
			err = attach_reroute_tc(job->dp->reroute_prog_fd[l2], r);
		}
		if (err) {
			dp_fail(job->e, DPE_SYSTEM, err, "cannot hook reroute interface %s", r->name);
			count = j + 1;
		}
	}
	rtnl_close(&nl);
	for (unsigned j = 0; err && j < count; j++) {
		bool had = false;

		for (unsigned i = 0; i < prev_count; i++)
			had |= !strcmp(prev[i].name, next[j].name) && prev[i].ifindex == next[j].ifindex &&
			       old_mode == mode;
		if (!had && next[j].ifindex)
			detach_reroute(job->dp, job->uid, &next[j], mode, true);
	}
	if (err)
		return -1;
	/* Then unhook what is no longer listed, was replaced, or is hooked in the other mode. */
	for (unsigned i = 0; i < prev_count; i++) {
		bool same_pin = false, kept = false;

		if (!prev[i].ifindex)
			continue;
		for (unsigned j = 0; j < count; j++) {
			if (strcmp(prev[i].name, next[j].name) || !next[j].ifindex)
				continue;
			same_pin = mode == ATTACH_MODE_TCX; /* the tcx pin was reused (attach_tcx_pinned) */
			kept = prev[i].ifindex == next[j].ifindex && old_mode == mode;
		}
		if (kept || (old_mode == ATTACH_MODE_TCX && same_pin))
			continue;
		detach_reroute(job->dp, job->uid, &prev[i], old_mode, true);
	}
	memcpy(m->reroute, next, sizeof(next));
	m->reroute_count = count;
	return 0;
}

static void sk_lookup_pin_path(const struct datapath *dp, const char *uid, char out[PATH_MAX])
{
	snprintf(out, PATH_MAX, "%s/pods/%s/sk_lookup", dp->root, uid);
}

/* The pod netns's sk_lookup link, if the pin holds one on that netns: its program id, else 0. */
static __u32 pinned_sk_lookup_prog(const char *pin, __u64 netns_ino)
{
	struct bpf_link_info info;

	if (pinned_link(pin, &info, sizeof(info)) || info.type != BPF_LINK_TYPE_NETNS ||
	    info.netns.netns_ino != netns_ino)
		return 0;
	return info.prog_id;
}

/* This thread's netns's cookie (Linux 5.14+), the key sk_lookup steering finds a pod's ztunnel
 * listeners by; 0 if the kernel has none. */
static __u64 netns_cookie(void)
{
	__u64 cookie = 0;
	socklen_t len = sizeof(cookie);
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	if (fd >= 0) {
		if (getsockopt(fd, SOL_SOCKET, 71 /* SO_NETNS_COOKIE */, &cookie, &len))
			cookie = 0;
		close(fd);
	}
	return cookie;
}

static bool sk_lookup_steering(struct datapath *dp)
{
	struct dp_settings st = { 0 };
	__u32 zero = 0;

	return bpf_map_lookup_elem(dp->settings_fd, &zero, &st) == 0 &&
	       (st.flags & SETTING_SK_LOOKUP_STEERING);
}

/* The pod netns's sk_lookup link (pin "sk_lookup"), on every pod whatever the node's steering: it
 * steers SYNs with sk_lookup steering and is the backstop in both modes, and a node that switches
 * steering finds every pod ready (verify reports a pod without it). Only a kernel without netns
 * cookies (before 5.14) goes without, and it cannot steer so. */
static int attach_sk_lookup(struct datapath *dp, const char *uid, struct pod_meta *m, int netns_fd,
			    struct dp_error *e)
{
	char pin[PATH_MAX];
	int fd, err = 0;

	sk_lookup_pin_path(dp, uid, pin);
	if (!m->netns_cookie) {
		if (sk_lookup_steering(dp))
			return dp_fail(e, DPE_KERNEL, 0,
				       "sk_lookup steering needs netns cookies (Linux 5.14+)");
		detach_pinned_link(pin);
		m->steering_sk_lookup = 0;
		return 0;
	}
	if (pinned_sk_lookup_prog(pin, m->netns_ino)) {
		fd = bpf_obj_get(pin);
		err = fd < 0 || bpf_link_update(fd, dp->sk_lookup_prog_fd, NULL) ? -errno : 0;
		if (fd >= 0)
			close(fd);
	} else {
		detach_pinned_link(pin);
		fd = bpf_link_create(dp->sk_lookup_prog_fd, netns_fd, BPF_SK_LOOKUP, NULL);
		if (fd < 0)
			return dp_fail(e, DPE_KERNEL, errno,
				       "cannot attach the sk_lookup program (Linux 5.9+)");
		if (bpf_obj_pin(fd, pin)) {
			err = -errno;
			bpf_link_detach(fd);
		}
		close(fd);
	}
	if (err)
		return dp_fail(e, DPE_SYSTEM, err, "cannot pin the sk_lookup link");
	m->steering_sk_lookup = 1;
	return 0;
}

/* Detaches the pod interface's own tcx links (not the reroute, host, cgroup or sk_lookup ones). */
static void detach_main_tcx(struct datapath *dp, const char *uid)
{
	char pin[PATH_MAX];

	for (int d = 0; d < 2; d++) {
		pin_path(dp, uid, d, pin);
		detach_pinned_link(pin);
	}
}

/* A failed update, inside the pod netns: back to the previous attachment (job->old), its hooks
 * first and what the update added removed after, so the pod is never without a hook. Best effort;
 * job->e keeps the update's error. */
static void restore_in_netns(struct netns_job *job)
{
	struct pod_meta *m = job->meta, cur = *m;
	const struct pod_meta *old = job->old;
	const unsigned routing =
		OWNS_RULE_V4 | OWNS_RULE_V6 | OWNS_ROUTE_V4 | OWNS_ROUTE_V6 | OWNS_ACCEPT_LOCAL;
	unsigned added = cur.owns & ~old->owns & routing;
	char names[MAX_REROUTE_IFACES][16], dir[PATH_MAX];
	struct pod_ifaces cur_ifaces, restored_ifaces;
	struct dp_error scratch = { 0 }, *err = job->e;
	struct ifaces_refused scratch_refused = { 0 };
	struct rtnl nl;

	job->e = &scratch;
	m->mode = old->mode;
	if (old->mode == ATTACH_MODE_TCX) {
		attach_tcx(job->dp, job->uid, m, HOOK_INGRESS);
		attach_tcx(job->dp, job->uid, m, HOOK_EGRESS);
		if (cur.mode == ATTACH_MODE_TC)
			detach_tc_filters(m);
	} else {
		attach_tc(job->dp, m);
		if (cur.mode == ATTACH_MODE_TCX)
			detach_main_tcx(job->dp, job->uid);
	}
	ifaces_get(job->dp, job->uid, &cur_ifaces);
	restored_ifaces = *job->old_ifaces;
	pod_dir(job->dp, job->uid, dir);
	if (ifaces_hook(dir, job->dp->prog_fd, old->mode, &restored_ifaces, &cur_ifaces, job->ifaces_mode,
			NULL, job->e) == 0)
		ifaces_put(job->dp, job->uid, &restored_ifaces);
	for (unsigned i = 0; i < old->reroute_count && i < MAX_REROUTE_IFACES; i++)
		snprintf(names[i], sizeof(names[i]), "%s", old->reroute[i].name);
	attach_reroutes(job, cur.mode, (const char(*)[16])names,
			old->reroute_count < MAX_REROUTE_IFACES ? old->reroute_count : MAX_REROUTE_IFACES);
	ifaces_get(job->dp, job->uid, &cur_ifaces);
	guards_sync(dir, job->dp->guard_prog_fd, old->mode, m->ifindex, &cur_ifaces, true, &scratch_refused,
		    job->e);
	if (added && rtnl_open(&nl) == 0) {
		if (added & OWNS_RULE_V4)
			rtnl_rule_del(&nl, &redirect_rule_v4);
		if (added & OWNS_RULE_V6)
			rtnl_rule_del(&nl, &redirect_rule_v6);
		if (added & OWNS_ROUTE_V4)
			rtnl_local_default_route_del(&nl, AF_INET, REDIRECT_ROUTE_TABLE);
		if (added & OWNS_ROUTE_V6)
			rtnl_local_default_route_del(&nl, AF_INET6, REDIRECT_ROUTE_TABLE);
		if (added & OWNS_ACCEPT_LOCAL)
			rtnl_set_accept_local(&nl, (int)m->ifindex, m->saved_accept_local);
		rtnl_close(&nl);
	}
	m->owns &= ~added;
	job->e = err;
	job->restored = true;
}

static int restore_job(void *p)
{
	restore_in_netns(p);
	return 0;
}

static int attach_job(void *p)
{
	struct netns_job *job = p;
	struct pod_meta *m = job->meta;
	struct pod_ifaces prev_ifaces = *job->old_ifaces;
	char dir[PATH_MAX];
	struct rtnl nl;
	unsigned old_mode = 0;
	int ifindex = 0, err;

	job->ifaces_mode = m->mode;
	if ((err = rtnl_open(&nl)))
		return dp_fail(job->e, DPE_SYSTEM, err, "cannot open rtnetlink in netns %s",
			       job->req->netns_path);
	if (find_pod_interface(&nl, m, job->req->netns_path, &ifindex, job->e))
		goto out;
	/* What only the netns can tell, refused before anything in it changes. */
	for (unsigned j = 0; j < job->req->reroute_count; j++)
		if (if_nametoindex(job->req->reroute[j]) == (unsigned)ifindex) {
			dp_fail(job->e, DPE_INVALID, 0, "reroute interface %s is the pod's own interface",
				job->req->reroute[j]);
			goto out;
		}
	if (!netns_cookie() && sk_lookup_steering(job->dp)) {
		dp_fail(job->e, DPE_KERNEL, 0, "sk_lookup steering needs netns cookies (Linux 5.14+)");
		goto out;
	}
	/* The veth peer's index, in the peer's (the node's) netns: where kubelet probes are handled. */
	job->host_peer = 0;
	if (job->req->host_netns[0] && rtnl_veth_peer(&nl, ifindex, &job->host_peer))
		job->host_peer = 0;
	if (ifaces_scan(&nl, (unsigned)ifindex, (const char(*)[16])job->req->reroute, job->req->reroute_count,
			m, job->ifaces, &job->refused, job->e))
		goto out;
	/* Never a refusal (overlapping ranges are a pod's right), but said. */
	memset(&job->foreign, 0, sizeof(job->foreign));
	foreign_addresses(job->dp, &nl, m, job->ifaces, say_refused, &job->foreign);
	/* A first attach refuses what it cannot capture (fail closed: CNI ADD fails, the pod does not
	 * start half captured). An attached pod never leaves the interfaces it can hook unhooked for
	 * the sake of one it cannot: those are hooked, the others said (the attach's warning, verify). */
	if (!job->old && job->refused.count) {
		dp_fail(job->e, DPE_POD_IP, 0, "%s", job->refused.message[0]);
		goto out;
	}
	if (m->state == ATTACH_STATE_ATTACHED) {
		if (m->ifindex != (unsigned)ifindex) {
			/* The pod's interface was replaced: its interfaces' hooks go (the cgroup's and the
			 * netns's sk_lookup link stay: they are not an interface's, and are updated in
			 * place below; the connect hooks route over lo only with that link there). */
			detach_iface_programs(job->dp, job->uid, m, true);
			memset(&prev_ifaces, 0, sizeof(prev_ifaces));
			/* The socket lookup's check waits for the new interface's entry (written at the
			 * end of the attach): else it would refuse every connection until then. */
			m->ifaces_gated = 0;
		} else {
			old_mode = m->mode;
		}
	}
	m->ifindex = (unsigned)ifindex;
	m->netns_cookie = netns_cookie();
	/* The pod's entries carry its netns's cookie before its programs run (a first attach wrote
	 * them without): to the programs an entry without it is another netns's, which fails closed
	 * (pod_redirect.bpf.c, policy_of_address). */
	if ((err = policy_write(&job->dp->policy, m, NULL))) {
		dp_fail(job->e, DPE_SYSTEM, err, "cannot record the policy of pod %s", job->uid);
		goto out;
	}
	if (m->state != ATTACH_STATE_ATTACHED) {
		/* Before touching the netns: a crash from here on leaves a record detach can act on. */
		m->owns = OWNS_RULE_V4 | OWNS_RULE_V6 | OWNS_ROUTE_V4 | OWNS_ROUTE_V6;
		m->state = ATTACH_STATE_ATTACHING;
		if ((err = meta_put(job->dp, job->uid, m))) {
			dp_fail(job->e, DPE_SYSTEM, err, "cannot record pod %s", job->uid);
			goto out;
		}
		m->owns = 0;
	}
	if (configure_routing(&nl, m, job->ifaces, job->e) || fault(job, "routing") ||
	    attach_programs(job->dp, job->uid, m,
			    job->req->mode == DP_MODE_AUTO && m->mode ? (enum dp_mode_request)m->mode
								      : job->req->mode,
			    job->e) ||
	    fault(job, "programs"))
		goto out;
	/* A mode switch removes the old hooks only now that the new ones run: no window in which the
	 * pod's traffic is not redirected (both running at once is harmless: same decisions). */
	if (old_mode == ATTACH_MODE_TC && m->mode == ATTACH_MODE_TCX)
		detach_tc_filters(m);
	else if (old_mode == ATTACH_MODE_TCX && m->mode == ATTACH_MODE_TC)
		detach_main_tcx(job->dp, job->uid);
	if (fault(job, "mode-switch"))
		goto out;
	/* The pod's other interfaces: recorded before they are hooked (a crash leaves what detach
	 * needs), and again with what hooking them created. */
	pod_dir(job->dp, job->uid, dir);
	ifaces_carry_owned(job->ifaces, m->mode, &prev_ifaces, old_mode);
	if ((err = ifaces_put(job->dp, job->uid, job->ifaces))) {
		dp_fail(job->e, DPE_SYSTEM, err, "cannot record the interfaces of pod %s", job->uid);
		goto out;
	}
	/* An interface about to lose pod_egress is guarded before it does (the guards are pruned once
	 * the hooks are done, below). */
	if (job->old && guards_sync(dir, job->dp->guard_prog_fd, m->mode, m->ifindex, job->ifaces, false,
				    &job->refused, job->e))
		goto out;
	err = ifaces_hook(dir, job->dp->prog_fd, m->mode, job->ifaces, &prev_ifaces, old_mode,
			  job->old ? &job->refused : NULL, job->e);
	ifaces_put(job->dp, job->uid, err ? &prev_ifaces : job->ifaces);
	job->ifaces_mode = err ? old_mode : m->mode;
	if (err || fault(job, "ifaces") ||
	    attach_reroutes(job, old_mode, (const char(*)[16])job->req->reroute, job->req->reroute_count) ||
	    fault(job, "reroutes") ||
	    guards_sync(dir, job->dp->guard_prog_fd, m->mode, m->ifindex, job->ifaces, true,
			job->old ? &job->refused : NULL, job->e) ||
	    fault(job, "guards"))
		goto out;
	m->state = ATTACH_STATE_ATTACHED;
out:
	rtnl_close(&nl);
	if (job->e->code && job->old)
		restore_in_netns(job); /* an update: back to the previous attachment, never detached */
	else if (job->e->code) /* a first attach: roll back in this same netns, never half redirected */
		undo_in_netns(job->dp, job->uid, m);
	return job->e->code ? -1 : 0;
}

static int open_pod_netns(const char *path, struct pod_meta *m, struct dp_error *e)
{
	unsigned long long ino, dev;
	int fd = open_netns(path, &ino, &dev);

	if (fd == -ENOENT)
		return dp_fail(e, DPE_NETNS, 0, "netns %s does not exist", path);
	if (fd == -EINVAL)
		return dp_fail(e, DPE_NETNS, 0, "%s is not a network namespace", path);
	if (fd < 0)
		return dp_fail(e, DPE_NETNS, fd, "cannot open netns %s", path);
	if (m) {
		m->netns_ino = ino;
		m->netns_dev = dev;
	}
	return fd;
}

/* Undoes a recorded attachment: inside its netns when that is still reachable. */
static void undo_recorded(struct datapath *dp, const char *uid, struct pod_meta *m, char *warning,
			  size_t wlen)
{
	struct netns_job job = { .dp = dp, .uid = uid, .meta = m };
	unsigned long long ino = 0, dev = 0;
	int fd;

	host_hooks_detach(&dp->host, uid, m);
	fd = open_netns(m->netns_path, &ino, &dev);

	if (fd >= 0 && ino == m->netns_ino && dev == m->netns_dev) {
		run_in_netns(fd, undo_job, &job);
	} else {
		detach_programs(dp, uid, m, false);
		if (warning && netns_present(m) == false && m->mode == ATTACH_MODE_TC)
			snprintf(warning, wlen, "netns %s is gone; its tc filters went with it",
				 m->netns_path);
		else if (warning)
			snprintf(warning, wlen, "netns %s is gone or was replaced; nothing to undo inside it",
				 m->netns_path);
	}
	if (fd >= 0)
		close(fd);
}

/* The namespace the agent runs in is the node's: redirecting it would capture the node's traffic. */
static bool is_own_netns(const struct pod_meta *m)
{
	struct stat st;

	return stat("/proc/self/ns/net", &st) == 0 && st.st_ino == m->netns_ino && st.st_dev == m->netns_dev;
}

int dp_attach(struct datapath *dp, const struct dp_attach_request *req, struct dp_attach_result *res,
	      struct dp_error *e)
{
	struct pod_meta m, old;
	struct pod_ifaces ifaces, old_ifaces, recorded;
	struct netns_job job = { .dp = dp,
				 .uid = req->uid,
				 .meta = &m,
				 .req = req,
				 .e = e,
				 .ifaces = &ifaces,
				 .old_ifaces = &old_ifaces };
	struct timespec now;
	bool undo = false;
	int fd, rc, err;

	if (!uid_valid(req->uid))
		return dp_fail(e, DPE_INVALID, 0, "pod uid must be 1-63 characters of [A-Za-z0-9._-]: %s",
			       req->uid);
	if (req->ip_count == 0 || req->ip_count > MAX_POD_IPS)
		return dp_fail(e, DPE_INVALID, 0, "a pod needs 1 to %d IPs, got %u", MAX_POD_IPS,
			       req->ip_count);
	if (req->netns_path[0] != '/')
		return dp_fail(e, DPE_INVALID, 0, "netns path must be absolute: %s", req->netns_path);
	if (req->flags & ~(POD_F_BYPASS_INBOUND | POD_F_STRICT | POD_F_DNS_CAPTURE))
		return dp_fail(e, DPE_INVALID, 0, "unknown pod flags 0x%x", req->flags);
	if (req->reroute_count > MAX_REROUTE_IFACES)
		return dp_fail(e, DPE_INVALID, 0, "at most %d reroute interfaces, got %u", MAX_REROUTE_IFACES,
			       req->reroute_count);
	for (unsigned i = 0; i < req->reroute_count; i++) {
		const char *n = req->reroute[i];

		if (!n[0] || strnlen(n, 16) >= 16 || strchr(n, '/') || !strcmp(n, ".") || !strcmp(n, "..") ||
		    strpbrk(n, " \t\n:"))
			return dp_fail(e, DPE_INVALID, 0, "not an interface name: \"%.16s\"", n);
	}

	memset(&m, 0, sizeof(m));
	fd = open_pod_netns(req->netns_path, &m, e);
	if (fd < 0)
		return -1;
	if (is_own_netns(&m)) {
		close(fd);
		return dp_fail(
			e, DPE_NETNS, 0,
			"%s is this process's own network namespace (the node's), not a pod's: refused",
			req->netns_path);
	}
	dp_lock(dp);
	res->updated = false;
	res->warning[0] = '\0';
	memset(&ifaces, 0, sizeof(ifaces));
	memset(&old_ifaces, 0, sizeof(old_ifaces));
	if (meta_get(dp, req->uid, &old) == 0) {
		if (old.state == ATTACH_STATE_ATTACHED && old.netns_ino == m.netns_ino &&
		    old.netns_dev == m.netns_dev) {
			m = old; /* same pod, same netns: update in place */
			res->updated = true;
			job.old = &old;
			ifaces_get(dp, req->uid, &old_ifaces);
		} else {
			/* A new sandbox for the same pod, or a crashed attach: clear the old record first. */
			undo_recorded(dp, req->uid, &old, NULL, 0);
			ifaces_forget(dp, req->uid, &old);
			policy_remove(&dp->policy, &old);
			meta_del(dp, req->uid);
			remove_pod_dir(dp, req->uid);
		}
	}
	snprintf(m.netns_path, sizeof(m.netns_path), "%s", req->netns_path);
	memcpy(m.ips, req->ips, sizeof(m.ips));
	m.ip_count = req->ip_count;
	m.flags = req->flags;
	clock_gettime(CLOCK_REALTIME, &now);
	if (!res->updated)
		m.attached_at_ns = (__u64)now.tv_sec * 1000000000ull + (__u64)now.tv_nsec;

	/* The gate stays on through an update only while the pod's entries are there (a node handed to
	 * an older release and back starts with none). */
	{
		struct captured_set own = { .count = 1, .ifindex = { m.ifindex } };

		m.ifaces_gated = res->updated && m.ifaces_gated && captured_has(&dp->policy, &m, &own, 0);
	}
	/* The programs read the pod's options from its addresses: in place before they run. */
	if ((err = policy_claim_slot(&dp->policy, req->uid, &m)) ||
	    (err = policy_write(&dp->policy, &m, res->updated ? &old : NULL)))
		dp_fail(e, err == -ENOSPC ? DPE_INVALID : DPE_SYSTEM, err,
			"cannot record the policy of pod %s", req->uid);
	else if ((rc = run_in_netns(fd, attach_job, &job)) < 0 && !e->code)
		dp_fail(e, DPE_NETNS, rc, "cannot enter netns %s", req->netns_path);
	else if (!e->code)
		undo = true; /* the netns job has run: a later failure must be undone */
	/* Nothing half-applied: a failure from here on is undone or restored below. */
	if (!e->code && !attach_sk_lookup(dp, req->uid, &m, fd, e) && !fault(&job, "sk_lookup") &&
	    !host_hooks_attach(&dp->host, req->uid, req->host_netns, job.host_peer, &m, e) &&
	    !fault(&job, "host") && !cgroup_hooks_prepare(&dp->cgroup, req->uid, req->pod_cgroup, &m, e) &&
	    !fault(&job, "dns")) {
		struct captured_set captured, was_captured;
		struct pod_policy now;

		/* The interfaces that carry hooks now, before the pod's entries say the set is complete
		 * (then its socket lookup refuses what came in on any other). */
		captured_set_of(&m, &ifaces, &captured);
		if (res->updated)
			captured_set_of(&old, &old_ifaces, &was_captured);
		err = captured_write(&dp->policy, &m, &captured, res->updated ? &was_captured : NULL);
		m.ifaces_gated = !err;
		/* The cookie is known once inside the netns (sk_lookup steering needs it in the policy),
		 * and whether DNS is captured once the cgroup hooks are prepared (they run already). */
		if (!err && (bpf_map_lookup_elem(dp->policy.policy_fd, &m.ips[0], &now) ||
			     now.netns_cookie != m.netns_cookie || now.flags != policy_flags(&m)))
			err = policy_write(&dp->policy, &m, NULL);
		if (!err) /* the addresses of its other interfaces: the pod's too */
			err = ifaces_policy_write(dp, &m, &ifaces, &old_ifaces);
		if (err)
			dp_fail(e, DPE_SYSTEM, err, "cannot record the policy of pod %s", req->uid);
		if (!e->code && !fault(&job, "policy") && !fault(&job, "record")) {
			if ((err = meta_put(dp, req->uid, &m)))
				dp_fail(e, DPE_SYSTEM, err, "cannot record pod %s", req->uid);
			else
				cgroup_hooks_commit(&dp->cgroup, req->uid, req->pod_cgroup, &m, e);
		}
	}
	if (e->code && res->updated) {
		/* A failed update of an attached pod: the previous attachment again, never a detach. */
		cgroup_hooks_abort(&dp->cgroup, req->uid);
		if (!old.steering_sk_lookup && m.steering_sk_lookup) {
			char pin[PATH_MAX];

			sk_lookup_pin_path(dp, req->uid, pin);
			detach_pinned_link(pin);
		}
		if (m.host_ifindex != old.host_ifindex || strcmp(m.host_netns_path, old.host_netns_path)) {
			struct dp_error scratch = { 0 };

			host_hooks_attach(&dp->host, req->uid, old.host_netns_path, (int)old.host_ifindex, &m,
					  &scratch);
		}
		if (!job.restored)
			run_in_netns(fd, restore_job, &job);
		ifaces_get(dp, req->uid, &recorded);
		old.mode = m.mode;
		old.owns = m.owns;
		old.ifindex = m.ifindex;
		old.reroute_count = m.reroute_count;
		memcpy(old.reroute, m.reroute, sizeof(old.reroute));
		old.host_ifindex = m.host_ifindex;
		old.host_owns_clsact = m.host_owns_clsact;
		old.host_netns_ino = m.host_netns_ino;
		old.host_netns_dev = m.host_netns_dev;
		memcpy(old.host_netns_path, m.host_netns_path, sizeof(old.host_netns_path));
		{
			struct captured_set restored, tried;

			/* The interfaces hooked again, and none the update added that are unhooked now,
			 * before the policy says whether the set is complete: if they cannot be written,
			 * it does not (not gated, never wrongly). */
			captured_set_of(&old, &recorded, &restored);
			captured_set_of(&m, &ifaces, &tried);
			if (captured_write(&dp->policy, &old, &restored, &tried))
				old.ifaces_gated = 0;
		}
		policy_write(&dp->policy, &old, &m);
		ifaces_policy_write(dp, &old, &recorded, &ifaces);
		meta_put(dp, req->uid, &old);
	} else if (e->code) {
		struct pod_meta found = with_iface_addrs(&m, &ifaces);

		if (undo)
			undo_recorded(dp, req->uid, &m, NULL, 0);
		cgroup_hooks_abort(&dp->cgroup, req->uid);
		policy_remove(&dp->policy, &found);
		ifaces_forget(dp, req->uid, &m);
		meta_del(dp, req->uid);
		remove_pod_dir(dp, req->uid);
		policy_remove(&dp->policy, &m);
		policy_release_slot(&dp->policy, req->uid, &m);
	} else {
		res->warning[0] = '\0';
		for (unsigned i = 0; i < job.refused.count + job.foreign.count; i++) {
			size_t len = strlen(res->warning);
			const char *msg = i < job.refused.count ? job.refused.message[i]
								: job.foreign.message[i - job.refused.count];

			if (i < IFACES_MAX_REFUSED * 2)
				snprintf(res->warning + len, sizeof(res->warning) - len, "%s%s",
					 len ? "; " : "", msg);
		}
		res->mode = m.mode;
		res->ifindex = (int)m.ifindex;
		res->host_ifindex = (int)m.host_ifindex;
	}
	dp_unlock(dp);
	close(fd);
	return e->code ? -1 : 0;
}

int dp_detach(struct datapath *dp, const char *uid, struct dp_detach_result *res, struct dp_error *e)
{
	struct pod_meta m;

	if (!uid_valid(uid))
		return dp_fail(e, DPE_INVALID, 0, "pod uid must be 1-63 characters of [A-Za-z0-9._-]: %s",
			       uid);
	res->warning[0] = '\0';
	dp_lock(dp);
	res->found = meta_get(dp, uid, &m) == 0;
	if (res->found) {
		undo_recorded(dp, uid, &m, res->warning, sizeof(res->warning));
		ifaces_forget(dp, uid, &m);
		policy_remove(&dp->policy, &m);
		policy_release_slot(&dp->policy, uid, &m);
		meta_del(dp, uid);
	}
	remove_pod_dir(dp, uid); /* also pins left by a crash before the record was written */
	dp_unlock(dp);
	return 0;
}

static int for_each_meta(struct datapath *dp,
			 int (*fn)(struct datapath *, const char *, struct pod_meta *, void *), void *ctx)
{
	struct pod_meta_key key, next;
	struct pod_meta m;
	void *prev = NULL;

	while (bpf_map_get_next_key(dp->meta_fd, prev, &next) == 0) {
		key = next;
		prev = &key;
		if (bpf_map_lookup_elem(dp->meta_fd, &key, &m) == 0) {
			int err = fn(dp, key.uid, &m, ctx);

			if (err)
				return err;
		}
	}
	return 0;
}

struct list_ctx {
	struct dp_pod *pods;
	size_t count, cap;
};

static int list_one(struct datapath *dp, const char *uid, struct pod_meta *m, void *p)
{
	struct list_ctx *ctx = p;
	struct dp_pod *pod;
	char pin[PATH_MAX];
	struct stat st;

	if (ctx->count == ctx->cap) {
		size_t cap = ctx->cap ? ctx->cap * 2 : 64;
		struct dp_pod *n = realloc(ctx->pods, cap * sizeof(*n));

		if (!n)
			return -ENOMEM;
		ctx->pods = n;
		ctx->cap = cap;
	}
	pod = &ctx->pods[ctx->count++];
	memset(pod, 0, sizeof(*pod));
	snprintf(pod->uid, sizeof(pod->uid), "%s", uid);
	pod->meta = *m;
	ifaces_get(dp, uid, &pod->ifaces);
	pod->netns_present = netns_present(m);
	pod->links_pinned = true;
	for (int d = 0; d < 2; d++) {
		pin_path(dp, uid, d, pin);
		pod->links_pinned = pod->links_pinned && stat(pin, &st) == 0;
	}
	if (m->slot)
		counters_read(&dp->policy, m->slot, &pod->counters);
	return 0;
}

int dp_list(struct datapath *dp, struct dp_pod **pods, size_t *count, struct dp_error *e)
{
	struct list_ctx ctx = { 0 };
	int err;

	dp_lock(dp);
	err = for_each_meta(dp, list_one, &ctx);
	dp_unlock(dp);
	if (err) {
		free(ctx.pods);
		return dp_fail(e, DPE_SYSTEM, err, "cannot list pods");
	}
	*pods = ctx.pods;
	*count = ctx.count;
	return 0;
}

/* ---- verify ---- */

void problem(struct dp_verify_result *r, const char *fmt, ...)
{
	va_list ap;

	if (r->problem_count >= DP_MAX_PROBLEMS)
		return;
	va_start(ap, fmt);
	vsnprintf(r->problems[r->problem_count++], sizeof(r->problems[0]), fmt, ap);
	va_end(ap);
}

void verify_program_name(struct dp_verify_result *r, __u32 prog_id, const char *hook, const char *want)
{
	char name[PROG_NAME_LEN] = "";
	/* Only a name the kernel cuts short needs the BTF one (a BTF load per check). */
	bool full = strlen(want) >= BPF_OBJ_NAME_LEN - 1;

	if (prog_name_by_id(prog_id, full, name) ||
	    (full && strlen(name) >= BPF_OBJ_NAME_LEN ? strcmp(name, want)
						      : strncmp(name, want, BPF_OBJ_NAME_LEN - 1)))
		problem(r, "%s hook runs program %u (%s), not %s", hook, prog_id, name, want);
}

static void verify_reroutes(struct netns_job *job, struct rtnl *nl)
{
	struct pod_meta *m = job->meta;
	struct dp_verify_result *res = job->verify;

	for (unsigned i = 0; i < m->reroute_count && i < MAX_REROUTE_IFACES; i++) {
		struct reroute_iface *r = &m->reroute[i];
		unsigned now = if_nametoindex(r->name);
		enum link_layer l2;
		const char *want;
		char hook[40];

		snprintf(hook, sizeof(hook), "reroute %s", r->name);
		if (now != r->ifindex) {
			problem(res,
				r->ifindex ? "reroute interface %s is gone or was replaced"
					   : "reroute interface %s appeared and is not hooked yet",
				r->name);
			continue;
		}
		if (!r->ifindex)
			continue;
		if (rtnl_link_layer(nl, (int)r->ifindex, &l2)) {
			problem(res, "reroute interface %s is gone or was replaced", r->name);
			continue;
		}
		want = reroute_prog_names[l2];
		if (m->mode == ATTACH_MODE_TCX) {
			struct tcx_link_info info;
			char pin[PATH_MAX];

			reroute_pin_path(job->dp, job->uid, r->name, pin);
			if (pinned_link_info(pin, &info) || info.ifindex != r->ifindex)
				problem(res, "the %s link is missing or detached", hook);
			else
				verify_program_name(res, info.prog_id, hook, want);
		} else {
			LIBBPF_OPTS(bpf_tc_hook, tch, .ifindex = (int)r->ifindex,
				    .attach_point = BPF_TC_INGRESS);
			LIBBPF_OPTS(bpf_tc_opts, opts, .handle = TC_FILTER_HANDLE,
				    .priority = TC_FILTER_PRIORITY);

			if (bpf_tc_query(&tch, &opts))
				problem(res, "the %s tc filter is missing", hook);
			else
				verify_program_name(res, opts.prog_id, hook, want);
		}
	}
}

static void say_problem(void *to, const char *msg)
{
	problem(to, "%s", msg);
}

/* The pod's other interfaces: hooked as recorded, and none or no address the record lacks. */
static void verify_ifaces(struct netns_job *job, struct rtnl *nl)
{
	struct pod_meta *m = job->meta;
	char names[MAX_REROUTE_IFACES][16], dir[PATH_MAX];
	struct dp_error e = { 0 };
	struct ifaces_refused ref;
	struct pod_ifaces now;
	bool scanned;

	for (unsigned i = 0; i < m->reroute_count && i < MAX_REROUTE_IFACES; i++)
		snprintf(names[i], sizeof(names[i]), "%s", m->reroute[i].name);
	scanned = ifaces_scan(nl, m->ifindex, (const char(*)[16])names,
			      m->reroute_count < MAX_REROUTE_IFACES ? m->reroute_count : MAX_REROUTE_IFACES,
			      m, &now, &ref, &e) == 0;
	if (!scanned)
		problem(job->verify, "%s", e.message);
	for (unsigned i = 0; scanned && i < ref.count && i < IFACES_MAX_REFUSED; i++)
		problem(job->verify, "%s", ref.message[i]);
	if (scanned && ref.more)
		problem(job->verify, "and %u more interfaces refused", ref.more);
	pod_dir(job->dp, job->uid, dir);
	ifaces_verify(nl, dir, m->mode, job->ifaces, scanned ? &now : NULL, job->verify);
	/* An address another pod holds is found, never taken: said, not silently skipped. */
	foreign_addresses(job->dp, nl, m, job->ifaces, say_problem, job->verify);
}

static int verify_job(void *p)
{
	struct netns_job *job = p;
	struct pod_meta *m = job->meta;
	struct dp_verify_result *r = job->verify;
	struct rtnl nl;
	bool v4, v6, exists;
	struct local_route have, want;
	char ip[INET6_ADDRSTRLEN], dir[PATH_MAX];
	int err;

	if ((err = rtnl_open(&nl)))
		return err;
	rtnl_link_exists(&nl, (int)m->ifindex, &exists);
	if (!exists)
		problem(r, "interface %u is gone from the netns", m->ifindex);
	for (unsigned i = 0; i < m->ip_count; i++) {
		int idx = 0, found = rtnl_find_address(&nl, m->ips[i].addr, &idx);
		bool captured = false;

		for (unsigned j = 0; j < job->ifaces->count && j < MAX_POD_IFACES; j++)
			captured |= idx && job->ifaces->iface[j].ifindex == (unsigned)idx;
		if (found || (idx != (int)m->ifindex && !captured))
			problem(r, "pod IP %s is no longer on interface %u or another captured one",
				ip_str(&m->ips[i], ip), m->ifindex);
	}
	pod_families(m, job->ifaces, &v4, &v6);
	for (int fam = 0; fam < 2; fam++) {
		const struct fwmark_rule *rule = fam == 0 ? &redirect_rule_v4 : &redirect_rule_v6;

		if (!(fam == 0 ? v4 : v6))
			continue;
		if (rtnl_rule_exists(&nl, rule, &exists) == 0 && !exists)
			problem(r, "the %s fwmark rule (mark 0x%x/0x%x, table %d) is missing",
				fam ? "IPv6" : "IPv4", REDIRECT_MARK, MARK_MASK, REDIRECT_ROUTE_TABLE);
		if (rtnl_local_default_route_get(&nl, rule->family, REDIRECT_ROUTE_TABLE, &exists, &have) ==
			    0 &&
		    wanted_local_route(&nl, m, job->ifaces, rule->family, &want) == 0) {
			if (!exists)
				problem(r, "the %s local route in table %d is missing", fam ? "IPv6" : "IPv4",
					REDIRECT_ROUTE_TABLE);
			else if (memcmp(have.prefsrc, want.prefsrc, sizeof(want.prefsrc)))
				problem(r,
					"the %s local route in table %d has not the pod's address as source",
					fam ? "IPv6" : "IPv4", REDIRECT_ROUTE_TABLE);
			else if (have.mtu != want.mtu)
				problem(r,
					"the %s local route in table %d has MTU %u, not the pod interface's "
					"%u",
					fam ? "IPv6" : "IPv4", REDIRECT_ROUTE_TABLE, have.mtu, want.mtu);
		}
	}
	if (v4) {
		uint32_t al = 0;

		if (rtnl_get_accept_local(&nl, (int)m->ifindex, &al) == 0 && al != 1)
			problem(r, "accept_local is %u on interface %u", al, m->ifindex);
	}

	if (m->mode == ATTACH_MODE_TCX) {
		for (int d = 0; d < 2; d++) {
			struct tcx_link_info info;
			char pin[PATH_MAX];

			pin_path(job->dp, job->uid, d, pin);
			if (pinned_link_info(pin, &info))
				problem(r, "the %s link pin %s is missing", hook_names[d], pin);
			else if (info.ifindex != m->ifindex)
				problem(r, "the %s link is detached", hook_names[d]);
			else
				verify_program_name(r, info.prog_id, hook_names[d], prog_names[d]);
		}
	} else {
		LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = (int)m->ifindex);

		for (int d = 0; d < 2; d++) {
			LIBBPF_OPTS(bpf_tc_opts, opts, .handle = TC_FILTER_HANDLE,
				    .priority = TC_FILTER_PRIORITY);

			hook.attach_point = d == HOOK_INGRESS ? BPF_TC_INGRESS : BPF_TC_EGRESS;
			if (bpf_tc_query(&hook, &opts))
				problem(r, "the %s tc filter is missing", hook_names[d]);
			else
				verify_program_name(r, opts.prog_id, hook_names[d], prog_names[d]);
		}
	}
	verify_reroutes(job, &nl);
	verify_ifaces(job, &nl);
	pod_dir(job->dp, job->uid, dir);
	guards_verify(&nl, dir, m->mode, m->ifindex, job->ifaces, r);
	rtnl_close(&nl);
	if (m->steering_sk_lookup || m->netns_cookie) { /* on every pod (attach_sk_lookup) */
		char pin[PATH_MAX];
		__u32 prog;

		sk_lookup_pin_path(job->dp, job->uid, pin);
		if (!(prog = pinned_sk_lookup_prog(pin, m->netns_ino)))
			problem(r, "the sk_lookup link is missing or detached");
		else
			verify_program_name(r, prog, "sk_lookup", "pod_sk_lookup");
	}
	cgroup_hooks_verify(&job->dp->cgroup, job->uid, m, r);
	return 0;
}

/* The socket lookup's view of the pod's interfaces: every one with hooks is in captured_ifaces. */
static void verify_captured(struct datapath *dp, const struct pod_meta *m, const struct pod_ifaces *f,
			    struct dp_verify_result *res)
{
	struct captured_set s;

	if (m->state != ATTACH_STATE_ATTACHED)
		return;
	if (!m->ifaces_gated) {
		problem(res, "the pod's interfaces are not recorded (attached by an older release, or the "
			     "record could "
			     "not be written): its socket lookup does not refuse connections from interfaces "
			     "without hooks, nor its egress guard TCP sent out through them");
		return;
	}
	captured_set_of(m, f, &s);
	for (unsigned i = 0; i < s.count; i++)
		if (!captured_has(&dp->policy, m, &s, i))
			problem(res, "interface %u is missing from the pod's captured_ifaces entries",
				s.ifindex[i]);
	if (m->netns_cookie && !captured_gated(&dp->policy, m))
		problem(res, "the pod's netns is missing from gated_netns (its egress guard lets TCP out of "
			     "interfaces without hooks)");
}

int dp_verify(struct datapath *dp, const char *uid, struct dp_verify_result *res, struct dp_error *e)
{
	struct pod_meta m;
	struct pod_ifaces ifaces;
	struct netns_job job = { .dp = dp, .uid = uid, .meta = &m, .verify = res, .e = e, .ifaces = &ifaces };
	unsigned long long ino = 0, dev = 0;
	int fd, rc;

	if (!uid_valid(uid))
		return dp_fail(e, DPE_INVALID, 0, "pod uid must be 1-63 characters of [A-Za-z0-9._-]: %s",
			       uid);
	memset(res, 0, sizeof(*res));
	dp_lock(dp);
	res->found = meta_get(dp, uid, &m) == 0;
	if (!res->found)
		goto out;
	if (m.state != ATTACH_STATE_ATTACHED)
		problem(res, "attach did not complete");
	ifaces_get(dp, uid, &ifaces);
	fd = open_netns(m.netns_path, &ino, &dev);
	if (fd < 0 || ino != m.netns_ino || dev != m.netns_dev) {
		problem(res, "netns %s is gone or was replaced", m.netns_path);
	} else {
		rc = run_in_netns(fd, verify_job, &job);
		if (rc < 0)
			problem(res, "cannot inspect netns %s: %s", m.netns_path, strerror(-rc));
		host_hooks_verify(&dp->host, uid, &m, res);
	}
	verify_captured(dp, &m, &ifaces, res);
	if (fd >= 0)
		close(fd);
out:
	dp_unlock(dp);
	return 0;
}

/* ---- garbage collection ---- */

struct gc_ctx {
	char (*uids)[POD_UID_LEN];
	size_t count, cap;
};

static bool pod_gone(struct datapath *dp, const char *uid, const struct pod_meta *m)
{
	struct tcx_link_info info;
	char pin[PATH_MAX];

	if (m->mode == ATTACH_MODE_TCX && m->state == ATTACH_STATE_ATTACHED) {
		/* A tcx link whose device was unregistered reports ifindex 0: authoritative even when
		 * the netns lives on without its path. */
		pin_path(dp, uid, HOOK_INGRESS, pin);
		if (pinned_link_info(pin, &info) == 0)
			return info.ifindex == 0;
	}
	return !netns_present(m);
}

static int gc_add(struct gc_ctx *ctx, const char *uid)
{
	if (ctx->count == ctx->cap) {
		size_t cap = ctx->cap ? ctx->cap * 2 : 16;
		char(*n)[POD_UID_LEN] = realloc(ctx->uids, cap * POD_UID_LEN);

		if (!n)
			return -ENOMEM;
		ctx->uids = n;
		ctx->cap = cap;
	}
	snprintf(ctx->uids[ctx->count++], POD_UID_LEN, "%s", uid);
	return 0;
}

static int gc_one(struct datapath *dp, const char *uid, struct pod_meta *m, void *p)
{
	if (!pod_gone(dp, uid, m))
		return 0;
	detach_programs(dp, uid, m, false);
	ifaces_forget(dp, uid, m);
	policy_remove(&dp->policy, m);
	policy_release_slot(&dp->policy, uid, m);
	meta_del(dp, uid);
	remove_pod_dir(dp, uid);
	return gc_add(p, uid);
}

/* Hooks on ztunnel cgroups that are gone (sk_lookup steering): the link reports no cgroup. */
static void gc_ztunnel_hooks(struct datapath *dp)
{
	char dirpath[PATH_MAX], pin[PATH_MAX];
	struct dirent *de;
	DIR *dir;

	snprintf(dirpath, sizeof(dirpath), "%s/ztunnel", dp->root);
	if (!(dir = opendir(dirpath)))
		return;
	while ((de = readdir(dir))) {
		__u64 cgroup = 0;
		__u32 prog = 0;

		if (de->d_name[0] == '.')
			continue;
		snprintf(pin, sizeof(pin), "%s/%s", dirpath, de->d_name);
		if (pinned_cgroup_link(pin, &cgroup, &prog) || cgroup == 0)
			detach_pinned_link(pin);
	}
	closedir(dir);
}

/* Slots and addresses whose pod has no record: left by a crash between the policy and the record. */
static void gc_policy(struct datapath *dp)
{
	struct pod_meta_key owner, empty;
	struct pod_policy pol;
	struct pod_ip ip, next;
	struct pod_meta m;
	void *prev = NULL;

	memset(&empty, 0, sizeof(empty));
	for (__u32 slot = 1; slot < MAX_PODS; slot++) {
		if (bpf_map_lookup_elem(dp->policy.slot_owner_fd, &slot, &owner) == 0 && owner.uid[0] &&
		    meta_get(dp, owner.uid, &m) != 0)
			bpf_map_update_elem(dp->policy.slot_owner_fd, &slot, &empty, BPF_ANY);
	}
	while (bpf_map_get_next_key(dp->policy.policy_fd, prev, &next) == 0) {
		ip = next;
		prev = &ip;
		if (bpf_map_lookup_elem(dp->policy.policy_fd, &ip, &pol) == 0 &&
		    (bpf_map_lookup_elem(dp->policy.slot_owner_fd, &pol.slot, &owner) || !owner.uid[0]))
			bpf_map_delete_elem(dp->policy.policy_fd, &ip);
	}
	captured_gc(&dp->policy);
}

int dp_gc(struct datapath *dp, char (**uids)[POD_UID_LEN], size_t *count, struct dp_error *e)
{
	struct gc_ctx ctx = { 0 };
	char path[PATH_MAX];
	struct dirent *de;
	DIR *dir;
	int err;

	dp_lock(dp);
	err = for_each_meta(dp, gc_one, &ctx);
	/* Pin directories without a record: left by a crash inside attach. */
	snprintf(path, sizeof(path), "%s/pods", dp->root);
	dir = err ? NULL : opendir(path);
	while (dir && (de = readdir(dir))) {
		struct pod_meta m;

		if (de->d_name[0] == '.' || !uid_valid(de->d_name) || meta_get(dp, de->d_name, &m) == 0)
			continue;
		memset(&m, 0, sizeof(m));
		detach_programs(dp, de->d_name, &m, false);
		remove_pod_dir(dp, de->d_name);
		if ((err = gc_add(&ctx, de->d_name)))
			break;
	}
	if (dir)
		closedir(dir);
	if (!err) {
		gc_policy(dp);
		gc_ztunnel_hooks(dp);
	}
	dp_unlock(dp);
	if (err) {
		free(ctx.uids);
		return dp_fail(e, DPE_SYSTEM, err, "cannot collect pins");
	}
	*uids = ctx.uids;
	*count = ctx.count;
	return 0;
}

/* ---- node-wide settings ---- */

int dp_configure(struct datapath *dp, const struct dp_settings_request *req, struct dp_error *e)
{
	struct dp_settings st = { .flags = req->flags };
	struct strict_allow_key key, next;
	__u32 zero = 0;
	__u8 yes = 1;
	int err = 0;

	if (req->flags & ~(SETTING_MARK_ONLY_EXEMPTION | SETTING_SK_LOOKUP_STEERING))
		return dp_fail(e, DPE_INVALID, 0, "unknown settings flags 0x%x", req->flags);
	if (req->allow_count > MAX_STRICT_ALLOW)
		return dp_fail(e, DPE_INVALID, 0, "at most %d strict-mode allow entries, got %u",
			       MAX_STRICT_ALLOW, req->allow_count);
	dp_lock(dp);
	/* The allow list first: a moment with the old list and new flags is the safer order. */
	while (!err && bpf_map_get_next_key(dp->strict_allow_fd, NULL, &next) == 0) {
		key = next;
		if (bpf_map_delete_elem(dp->strict_allow_fd, &key))
			err = -errno;
	}
	for (unsigned i = 0; !err && i < req->allow_count; i++)
		if (bpf_map_update_elem(dp->strict_allow_fd, &req->allow[i], &yes, BPF_ANY))
			err = -errno;
	if (!err && bpf_map_update_elem(dp->settings_fd, &zero, &st, BPF_ANY))
		err = -errno;
	dp_unlock(dp);
	return err ? dp_fail(e, DPE_SYSTEM, err, "cannot write the datapath settings") : 0;
}

int dp_trust_ztunnel_cgroup(struct datapath *dp, const char *cgroup_dir, struct dp_error *e)
{
	char dir[PATH_MAX], pin[PATH_MAX];
	struct stat st;
	__u64 id;
	__u8 yes = 1;
	int cg, fd, err = 0;

	cg = open(cgroup_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (cg < 0 || fstat(cg, &st)) {
		err = errno;
		if (cg >= 0)
			close(cg);
		return dp_fail(e, DPE_INVALID, err, "cannot open cgroup %s", cgroup_dir);
	}
	id = st.st_ino;
	dp_lock(dp);
	if (bpf_map_update_elem(dp->ztunnel_cgroups_fd, &id, &yes, BPF_ANY))
		err = dp_fail(e, DPE_SYSTEM, errno, "cannot record ztunnel's cgroup");
	/* ztunnel's listeners are learnt by a sockops hook on its cgroup, whatever the steering: the
	 * pod's sk_lookup program hands them SYNs (all of them with sk_lookup steering; those meeting
	 * a TIME_WAIT socket with either). */
	snprintf(dir, sizeof(dir), "%s/ztunnel", dp->root);
	snprintf(pin, sizeof(pin), "%s/sockops-%llu", dir, (unsigned long long)id);
	if (!err && access(pin, F_OK) != 0) {
		mkdir_p(dir);
		fd = bpf_link_create(dp->sockops_prog_fd, cg, BPF_CGROUP_SOCK_OPS, NULL);
		if (fd < 0) {
			err = dp_fail(e, DPE_SYSTEM, errno,
				      "cannot attach the sockops program to ztunnel's cgroup");
		} else {
			if (bpf_obj_pin(fd, pin))
				err = dp_fail(e, DPE_SYSTEM, errno, "cannot pin %s", pin);
			close(fd);
		}
	}
	dp_unlock(dp);
	close(cg);
	return err ? -1 : 0;
}

int dp_node_counters(struct datapath *dp, struct pod_counters *out, struct dp_error *e)
{
	int err = counters_read(&dp->policy, 0, out);

	return err ? dp_fail(e, DPE_SYSTEM, err, "cannot read the node counters") : 0;
}
