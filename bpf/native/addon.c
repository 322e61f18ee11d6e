/* N-API surface of the native addon. Every operation that may block (bpf syscalls, netlink, a
 * netns thread) runs as async work off the JS thread and settles a Promise. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <node_api.h>

#include "datapath.h"
#include "layout.h"
#include "netns_addresses.h"
#include "netns_watch.h"
#include "netns_socket.h"
#include "probe.h"
#include "seqpacket.h"

#define CHECK(call)                                                                   \
	do {                                                                          \
		if ((call) != napi_ok) {                                              \
			napi_throw_error(env, "EADDON", "N-API call failed: " #call); \
			return NULL;                                                  \
		}                                                                     \
	} while (0)

/* ---- the datapath handle ---- */

struct handle {
	struct datapath *dp;
	unsigned inflight;
	bool closing;
};

static void handle_release(struct handle *h)
{
	if (h->closing && h->inflight == 0 && h->dp) {
		dp_close(h->dp);
		h->dp = NULL;
	}
}

static void handle_finalize(napi_env env, void *data, void *hint)
{
	struct handle *h = data;

	(void)env;
	(void)hint;
	h->closing = true;
	handle_release(h);
	if (!h->dp)
		free(h);
}

/* ---- async jobs ---- */

struct job;
typedef void (*job_run)(struct job *);
typedef napi_value (*job_result)(napi_env, struct job *);

struct job {
	napi_async_work work;
	napi_deferred deferred;
	napi_ref handle_ref;
	struct handle *h;
	job_run run;
	job_result result;
	struct dp_error err;
	union {
		struct {
			char root[4096], object[4096];
			int tc_netns_cookie; /* -1: probed at open */
			struct datapath *dp;
		} open;
		struct {
			struct dp_attach_request req;
			struct dp_attach_result res;
		} attach;
		struct {
			char uid[POD_UID_LEN];
			struct dp_detach_result res;
		} detach;
		struct {
			struct dp_pod *pods;
			size_t count;
		} list;
		struct {
			char uid[POD_UID_LEN];
			struct dp_verify_result res;
		} verify;
		struct {
			char (*uids)[POD_UID_LEN];
			size_t count;
		} gc;
		struct dp_settings_request configure;
		struct {
			struct netns_socket_request req;
			int fd;
		} socket;
		struct {
			char netns[NETNS_PATH_LEN];
			struct netns_socket_request reqs[NETNS_SOCKETS_MAX];
			struct netns_socket_result res[NETNS_SOCKETS_MAX];
			size_t n;
		} sockets;
		struct {
			char path[NETNS_PATH_LEN];
			struct netns_addresses res;
		} addresses;
		struct {
			char path[NETNS_PATH_LEN];
			struct netns_watch res;
		} watch;
		struct {
			char root[4096];
			unsigned to, from;
		} downgrade;
		struct kernel_probe probe;
	} u;
};

static void job_execute(napi_env env, void *data)
{
	struct job *job = data;

	(void)env;
	job->run(job);
}

static napi_value make_error(napi_env env, const struct dp_error *e)
{
	napi_value code, msg, err;

	napi_create_string_utf8(env, e->code, NAPI_AUTO_LENGTH, &code);
	napi_create_string_utf8(env, e->message, NAPI_AUTO_LENGTH, &msg);
	napi_create_error(env, code, msg, &err);
	return err;
}

static void job_complete(napi_env env, napi_status status, void *data)
{
	struct job *job = data;
	napi_value value;

	if (status != napi_ok && !job->err.code) {
		job->err.code = DPE_SYSTEM;
		snprintf(job->err.message, sizeof(job->err.message), "operation cancelled");
	}
	if (job->err.code) {
		napi_reject_deferred(env, job->deferred, make_error(env, &job->err));
	} else {
		value = job->result(env, job);
		napi_resolve_deferred(env, job->deferred, value);
	}
	if (job->h) {
		job->h->inflight--;
		handle_release(job->h);
	}
	if (job->handle_ref)
		napi_delete_reference(env, job->handle_ref);
	napi_delete_async_work(env, job->work);
	free(job);
}

static napi_value job_start(napi_env env, struct job *job, const char *name)
{
	napi_value promise, resource_name;

	CHECK(napi_create_promise(env, &job->deferred, &promise));
	CHECK(napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &resource_name));
	CHECK(napi_create_async_work(env, NULL, resource_name, job_execute, job_complete, job, &job->work));
	if (job->h)
		job->h->inflight++;
	CHECK(napi_queue_async_work(env, job->work));
	return promise;
}

static struct job *job_new(job_run run, job_result result)
{
	struct job *job = calloc(1, sizeof(*job));

	if (job) {
		job->run = run;
		job->result = result;
	}
	return job;
}

/* ---- argument helpers ---- */

static bool get_string(napi_env env, napi_value v, char *buf, size_t len, const char *what)
{
	size_t n = 0;

	/* The length first (bytes, without the NUL): a copy that fills the buffer cannot tell a string
	 * of exactly len - 1 bytes, which fits, from a longer one cut short. */
	if (napi_get_value_string_utf8(env, v, NULL, 0, &n) != napi_ok) {
		napi_throw_type_error(env, DPE_INVALID, what);
		return false;
	}
	if (n >= len) {
		napi_throw_range_error(env, DPE_INVALID, what);
		return false;
	}
	return napi_get_value_string_utf8(env, v, buf, len, &n) == napi_ok;
}

/* Takes the handle argument and a reference to it for the job's lifetime. */
static bool take_handle(napi_env env, napi_value v, struct job *job)
{
	struct handle *h = NULL;

	if (napi_get_value_external(env, v, (void **)&h) != napi_ok || !h || !h->dp || h->closing) {
		napi_throw_error(env, DPE_INVALID, "the datapath is closed");
		return false;
	}
	job->h = h;
	napi_create_reference(env, v, 1, &job->handle_ref);
	return true;
}

static bool parse_ip(const char *s, struct pod_ip *out)
{
	memset(out, 0, sizeof(*out));
	if (inet_pton(AF_INET, s, out->addr + 12) == 1) {
		out->addr[10] = out->addr[11] = 0xff;
		return true;
	}
	return inet_pton(AF_INET6, s, out->addr) == 1;
}

static napi_value ip_value(napi_env env, const struct pod_ip *ip)
{
	static const uint8_t v4_prefix[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
	char buf[INET6_ADDRSTRLEN] = "";
	napi_value v;

	if (memcmp(ip->addr, v4_prefix, 12) == 0)
		inet_ntop(AF_INET, ip->addr + 12, buf, sizeof(buf));
	else
		inet_ntop(AF_INET6, ip->addr, buf, sizeof(buf));
	napi_create_string_utf8(env, buf, NAPI_AUTO_LENGTH, &v);
	return v;
}

static void set_named(napi_env env, napi_value obj, const char *name, napi_value v)
{
	napi_set_named_property(env, obj, name, v);
}

static void set_u32(napi_env env, napi_value obj, const char *name, uint32_t n)
{
	napi_value v;

	napi_create_uint32(env, n, &v);
	set_named(env, obj, name, v);
}

static void set_bool(napi_env env, napi_value obj, const char *name, bool b)
{
	napi_value v;

	napi_get_boolean(env, b, &v);
	set_named(env, obj, name, v);
}

static void set_str(napi_env env, napi_value obj, const char *name, const char *s)
{
	napi_value v;

	napi_create_string_utf8(env, s, NAPI_AUTO_LENGTH, &v);
	set_named(env, obj, name, v);
}

static void set_double(napi_env env, napi_value obj, const char *name, double d)
{
	napi_value v;

	napi_create_double(env, d, &v);
	set_named(env, obj, name, v);
}

/* ---- open ---- */

static void open_run(struct job *job)
{
	dp_open(job->u.open.root, job->u.open.object, job->u.open.tc_netns_cookie, &job->u.open.dp,
		&job->err);
}

static napi_value open_result(napi_env env, struct job *job)
{
	struct handle *h = calloc(1, sizeof(*h));
	napi_value ext;

	h->dp = job->u.open.dp;
	napi_create_external(env, h, handle_finalize, NULL, &ext);
	return ext;
}

static napi_value js_open(napi_env env, napi_callback_info info)
{
	size_t argc = 3;
	napi_value argv[3];
	struct job *job = job_new(open_run, open_result);
	bool cookie;

	CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (!job || argc < 2 ||
	    !get_string(env, argv[0], job->u.open.root, sizeof(job->u.open.root), "bpffs root") ||
	    !get_string(env, argv[1], job->u.open.object, sizeof(job->u.open.object), "object path")) {
		free(job);
		return NULL;
	}
	/* Whether the tc programs check pod_policy entries' netns cookies: a boolean, or probed. */
	job->u.open.tc_netns_cookie =
		argc >= 3 && napi_get_value_bool(env, argv[2], &cookie) == napi_ok ? cookie : -1;
	return job_start(env, job, "ambient-bpf:open");
}

static napi_value js_close(napi_env env, napi_callback_info info)
{
	size_t argc = 1;
	napi_value argv[1];
	struct handle *h = NULL;

	CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (argc < 1 || napi_get_value_external(env, argv[0], (void **)&h) != napi_ok || !h)
		return NULL;
	h->closing = true;
	handle_release(h);
	return NULL;
}

/* ---- downgrade: the node state handed to an older release ---- */

static void downgrade_run(struct job *job)
{
	dp_layout_downgrade(job->u.downgrade.root, job->u.downgrade.to, &job->u.downgrade.from, &job->err);
}

static napi_value downgrade_result(napi_env env, struct job *job)
{
	napi_value v;

	napi_create_uint32(env, job->u.downgrade.from, &v);
	return v;
}

/* downgrade(root, layout): resolves with the layout the pins had. */
static napi_value js_downgrade(napi_env env, napi_callback_info info)
{
	size_t argc = 2;
	napi_value argv[2];
	struct job *job = job_new(downgrade_run, downgrade_result);

	CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (!job || argc < 2 ||
	    !get_string(env, argv[0], job->u.downgrade.root, sizeof(job->u.downgrade.root), "bpffs root") ||
	    napi_get_value_uint32(env, argv[1], &job->u.downgrade.to) != napi_ok) {
		free(job);
		return NULL;
	}
	return job_start(env, job, "ambient-bpf:downgrade");
}

/* ---- attach ---- */

static void attach_run(struct job *job)
{
	dp_attach(job->h->dp, &job->u.attach.req, &job->u.attach.res, &job->err);
}

static napi_value attach_result(napi_env env, struct job *job)
{
	napi_value obj;

	napi_create_object(env, &obj);
	set_str(env, obj, "mode", job->u.attach.res.mode == ATTACH_MODE_TCX ? "tcx" : "tc");
	set_u32(env, obj, "ifindex", (uint32_t)job->u.attach.res.ifindex);
	set_bool(env, obj, "updated", job->u.attach.res.updated);
	set_u32(env, obj, "hostIfindex", (uint32_t)job->u.attach.res.host_ifindex);
	set_str(env, obj, "warning", job->u.attach.res.warning);
	return obj;
}

/* attach(handle, uid, netnsPath, ips: string[], mode: 0 auto | 1 tcx | 2 tc, flags: POD_F_*,
 *        reroute: string[], podCgroup: string ('' = no hooks on the pod's cgroup),
 *        hostNetns: string ('' = kubelet probes not handled)) */
static napi_value js_attach(napi_env env, napi_callback_info info)
{
	size_t argc = 9;
	napi_value argv[9];
	struct job *job = job_new(attach_run, attach_result);
	struct dp_attach_request *req;
	uint32_t n = 0, mode = 0;

	CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (!job)
		return NULL;
	req = &job->u.attach.req;
	if (argc < 5 ||
	    !get_string(env, argv[1], req->uid, sizeof(req->uid), "pod uid (at most 63 characters)") ||
	    !get_string(env, argv[2], req->netns_path, sizeof(req->netns_path),
			"netns path (at most 255 bytes)"))
		goto bad;
	if (napi_get_array_length(env, argv[3], &n) != napi_ok || n == 0 || n > MAX_POD_IPS) {
		napi_throw_range_error(env, DPE_INVALID, "a pod needs 1 to 8 IPs");
		goto bad;
	}
	for (uint32_t i = 0; i < n; i++) {
		char s[INET6_ADDRSTRLEN + 1];
		napi_value v;

		napi_get_element(env, argv[3], i, &v);
		if (!get_string(env, v, s, sizeof(s), "pod IP") || !parse_ip(s, &req->ips[i])) {
			napi_value code, msg, err;
			char text[128];

			snprintf(text, sizeof(text), "not an IP address: %s", s);
			napi_create_string_utf8(env, DPE_INVALID, NAPI_AUTO_LENGTH, &code);
			napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg);
			napi_create_type_error(env, code, msg, &err);
			napi_throw(env, err);
			goto bad;
		}
	}
	req->ip_count = n;
	napi_get_value_uint32(env, argv[4], &mode);
	req->mode = (enum dp_mode_request)mode;
	if (argc >= 6)
		napi_get_value_uint32(env, argv[5], &req->flags);
	if (argc >= 7) {
		if (napi_get_array_length(env, argv[6], &n) != napi_ok || n > MAX_REROUTE_IFACES) {
			napi_throw_range_error(env, DPE_INVALID, "at most 4 reroute interfaces");
			goto bad;
		}
		for (uint32_t i = 0; i < n; i++) {
			napi_value v;

			napi_get_element(env, argv[6], i, &v);
			if (!get_string(env, v, req->reroute[i], sizeof(req->reroute[i]),
					"interface name (at most 15 characters)"))
				goto bad;
		}
		req->reroute_count = n;
	}
	if (argc >= 8 && !get_string(env, argv[7], req->pod_cgroup, sizeof(req->pod_cgroup),
				     "cgroup path (at most 255 bytes)"))
		goto bad;
	if (argc >= 9 && !get_string(env, argv[8], req->host_netns, sizeof(req->host_netns),
				     "node netns path (at most 255 bytes)"))
		goto bad;
	if (!take_handle(env, argv[0], job))
		goto bad;
	return job_start(env, job, "ambient-bpf:attach");
bad:
	free(job);
	return NULL;
}

/* ---- detach / verify (by uid) ---- */

static void detach_run(struct job *job)
{
	dp_detach(job->h->dp, job->u.detach.uid, &job->u.detach.res, &job->err);
}

static napi_value detach_result(napi_env env, struct job *job)
{
	napi_value obj;

	napi_create_object(env, &obj);
	set_bool(env, obj, "found", job->u.detach.res.found);
	if (job->u.detach.res.warning[0])
		set_str(env, obj, "warning", job->u.detach.res.warning);
	return obj;
}

static void verify_run(struct job *job)
{
	dp_verify(job->h->dp, job->u.verify.uid, &job->u.verify.res, &job->err);
}

static napi_value verify_result(napi_env env, struct job *job)
{
	napi_value obj, arr, s;

	napi_create_object(env, &obj);
	set_bool(env, obj, "found", job->u.verify.res.found);
	napi_create_array_with_length(env, job->u.verify.res.problem_count, &arr);
	for (unsigned i = 0; i < job->u.verify.res.problem_count; i++) {
		napi_create_string_utf8(env, job->u.verify.res.problems[i], NAPI_AUTO_LENGTH, &s);
		napi_set_element(env, arr, i, s);
	}
	set_named(env, obj, "problems", arr);
	return obj;
}

/* Starts a job on a datapath handle (argv[0]); with a uid_offset, argv[1] is a pod uid copied to
 * that offset of the job. */
static napi_value handle_job(napi_env env, napi_callback_info info, job_run run, job_result result,
			     size_t uid_offset, const char *name)
{
	size_t argc = 2, want = uid_offset ? 2 : 1;
	napi_value argv[2];
	struct job *job = job_new(run, result);

	CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (!job)
		return NULL;
	if (argc < want ||
	    (uid_offset && !get_string(env, argv[1], (char *)job + uid_offset, POD_UID_LEN,
				       "pod uid (at most 63 characters)")) ||
	    !take_handle(env, argv[0], job)) {
		free(job);
		return NULL;
	}
	return job_start(env, job, name);
}

static napi_value js_detach(napi_env env, napi_callback_info info)
{
	return handle_job(env, info, detach_run, detach_result, offsetof(struct job, u.detach.uid),
			  "ambient-bpf:detach");
}

static napi_value js_verify(napi_env env, napi_callback_info info)
{
	return handle_job(env, info, verify_run, verify_result, offsetof(struct job, u.verify.uid),
			  "ambient-bpf:verify");
}

/* ---- list / gc ---- */

/* Names of enum pod_counter, in order. */
static const char *const counter_names[CNT_COUNT] = {
	"outboundRedirected", "outboundNoZtunnel", "inboundRedirected", "inboundNoZtunnel",
	"bypassZtunnel",      "bypassHbone",	   "bypassProbe",	"bypassInboundAnnotation",
	"forgedMark",	      "strictDropped",	   "rerouted",		"unclassifiedDropped",
	"spoofedDropped",     "lookupRefused",	   "uncapturedDropped",
};

static napi_value counters_value(napi_env env, const struct pod_counters *c)
{
	napi_value obj;

	napi_create_object(env, &obj);
	for (int i = 0; i < CNT_COUNT; i++)
		set_double(env, obj, counter_names[i], (double)c->value[i]);
	return obj;
}

static void list_run(struct job *job)
{
	dp_list(job->h->dp, &job->u.list.pods, &job->u.list.count, &job->err);
}

static napi_value list_result(napi_env env, struct job *job)
{
	napi_value arr;

	napi_create_array_with_length(env, job->u.list.count, &arr);
	for (size_t i = 0; i < job->u.list.count; i++) {
		const struct dp_pod *p = &job->u.list.pods[i];
		napi_value obj, ips;

		napi_create_object(env, &obj);
		set_str(env, obj, "uid", p->uid);
		set_str(env, obj, "netnsPath", p->meta.netns_path);
		set_double(env, obj, "netnsInode", (double)p->meta.netns_ino);
		set_u32(env, obj, "ifindex", p->meta.ifindex);
		set_str(env, obj, "mode",
			p->meta.mode == ATTACH_MODE_TCX	 ? "tcx"
			: p->meta.mode == ATTACH_MODE_TC ? "tc"
							 : "none");
		set_str(env, obj, "state", p->meta.state == ATTACH_STATE_ATTACHED ? "attached" : "attaching");
		set_double(env, obj, "attachedAtMs", (double)(p->meta.attached_at_ns / 1000000ull));
		set_bool(env, obj, "netnsPresent", p->netns_present);
		set_bool(env, obj, "linksPinned", p->links_pinned);
		napi_create_array_with_length(env, p->meta.ip_count, &ips);
		for (unsigned j = 0; j < p->meta.ip_count && j < MAX_POD_IPS; j++)
			napi_set_element(env, ips, j, ip_value(env, &p->meta.ips[j]));
		set_named(env, obj, "ips", ips);
		set_named(env, obj, "counters", counters_value(env, &p->counters));
		set_bool(env, obj, "bypassInbound", p->meta.flags & POD_F_BYPASS_INBOUND);
		set_bool(env, obj, "strict", p->meta.flags & POD_F_STRICT);
		set_bool(env, obj, "dnsCapture",
			 p->meta.pod_cgroup_id && (p->meta.flags & POD_F_DNS_CAPTURE));
		set_double(env, obj, "podCgroupId", (double)p->meta.pod_cgroup_id);
		set_u32(env, obj, "hostIfindex", p->meta.host_ifindex);
		set_str(env, obj, "steering", p->meta.steering_sk_lookup ? "sk-lookup" : "sk-assign");
		napi_create_array_with_length(env, p->meta.reroute_count, &ips);
		for (unsigned j = 0; j < p->meta.reroute_count && j < MAX_REROUTE_IFACES; j++) {
			napi_value name;

			napi_create_string_utf8(env, p->meta.reroute[j].name, NAPI_AUTO_LENGTH, &name);
			napi_set_element(env, ips, j, name);
		}
		set_named(env, obj, "rerouteInterfaces", ips);
		napi_create_array_with_length(env, p->ifaces.count, &ips);
		for (unsigned j = 0; j < p->ifaces.count && j < MAX_POD_IFACES; j++) {
			napi_value iface;

			napi_create_object(env, &iface);
			set_str(env, iface, "name", p->ifaces.iface[j].name);
			set_u32(env, iface, "ifindex", p->ifaces.iface[j].ifindex);
			napi_set_element(env, ips, j, iface);
		}
		set_named(env, obj, "otherInterfaces", ips);
		set_str(env, obj, "interface", p->ifaces.own);
		napi_create_array_with_length(env, p->ifaces.addr_count, &ips);
		for (unsigned j = 0; j < p->ifaces.addr_count && j < MAX_POD_IPS; j++)
			napi_set_element(env, ips, j, ip_value(env, &p->ifaces.addrs[j]));
		set_named(env, obj, "otherAddresses", ips);
		napi_set_element(env, arr, (uint32_t)i, obj);
	}
	free(job->u.list.pods);
	return arr;
}

static void gc_run(struct job *job)
{
	dp_gc(job->h->dp, &job->u.gc.uids, &job->u.gc.count, &job->err);
}

static napi_value gc_result(napi_env env, struct job *job)
{
	napi_value arr, s;

	napi_create_array_with_length(env, job->u.gc.count, &arr);
	for (size_t i = 0; i < job->u.gc.count; i++) {
		napi_create_string_utf8(env, job->u.gc.uids[i], NAPI_AUTO_LENGTH, &s);
		napi_set_element(env, arr, (uint32_t)i, s);
	}
	free(job->u.gc.uids);
	return arr;
}

static napi_value js_list(napi_env env, napi_callback_info info)
{
	return handle_job(env, info, list_run, list_result, 0, "ambient-bpf:list");
}

static napi_value js_gc(napi_env env, napi_callback_info info)
{
	return handle_job(env, info, gc_run, gc_result, 0, "ambient-bpf:gc");
}

/* ---- sockets inside a netns ---- */

static void socket_run(struct job *job)
{
	job->u.socket.fd = netns_socket(&job->u.socket.req, &job->err);
}

static napi_value socket_result(napi_env env, struct job *job)
{
	napi_value v;

	napi_create_int32(env, job->u.socket.fd, &v);
	return v;
}

static bool opt_u32(napi_env env, napi_value obj, const char *name, uint32_t *out)
{
	bool has = false;
	napi_value v;

	napi_has_named_property(env, obj, name, &has);
	if (!has)
		return false;
	napi_get_named_property(env, obj, name, &v);
	return napi_get_value_uint32(env, v, out) == napi_ok;
}

static bool opt_bool(napi_env env, napi_value obj, const char *name)
{
	bool has = false, b = false;
	napi_value v;

	napi_has_named_property(env, obj, name, &has);
	if (has && napi_get_named_property(env, obj, name, &v) == napi_ok)
		napi_get_value_bool(env, v, &b);
	return b;
}

static bool opt_string(napi_env env, napi_value obj, const char *name, char *buf, size_t len)
{
	bool has = false;
	napi_value v;

	napi_has_named_property(env, obj, name, &has);
	if (!has)
		return false;
	napi_get_named_property(env, obj, name, &v);
	return get_string(env, v, buf, len, name);
}

/* One socket request from {netns?, family: 4|6, type: 'tcp'|'udp', mark?, transparent?, freebind?,
 * reuseport?, v6only?, bindAddress?, bindPort?, listen?}. */
static void parse_socket_request(napi_env env, napi_value o, struct netns_socket_request *r)
{
	char type[8] = "tcp", addr[INET6_ADDRSTRLEN + 1] = "";
	uint32_t family = 4, port = 0;

	opt_string(env, o, "netns", r->netns_path, sizeof(r->netns_path));
	opt_u32(env, o, "family", &family);
	opt_string(env, o, "type", type, sizeof(type));
	r->family = family == 6 ? 6 : 4;
	r->udp = strcmp(type, "udp") == 0;
	r->has_mark = opt_u32(env, o, "mark", &r->mark);
	r->transparent = opt_bool(env, o, "transparent");
	r->freebind = opt_bool(env, o, "freebind");
	r->reuseport = opt_bool(env, o, "reuseport");
	r->v6only = opt_bool(env, o, "v6only");
	if (opt_string(env, o, "bindAddress", addr, sizeof(addr))) {
		snprintf(r->bind_address, sizeof(r->bind_address), "%s", addr);
		r->bind = true;
	}
	if (opt_u32(env, o, "bindPort", &port)) {
		r->bind_port = (uint16_t)port;
		r->bind = true;
	}
	r->listen_backlog = -1;
	if (opt_u32(env, o, "listen", &port))
		r->listen_backlog = (int)port;
}

/* Starts the job, unless parsing its arguments threw (a bad type): then frees it. */
static napi_value start_unless_thrown(napi_env env, struct job *job, const char *name)
{
	bool thrown = false;

	napi_is_exception_pending(env, &thrown);
	if (thrown) {
		free(job);
		return NULL;
	}
	return job_start(env, job, name);
}

/* socket(request) -> fd */
static napi_value js_socket(napi_env env, napi_callback_info info)
{
	size_t argc = 1;
	napi_value argv[1];
	napi_valuetype t = napi_undefined;
	struct job *job;

	CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (argc < 1 || napi_typeof(env, argv[0], &t) != napi_ok || t != napi_object) {
		napi_throw_type_error(env, DPE_INVALID, "socket() takes an options object");
		return NULL;
	}
	job = job_new(socket_run, socket_result);
	if (!job)
		return NULL;
	parse_socket_request(env, argv[0], &job->u.socket.req);
	return start_unless_thrown(env, job, "ambient-bpf:socket");
}

static void sockets_run(struct job *job)
{
	netns_sockets(job->u.sockets.netns, job->u.sockets.reqs, job->u.sockets.res, job->u.sockets.n,
		      &job->err);
}

static napi_value sockets_result(napi_env env, struct job *job)
{
	napi_value out, item, v;

	napi_create_array_with_length(env, job->u.sockets.n, &out);
	for (size_t i = 0; i < job->u.sockets.n; i++) {
		const struct netns_socket_result *r = &job->u.sockets.res[i];

		napi_create_object(env, &item);
		if (r->fd >= 0) {
			napi_create_int32(env, r->fd, &v);
			napi_set_named_property(env, item, "fd", v);
		} else {
			napi_create_string_utf8(env, r->error, NAPI_AUTO_LENGTH, &v);
			napi_set_named_property(env, item, "error", v);
		}
		napi_set_element(env, out, (uint32_t)i, item);
	}
	return out;
}

/* sockets(netns, requests[]) -> [{fd} | {error}]: all made on one thread inside netns ('' = ours). */
static napi_value js_sockets(napi_env env, napi_callback_info info)
{
	size_t argc = 2;
	napi_value argv[2], o;
	uint32_t n = 0;
	struct job *job;

	CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (argc < 2 || napi_get_array_length(env, argv[1], &n) != napi_ok || n == 0 ||
	    n > NETNS_SOCKETS_MAX) {
		napi_throw_range_error(env, DPE_INVALID, "sockets(netns, requests: 1 to 12 options objects)");
		return NULL;
	}
	job = job_new(sockets_run, sockets_result);
	if (!job)
		return NULL;
	if (!get_string(env, argv[0], job->u.sockets.netns, sizeof(job->u.sockets.netns), "netns")) {
		free(job);
		return NULL;
	}
	job->u.sockets.n = n;
	for (uint32_t i = 0; i < n; i++) {
		napi_get_element(env, argv[1], i, &o);
		parse_socket_request(env, o, &job->u.sockets.reqs[i]);
	}
	return start_unless_thrown(env, job, "ambient-bpf:sockets");
}

/* ---- node-wide settings and counters ---- */

static void configure_run(struct job *job)
{
	dp_configure(job->h->dp, &job->u.configure, &job->err);
}

static napi_value undefined_result(napi_env env, struct job *job)
{
	napi_value v;

	(void)job;
	napi_get_undefined(env, &v);
	return v;
}

/* configure(handle, flags: SETTING_*, allow: [protocol, port][]) */
static napi_value js_configure(napi_env env, napi_callback_info info)
{
	size_t argc = 3;
	napi_value argv[3];
	struct job *job = job_new(configure_run, undefined_result);
	struct dp_settings_request *req;
	uint32_t n = 0;

	CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (!job)
		return NULL;
	req = &job->u.configure;
	if (argc < 3 || napi_get_value_uint32(env, argv[1], &req->flags) != napi_ok ||
	    napi_get_array_length(env, argv[2], &n) != napi_ok || n > MAX_STRICT_ALLOW) {
		napi_throw_range_error(env, DPE_INVALID,
				       "configure(handle, flags, allow: at most 64 entries)");
		goto bad;
	}
	for (uint32_t i = 0; i < n; i++) {
		napi_value entry, v;
		uint32_t proto = 0, port = 0;

		napi_get_element(env, argv[2], i, &entry);
		napi_get_element(env, entry, 0, &v);
		napi_get_value_uint32(env, v, &proto);
		napi_get_element(env, entry, 1, &v);
		napi_get_value_uint32(env, v, &port);
		if (proto > 255 || port > 65535) {
			napi_throw_range_error(env, DPE_INVALID,
					       "strict allow entries are [protocol 0-255, port 0-65535]");
			goto bad;
		}
		req->allow[i].protocol = (__u8)proto;
		req->allow[i].port = htons((uint16_t)port);
	}
	req->allow_count = n;
	if (!take_handle(env, argv[0], job))
		goto bad;
	return job_start(env, job, "ambient-bpf:configure");
bad:
	free(job);
	return NULL;
}

static struct datapath *live_dp(napi_env env, napi_value v)
{
	struct handle *h = NULL;

	if (napi_get_value_external(env, v, (void **)&h) != napi_ok || !h || !h->dp || h->closing) {
		napi_throw_error(env, DPE_INVALID, "the datapath is closed");
		return NULL;
	}
	return h->dp;
}

static napi_value throw_dp_error(napi_env env, const struct dp_error *e)
{
	napi_throw(env, make_error(env, e));
	return NULL;
}

/* trustZtunnelCgroup(handle, cgroupDir: string): a map update (and a link), synchronous. */
static napi_value js_trust_ztunnel_cgroup(napi_env env, napi_callback_info info)
{
	size_t argc = 2;
	napi_value argv[2];
	struct dp_error e = { 0 };
	struct datapath *dp;
	char dir[4096];

	CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (argc < 2 || !(dp = live_dp(env, argv[0])) ||
	    !get_string(env, argv[1], dir, sizeof(dir), "cgroup directory"))
		return NULL;
	if (dp_trust_ztunnel_cgroup(dp, dir, &e))
		return throw_dp_error(env, &e);
	return NULL;
}

/* nodeCounters(handle): counters of traffic not attributed to a pod, synchronous. */
static napi_value js_node_counters(napi_env env, napi_callback_info info)
{
	size_t argc = 1;
	napi_value argv[1];
	struct dp_error e = { 0 };
	struct pod_counters c;
	struct datapath *dp;

	CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (argc < 1 || !(dp = live_dp(env, argv[0])))
		return NULL;
	if (dp_node_counters(dp, &c, &e))
		return throw_dp_error(env, &e);
	return counters_value(env, &c);
}

/* ---- addresses of a netns ---- */

static void addresses_run(struct job *job)
{
	netns_addresses(job->u.addresses.path, &job->u.addresses.res, &job->err);
}

static napi_value addresses_result(napi_env env, struct job *job)
{
	napi_value obj, arr;

	napi_create_object(env, &obj);
	set_double(env, obj, "inode", (double)job->u.addresses.res.ino);
	set_double(env, obj, "device", (double)job->u.addresses.res.dev);
	set_double(env, obj, "ownerUserns", (double)job->u.addresses.res.owner_userns);
	napi_create_array_with_length(env, job->u.addresses.res.count, &arr);
	for (unsigned i = 0; i < job->u.addresses.res.count; i++)
		napi_set_element(env, arr, i, ip_value(env, &job->u.addresses.res.addrs[i]));
	set_named(env, obj, "addresses", arr);
	return obj;
}

/* Starts `job`, whose one argument, a netns path, goes to `path` (a buffer inside the job). */
static napi_value start_netns_path_job(napi_env env, napi_callback_info info, struct job *job, char *path,
				       size_t size, const char *name)
{
	size_t argc = 1;
	napi_value argv[1];

	CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (!job)
		return NULL;
	if (argc < 1 || !get_string(env, argv[0], path, size, "netns path")) {
		free(job);
		return NULL;
	}
	return job_start(env, job, name);
}

/* netnsAddresses(path) -> { inode, device, ownerUserns, addresses } */
static napi_value js_netns_addresses(napi_env env, napi_callback_info info)
{
	struct job *job = job_new(addresses_run, addresses_result);

	return start_netns_path_job(env, info, job, job ? job->u.addresses.path : NULL,
				    sizeof(job->u.addresses.path), "ambient-bpf:netns-addresses");
}

/* ---- a netns's interface changes ---- */

static void watch_run(struct job *job)
{
	netns_watch(job->u.watch.path, &job->u.watch.res, &job->err);
}

static napi_value watch_result(napi_env env, struct job *job)
{
	napi_value obj, arr, fd;

	napi_create_object(env, &obj);
	napi_create_int32(env, job->u.watch.res.fd, &fd);
	set_named(env, obj, "fd", fd);
	napi_create_array_with_length(env, job->u.watch.res.link_count, &arr);
	for (unsigned i = 0; i < job->u.watch.res.link_count; i++) {
		napi_value v;

		napi_create_uint32(env, job->u.watch.res.links[i], &v);
		napi_set_element(env, arr, i, v);
	}
	set_named(env, obj, "ifindexes", arr);
	return obj;
}

/* netnsWatch(path) -> { fd, ifindexes }: fd readable on every link or address change in that
 * netns, ifindexes its interfaces then */
static napi_value js_netns_watch(napi_env env, napi_callback_info info)
{
	struct job *job = job_new(watch_run, watch_result);

	return start_netns_path_job(env, info, job, job ? job->u.watch.path : NULL, sizeof(job->u.watch.path),
				    "ambient-bpf:netns-watch");
}

/* ---- kernel features ---- */

static void probe_run(struct job *job)
{
	kernel_probe_run(&job->u.probe);
}

static napi_value probe_result(napi_env env, struct job *job)
{
	napi_value obj, present, detail;

	napi_create_object(env, &obj);
	napi_create_object(env, &present);
	napi_create_object(env, &detail);
	for (int f = 0; f < KF_COUNT; f++) {
		napi_value b;

		napi_get_boolean(env, job->u.probe.present[f], &b);
		napi_set_named_property(env, present, kernel_feature_names[f], b);
		set_str(env, detail, kernel_feature_names[f], job->u.probe.detail[f]);
	}
	set_named(env, obj, "present", present);
	set_named(env, obj, "detail", detail);
	set_double(env, obj, "elapsedMs", job->u.probe.elapsed_ms);
	return obj;
}

/* probeKernel() -> { present: {feature: bool}, detail: {feature: string}, elapsedMs } */
static napi_value js_probe_kernel(napi_env env, napi_callback_info info)
{
	struct job *job = job_new(probe_run, probe_result);

	(void)info;
	if (!job) {
		napi_throw_error(env, DPE_SYSTEM, "out of memory");
		return NULL;
	}
	return job_start(env, job, "ambient-bpf:probe-kernel");
}

/* ---- module ---- */

static napi_value init(napi_env env, napi_value exports)
{
	napi_value constants;
	const napi_property_descriptor fns[] = {
		{ "open", NULL, js_open, NULL, NULL, NULL, napi_default, NULL },
		{ "downgrade", NULL, js_downgrade, NULL, NULL, NULL, napi_default, NULL },
		{ "close", NULL, js_close, NULL, NULL, NULL, napi_default, NULL },
		{ "attach", NULL, js_attach, NULL, NULL, NULL, napi_default, NULL },
		{ "detach", NULL, js_detach, NULL, NULL, NULL, napi_default, NULL },
		{ "verify", NULL, js_verify, NULL, NULL, NULL, napi_default, NULL },
		{ "list", NULL, js_list, NULL, NULL, NULL, napi_default, NULL },
		{ "gc", NULL, js_gc, NULL, NULL, NULL, napi_default, NULL },
		{ "configure", NULL, js_configure, NULL, NULL, NULL, napi_default, NULL },
		{ "trustZtunnelCgroup", NULL, js_trust_ztunnel_cgroup, NULL, NULL, NULL, napi_default, NULL },
		{ "nodeCounters", NULL, js_node_counters, NULL, NULL, NULL, napi_default, NULL },
		{ "socket", NULL, js_socket, NULL, NULL, NULL, napi_default, NULL },
		{ "sockets", NULL, js_sockets, NULL, NULL, NULL, napi_default, NULL },
		{ "netnsAddresses", NULL, js_netns_addresses, NULL, NULL, NULL, napi_default, NULL },
		{ "netnsWatch", NULL, js_netns_watch, NULL, NULL, NULL, napi_default, NULL },
		{ "probeKernel", NULL, js_probe_kernel, NULL, NULL, NULL, napi_default, NULL },
	};

	CHECK(napi_define_properties(env, exports, sizeof(fns) / sizeof(fns[0]), fns));
	CHECK(napi_create_object(env, &constants));
	set_u32(env, constants, "DATAPATH_LAYOUT", DATAPATH_LAYOUT);
	set_u32(env, constants, "ZTUNNEL_OUTBOUND_PORT", ZTUNNEL_OUTBOUND_PORT);
	set_u32(env, constants, "ZTUNNEL_INBOUND_PORT", ZTUNNEL_INBOUND_PORT);
	set_u32(env, constants, "ZTUNNEL_HBONE_PORT", ZTUNNEL_HBONE_PORT);
	set_u32(env, constants, "ZTUNNEL_DNS_PORT", ZTUNNEL_DNS_PORT);
	set_u32(env, constants, "ZTUNNEL_MARK", ZTUNNEL_MARK);
	set_u32(env, constants, "REDIRECT_MARK", REDIRECT_MARK);
	set_u32(env, constants, "MARK_MASK", MARK_MASK);
	set_u32(env, constants, "REDIRECT_ROUTE_TABLE", REDIRECT_ROUTE_TABLE);
	set_u32(env, constants, "REDIRECT_RULE_PRIORITY", REDIRECT_RULE_PRIORITY);
	set_u32(env, constants, "MAX_POD_IPS", MAX_POD_IPS);
	set_u32(env, constants, "TC_FILTER_HANDLE", TC_FILTER_HANDLE);
	set_u32(env, constants, "TC_FILTER_PRIORITY", TC_FILTER_PRIORITY);
	set_u32(env, constants, "POD_F_BYPASS_INBOUND", POD_F_BYPASS_INBOUND);
	set_u32(env, constants, "POD_F_STRICT", POD_F_STRICT);
	set_u32(env, constants, "POD_F_DNS_CAPTURE", POD_F_DNS_CAPTURE);
	set_u32(env, constants, "SETTING_MARK_ONLY_EXEMPTION", SETTING_MARK_ONLY_EXEMPTION);
	set_u32(env, constants, "SETTING_SK_LOOKUP_STEERING", SETTING_SK_LOOKUP_STEERING);
	set_u32(env, constants, "MAX_REROUTE_IFACES", MAX_REROUTE_IFACES);
	CHECK(napi_set_named_property(env, exports, "constants", constants));
	seqpacket_register(env, exports);
	return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
