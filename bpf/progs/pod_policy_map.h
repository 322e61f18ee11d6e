/* Maps shared by the pod-side and node-side programs (the progs/ sources are linked into
 * one object; each is defined in pod_redirect.bpf.c and declared extern elsewhere). */
#ifndef AMBIENT_POD_POLICY_MAP_H
#define AMBIENT_POD_POLICY_MAP_H

#include "ambient_shared.h"

#define POD_POLICY_MAP                                \
	struct {                                      \
		__uint(type, BPF_MAP_TYPE_HASH);      \
		__uint(max_entries, MAX_PODS * 2);    \
		__uint(map_flags, BPF_F_NO_PREALLOC); \
		__type(key, struct pod_ip);           \
		__type(value, struct pod_policy);     \
	}

/* The interfaces with hooks, per pod (by slot): read by the pod netns's sk_lookup program. */
#define CAPTURED_IFACES_MAP                               \
	struct {                                          \
		__uint(type, BPF_MAP_TYPE_HASH);          \
		__uint(max_entries, MAX_CAPTURED_IFACES); \
		__uint(map_flags, BPF_F_NO_PREALLOC);     \
		__type(key, struct captured_key);         \
		__type(value, __u64);                     \
	}

/* The pod netns whose captured_ifaces entries are written, by netns cookie, to the pod's slot. */
#define GATED_NETNS_MAP                               \
	struct {                                      \
		__uint(type, BPF_MAP_TYPE_HASH);      \
		__uint(max_entries, MAX_PODS);        \
		__uint(map_flags, BPF_F_NO_PREALLOC); \
		__type(key, __u64);                   \
		__type(value, __u32);                 \
	}

/* Per-pod counters, by the slot in pod_policy. */
#define POD_COUNTERS_MAP                                 \
	struct {                                         \
		__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); \
		__uint(max_entries, MAX_PODS);           \
		__type(key, __u32);                      \
		__type(value, struct pod_counters);      \
	}

/* Decisions of the tc programs for SYNs, taken over by the sk_lookup program (sk_lookup steering). */
#define STEER_MAP                                      \
	struct {                                       \
		__uint(type, BPF_MAP_TYPE_LRU_HASH);   \
		__uint(max_entries, MAX_STEERED_SYNS); \
		__type(key, struct steer_key);         \
		__type(value, struct listener_key);    \
	}

/* ztunnel's 15001/15006 listeners, by pod netns cookie and port (learnt by ztunnel_sockops). */
#define ZTUNNEL_LISTENERS_MAP                        \
	struct {                                     \
		__uint(type, BPF_MAP_TYPE_SOCKHASH); \
		__uint(max_entries, MAX_PODS * 2);   \
		__type(key, struct listener_key);    \
		__type(value, __u64);                \
	}

#endif
