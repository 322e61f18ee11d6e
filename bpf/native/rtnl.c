#define _GNU_SOURCE
#include "rtnl.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <net/if.h>
#include <sys/socket.h>
#include <linux/fib_rules.h>
#include <linux/if_arp.h>
#include <linux/if_addr.h>
#include <linux/if_link.h>
#include <linux/ip.h>
#include <linux/netlink.h>
#include <linux/pkt_sched.h>
#include <linux/rtnetlink.h>

#define MSG_BUF 4096
#define RECV_BUF 32768

struct msg {
	struct nlmsghdr hdr;
	char body[MSG_BUF - sizeof(struct nlmsghdr)];
};

int rtnl_open(struct rtnl *nl)
{
	struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
	int one = 1;

	nl->fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	if (nl->fd < 0)
		return -errno;
	nl->seq = 0;
	/* Extended acks make kernel errors explicit; strict checking makes dumps honour filters. */
	setsockopt(nl->fd, SOL_NETLINK, NETLINK_EXT_ACK, &one, sizeof(one));
	setsockopt(nl->fd, SOL_NETLINK, NETLINK_GET_STRICT_CHK, &one, sizeof(one));
	if (bind(nl->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int err = -errno;

		close(nl->fd);
		nl->fd = -1;
		return err;
	}
	return 0;
}

void rtnl_close(struct rtnl *nl)
{
	if (nl->fd >= 0)
		close(nl->fd);
	nl->fd = -1;
}

static void *msg_init(struct msg *m, uint16_t type, uint16_t flags, size_t family_len)
{
	memset(m, 0, sizeof(*m));
	m->hdr.nlmsg_type = type;
	m->hdr.nlmsg_flags = NLM_F_REQUEST | flags;
	m->hdr.nlmsg_len = NLMSG_LENGTH(family_len);
	return NLMSG_DATA(&m->hdr);
}

static struct rtattr *attr_put(struct msg *m, uint16_t type, const void *data, size_t len)
{
	struct rtattr *rta = (struct rtattr *)((char *)&m->hdr + NLMSG_ALIGN(m->hdr.nlmsg_len));

	rta->rta_type = type;
	rta->rta_len = RTA_LENGTH(len);
	if (len)
		memcpy(RTA_DATA(rta), data, len);
	m->hdr.nlmsg_len = NLMSG_ALIGN(m->hdr.nlmsg_len) + RTA_ALIGN(rta->rta_len);
	return rta;
}

static void attr_put_u32(struct msg *m, uint16_t type, uint32_t v)
{
	attr_put(m, type, &v, sizeof(v));
}

static struct rtattr *nest_start(struct msg *m, uint16_t type)
{
	return attr_put(m, type, NULL, 0);
}

static void nest_end(struct msg *m, struct rtattr *nest)
{
	nest->rta_len = (unsigned short)((char *)&m->hdr + m->hdr.nlmsg_len - (char *)nest);
}

typedef int (*dump_cb)(struct nlmsghdr *h, void *ctx);

/* Sends one request and reads until its ACK (or, for dumps, NLMSG_DONE), passing every data
 * message to cb. */
static int transact(struct rtnl *nl, struct msg *m, dump_cb cb, void *ctx)
{
	static __thread char buf[RECV_BUF];
	/* NLM_F_DUMP is two bits; NLM_F_EXCL of a create reuses one of them. */
	bool dump = (m->hdr.nlmsg_flags & NLM_F_DUMP) == NLM_F_DUMP;
	int cb_err = 0;

	m->hdr.nlmsg_seq = ++nl->seq;
	if (!dump)
		m->hdr.nlmsg_flags |= NLM_F_ACK;
	if (send(nl->fd, m, m->hdr.nlmsg_len, 0) < 0)
		return -errno;
	for (;;) {
		ssize_t n = recv(nl->fd, buf, sizeof(buf), 0);
		struct nlmsghdr *h;

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		for (h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_seq != nl->seq)
				continue;
			if (h->nlmsg_type == NLMSG_ERROR) {
				struct nlmsgerr *e = NLMSG_DATA(h);

				return e->error ? e->error : cb_err;
			}
			if (h->nlmsg_type == NLMSG_DONE)
				return cb_err;
			if (cb && !cb_err)
				cb_err = cb(h, ctx);
		}
	}
}

static struct rtattr *find_attr(struct rtattr *rta, int len, uint16_t type)
{
	for (; RTA_OK(rta, len); rta = RTA_NEXT(rta, len))
		if ((rta->rta_type & NLA_TYPE_MASK) == type)
			return rta;
	return NULL;
}

/* ---- addresses ---- */

struct list_addr_ctx {
	rtnl_addr_fn fn;
	void *arg;
};

static int list_addr_cb(struct nlmsghdr *h, void *p)
{
	struct list_addr_ctx *ctx = p;
	struct ifaddrmsg *ifa = NLMSG_DATA(h);
	int len = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof(*ifa)));
	uint8_t addr[16] = { 0 };
	struct rtattr *a;

	if (h->nlmsg_type != RTM_NEWADDR || (ifa->ifa_family != AF_INET && ifa->ifa_family != AF_INET6))
		return 0;
	a = find_attr(IFA_RTA(ifa), len, IFA_LOCAL);
	if (!a)
		a = find_attr(IFA_RTA(ifa), len, IFA_ADDRESS);
	if (!a)
		return 0;
	if (ifa->ifa_family == AF_INET) {
		addr[10] = addr[11] = 0xff;
		memcpy(addr + 12, RTA_DATA(a), 4);
	} else {
		memcpy(addr, RTA_DATA(a), 16);
	}
	ctx->fn(addr, (int)ifa->ifa_index, ctx->arg);
	return 0;
}

int rtnl_list_addresses(struct rtnl *nl, rtnl_addr_fn fn, void *arg)
{
	struct msg m;
	struct ifaddrmsg *ifa = msg_init(&m, RTM_GETADDR, NLM_F_DUMP, sizeof(*ifa));
	struct list_addr_ctx ctx = { fn, arg };

	ifa->ifa_family = AF_UNSPEC;
	return transact(nl, &m, list_addr_cb, &ctx);
}

struct find_addr_ctx {
	const uint8_t *addr;
	int ifindex;
};

static void find_addr_fn(const uint8_t addr[16], int ifindex, void *p)
{
	struct find_addr_ctx *ctx = p;

	if (memcmp(addr, ctx->addr, 16) == 0)
		ctx->ifindex = ifindex;
}

int rtnl_find_address(struct rtnl *nl, const uint8_t addr[16], int *ifindex)
{
	struct find_addr_ctx ctx = { addr, 0 };
	int err = rtnl_list_addresses(nl, find_addr_fn, &ctx);

	if (err)
		return err;
	if (!ctx.ifindex)
		return -ENOENT;
	*ifindex = ctx.ifindex;
	return 0;
}

/* ---- fwmark rules ---- */

static void rule_msg(struct msg *m, uint16_t type, uint16_t flags, const struct fwmark_rule *r)
{
	struct fib_rule_hdr *frh = msg_init(m, type, flags, sizeof(*frh));

	frh->family = (uint8_t)r->family;
	frh->action = FR_ACT_TO_TBL;
	frh->table = r->table < 256 ? (uint8_t)r->table : RT_TABLE_UNSPEC;
	attr_put_u32(m, FRA_TABLE, r->table);
	attr_put_u32(m, FRA_PRIORITY, r->priority);
	attr_put_u32(m, FRA_FWMARK, r->mark);
	attr_put_u32(m, FRA_FWMASK, r->mask);
}

int rtnl_rule_add(struct rtnl *nl, const struct fwmark_rule *r)
{
	struct msg m;

	rule_msg(&m, RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, r);
	return transact(nl, &m, NULL, NULL);
}

int rtnl_rule_del(struct rtnl *nl, const struct fwmark_rule *r)
{
	struct msg m;

	rule_msg(&m, RTM_DELRULE, 0, r);
	return transact(nl, &m, NULL, NULL);
}

struct rule_match_ctx {
	const struct fwmark_rule *want;
	bool found;
};

static uint32_t attr_u32(struct rtattr *base, int len, uint16_t type, uint32_t dflt)
{
	struct rtattr *a = find_attr(base, len, type);

	return a ? *(uint32_t *)RTA_DATA(a) : dflt;
}

static int rule_match_cb(struct nlmsghdr *h, void *p)
{
	struct rule_match_ctx *ctx = p;
	struct fib_rule_hdr *frh = NLMSG_DATA(h);
	struct rtattr *base = (struct rtattr *)((char *)frh + NLMSG_ALIGN(sizeof(*frh)));
	int len = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof(*frh)));

	if (h->nlmsg_type != RTM_NEWRULE || frh->family != ctx->want->family)
		return 0;
	if (attr_u32(base, len, FRA_TABLE, frh->table) == ctx->want->table &&
	    attr_u32(base, len, FRA_PRIORITY, 0) == ctx->want->priority &&
	    attr_u32(base, len, FRA_FWMARK, 0) == ctx->want->mark &&
	    attr_u32(base, len, FRA_FWMASK, 0) == ctx->want->mask)
		ctx->found = true;
	return 0;
}

int rtnl_rule_exists(struct rtnl *nl, const struct fwmark_rule *r, bool *exists)
{
	struct msg m;
	struct fib_rule_hdr *frh = msg_init(&m, RTM_GETRULE, NLM_F_DUMP, sizeof(*frh));
	struct rule_match_ctx ctx = { .want = r };
	int err;

	frh->family = (uint8_t)r->family;
	err = transact(nl, &m, rule_match_cb, &ctx);
	*exists = ctx.found;
	return err;
}

/* ---- the local default route of the redirect table ---- */

static void route_msg(struct msg *m, uint16_t type, uint16_t flags, int family, uint32_t table)
{
	struct rtmsg *rtm = msg_init(m, type, flags, sizeof(*rtm));

	rtm->rtm_family = (uint8_t)family;
	rtm->rtm_dst_len = 0;
	rtm->rtm_table = table < 256 ? (uint8_t)table : RT_TABLE_UNSPEC;
	rtm->rtm_protocol = RTPROT_BOOT;
	rtm->rtm_scope = RT_SCOPE_HOST;
	rtm->rtm_type = RTN_LOCAL;
	attr_put_u32(m, RTA_TABLE, table);
	attr_put_u32(m, RTA_OIF, if_nametoindex("lo"));
}

static size_t family_addr_len(int family)
{
	return family == AF_INET ? 4 : 16;
}

int rtnl_local_default_route_set(struct rtnl *nl, int family, uint32_t table, const struct local_route *want)
{
	struct msg m;
	struct rtattr *metrics;

	route_msg(&m, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, family, table);
	attr_put(&m, RTA_PREFSRC, want->prefsrc, family_addr_len(family));
	metrics = nest_start(&m, RTA_METRICS);
	attr_put_u32(&m, RTAX_MTU, want->mtu);
	nest_end(&m, metrics);
	return transact(nl, &m, NULL, NULL);
}

int rtnl_local_default_route_del(struct rtnl *nl, int family, uint32_t table)
{
	struct msg m;

	route_msg(&m, RTM_DELROUTE, 0, family, table);
	return transact(nl, &m, NULL, NULL);
}

struct route_match_ctx {
	uint32_t table;
	size_t addr_len;
	bool found;
	struct local_route have;
};

static int route_match_cb(struct nlmsghdr *h, void *p)
{
	struct route_match_ctx *ctx = p;
	struct rtmsg *rtm = NLMSG_DATA(h);
	int len = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof(*rtm)));
	struct rtattr *src, *metrics;

	if (h->nlmsg_type != RTM_NEWROUTE)
		return 0;
	if (rtm->rtm_type == RTN_LOCAL && rtm->rtm_dst_len == 0 &&
	    attr_u32(RTM_RTA(rtm), len, RTA_TABLE, rtm->rtm_table) == ctx->table) {
		ctx->found = true;
		src = find_attr(RTM_RTA(rtm), len, RTA_PREFSRC);
		if (src && RTA_PAYLOAD(src) == ctx->addr_len)
			memcpy(ctx->have.prefsrc, RTA_DATA(src), ctx->addr_len);
		metrics = find_attr(RTM_RTA(rtm), len, RTA_METRICS);
		if (metrics)
			ctx->have.mtu = attr_u32(RTA_DATA(metrics), (int)RTA_PAYLOAD(metrics), RTAX_MTU, 0);
	}
	return 0;
}

int rtnl_local_default_route_get(struct rtnl *nl, int family, uint32_t table, bool *exists,
				 struct local_route *have)
{
	struct msg m;
	struct rtmsg *rtm = msg_init(&m, RTM_GETROUTE, NLM_F_DUMP, sizeof(*rtm));
	struct route_match_ctx ctx = { .table = table, .addr_len = family_addr_len(family) };
	int err;

	rtm->rtm_family = (uint8_t)family;
	rtm->rtm_table = table < 256 ? (uint8_t)table : RT_TABLE_UNSPEC;
	attr_put_u32(&m, RTA_TABLE, table);
	err = transact(nl, &m, route_match_cb, &ctx);
	*exists = ctx.found;
	*have = ctx.have;
	return err;
}

/* ---- devconf: accept_local ---- */

struct devconf_ctx {
	uint32_t value;
	bool found;
};

static int devconf_cb(struct nlmsghdr *h, void *p)
{
	struct devconf_ctx *ctx = p;
	struct ifinfomsg *ifi = NLMSG_DATA(h);
	int len = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof(*ifi)));
	struct rtattr *spec, *inet, *conf;

	if (h->nlmsg_type != RTM_NEWLINK)
		return 0;
	spec = find_attr(IFLA_RTA(ifi), len, IFLA_AF_SPEC);
	if (!spec)
		return 0;
	inet = find_attr(RTA_DATA(spec), (int)RTA_PAYLOAD(spec), AF_INET);
	if (!inet)
		return 0;
	conf = find_attr(RTA_DATA(inet), (int)RTA_PAYLOAD(inet), IFLA_INET_CONF);
	if (!conf || RTA_PAYLOAD(conf) < IPV4_DEVCONF_ACCEPT_LOCAL * sizeof(uint32_t))
		return 0;
	ctx->value = ((uint32_t *)RTA_DATA(conf))[IPV4_DEVCONF_ACCEPT_LOCAL - 1];
	ctx->found = true;
	return 0;
}

int rtnl_get_accept_local(struct rtnl *nl, int ifindex, uint32_t *value)
{
	struct msg m;
	struct ifinfomsg *ifi = msg_init(&m, RTM_GETLINK, 0, sizeof(*ifi));
	struct devconf_ctx ctx = { 0 };
	int err;

	ifi->ifi_family = AF_UNSPEC;
	ifi->ifi_index = ifindex;
	err = transact(nl, &m, devconf_cb, &ctx);
	if (err)
		return err;
	if (!ctx.found)
		return -EOPNOTSUPP;
	*value = ctx.value;
	return 0;
}

int rtnl_set_accept_local(struct rtnl *nl, int ifindex, uint32_t value)
{
	struct msg m;
	struct ifinfomsg *ifi = msg_init(&m, RTM_SETLINK, 0, sizeof(*ifi));
	struct rtattr *spec, *inet, *conf;

	ifi->ifi_family = AF_UNSPEC;
	ifi->ifi_index = ifindex;
	spec = nest_start(&m, IFLA_AF_SPEC);
	inet = nest_start(&m, AF_INET);
	conf = nest_start(&m, IFLA_INET_CONF);
	attr_put_u32(&m, IPV4_DEVCONF_ACCEPT_LOCAL, value);
	nest_end(&m, conf);
	nest_end(&m, inet);
	nest_end(&m, spec);
	return transact(nl, &m, NULL, NULL);
}

/* ---- links and tc filters ---- */

int rtnl_link_exists(struct rtnl *nl, int ifindex, bool *exists)
{
	struct msg m;
	struct ifinfomsg *ifi = msg_init(&m, RTM_GETLINK, 0, sizeof(*ifi));
	int err;

	ifi->ifi_index = ifindex;
	err = transact(nl, &m, NULL, NULL);
	*exists = err == 0;
	return err == -ENODEV ? 0 : err;
}

struct link_info {
	int type;
	uint32_t mtu;
};

static int link_info_cb(struct nlmsghdr *h, void *p)
{
	struct link_info *info = p;
	struct ifinfomsg *ifi = NLMSG_DATA(h);
	struct rtattr *mtu;

	if (h->nlmsg_type != RTM_NEWLINK || h->nlmsg_len < NLMSG_LENGTH(sizeof(*ifi)))
		return 0;
	info->type = ifi->ifi_type;
	mtu = find_attr(IFLA_RTA(ifi), (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof(*ifi))), IFLA_MTU);
	if (mtu)
		info->mtu = *(uint32_t *)RTA_DATA(mtu);
	return 0;
}

static int link_info(struct rtnl *nl, int ifindex, struct link_info *info)
{
	struct msg m;
	struct ifinfomsg *ifi = msg_init(&m, RTM_GETLINK, 0, sizeof(*ifi));
	int err;

	info->type = -1;
	info->mtu = 0;
	ifi->ifi_index = ifindex;
	if ((err = transact(nl, &m, link_info_cb, info)))
		return err;
	return info->type < 0 ? -ENODEV : 0;
}

int rtnl_link_type(struct rtnl *nl, int ifindex, unsigned short *type)
{
	struct link_info info;
	int err = link_info(nl, ifindex, &info);

	if (!err)
		*type = (unsigned short)info.type;
	return err;
}

int rtnl_link_layer(struct rtnl *nl, int ifindex, enum link_layer *layer)
{
	unsigned short type = 0;
	int err = rtnl_link_type(nl, ifindex, &type);

	*layer = type == ARPHRD_ETHER || type == ARPHRD_LOOPBACK ? LINK_ETHERNET : LINK_NONE;
	return err;
}

int rtnl_link_mtu(struct rtnl *nl, int ifindex, uint32_t *mtu)
{
	struct link_info info;
	int err = link_info(nl, ifindex, &info);

	if (!err)
		*mtu = info.mtu;
	return err;
}

static int count_cb(struct nlmsghdr *h, void *p)
{
	if (h->nlmsg_type == RTM_NEWTFILTER)
		(*(int *)p)++;
	return 0;
}

int rtnl_count_filters(struct rtnl *nl, int ifindex, uint32_t parent, int *count)
{
	struct msg m;
	struct tcmsg *tcm = msg_init(&m, RTM_GETTFILTER, NLM_F_DUMP, sizeof(*tcm));

	tcm->tcm_family = AF_UNSPEC;
	tcm->tcm_ifindex = ifindex;
	tcm->tcm_parent = parent;
	*count = 0;
	return transact(nl, &m, count_cb, count);
}

struct link_peer_ctx {
	int peer;
	bool veth;
};

static int link_peer_cb(struct nlmsghdr *h, void *p)
{
	struct link_peer_ctx *ctx = p;
	struct ifinfomsg *ifi = NLMSG_DATA(h);
	int len = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof(*ifi)));
	struct rtattr *link, *info, *kind;

	if (h->nlmsg_type != RTM_NEWLINK)
		return 0;
	link = find_attr(IFLA_RTA(ifi), len, IFLA_LINK);
	if (link && RTA_PAYLOAD(link) >= sizeof(uint32_t))
		ctx->peer = (int)*(uint32_t *)RTA_DATA(link);
	info = find_attr(IFLA_RTA(ifi), len, IFLA_LINKINFO);
	kind = info ? find_attr(RTA_DATA(info), (int)RTA_PAYLOAD(info), IFLA_INFO_KIND) : NULL;
	ctx->veth = kind && RTA_PAYLOAD(kind) >= 4 && !strncmp(RTA_DATA(kind), "veth", RTA_PAYLOAD(kind));
	return 0;
}

int rtnl_veth_peer(struct rtnl *nl, int ifindex, int *peer_ifindex)
{
	struct link_peer_ctx ctx = { 0 };
	struct msg m;
	struct ifinfomsg *ifi = msg_init(&m, RTM_GETLINK, 0, sizeof(*ifi));
	int err;

	ifi->ifi_index = ifindex;
	if ((err = transact(nl, &m, link_peer_cb, &ctx)))
		return err;
	if (!ctx.veth || ctx.peer <= 0)
		return -ENOTSUP;
	*peer_ifindex = ctx.peer;
	return 0;
}
