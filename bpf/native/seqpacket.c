/* Unix SOCK_SEQPACKET sockets with SCM_RIGHTS, for ZDS. Every call is non-blocking; readiness
 * comes from a libuv poll watcher on Node's own event loop (no threads, no timers). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <limits.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <node_api.h>
#include <uv.h>

#include "seqpacket.h"

#define MAX_FDS 8 /* received fds beyond one are reported, so the protocol layer can reject them */

static napi_value throw_errno(napi_env env, int err, const char *what)
{
	char msg[256];
	const char *code = err == ENOENT	 ? "ENOENT"
			   : err == ECONNREFUSED ? "ECONNREFUSED"
			   : err == EPIPE	 ? "EPIPE"
			   : err == ECONNRESET	 ? "ECONNRESET"
			   : err == EMSGSIZE	 ? "EMSGSIZE"
			   : err == EADDRINUSE	 ? "EADDRINUSE"
			   : err == EACCES	 ? "EACCES"
			   : err == EBADF	 ? "EBADF"
						 : "ESYSTEM";

	snprintf(msg, sizeof(msg), "%s: %s", what, strerror(err));
	napi_throw_error(env, code, msg);
	return NULL;
}

static bool arg_string(napi_env env, napi_value v, char *buf, size_t len)
{
	size_t n = 0;

	return napi_get_value_string_utf8(env, v, buf, len, &n) == napi_ok && n < len - 1;
}

static napi_value int_value(napi_env env, int v)
{
	napi_value out;

	napi_create_int32(env, v, &out);
	return out;
}

static int fill_addr(const char *path, struct sockaddr_un *sa)
{
	memset(sa, 0, sizeof(*sa));
	sa->sun_family = AF_UNIX;
	if (strlen(path) >= sizeof(sa->sun_path))
		return -ENAMETOOLONG;
	strcpy(sa->sun_path, path);
	return 0;
}

static int arg_fd(napi_env env, napi_value v)
{
	int32_t fd = -1;

	napi_get_value_int32(env, v, &fd);
	return fd;
}

/* listen(path, mode) -> fd. A stale socket file is removed; any other file at path is an error. */
static napi_value sp_listen(napi_env env, napi_callback_info info)
{
	size_t argc = 2;
	napi_value argv[2];
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	struct sockaddr_un sa;
	struct stat st;
	uint32_t mode = 0600;
	int fd;

	napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
	if (argc < 1 || !arg_string(env, argv[0], path, sizeof(path)))
		return throw_errno(env, ENAMETOOLONG, "socket path");
	if (argc > 1)
		napi_get_value_uint32(env, argv[1], &mode);
	fill_addr(path, &sa);
	if (lstat(path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode))
			return throw_errno(env, EEXIST, "a file that is not a socket is in the way");
		unlink(path);
	}
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return throw_errno(env, errno, "socket");
	/* Created with the final mode: never reachable with wider permissions, even briefly. */
	mode_t old = umask(0777 & ~mode);
	int rc = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
	int err = errno;

	umask(old);
	if (rc || chmod(path, mode) || listen(fd, 64)) {
		err = rc ? err : errno;
		close(fd);
		return throw_errno(env, err, "bind/listen");
	}
	return int_value(env, fd);
}

/* connect(path) -> fd */
static napi_value sp_connect(napi_env env, napi_callback_info info)
{
	size_t argc = 1;
	napi_value argv[1];
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	struct sockaddr_un sa;
	int fd;

	napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
	if (argc < 1 || !arg_string(env, argv[0], path, sizeof(path)))
		return throw_errno(env, ENAMETOOLONG, "socket path");
	fill_addr(path, &sa);
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return throw_errno(env, errno, "socket");
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa))) {
		int err = errno;

		close(fd);
		return throw_errno(env, err == EAGAIN ? ECONNREFUSED : err, "connect");
	}
	return int_value(env, fd);
}

/* accept(fd) -> fd, or -1 when no connection is pending */
static napi_value sp_accept(napi_env env, napi_callback_info info)
{
	size_t argc = 1;
	napi_value argv[1];
	int fd;

	napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
	fd = accept4(arg_fd(env, argv[0]), NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0 && errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
		return throw_errno(env, errno, "accept");
	return int_value(env, fd < 0 ? -1 : fd);
}

/* send(fd, data, pass) -> true, or false when the socket is full. pass: an fd (< 0: none) or an
 * array of fds, all sent with SCM_RIGHTS on this datagram. */
static napi_value sp_send(napi_env env, napi_callback_info info)
{
	size_t argc = 3, len = 0;
	napi_value argv[3], out;
	void *data = NULL;
	int32_t pass[MAX_FDS];
	uint32_t npass = 0;
	bool is_array = false;
	char cbuf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
	struct iovec iov;
	struct msghdr msg;

	napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
	if (argc < 2 || napi_get_buffer_info(env, argv[1], &data, &len) != napi_ok)
		return throw_errno(env, EINVAL, "send: data must be a Buffer");
	if (argc > 2 && napi_is_array(env, argv[2], &is_array) == napi_ok && is_array) {
		napi_get_array_length(env, argv[2], &npass);
		if (npass > MAX_FDS)
			return throw_errno(env, EINVAL, "send: too many fds");
		for (uint32_t i = 0; i < npass; i++) {
			napi_value v;

			napi_get_element(env, argv[2], i, &v);
			pass[i] = arg_fd(env, v);
		}
	} else if (argc > 2 && (pass[0] = arg_fd(env, argv[2])) >= 0) {
		npass = 1;
	}
	memset(&msg, 0, sizeof(msg));
	iov.iov_base = data;
	iov.iov_len = len;
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	if (npass > 0) {
		struct cmsghdr *c;

		memset(cbuf, 0, sizeof(cbuf));
		msg.msg_control = cbuf;
		msg.msg_controllen = CMSG_SPACE(sizeof(int) * npass);
		c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * npass);
		memcpy(CMSG_DATA(c), pass, sizeof(int) * npass);
	}
	if (sendmsg(arg_fd(env, argv[0]), &msg, MSG_NOSIGNAL) < 0) {
		if (errno == EAGAIN) {
			napi_get_boolean(env, false, &out);
			return out;
		}
		return throw_errno(env, errno, "send");
	}
	napi_get_boolean(env, true, &out);
	return out;
}

/* recv(fd, maxLen) -> { data, fds } | null (nothing to read) | { eof: true }.
 * A datagram longer than maxLen or with more fds than fit is an error (and its fds are closed). */
static napi_value sp_recv(napi_env env, napi_callback_info info)
{
	size_t argc = 2;
	napi_value argv[2], out, buf, fds, eof;
	uint32_t max = 1024;
	char cbuf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
	int got[MAX_FDS], nfds = 0;
	struct iovec iov;
	struct msghdr msg;
	struct cmsghdr *c;
	void *data;
	ssize_t n;

	napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
	if (argc > 1)
		napi_get_value_uint32(env, argv[1], &max);
	if (napi_create_buffer(env, max, &data, &buf) != napi_ok)
		return NULL;
	memset(&msg, 0, sizeof(msg));
	iov.iov_base = data;
	iov.iov_len = max;
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = cbuf;
	msg.msg_controllen = sizeof(cbuf);
	n = recvmsg(arg_fd(env, argv[0]), &msg, MSG_CMSG_CLOEXEC);
	if (n < 0) {
		if (errno == EAGAIN || errno == EINTR) {
			napi_get_null(env, &out);
			return out;
		}
		return throw_errno(env, errno, "recv");
	}
	for (c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int) && nfds < MAX_FDS; i++)
			memcpy(&got[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
	}
	if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
		for (int i = 0; i < nfds; i++)
			close(got[i]);
		napi_throw_error(env, "ETRUNCATED",
				 msg.msg_flags & MSG_TRUNC ? "datagram longer than the receive buffer"
							   : "too many file descriptors");
		return NULL;
	}
	napi_create_object(env, &out);
	if (n == 0 && nfds == 0) {
		napi_get_boolean(env, true, &eof);
		napi_set_named_property(env, out, "eof", eof);
		return out;
	}
	napi_create_buffer_copy(env, (size_t)n, data, NULL, &buf);
	napi_set_named_property(env, out, "data", buf);
	napi_create_array_with_length(env, (size_t)nfds, &fds);
	for (int i = 0; i < nfds; i++)
		napi_set_element(env, fds, (uint32_t)i, int_value(env, got[i]));
	napi_set_named_property(env, out, "fds", fds);
	return out;
}

/* dup(fd) -> a close-on-exec duplicate */
static napi_value sp_dup(napi_env env, napi_callback_info info)
{
	size_t argc = 1;
	napi_value argv[1];
	int fd;

	napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
	fd = fcntl(arg_fd(env, argv[0]), F_DUPFD_CLOEXEC, 3);
	if (fd < 0)
		return throw_errno(env, errno, "dup");
	return int_value(env, fd);
}

/* reserveFds(count) -> the number of fds the table now holds (count, or less under RLIMIT_NOFILE).
 * The kernel grows a process's fd table by doubling, and in a multithreaded process each growth
 * waits for an RCU grace period (expand_fdtable: ~10 ms on these VMs) inside whichever open() or
 * socket() crosses 256, 512, 1024...: a pod enrolment that happens to. Growing the table once at
 * start-up moves that wait there (the table never shrinks). */
static napi_value sp_reserve_fds(napi_env env, napi_callback_info info)
{
	size_t argc = 1;
	napi_value argv[1];
	struct rlimit rl;
	int64_t want = 0;
	int fd, high;

	napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
	if (argc < 1 || napi_get_value_int64(env, argv[0], &want) != napi_ok || want < 1 || want > INT_MAX)
		return throw_errno(env, EINVAL, "reserveFds");
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && (rlim_t)want > rl.rlim_cur)
		want = (int64_t)rl.rlim_cur;
	fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return throw_errno(env, errno, "reserveFds: /dev/null");
	high = fcntl(fd, F_DUPFD_CLOEXEC, (int)want - 1); /* the lowest free fd >= want - 1 */
	if (high < 0) {
		int err = errno;

		close(fd);
		return throw_errno(env, err, "reserveFds");
	}
	close(high);
	close(fd);
	return int_value(env, (int)want);
}

/* peerCredentials(fd) -> { pid, uid, gid } of the process that connected (SO_PEERCRED). */
static napi_value sp_peer_credentials(napi_env env, napi_callback_info info)
{
	size_t argc = 1;
	napi_value argv[1], out;
	struct ucred cred;
	socklen_t len = sizeof(cred);

	napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
	if (getsockopt(arg_fd(env, argv[0]), SOL_SOCKET, SO_PEERCRED, &cred, &len))
		return throw_errno(env, errno, "SO_PEERCRED");
	napi_create_object(env, &out);
	napi_set_named_property(env, out, "pid", int_value(env, cred.pid));
	napi_set_named_property(env, out, "uid", int_value(env, (int)cred.uid));
	napi_set_named_property(env, out, "gid", int_value(env, (int)cred.gid));
	return out;
}

static napi_value sp_close(napi_env env, napi_callback_info info)
{
	size_t argc = 1;
	napi_value argv[1];

	napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
	if (argc > 0)
		close(arg_fd(env, argv[0]));
	return NULL;
}

/* ---- Watcher: a libuv poll handle that calls back (events) on readiness ---- */

struct watcher {
	uv_poll_t poll;
	napi_env env;
	napi_ref self;
	napi_ref callback;
	napi_async_context ctx;
	bool started, closed;
	bool uv_closed, finalized; /* freed once libuv and the JS object are both done with it */
};

static void watcher_maybe_free(struct watcher *w)
{
	if (w->uv_closed && w->finalized)
		free(w);
}

static void watcher_closed(uv_handle_t *h)
{
	struct watcher *w = h->data;

	w->uv_closed = true;
	watcher_maybe_free(w);
}

static void watcher_cb(uv_poll_t *poll, int status, int events)
{
	struct watcher *w = poll->data;
	napi_handle_scope scope;
	napi_value cb, self, argv[1], result;

	if (w->closed)
		return;
	napi_open_handle_scope(w->env, &scope);
	napi_get_reference_value(w->env, w->callback, &cb);
	napi_get_reference_value(w->env, w->self, &self);
	napi_create_int32(w->env, status < 0 ? status : events, &argv[0]);
	napi_make_callback(w->env, w->ctx, self, cb, 1, argv, &result);
	napi_close_handle_scope(w->env, scope);
}

static void watcher_release(napi_env env, struct watcher *w)
{
	if (w->closed)
		return;
	w->closed = true;
	if (w->started)
		napi_reference_unref(env, w->self, NULL);
	napi_delete_reference(env, w->callback);
	napi_async_destroy(env, w->ctx);
	uv_close((uv_handle_t *)&w->poll, watcher_closed);
}

static void watcher_finalize(napi_env env, void *data, void *hint)
{
	struct watcher *w = data;

	(void)hint;
	if (!w->closed)
		watcher_release(env, w);
	napi_delete_reference(env, w->self);
	w->finalized = true;
	watcher_maybe_free(w);
}

/* new Watcher(fd, callback) */
static napi_value watcher_new(napi_env env, napi_callback_info info)
{
	size_t argc = 2;
	napi_value argv[2], self, name;
	struct watcher *w;
	uv_loop_t *loop;

	napi_get_cb_info(env, info, &argc, argv, &self, NULL);
	w = calloc(1, sizeof(*w));
	if (!w)
		return throw_errno(env, ENOMEM, "watcher");
	napi_get_uv_event_loop(env, &loop);
	if (uv_poll_init(loop, &w->poll, arg_fd(env, argv[0]))) {
		free(w);
		return throw_errno(env, EBADF, "watch");
	}
	w->poll.data = w;
	w->env = env;
	napi_create_reference(env, argv[1], 1, &w->callback);
	napi_create_string_utf8(env, "ambient-bpf:seqpacket", NAPI_AUTO_LENGTH, &name);
	napi_async_init(env, NULL, name, &w->ctx);
	napi_wrap(env, self, w, watcher_finalize, NULL, &w->self);
	return self;
}

static struct watcher *watcher_of(napi_env env, napi_callback_info info, size_t *argc, napi_value *argv)
{
	napi_value self;
	struct watcher *w = NULL;

	napi_get_cb_info(env, info, argc, argv, &self, NULL);
	napi_unwrap(env, self, (void **)&w);
	return w && !w->closed ? w : NULL;
}

/* start(events): 1 readable, 2 writable; a peer hang-up is always reported (4). */
static napi_value watcher_start(napi_env env, napi_callback_info info)
{
	size_t argc = 1;
	napi_value argv[1];
	struct watcher *w = watcher_of(env, info, &argc, argv);
	uint32_t ev = 1;
	int uv = UV_DISCONNECT;

	if (!w)
		return NULL;
	if (argc > 0)
		napi_get_value_uint32(env, argv[0], &ev);
	if (ev & 1)
		uv |= UV_READABLE;
	if (ev & 2)
		uv |= UV_WRITABLE;
	uv_poll_start(&w->poll, uv, watcher_cb);
	if (!w->started) /* keep the JS object alive while it watches */
		napi_reference_ref(env, w->self, NULL);
	w->started = true;
	return NULL;
}

static napi_value watcher_close(napi_env env, napi_callback_info info)
{
	size_t argc = 0;
	struct watcher *w = watcher_of(env, info, &argc, NULL);

	if (w)
		watcher_release(env, w);
	return NULL;
}

void seqpacket_register(napi_env env, napi_value exports)
{
	napi_value sp, watcher;
	const napi_property_descriptor fns[] = {
		{ "listen", NULL, sp_listen, NULL, NULL, NULL, napi_default, NULL },
		{ "connect", NULL, sp_connect, NULL, NULL, NULL, napi_default, NULL },
		{ "accept", NULL, sp_accept, NULL, NULL, NULL, napi_default, NULL },
		{ "send", NULL, sp_send, NULL, NULL, NULL, napi_default, NULL },
		{ "recv", NULL, sp_recv, NULL, NULL, NULL, napi_default, NULL },
		{ "close", NULL, sp_close, NULL, NULL, NULL, napi_default, NULL },
		{ "dup", NULL, sp_dup, NULL, NULL, NULL, napi_default, NULL },
		{ "reserveFds", NULL, sp_reserve_fds, NULL, NULL, NULL, napi_default, NULL },
		{ "peerCredentials", NULL, sp_peer_credentials, NULL, NULL, NULL, napi_default, NULL },
	};
	const napi_property_descriptor methods[] = {
		{ "start", NULL, watcher_start, NULL, NULL, NULL, napi_default, NULL },
		{ "close", NULL, watcher_close, NULL, NULL, NULL, napi_default, NULL },
	};

	napi_create_object(env, &sp);
	napi_define_properties(env, sp, sizeof(fns) / sizeof(fns[0]), fns);
	napi_define_class(env, "Watcher", NAPI_AUTO_LENGTH, watcher_new, NULL,
			  sizeof(methods) / sizeof(methods[0]), methods, &watcher);
	napi_set_named_property(env, sp, "Watcher", watcher);
	napi_set_named_property(env, exports, "seqpacket", sp);
}
