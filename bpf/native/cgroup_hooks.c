/* The hooks on a pod's cgroup v2: always the socket-option guard (progs/socket_guard.bpf.c); the
 * egress guard (progs/egress_guard.bpf.c) where programs can read a device's netns cookie; the
 * outbound connect hooks that route the apps' TCP over lo to ztunnel (progs/outbound_route.bpf.c);
 * then DNS capture's socket-call hooks (progs/dns_capture.bpf.c) when the pod's DNS is captured.
 * Each is a bpf_link pinned at pods/<uid>/<program>, so it outlives the process that made it. */
#define _GNU_SOURCE
#include "cgroup_hooks.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bpf/bpf.h>

#include "hooks.h"

static const char *const prog_names[CGROUP_HOOKS] = {
	"pod_setsockopt", "pod_egress_guard", "pod_connect4",	  "pod_connect6",
	"dns_connect4",	  "dns_connect6",     "dns_sendmsg4",	  "dns_sendmsg6",
	"dns_recvmsg4",	  "dns_recvmsg6",     "dns_getpeername4", "dns_getpeername6",
};
static const enum bpf_attach_type attach_types[CGROUP_HOOKS] = {
	BPF_CGROUP_SETSOCKOPT,	  BPF_CGROUP_INET_EGRESS,	BPF_CGROUP_INET4_CONNECT,
	BPF_CGROUP_INET6_CONNECT, BPF_CGROUP_INET4_CONNECT,	BPF_CGROUP_INET6_CONNECT,
	BPF_CGROUP_UDP4_SENDMSG,  BPF_CGROUP_UDP6_SENDMSG,	BPF_CGROUP_UDP4_RECVMSG,
	BPF_CGROUP_UDP6_RECVMSG,  BPF_CGROUP_INET4_GETPEERNAME, BPF_CGROUP_INET6_GETPEERNAME,
};

#define GUARD_HOOK 0
#define EGRESS_GUARD_HOOK 1
#define ROUTE_HOOKS 4 /* the connect hooks: 2 and 3 */

/* Is hook i wanted for pod m? The egress guard where it can tell the pod's netns; the route hooks
 * only with the pod netns's sk_lookup program, which alone may take the SYNs they route over lo
 * (it is there when the netns has a cookie). */
static bool wanted(const struct cgroup_hooks *h, int i, const struct pod_meta *m)
{
	if (i == GUARD_HOOK)
		return true;
	if (i == EGRESS_GUARD_HOOK)
		return h->egress_guard && m->netns_cookie != 0;
	if (i < ROUTE_HOOKS)
		return m->netns_cookie != 0;
	return m->flags & POD_F_DNS_CAPTURE;
}

static const char *purpose(int i)
{
	return i == GUARD_HOOK		? "socket-option guard"
	       : i == EGRESS_GUARD_HOOK ? "egress guard"
	       : i < ROUTE_HOOKS	? "outbound route"
					: "DNS capture";
}

static void pin_path(const struct cgroup_hooks *h, const char *uid, int hook, char out[PATH_MAX])
{
	snprintf(out, PATH_MAX, "%s/pods/%s/%s", h->root, uid, prog_names[hook]);
}

/* Where an update pins a link it made on a new cgroup ("_next": bpffs refuses dots in names). */
static void next_pin_path(const struct cgroup_hooks *h, const char *uid, int hook, char out[PATH_MAX])
{
	snprintf(out, PATH_MAX, "%s/pods/%s/%s_next", h->root, uid, prog_names[hook]);
}

void cgroup_hooks_init(struct cgroup_hooks *h, const char *root, struct bpf_object *obj, bool egress_guard)
{
	h->root = root;
	h->egress_guard = egress_guard;
	for (int i = 0; i < CGROUP_HOOKS; i++)
		h->prog_fd[i] = bpf_program__fd(bpf_object__find_program_by_name(obj, prog_names[i]));
}

int pinned_cgroup_link(const char *pin, __u64 *cgroup_id, __u32 *prog_id)
{
	struct bpf_link_info info;
	int err = pinned_link(pin, &info, sizeof(info));

	if (!err && info.type != BPF_LINK_TYPE_CGROUP)
		err = -EINVAL;
	*cgroup_id = err ? 0 : info.cgroup.cgroup_id;
	*prog_id = err ? 0 : info.prog_id;
	return err;
}

void cgroup_hooks_abort(const struct cgroup_hooks *h, const char *uid)
{
	char pin[PATH_MAX];

	for (int i = 0; i < CGROUP_HOOKS; i++) {
		next_pin_path(h, uid, i, pin);
		detach_pinned_link(pin);
	}
}

void cgroup_hooks_detach(const struct cgroup_hooks *h, const char *uid, struct pod_meta *m)
{
	char pin[PATH_MAX];

	cgroup_hooks_abort(h, uid);
	for (int i = 0; i < CGROUP_HOOKS; i++) {
		pin_path(h, uid, i, pin);
		detach_pinned_link(pin);
	}
	m->pod_cgroup_id = 0;
}

int cgroup_hooks_prepare(const struct cgroup_hooks *h, const char *uid, const char *path, struct pod_meta *m,
			 struct dp_error *e)
{
	char pin[PATH_MAX], next[PATH_MAX];
	struct stat st;
	int cg, err = 0;

	if (!path[0]) {
		m->pod_cgroup_id = 0; /* turned off: cgroup_hooks_commit detaches */
		return 0;
	}
	cg = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (cg < 0 || fstat(cg, &st)) {
		err = errno;
		if (cg >= 0)
			close(cg);
		return dp_fail(e, DPE_INVALID, err, "cannot open the pod's cgroup %s", path);
	}
	for (int i = 0; i < CGROUP_HOOKS && !err; i++) {
		__u64 linked = 0;
		__u32 prog = 0;
		int fd;

		pin_path(h, uid, i, pin);
		next_pin_path(h, uid, i, next);
		detach_pinned_link(next); /* left by a crash */
		if (!wanted(h, i, m))
			continue; /* (detached by cgroup_hooks_commit, once the update is recorded) */
		if (pinned_cgroup_link(pin, &linked, &prog) == 0 && linked == st.st_ino) {
			fd = bpf_obj_get(pin);
			if (fd < 0 || bpf_link_update(fd, h->prog_fd[i], NULL))
				err = -errno;
			if (fd >= 0)
				close(fd);
			continue;
		}
		fd = bpf_link_create(h->prog_fd[i], cg, attach_types[i], NULL);
		if (fd < 0) {
			err = -errno;
			break;
		}
		if (bpf_obj_pin(fd, next)) {
			err = -errno;
			bpf_link_detach(fd);
		}
		close(fd);
	}
	close(cg);
	if (err) {
		cgroup_hooks_abort(h, uid);
		return dp_fail(e, DPE_SYSTEM, err, "cannot attach the hooks on the pod's cgroup %s", path);
	}
	m->pod_cgroup_id = st.st_ino;
	return 0;
}

/* The prepared links replace the old ones (rename over their pins: the old link goes with its last
 * pin, the new one already runs). */
int cgroup_hooks_commit(const struct cgroup_hooks *h, const char *uid, const char *path, struct pod_meta *m,
			struct dp_error *e)
{
	char pin[PATH_MAX], next[PATH_MAX];

	if (!path[0]) {
		cgroup_hooks_detach(h, uid, m);
		return 0;
	}
	for (int i = 0; i < CGROUP_HOOKS; i++) {
		pin_path(h, uid, i, pin);
		next_pin_path(h, uid, i, next);
		if (!wanted(h, i, m))
			detach_pinned_link(pin);
		else if (access(next, F_OK) == 0 && rename(next, pin))
			return dp_fail(e, DPE_SYSTEM, errno, "cannot replace the cgroup link %s", pin);
	}
	return 0;
}

void cgroup_hooks_verify(const struct cgroup_hooks *h, const char *uid, const struct pod_meta *m,
			 struct dp_verify_result *r)
{
	for (int i = 0; m->pod_cgroup_id && i < CGROUP_HOOKS; i++) {
		const char *what = purpose(i);
		char pin[PATH_MAX];
		__u64 linked = 0;
		__u32 prog = 0;

		if (!wanted(h, i, m))
			continue;
		pin_path(h, uid, i, pin);
		if (pinned_cgroup_link(pin, &linked, &prog) || linked != m->pod_cgroup_id)
			problem(r, "the %s hook %s is missing or detached (cgroup gone?)", what,
				prog_names[i]);
		else
			verify_program_name(r, prog, what, prog_names[i]);
	}
}
