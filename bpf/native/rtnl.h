/* Minimal rtnetlink client: just what the datapath configures in a pod netns. Every function acts
 * on the network namespace of the calling thread (the socket is opened there). Functions return 0
 * or a negative errno. */
#ifndef AMBIENT_RTNL_H
#define AMBIENT_RTNL_H

#include <stdbool.h>
#include <stdint.h>

struct rtnl {
	int fd;
	uint32_t seq;
};

int rtnl_open(struct rtnl *nl);
void rtnl_close(struct rtnl *nl);

/* Calls fn for every IPv4/IPv6 address (16 bytes; IPv4 as ::ffff:a.b.c.d) and its interface. */
typedef void (*rtnl_addr_fn)(const uint8_t addr[16], int ifindex, void *arg);
int rtnl_list_addresses(struct rtnl *nl, rtnl_addr_fn fn, void *arg);

/* The interface carrying `addr` (16 bytes; IPv4 as ::ffff:a.b.c.d), or -ENOENT. */
int rtnl_find_address(struct rtnl *nl, const uint8_t addr[16], int *ifindex);

/* "fwmark MARK/MASK lookup TABLE pref PRIO" for AF_INET or AF_INET6. */
struct fwmark_rule {
	int family;
	uint32_t mark, mask, table, priority;
};
int rtnl_rule_add(struct rtnl *nl, const struct fwmark_rule *r); /* -EEXIST if already there */
int rtnl_rule_del(struct rtnl *nl, const struct fwmark_rule *r);
int rtnl_rule_exists(struct rtnl *nl, const struct fwmark_rule *r, bool *exists);

/* "local 0.0.0.0/0 dev lo table TABLE src PREFSRC mtu MTU" (or ::/0), made or replaced. What a
 * socket routed there (outbound_route.bpf.c) gets: the source it connects from (without one the
 * kernel would pick the destination itself) and the MTU its segments are cut to (the pod
 * interface's, as with upstream's REDIRECT: a 64 KiB loopback MSS measured slower in bulk). */
struct local_route {
	uint8_t prefsrc[16]; /* 4 bytes for IPv4, the rest zero */
	uint32_t mtu;
};
int rtnl_local_default_route_set(struct rtnl *nl, int family, uint32_t table, const struct local_route *want);
int rtnl_local_default_route_del(struct rtnl *nl, int family, uint32_t table);
/* Is it there, and its source and MTU (zeros if none). */
int rtnl_local_default_route_get(struct rtnl *nl, int family, uint32_t table, bool *exists,
				 struct local_route *have);

/* net.ipv4.conf.<dev>.accept_local, through IFLA_AF_SPEC/IFLA_INET_CONF. */
int rtnl_get_accept_local(struct rtnl *nl, int ifindex, uint32_t *value);
int rtnl_set_accept_local(struct rtnl *nl, int ifindex, uint32_t value);

/* Number of tc filters under a clsact parent (ingress or egress) of a device. */
int rtnl_count_filters(struct rtnl *nl, int ifindex, uint32_t parent, int *count);

/* Does a device with this index exist (in this netns)? */
int rtnl_link_exists(struct rtnl *nl, int ifindex, bool *exists);

/* A device's type (ARPHRD_*: ifi_type of its RTM_NEWLINK), or -ENODEV. */
int rtnl_link_type(struct rtnl *nl, int ifindex, unsigned short *type);

/* What a device carries before the IP header, which picks the programs hooked on it: Ethernet (and
 * loopback, whose header is a zeroed Ethernet one), or nothing: tc sees the packets of tun and
 * wireguard devices (ARPHRD_NONE), ipip, sit, ip6tnl, gre, ppp from the IP header on. */
enum link_layer { LINK_ETHERNET = 0, LINK_NONE = 1 };
int rtnl_link_layer(struct rtnl *nl, int ifindex, enum link_layer *layer);
int rtnl_link_mtu(struct rtnl *nl, int ifindex, uint32_t *mtu);

/* The peer's ifindex of a veth device (in the peer's netns), or -ENOTSUP if it is no veth. */
int rtnl_veth_peer(struct rtnl *nl, int ifindex, int *peer_ifindex);

#endif
