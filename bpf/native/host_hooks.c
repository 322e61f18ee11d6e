#define _GNU_SOURCE
#include "host_hooks.h"

#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <unistd.h>

#include "hooks.h"
#include "netns_thread.h"
#include "rtnl.h"

static const char *const dir_names[2] = { "ingress", "egress" };
static const char *const hook_names[2] = { "host-ingress", "host-egress" };
static const char *const prog_names[2] = { "pod_to_node", "node_to_pod" };
static const unsigned tcx_types[2] = { AMB_BPF_TCX_INGRESS, AMB_BPF_TCX_EGRESS };

struct host_job {
	const struct host_hooks *h;
	const char *uid;
	struct pod_meta *meta;
	struct dp_error *e;
	struct dp_verify_result *verify;
};

void host_hooks_init(struct host_hooks *h, const char *root, struct bpf_object *obj)
{
	h->root = root;
	for (int d = 0; d < 2; d++)
		h->prog_fd[d] = bpf_program__fd(bpf_object__find_program_by_name(obj, prog_names[d]));
}

static void pin_path(const struct host_hooks *h, const char *uid, int d, char out[PATH_MAX])
{
	snprintf(out, PATH_MAX, "%s/pods/%s/%s", h->root, uid, hook_names[d]);
}

/* Removes our tc filters from the node-side device (in the node's netns). */
static int tc_detach_job(void *p)
{
	struct host_job *job = p;
	struct pod_meta *m = job->meta;

	if (tc_detach_filters((int)m->host_ifindex, m->host_owns_clsact))
		m->host_owns_clsact = 0;
	return 0;
}

void host_hooks_detach(const struct host_hooks *h, const char *uid, struct pod_meta *m)
{
	struct host_job job = { .h = h, .uid = uid, .meta = m };
	unsigned long long ino = 0, dev = 0;
	char pin[PATH_MAX];
	int fd;

	for (int d = 0; d < 2; d++) {
		pin_path(h, uid, d, pin);
		detach_pinned_link(pin);
	}
	if (m->host_ifindex && m->host_netns_path[0]) {
		fd = open_netns(m->host_netns_path, &ino, &dev);
		if (fd >= 0 && ino == m->host_netns_ino && dev == m->host_netns_dev)
			run_in_netns(fd, tc_detach_job, &job);
		if (fd >= 0)
			close(fd);
	}
	m->host_ifindex = 0;
	m->host_netns_path[0] = '\0';
}

/* In the node's netns: hooks the pod's veth peer, if that is what the index names here. */
static int attach_job(void *p)
{
	struct host_job *job = p;
	struct pod_meta *m = job->meta;
	struct rtnl nl;
	int back = 0, err;
	char pin[PATH_MAX];

	if ((err = rtnl_open(&nl)))
		return dp_fail(job->e, DPE_SYSTEM, err, "cannot open rtnetlink in the node's netns");
	err = rtnl_veth_peer(&nl, (int)m->host_ifindex, &back);
	rtnl_close(&nl);
	if (err || back != (int)m->ifindex) {
		m->host_ifindex = 0; /* the peer lives in another netns: kubelet probes are not handled */
		return 0;
	}
	if (m->mode == ATTACH_MODE_TCX) {
		tc_detach_job(job); /* after a switch from tc */
		for (int d = 0; d < 2 && !err; d++) {
			pin_path(job->h, job->uid, d, pin);
			err = attach_tcx_pinned(pin, job->h->prog_fd[d], m->host_ifindex, tcx_types[d]);
		}
	} else {
		bool created = false;

		err = tc_attach_filters((int)m->host_ifindex, job->h->prog_fd, &created);
		if (created)
			m->host_owns_clsact = 1;
	}
	if (err)
		return dp_fail(job->e, DPE_SYSTEM, err,
			       "cannot hook the node side (ifindex %u) of the pod's veth", m->host_ifindex);
	return 0;
}

int host_hooks_attach(const struct host_hooks *h, const char *uid, const char *host_netns, int peer,
		      struct pod_meta *m, struct dp_error *e)
{
	struct host_job job = { .h = h, .uid = uid, .meta = m, .e = e };
	unsigned long long ino = 0, dev = 0;
	int fd, rc;

	if (!host_netns[0] || !peer) {
		host_hooks_detach(h, uid, m);
		return 0;
	}
	if ((fd = open_netns(host_netns, &ino, &dev)) < 0)
		return dp_fail(e, DPE_NETNS, fd, "cannot open the node's netns %s", host_netns);
	if (m->host_ifindex &&
	    (m->host_ifindex != (unsigned)peer || m->host_netns_ino != ino || m->host_netns_dev != dev))
		host_hooks_detach(h, uid, m);
	m->host_ifindex = (unsigned)peer;
	m->host_netns_ino = ino;
	m->host_netns_dev = dev;
	snprintf(m->host_netns_path, sizeof(m->host_netns_path), "%s", host_netns);
	rc = run_in_netns(fd, attach_job, &job);
	close(fd);
	if (rc < 0 && !e->code)
		dp_fail(e, DPE_NETNS, rc, "cannot enter the node's netns %s", host_netns);
	if (!m->host_ifindex)
		m->host_netns_path[0] = '\0';
	return e->code ? -1 : 0;
}

static int verify_tc_job(void *p)
{
	struct host_job *job = p;
	LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = (int)job->meta->host_ifindex);

	for (int d = 0; d < 2; d++) {
		LIBBPF_OPTS(bpf_tc_opts, opts, .handle = TC_FILTER_HANDLE, .priority = TC_FILTER_PRIORITY);

		hook.attach_point = d == HOOK_INGRESS ? BPF_TC_INGRESS : BPF_TC_EGRESS;
		if (bpf_tc_query(&hook, &opts))
			problem(job->verify, "the node-side %s tc filter (kubelet probes) is missing",
				dir_names[d]);
		else
			verify_program_name(job->verify, opts.prog_id, hook_names[d], prog_names[d]);
	}
	return 0;
}

void host_hooks_verify(const struct host_hooks *h, const char *uid, const struct pod_meta *m,
		       struct dp_verify_result *r)
{
	struct host_job job = { .h = h, .uid = uid, .meta = (struct pod_meta *)m, .verify = r };
	unsigned long long ino = 0, dev = 0;
	char pin[PATH_MAX];
	int fd;

	if (!m->host_ifindex)
		return;
	if (m->mode == ATTACH_MODE_TCX) {
		for (int d = 0; d < 2; d++) {
			struct tcx_link_info info;

			pin_path(h, uid, d, pin);
			if (pinned_link_info(pin, &info) || info.ifindex != m->host_ifindex)
				problem(r, "the node-side %s link (kubelet probes) is missing or detached",
					dir_names[d]);
			else
				verify_program_name(r, info.prog_id, hook_names[d], prog_names[d]);
		}
		return;
	}
	fd = open_netns(m->host_netns_path, &ino, &dev);
	if (fd < 0 || ino != m->host_netns_ino || dev != m->host_netns_dev)
		problem(r, "the node's netns %s is gone or was replaced", m->host_netns_path);
	else
		run_in_netns(fd, verify_tc_job, &job);
	if (fd >= 0)
		close(fd);
}
