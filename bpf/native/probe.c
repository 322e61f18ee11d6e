#define _GNU_SOURCE
#include "probe.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>
#include <linux/bpf.h>

#include "../progs/ambient_shared.h"

const char *const kernel_feature_names[KF_COUNT] = {
	[KF_TC_PROGRAMS] = "tcPrograms",
	[KF_TCX] = "tcx",
	[KF_SK_ASSIGN_REUSEPORT] = "skAssignReuseport",
	[KF_SK_LOOKUP] = "skLookup",
	[KF_NETNS_COOKIES] = "netnsCookies",
	[KF_CGROUP_SOCK_ADDR] = "cgroupSockAddr",
	[KF_CGROUP_SOCKOPT] = "cgroupSockopt",
	[KF_SOCK_OPS] = "sockOps",
	[KF_TC_NETNS_COOKIE] = "tcNetnsCookie",
};

/* Instructions for the few programs the probes load (libbpf exports no instruction macros). */
#define I(c, d, s, o, i) \
	((struct bpf_insn){ .code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i) })
#define MOV_REG(d, s) I(BPF_ALU64 | BPF_MOV | BPF_X, d, s, 0, 0)
#define MOV_IMM(d, i) I(BPF_ALU64 | BPF_MOV | BPF_K, d, 0, 0, i)
#define ADD_IMM(d, i) I(BPF_ALU64 | BPF_ADD | BPF_K, d, 0, 0, i)
#define AND_IMM(d, i) I(BPF_ALU64 | BPF_AND | BPF_K, d, 0, 0, i)
#define LDX(sz, d, s, o) I(BPF_LDX | (sz) | BPF_MEM, d, s, o, 0)
#define ST(sz, d, o, i) I(BPF_ST | (sz) | BPF_MEM, d, 0, o, i)
#define JNE_IMM(d, i, o) I(BPF_JMP | BPF_JNE | BPF_K, d, 0, o, i)
#define JEQ_IMM(d, i, o) I(BPF_JMP | BPF_JEQ | BPF_K, d, 0, o, i)
#define CALL(f) I(BPF_JMP | BPF_CALL, 0, 0, 0, f)
#define EXIT() I(BPF_JMP | BPF_EXIT, 0, 0, 0, 0)

/* In the throwaway netns: SYNs to STEER_FROM on lo are handed to the listener on STEER_TO. */
#define STEER_FROM 1000
#define STEER_TO 1001

static void note(struct kernel_probe *p, enum kernel_feature f, bool present, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static void note(struct kernel_probe *p, enum kernel_feature f, bool present, const char *fmt, ...)
{
	va_list ap;

	p->present[f] = present;
	va_start(ap, fmt);
	vsnprintf(p->detail[f], sizeof(p->detail[f]), fmt, ap);
	va_end(ap);
}

/* A program returning `ret` (the caller closes it); -errno when refused. */
static int load_trivial(enum bpf_prog_type type, enum bpf_attach_type attach, int ret)
{
	const struct bpf_insn insns[] = { MOV_IMM(BPF_REG_0, ret), EXIT() };
	LIBBPF_OPTS(bpf_prog_load_opts, opts, .expected_attach_type = attach);
	int fd = bpf_prog_load(type, "amb_kprobe", "GPL", insns, sizeof(insns) / sizeof(insns[0]), &opts);

	return fd < 0 ? -errno : fd;
}

/* Does a program of `type` (expected to attach at `attach`) load that calls `helper` with its
 * context as the only argument? libbpf's helper probe sets no expected attach type, which the
 * kernel requires of cgroup sock_addr programs. */
static bool helper_with_ctx(enum bpf_prog_type type, enum bpf_attach_type attach, enum bpf_func_id helper)
{
	const struct bpf_insn insns[] = { CALL(helper), MOV_IMM(BPF_REG_0, 1), EXIT() };
	LIBBPF_OPTS(bpf_prog_load_opts, opts, .expected_attach_type = attach);
	int fd = bpf_prog_load(type, "amb_kprobe", "GPL", insns, sizeof(insns) / sizeof(insns[0]), &opts);

	if (fd < 0)
		return false;
	close(fd);
	return true;
}

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void probe_tc_programs(struct kernel_probe *p)
{
	static const struct {
		enum bpf_func_id id;
		const char *name;
	} helpers[] = {
		{ BPF_FUNC_skc_lookup_tcp, "bpf_skc_lookup_tcp" },
		{ BPF_FUNC_sk_assign, "bpf_sk_assign" },
		{ BPF_FUNC_redirect, "bpf_redirect" },
	};
	int ok = libbpf_probe_bpf_prog_type(BPF_PROG_TYPE_SCHED_CLS, NULL);

	if (ok <= 0)
		return note(p, KF_TC_PROGRAMS, false, "libbpf_probe_bpf_prog_type(sched_cls): %s",
			    ok ? strerror(-ok) : "no");
	for (size_t i = 0; i < sizeof(helpers) / sizeof(helpers[0]); i++) {
		ok = libbpf_probe_bpf_helper(BPF_PROG_TYPE_SCHED_CLS, helpers[i].id, NULL);
		if (ok <= 0)
			return note(p, KF_TC_PROGRAMS, false, "libbpf_probe_bpf_helper(sched_cls, %s): %s",
				    helpers[i].name, ok ? strerror(-ok) : "no");
	}
	note(p, KF_TC_PROGRAMS, true,
	     "libbpf_probe_bpf_prog_type(sched_cls) and _helper(bpf_skc_lookup_tcp, "
	     "bpf_sk_assign, bpf_redirect)");
}

static void probe_sk_lookup(struct kernel_probe *p)
{
	int ok = libbpf_probe_bpf_prog_type(BPF_PROG_TYPE_SK_LOOKUP, NULL);

	if (ok > 0)
		ok = libbpf_probe_bpf_helper(BPF_PROG_TYPE_SK_LOOKUP, BPF_FUNC_sk_assign, NULL);
	/* The netns link itself is tried in the throwaway netns (probe_in_netns). */
	note(p, KF_SK_LOOKUP, ok > 0, "libbpf_probe_bpf_prog_type(sk_lookup) and _helper(bpf_sk_assign): %s",
	     ok > 0 ? "yes"
	     : ok   ? strerror(-ok)
		    : "no");
}

static void probe_netns_cookies(struct kernel_probe *p)
{
	__u64 cookie = 0;
	socklen_t len = sizeof(cookie);
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	int err = fd < 0								? errno
		  : getsockopt(fd, SOL_SOCKET, 71 /* SO_NETNS_COOKIE */, &cookie, &len) ? errno
											: 0;
	int ok;

	if (fd >= 0)
		close(fd);
	if (err || !cookie)
		return note(p, KF_NETNS_COOKIES, false, "getsockopt(SO_NETNS_COOKIE): %s",
			    err ? strerror(err) : "0");
	/* Per program type: the helper is in some types and not in others (sk_lookup has none). */
	ok = libbpf_probe_bpf_helper(BPF_PROG_TYPE_SOCK_OPS, BPF_FUNC_get_netns_cookie, NULL);
	if (ok <= 0)
		return note(p, KF_NETNS_COOKIES, false,
			    "libbpf_probe_bpf_helper(sock_ops, bpf_get_netns_cookie): %s",
			    ok ? strerror(-ok) : "no");
	if (!helper_with_ctx(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT,
			     BPF_FUNC_get_netns_cookie))
		return note(p, KF_NETNS_COOKIES, false,
			    "bpf_get_netns_cookie in a cgroup/connect4 program: %s", strerror(errno));
	note(p, KF_NETNS_COOKIES, true,
	     "getsockopt(SO_NETNS_COOKIE), bpf_get_netns_cookie in sock_ops "
	     "(libbpf_probe_bpf_helper) and cgroup/connect4 programs");
}

bool tc_reads_netns_cookie(char *detail, size_t len)
{
	/* bpf_probe_read_kernel(fp - 8, 8, ctx): what the CO-RE read of skb->dev compiles to. */
	const struct bpf_insn insns[] = {
		MOV_REG(BPF_REG_3, BPF_REG_1),
		MOV_REG(BPF_REG_1, BPF_REG_10),
		ADD_IMM(BPF_REG_1, -8),
		MOV_IMM(BPF_REG_2, 8),
		CALL(BPF_FUNC_probe_read_kernel),
		MOV_IMM(BPF_REG_0, 0),
		EXIT(),
	};
	struct btf *vmlinux = btf__load_vmlinux_btf();
	bool cookie = false;
	int id, fd;

	if (!vmlinux) {
		snprintf(detail, len, "no kernel BTF (/sys/kernel/btf/vmlinux) to relocate the read against");
		return false;
	}
	if ((id = btf__find_by_name_kind(vmlinux, "net", BTF_KIND_STRUCT)) > 0) {
		const struct btf_type *t = btf__type_by_id(vmlinux, (__u32)id);
		const struct btf_member *m = btf_members(t);

		for (unsigned i = 0; i < btf_vlen(t); i++, m++)
			cookie |= !strcmp(btf__name_by_offset(vmlinux, m->name_off), "net_cookie");
	}
	btf__free(vmlinux);
	if (!cookie) {
		snprintf(detail, len, "the kernel's struct net has no net_cookie (BTF)");
		return false;
	}
	fd = bpf_prog_load(BPF_PROG_TYPE_SCHED_CLS, "amb_kprobe", "GPL", insns,
			   sizeof(insns) / sizeof(insns[0]), NULL);
	if (fd < 0) {
		snprintf(detail, len, "bpf_probe_read_kernel from a tc program's context: %s",
			 strerror(errno));
		return false;
	}
	close(fd);
	snprintf(detail, len,
		 "bpf_probe_read_kernel from a tc program's context, and struct net's net_cookie in the "
		 "kernel's BTF");
	return true;
}

/* Can tc programs read the cookie of their netns? Then a pod_policy entry counts only in the pod
 * netns it was written for (pod_redirect.bpf.c, policy_of_address). */
static void probe_tc_netns_cookie(struct kernel_probe *p)
{
	char detail[sizeof(p->detail[0])];
	bool ok;

	if (!p->present[KF_NETNS_COOKIES])
		return note(p, KF_TC_NETNS_COOKIE, false, "not tried: no netns cookies");
	ok = tc_reads_netns_cookie(detail, sizeof(detail));
	note(p, KF_TC_NETNS_COOKIE, ok, "%s", detail);
}

static void probe_cgroup_hooks(struct kernel_probe *p)
{
	static const struct {
		enum bpf_attach_type attach;
		const char *name;
	} sock_addr[] = {
		{ BPF_CGROUP_INET4_CONNECT, "connect4" },
		{ BPF_CGROUP_INET6_CONNECT, "connect6" },
		{ BPF_CGROUP_UDP4_SENDMSG, "sendmsg4" },
		{ BPF_CGROUP_UDP6_SENDMSG, "sendmsg6" },
		{ BPF_CGROUP_UDP4_RECVMSG, "recvmsg4" },
		{ BPF_CGROUP_UDP6_RECVMSG, "recvmsg6" },
		{ BPF_CGROUP_INET4_GETPEERNAME, "getpeername4" },
		{ BPF_CGROUP_INET6_GETPEERNAME, "getpeername6" },
	};
	int fd;

	/* libbpf's type probe loads sock_addr programs without the expected attach type the kernel
	 * requires of them, and could not tell the hooks apart anyway: each is loaded for its hook. */
	note(p, KF_CGROUP_SOCK_ADDR, true,
	     "cgroup sock_addr programs load for connect, sendmsg, recvmsg and getpeername");
	for (size_t i = 0; i < sizeof(sock_addr) / sizeof(sock_addr[0]); i++) {
		fd = load_trivial(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, sock_addr[i].attach, 1);
		if (fd < 0) {
			note(p, KF_CGROUP_SOCK_ADDR, false, "a cgroup/%s program: %s", sock_addr[i].name,
			     strerror(-fd));
			break;
		}
		close(fd);
	}
	fd = load_trivial(BPF_PROG_TYPE_CGROUP_SOCKOPT, BPF_CGROUP_SETSOCKOPT, 1);
	note(p, KF_CGROUP_SOCKOPT, fd >= 0, "a cgroup/setsockopt program: %s",
	     fd >= 0 ? "loads" : strerror(-fd));
	if (fd >= 0)
		close(fd);
	fd = libbpf_probe_bpf_prog_type(BPF_PROG_TYPE_SOCK_OPS, NULL);
	note(p, KF_SOCK_OPS, fd > 0, "libbpf_probe_bpf_prog_type(sock_ops): %s",
	     fd > 0 ? "yes"
	     : fd   ? strerror(-fd)
		    : "no");
}

/* ---- real attempts, in a netns of the probe's own ---- */

/* The tc program of the SO_REUSEPORT attempt: a SYN to 127.0.0.1:STEER_FROM is handed with
 * bpf_sk_assign to the listener on 127.0.0.1:STEER_TO. Before Linux 6.6 the helper refuses an
 * SO_REUSEPORT listener (-ESOCKTNOSUPPORT), the SYN finds nothing on STEER_FROM and the
 * connection is refused. */
static int load_steer_prog(void)
{
	const struct bpf_insn insns[] = {
		MOV_REG(BPF_REG_6, BPF_REG_1),
		/* 12 bytes from the TCP destination port (Ethernet 14 + IPv4 20 + 2) to the flags */
		MOV_REG(BPF_REG_1, BPF_REG_6),
		MOV_IMM(BPF_REG_2, 36),
		MOV_REG(BPF_REG_3, BPF_REG_10),
		ADD_IMM(BPF_REG_3, -24),
		MOV_IMM(BPF_REG_4, 12),
		CALL(BPF_FUNC_skb_load_bytes),
		JNE_IMM(BPF_REG_0, 0, 24), /* -> out */
		LDX(BPF_H, BPF_REG_1, BPF_REG_10, -24),
		JNE_IMM(BPF_REG_1, htons(STEER_FROM), 22),
		LDX(BPF_B, BPF_REG_1, BPF_REG_10, -13),
		AND_IMM(BPF_REG_1, 0x12), /* SYN | ACK */
		JNE_IMM(BPF_REG_1, 0x02, 19),
		/* struct bpf_sock_tuple.ipv4 at fp-16: any source, 127.0.0.1:STEER_TO */
		ST(BPF_W, BPF_REG_10, -16, 0),
		ST(BPF_W, BPF_REG_10, -12, (__s32)htonl(INADDR_LOOPBACK)),
		ST(BPF_H, BPF_REG_10, -8, 0),
		ST(BPF_H, BPF_REG_10, -6, htons(STEER_TO)),
		MOV_REG(BPF_REG_1, BPF_REG_6),
		MOV_REG(BPF_REG_2, BPF_REG_10),
		ADD_IMM(BPF_REG_2, -16),
		MOV_IMM(BPF_REG_3, 12),
		MOV_IMM(BPF_REG_4, -1), /* BPF_F_CURRENT_NETNS */
		MOV_IMM(BPF_REG_5, 0),
		CALL(BPF_FUNC_skc_lookup_tcp),
		JEQ_IMM(BPF_REG_0, 0, 7),
		MOV_REG(BPF_REG_7, BPF_REG_0),
		MOV_REG(BPF_REG_1, BPF_REG_6),
		MOV_REG(BPF_REG_2, BPF_REG_7),
		MOV_IMM(BPF_REG_3, 0),
		CALL(BPF_FUNC_sk_assign),
		MOV_REG(BPF_REG_1, BPF_REG_7),
		CALL(BPF_FUNC_sk_release),
		/* out: */
		MOV_IMM(BPF_REG_0, 0), /* TC_ACT_OK */
		EXIT(),
	};
	int fd = bpf_prog_load(BPF_PROG_TYPE_SCHED_CLS, "amb_kprobe_steer", "GPL", insns,
			       sizeof(insns) / sizeof(insns[0]), NULL);

	return fd < 0 ? -errno : fd;
}

static int lo_up(void)
{
	struct ifreq ifr = { 0 };
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	int err = 0;

	if (fd < 0)
		return -errno;
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "lo");
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0)
		err = -errno;
	ifr.ifr_flags |= IFF_UP;
	if (!err && ioctl(fd, SIOCSIFFLAGS, &ifr) < 0)
		err = -errno;
	close(fd);
	return err;
}

/* ztunnel's kind of listener: SO_REUSEPORT, on 127.0.0.1:port. */
static int reuseport_listener(int port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET,
				  .sin_port = htons(port),
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int one = 1, err, fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -errno;
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) ||
	    bind(fd, (struct sockaddr *)&sa, sizeof(sa)) || listen(fd, 4)) {
		err = -errno;
		close(fd);
		return err;
	}
	return fd;
}

/* A client whose connect gives up after half a second (a SYN nobody takes is not retried for long). */
static int client_socket(void)
{
	struct timeval tv = { .tv_sec = 0, .tv_usec = 500 * 1000 };
	int err, fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -errno;
	if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv))) {
		err = -errno;
		close(fd);
		return err;
	}
	return fd;
}

/* Is a SYN steered by tc's bpf_sk_assign to an SO_REUSEPORT listener accepted? The program is on
 * lo's ingress already. 1: yes, 0: refused, -errno: the attempt failed. */
static int steer_to_reuseport_listener(void)
{
	struct sockaddr_in to = { .sin_family = AF_INET,
				  .sin_port = htons(STEER_FROM),
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int listener = reuseport_listener(STEER_TO), client, ret;

	if (listener < 0)
		return listener;
	client = client_socket();
	if (client < 0) {
		close(listener);
		return client;
	}
	ret = connect(client, (struct sockaddr *)&to, sizeof(to)) == 0 ? 1
	      : errno == ECONNREFUSED				       ? 0
								       : -errno;
	close(client);
	close(listener);
	return ret;
}

struct netns_probe {
	struct kernel_probe *p;
	int result;
};

static void *probe_in_netns(void *arg)
{
	struct netns_probe *np = arg;
	struct kernel_probe *p = np->p;
	DECLARE_LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = 1, .attach_point = BPF_TC_INGRESS);
	DECLARE_LIBBPF_OPTS(bpf_tc_opts, tc_opts, .handle = 1, .priority = 1);
	int prog = -1, link = -1, netns = -1, sk_prog = -1, err, steered;

	/* This thread only: the process keeps its netns, and the new one goes with the thread's last
	 * reference (its fds are closed before it ends). Nothing is named or pinned. */
	if (unshare(CLONE_NEWNET)) {
		np->result = -errno;
		return NULL;
	}
	if ((err = lo_up())) {
		np->result = err;
		return NULL;
	}

	/* tcx: libbpf has no probe for it; a link on lo of this netns, of the program the SO_REUSEPORT
	 * attempt needs anyway (a tcx link's attach and detach each wait for RCU: one link, not two). */
	prog = load_steer_prog();
	if (prog < 0) {
		note(p, KF_TCX, false, "the tc program (bpf_skc_lookup_tcp, bpf_sk_assign): %s",
		     strerror(-prog));
		note(p, KF_SK_ASSIGN_REUSEPORT, false,
		     "the tc program (bpf_skc_lookup_tcp, bpf_sk_assign): %s", strerror(-prog));
	} else {
		link = bpf_link_create(prog, 1 /* lo */, AMB_BPF_TCX_INGRESS, NULL);
		note(p, KF_TCX, link >= 0, "bpf_link_create(BPF_TCX_INGRESS) on lo of a throwaway netns: %s",
		     link >= 0 ? "ok" : strerror(errno));

		/* bpf_sk_assign with an SO_REUSEPORT listener: not a question of the helper's presence,
		 * which libbpf answers, but of what it accepts: a SYN on lo steered to one, by the tcx
		 * link, else by a cls_bpf filter. */
		err = 0;
		if (link < 0) {
			err = bpf_tc_hook_create(&hook);
			if (!err) {
				tc_opts.prog_fd = prog;
				err = bpf_tc_attach(&hook, &tc_opts);
			}
		}
		steered = err ? err : steer_to_reuseport_listener();
		if (steered < 0)
			note(p, KF_SK_ASSIGN_REUSEPORT, false,
			     "a SYN steered on lo of a throwaway netns (%s): %s",
			     link >= 0 ? "tcx" : "cls_bpf", strerror(-steered));
		else
			note(p, KF_SK_ASSIGN_REUSEPORT, steered,
			     "a SYN steered by tc's bpf_sk_assign to an SO_REUSEPORT "
			     "listener on lo of a throwaway netns: %s",
			     steered ? "accepted" : "refused");
		if (link >= 0)
			close(link);
		else
			bpf_tc_hook_destroy(&hook); /* the clsact qdisc, with the filter */
		close(prog);
	}

	/* sk_lookup: the program probe passed; its netns link too? */
	if (p->present[KF_SK_LOOKUP]) {
		sk_prog = load_trivial(BPF_PROG_TYPE_SK_LOOKUP, BPF_SK_LOOKUP, 1 /* SK_PASS */);
		netns = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
		link = sk_prog >= 0 && netns >= 0 ? bpf_link_create(sk_prog, netns, BPF_SK_LOOKUP, NULL) : -1;
		if (link < 0) {
			note(p, KF_SK_LOOKUP, false, "an sk_lookup link on a throwaway netns: %s",
			     strerror(errno));
		} else {
			note(p, KF_SK_LOOKUP, true,
			     "libbpf_probe_bpf_prog_type(sk_lookup), _helper(bpf_sk_assign), and "
			     "an sk_lookup link on a throwaway netns");
			close(link);
		}
		if (netns >= 0)
			close(netns);
		if (sk_prog >= 0)
			close(sk_prog);
	}
	np->result = 0;
	return NULL;
}

void kernel_probe_run(struct kernel_probe *p)
{
	struct netns_probe np = { .p = p, .result = 0 };
	double start = now_ms();
	pthread_t thread;
	int err;

	memset(p, 0, sizeof(*p));
	probe_tc_programs(p);
	probe_sk_lookup(p);
	probe_netns_cookies(p);
	probe_tc_netns_cookie(p);
	probe_cgroup_hooks(p);
	if (!p->present[KF_TC_PROGRAMS]) {
		note(p, KF_TCX, false, "not tried: no tc programs");
		note(p, KF_SK_ASSIGN_REUSEPORT, false, "not tried: no tc programs");
	} else if ((err = pthread_create(&thread, NULL, probe_in_netns, &np))) {
		np.result = -err;
	} else {
		pthread_join(thread, NULL);
	}
	if (np.result < 0) {
		/* Not tried, so not known: taken as absent (the older kernels' modes), and said so. */
		note(p, KF_TCX, false, "not tried: no throwaway netns with lo up to try it in (%s)",
		     strerror(-np.result));
		note(p, KF_SK_ASSIGN_REUSEPORT, false,
		     "not tried: no throwaway netns with lo up to try it in (%s)", strerror(-np.result));
	}
	p->elapsed_ms = now_ms() - start;
}
