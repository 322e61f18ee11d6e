/* Benchmark helper, one binary, four roles:
 *   tcpbench server PORT [NETNS]         ztunnel-shaped listener: [::]:PORT, IP_TRANSPARENT,
 *                                        SO_REUSEPORT, SO_MARK 0x539; drains every connection;
 *                                        with NETNS, the socket is made there and the process
 *                                        stays in its own netns, as ztunnel's are
 *   tcpbench connrate HOST PORT SECONDS  new connections per second (connect, then RST close)
 *   tcpbench bulk HOST PORT SECONDS      one connection, write as fast as possible: Gbit/s
 *   tcpbench spawn NETNS CMD ARGS...     fork, setns the child into NETNS, exec CMD (stdin passed
 *                                        on); prints the microseconds from fork to exit, as an
 *                                        agent that spawns iptables-restore in a pod netns pays
 * The network roles run in whatever netns they are started in (nsenter --net=...). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

/* A socket made in `netns` (then back to our own netns), or in ours when it is NULL. */
static int socket_in(const char *netns, int family, int type)
{
	int own, target, s;

	if (!netns)
		return socket(family, type, 0);
	own = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	target = open(netns, O_RDONLY | O_CLOEXEC);
	if (own < 0 || target < 0 || setns(target, CLONE_NEWNET))
		die("setns");
	s = socket(family, type, 0);
	if (setns(own, CLONE_NEWNET))
		die("setns back");
	close(own);
	close(target);
	return s;
}

static _Noreturn void serve(int port, const char *netns)
{
	int one = 1, mark = 0x539, v6only = 0;
	int ls = socket_in(netns, AF_INET6, SOCK_STREAM | SOCK_NONBLOCK);
	struct sockaddr_in6 a = { .sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port) };
	struct epoll_event ev = { .events = EPOLLIN }, evs[64];
	static char buf[1 << 18];
	int ep;

	if (ls < 0)
		die("socket");
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	setsockopt(ls, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	setsockopt(ls, SOL_SOCKET, SO_MARK, &mark, sizeof(mark));
	setsockopt(ls, SOL_IPV6, IPV6_TRANSPARENT, &one, sizeof(one));
	setsockopt(ls, SOL_IP, IP_TRANSPARENT, &one, sizeof(one));
	setsockopt(ls, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof(v6only));
	if (bind(ls, (struct sockaddr *)&a, sizeof(a)) || listen(ls, 4096))
		die("bind/listen");
	ep = epoll_create1(0);
	ev.data.fd = ls;
	epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
	printf("listening\n");
	fflush(stdout);
	for (;;) {
		int n = epoll_wait(ep, evs, 64, -1);

		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;

			if (fd == ls) {
				int c;

				while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
					ev.data.fd = c;
					epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
				}
				continue;
			}
			for (;;) {
				ssize_t r = read(fd, buf, sizeof(buf));

				if (r > 0)
					continue;
				if (r < 0 && errno == EAGAIN)
					break;
				close(fd); /* EOF or reset */
				break;
			}
		}
	}
}

static int resolve(const char *host, int port, struct sockaddr_storage *ss, socklen_t *len)
{
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST }, *res;
	char p[16];

	snprintf(p, sizeof(p), "%d", port);
	if (getaddrinfo(host, p, &hints, &res))
		return -1;
	memcpy(ss, res->ai_addr, res->ai_addrlen);
	*len = res->ai_addrlen;
	freeaddrinfo(res);
	return 0;
}

static int connrate(const char *host, int port, double seconds)
{
	struct sockaddr_storage ss;
	struct linger lg = { .l_onoff = 1, .l_linger = 0 };
	socklen_t len;
	long count = 0;
	double start, end;

	if (resolve(host, port, &ss, &len))
		die("address");
	start = now();
	end = start + seconds;
	while (now() < end) {
		int s = socket(ss.ss_family, SOCK_STREAM, 0);

		if (connect(s, (struct sockaddr *)&ss, len))
			die("connect");
		/* RST close: no TIME_WAIT, so the run is not limited by ephemeral ports. */
		setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
		close(s);
		count++;
	}
	printf("%.1f\n", (double)count / (now() - start));
	return 0;
}

static int bulk(const char *host, int port, double seconds)
{
	struct sockaddr_storage ss;
	static char buf[1 << 16];
	socklen_t len;
	double start, end, total = 0;
	int s;

	if (resolve(host, port, &ss, &len))
		die("address");
	s = socket(ss.ss_family, SOCK_STREAM, 0);
	if (connect(s, (struct sockaddr *)&ss, len))
		die("connect");
	start = now();
	end = start + seconds;
	while (now() < end) {
		ssize_t w = write(s, buf, sizeof(buf));

		if (w < 0)
			die("write");
		total += (double)w;
	}
	printf("%.3f\n", total * 8 / (now() - start) / 1e9);
	close(s);
	return 0;
}

static int spawn(const char *netns, char **argv)
{
	double start = now();
	pid_t pid = fork();
	int status;

	if (pid == 0) {
		int fd = open(netns, O_RDONLY | O_CLOEXEC);

		if (fd < 0 || setns(fd, CLONE_NEWNET))
			die("setns");
		execvp(argv[0], argv);
		die("exec");
	}
	if (pid < 0 || waitpid(pid, &status, 0) < 0)
		die("fork/wait");
	if (!WIFEXITED(status) || WEXITSTATUS(status))
		return fprintf(stderr, "%s failed\n", argv[0]), 1;
	printf("%.1f\n", (now() - start) * 1e6);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "server"))
		serve(atoi(argv[2]), argc >= 4 ? argv[3] : NULL);
	if (argc >= 5 && !strcmp(argv[1], "connrate"))
		return connrate(argv[2], atoi(argv[3]), atof(argv[4]));
	if (argc >= 5 && !strcmp(argv[1], "bulk"))
		return bulk(argv[2], atoi(argv[3]), atof(argv[4]));
	if (argc >= 4 && !strcmp(argv[1], "spawn"))
		return spawn(argv[2], argv + 3);
	fprintf(stderr, "usage: tcpbench server PORT [NETNS] | connrate HOST PORT S | bulk HOST PORT S | "
			"spawn NETNS CMD...\n");
	return 2;
}
