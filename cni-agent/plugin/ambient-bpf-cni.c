/* ambient-bpf-cni: the chained CNI plugin, a small static relay. Runtimes exec it on the host,
 * where no Node.js can be assumed; all CNI logic lives in the agent. It answers VERSION itself and
 * relays every other command (environment and stdin) to the agent's Unix socket, named by the
 * conflist entry's "agent_socket", then prints the agent's answer and exits with its code.
 *
 * When the agent cannot be reached it decides alone, from the policy the agent persists where a
 * reboot does not erase it (the entry's "policy_file", default /var/lib/ambient-bpf/cni-policy).
 * An ADD or CHECK fails (CNI error 11: the runtime retries) for a pod that is or may be ambient,
 * and passes prevResult through for a pod the policy says is not (see decide() for the rule).
 *
 * Relay protocol, agent side in cni-agent/src/cni/relay.ts:
 *   request:  "AMBIENT-BPF-CNI 1\n", then "KEY=VALUE\n" for each CNI_* variable, "\n", then stdin
 *             until end of stream (the plugin shuts its write side down)
 *   response: "<exit code>\n", then what to print on stdout */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_STDIN (1 << 20)
#define DEFAULT_AGENT_SOCKET "/var/run/ambient-bpf/cni.sock"
#define DEFAULT_POLICY_FILE "/var/lib/ambient-bpf/cni-policy"
/* First and last lines of a complete policy file (cni-agent/src/cni/policy-file.ts writes it). */
#define POLICY_MAGIC "ambient-bpf-cni-policy 1"
#define POLICY_END "end"
#define SUPPORTED "[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]"
#define REPLY_TIMEOUT_S 60
/* An agent that accepts nothing (hung with its listen queue full) must not hold the runtime's call
 * for ever: connect() on a Unix socket waits for room in that queue, bounded by SO_SNDTIMEO. */
#define CONNECT_TIMEOUT_S 10

/* CNI error codes (spec 1.1). */
#define CNI_ERR_IO 5
#define CNI_ERR_DECODE 6
#define CNI_ERR_TRY_LATER 11

static const char *const relayed_env[] = { "CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS",
					   "CNI_IFNAME",  "CNI_ARGS",	     "CNI_PATH" };

struct buf {
	char *data;
	size_t len;
};

static char cni_version[32] = "1.1.0";

static int cni_error(int code, const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	for (char *p = msg; *p; p++) /* keep the JSON valid without an escaper */
		if (*p == '"' || *p == '\\' || (unsigned char)*p < 0x20)
			*p = '\'';
	printf("{\"cniVersion\":\"%s\",\"code\":%d,\"msg\":\"%s\"}\n", cni_version, code, msg);
	return 1;
}

static bool read_all(int fd, struct buf *b, size_t max)
{
	size_t cap = 4096;

	b->data = malloc(cap + 1);
	b->len = 0;
	for (;;) {
		ssize_t n;

		if (b->len == cap) {
			if (cap >= max)
				return false;
			cap *= 2;
			b->data = realloc(b->data, cap + 1);
		}
		n = read(fd, b->data + b->len, cap - b->len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return false;
		if (n == 0)
			break;
		b->len += (size_t)n;
	}
	b->data[b->len] = '\0';
	return true;
}

/* ---- just enough JSON: the raw text of a top-level member ---- */

static const char *skip_ws(const char *p)
{
	while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
		p++;
	return p;
}

static const char *skip_string(const char *p)
{
	for (p++; *p && *p != '"'; p++)
		if (*p == '\\' && p[1])
			p++;
	return *p ? p + 1 : NULL;
}

static const char *skip_value(const char *p)
{
	int depth = 0;

	p = skip_ws(p);
	do {
		if (!*p)
			return NULL;
		if (*p == '"') {
			if (!(p = skip_string(p)))
				return NULL;
			continue;
		}
		if (*p == '{' || *p == '[')
			depth++;
		else if (*p == '}' || *p == ']')
			depth--;
		else if (depth == 0 && (*p == ',' || *p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
			break;
		p++;
	} while (depth > 0 || (*p && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\n' &&
			       *p != '\r' && *p != '\t'));
	return p;
}

/* Finds top-level member `key`; sets [*start, *end) to its value's text. */
static bool json_member(const char *json, const char *key, const char **start, const char **end)
{
	const char *p = skip_ws(json);
	size_t klen = strlen(key);

	if (*p++ != '{')
		return false;
	for (;;) {
		const char *k, *kend, *v;

		p = skip_ws(p);
		if (*p != '"')
			return false;
		k = p + 1;
		if (!(p = skip_string(p)))
			return false;
		kend = p - 1;
		p = skip_ws(p);
		if (*p++ != ':')
			return false;
		v = skip_ws(p);
		if (!(p = skip_value(v)))
			return false;
		if ((size_t)(kend - k) == klen && strncmp(k, key, klen) == 0) {
			*start = v;
			*end = p;
			return true;
		}
		p = skip_ws(p);
		if (*p == ',') {
			p++;
			continue;
		}
		return false;
	}
}

/* A top-level string member without escapes (paths, versions), or NULL. */
static char *json_string(const char *json, const char *key)
{
	const char *s, *e;
	char *out;

	if (!json_member(json, key, &s, &e) || *s != '"' || e - s < 2)
		return NULL;
	out = strndup(s + 1, (size_t)(e - s - 2));
	return strchr(out, '\\') ? (free(out), NULL) : out;
}

/* ---- the agent's policy, for when it is down ---- */

static void cni_arg(const char *args, const char *key, char *out, size_t len)
{
	size_t klen = strlen(key);

	out[0] = '\0';
	for (const char *p = args; p && *p;) {
		const char *end = strchr(p, ';');
		size_t n = end ? (size_t)(end - p) : strlen(p);

		if (n > klen && strncmp(p, key, klen) == 0 && p[klen] == '=') {
			snprintf(out, len, "%.*s", (int)(n - klen - 1), p + klen + 1);
			return;
		}
		p = end ? end + 1 : NULL;
	}
}

/* What the policy says about a pod: whether it may start without the agent, and why. */
struct decision {
	bool start;
	char ns[256], name[256], why[192];
};

/* The rule while the agent is unreachable, in this order (README, "The CNI plugin"):
 *   1. no complete policy file (the agent never ran here, or the data is lost): fail;
 *   2. the namespace is excluded (kube-system): start;
 *   3. the pod is listed (the agent saw it: its sandbox is being recreated after a reboot, or it
 *      restarts; by namespace, name and, where the runtime passes K8S_POD_UID, uid): its own decision;
 *   4. otherwise (a pod the agent never saw; its labels are unknown here): start only in a
 *      namespace listed "none" (not labelled ambient, and no pod of it seen with the ambient pod
 *      label); fail in one labelled ambient, one where pods opt in by label, one the agent holds
 *      ("held": --unseen-pods=hold), or one not listed. */
static struct decision decide(const char *policy_file)
{
	struct decision d = { .start = false };
	char *ns = d.ns, *name = d.name, line[1024], ns_mode[256] = "", pod_mode[32] = "", uid[128];
	const char *args = getenv("CNI_ARGS");
	bool magic = false, complete = false;
	FILE *f;

	cni_arg(args, "K8S_POD_NAMESPACE", ns, sizeof(d.ns));
	cni_arg(args, "K8S_POD_NAME", name, sizeof(d.name));
	cni_arg(args, "K8S_POD_UID", uid, sizeof(uid));
	if (!ns[0])
		snprintf(ns, sizeof(d.ns), "default");
	f = fopen(policy_file, "re");
	if (!f) {
		snprintf(d.why, sizeof(d.why), "it may be ambient: no policy at %s (%s)", policy_file,
			 strerror(errno));
		return d;
	}
	while (fgets(line, sizeof(line), f)) {
		char kind[16], a[256], b[256], c[32], line_uid[128];
		int n;

		line[strcspn(line, "\n")] = '\0';
		if (line[0] == '#' || !line[0])
			continue;
		if (!magic) {
			if (strcmp(line, POLICY_MAGIC) != 0)
				break;
			magic = true;
			continue;
		}
		if (strcmp(line, POLICY_END) == 0) {
			complete = true;
			break;
		}
		n = sscanf(line, "%15s %255s %255s %31s %127s", kind, a, b, c, line_uid);
		if (n == 3 && strcmp(kind, "namespace") == 0 && strcmp(a, ns) == 0)
			snprintf(ns_mode, sizeof(ns_mode), "%s", b);
		/* A line for another pod of the same name (another uid: an earlier pod of that name) is
		 * not this pod's: it is judged as a pod the agent never saw. */
		else if (n >= 4 && strcmp(kind, "pod") == 0 && strcmp(a, ns) == 0 && strcmp(b, name) == 0 &&
			 (n == 4 || !uid[0] || strcmp(line_uid, uid) == 0))
			snprintf(pod_mode, sizeof(pod_mode), "%s", c);
	}
	fclose(f);
	if (!complete) {
		snprintf(d.why, sizeof(d.why), "it may be ambient: the policy at %s is incomplete",
			 policy_file);
		return d;
	}
	if (strcmp(ns_mode, "excluded") == 0) {
		d.start = true;
	} else if (pod_mode[0]) {
		d.start = strcmp(pod_mode, "ambient") != 0;
		snprintf(d.why, sizeof(d.why), "the policy says it is ambient");
	} else if (strcmp(ns_mode, "none") == 0) {
		d.start = true;
	} else {
		/* (a mode this build does not know fails too: the agent that wrote it knows better) */
		snprintf(d.why, sizeof(d.why), "%s",
			 !ns_mode[0] ? "it may be ambient: its namespace is not in the policy"
			 : strcmp(ns_mode, "ambient") == 0 ? "its namespace is ambient"
			 : strcmp(ns_mode, "held") == 0
				 ? "it may be ambient: the agent holds pods it has not seen "
				   "(--unseen-pods=hold)"
				 : "it may be ambient: pods of its namespace opt in by label");
	}
	return d;
}

static int agent_down(const char *command, const char *socket_path, const char *config, int err)
{
	const char *s, *e;
	char *policy_file;
	struct decision d;

	if (!strcmp(command, "DEL") || !strcmp(command, "GC") || !strcmp(command, "STATUS"))
		return 0; /* never block teardown or the node's network readiness */
	policy_file = json_string(config, "policy_file");
	d = decide(policy_file ? policy_file : DEFAULT_POLICY_FILE);
	if (!d.start)
		return cni_error(CNI_ERR_TRY_LATER,
				 "pod %s/%s: %s, and the ambient-bpf agent is not reachable at %s (%s): "
				 "check the ambient-bpf "
				 "DaemonSet pod on this node and its logs; the runtime retries",
				 d.ns, d.name, d.why, socket_path, strerror(err));
	if (!strcmp(command, "ADD")) {
		if (json_member(config, "prevResult", &s, &e))
			printf("%.*s\n", (int)(e - s), s);
		else
			printf("{\"cniVersion\":\"%s\"}\n", cni_version);
	}
	return 0;
}

static bool write_all(int fd, const char *p, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return false;
		p += n;
		len -= (size_t)n;
	}
	return true;
}

int main(void)
{
	const char *command = getenv("CNI_COMMAND");
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct timeval connect_tv = { .tv_sec = CONNECT_TIMEOUT_S };
	struct timeval tv = { .tv_sec = REPLY_TIMEOUT_S };
	struct buf in, reply;
	char *socket_path, *version, header[8192];
	size_t hlen;
	int fd, code, err = 0;
	char *nl;

	if (!command || !*command)
		return cni_error(4, "CNI_COMMAND is not set");
	if (!read_all(0, &in, MAX_STDIN))
		return cni_error(CNI_ERR_IO, "cannot read the network configuration from stdin");
	if ((version = json_string(in.data, "cniVersion")) && strlen(version) < sizeof(cni_version))
		snprintf(cni_version, sizeof(cni_version), "%s", version);
	if (!strcmp(command, "VERSION")) {
		printf("{\"cniVersion\":\"%s\",\"supportedVersions\":" SUPPORTED "}\n", cni_version);
		return 0;
	}
	if (skip_ws(in.data)[0] != '{')
		return cni_error(CNI_ERR_DECODE, "the network configuration on stdin is not a JSON object");
	socket_path = json_string(in.data, "agent_socket");
	if (!socket_path)
		socket_path = strdup(DEFAULT_AGENT_SOCKET);
	if (strlen(socket_path) >= sizeof(sa.sun_path))
		return cni_error(7, "agent_socket is too long: %s", socket_path);
	strcpy(sa.sun_path, socket_path);

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd >= 0)
		setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &connect_tv, sizeof(connect_tv));
	/* With a timeout set, a stop and continue (SIGSTOP, a cgroup freeze) ends connect() with EINTR
	 * instead of restarting it: ask again (the wait starts over, bounded by the signals sent). */
	while (fd >= 0 && (err = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ? errno : 0) == EINTR)
		;
	if (fd < 0 || err)
		return agent_down(command, socket_path, in.data,
				  fd < 0	  ? errno
				  : err == EAGAIN ? ETIMEDOUT
						  : err);
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	hlen = (size_t)snprintf(header, sizeof(header), "AMBIENT-BPF-CNI 1\n");
	for (size_t i = 0; i < sizeof(relayed_env) / sizeof(relayed_env[0]); i++) {
		const char *v = getenv(relayed_env[i]);

		if (v && !strchr(v, '\n') && hlen < sizeof(header))
			hlen += (size_t)snprintf(header + hlen, sizeof(header) - hlen, "%s=%s\n",
						 relayed_env[i], v);
	}
	if (hlen + 1 >= sizeof(header))
		return cni_error(4, "the CNI environment is too large");
	header[hlen++] = '\n';
	if (!write_all(fd, header, hlen) || !write_all(fd, in.data, in.len) || shutdown(fd, SHUT_WR) < 0 ||
	    !read_all(fd, &reply, MAX_STDIN))
		return agent_down(command, socket_path, in.data, errno ? errno : EPIPE);
	nl = memchr(reply.data, '\n', reply.len);
	if (!nl)
		return agent_down(command, socket_path, in.data, EPROTO);
	code = atoi(reply.data);
	fwrite(nl + 1, 1, reply.len - (size_t)(nl + 1 - reply.data), stdout);
	return code;
}
