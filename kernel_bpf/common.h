/* SPDX-License-Identifier: GPL-2.0 */
/*
 * common.h - everything the datapath stages and the agent share: constants,
 * verdict reasons, map value structs and the maps themselves.
 *
 * The agent (mirror/) reads the structs through BCC's table types and the
 * reason list by parsing LM_REASONS below, so this file is the one definition.
 * Addresses are IPv4 in network byte order; MACs are raw bytes.
 */
#ifndef LM_COMMON_H
#define LM_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>

/* Table sizes: defaults the loader may override with -D. */
#ifndef LM_MAX_ROUTES
#define LM_MAX_ROUTES 65536
#endif
#ifndef LM_MAX_NEIGHBORS
#define LM_MAX_NEIGHBORS 65536
#endif
#ifndef LM_MAX_LINKS
#define LM_MAX_LINKS 4096
#endif

/*
 * Verdict reasons: X(NAME, value, "what it means").  Slot 0 counts packets
 * the fast path forwarded; every other slot names why a packet was punted to
 * the kernel.  Values are stable: they are counter indexes and route actions.
 */
#define LM_REASONS(X)                                                              \
	X(FORWARDED, 0, "forwarded by the fast path")                              \
	X(AGENT_STALE, 1, "agent heartbeat expired or agent not ready")            \
	X(IFACE_UNMANAGED, 2, "ingress interface not managed by the agent")        \
	X(NOT_IP, 3, "not an IP packet (ARP, LLDP, ...)")                          \
	X(IPV6, 4, "IPv6 (not handled yet)")                                       \
	X(VLAN, 5, "802.1Q/802.1ad tagged frame (not handled yet)")                \
	X(L2_OTHERHOST, 6, "destination MAC is not the ingress interface's")       \
	X(L2_MULTICAST, 7, "broadcast or multicast destination MAC")               \
	X(IP_MALFORMED, 8, "bad IPv4 version, header length or total length")      \
	X(IP_CSUM, 9, "bad IPv4 header checksum")                                  \
	X(IP_OPTIONS, 10, "IPv4 header carries options")                           \
	X(IP_FRAGMENT, 11, "IPv4 fragment")                                        \
	X(IP_MULTICAST, 12, "multicast or broadcast destination address")          \
	X(MARTIAN, 13, "martian source or destination address")                    \
	X(NETFILTER, 14, "netfilter rules could affect forwarded traffic")         \
	X(POLICY_ROUTING, 15, "policy routing rules beyond the defaults")          \
	X(FORWARDING_OFF, 16, "IPv4 forwarding disabled on the ingress interface") \
	X(LOCAL, 17, "destined to this host (local table)")                        \
	X(NO_ROUTE, 18, "no route in the fast path table")                         \
	X(ROUTE_UNSUPPORTED, 19, "route type or attributes the fast path does not handle") \
	X(RP_FILTER, 20, "reverse path filter would need the kernel's decision")   \
	X(EGRESS_UNMANAGED, 21, "egress interface not managed or not up")          \
	X(HAIRPIN, 22, "egress equals ingress (kernel sends an ICMP redirect)")    \
	X(NO_NEIGHBOR, 23, "no resolved neighbour for the next hop")               \
	X(TTL_EXCEEDED, 24, "TTL <= 1 (kernel answers ICMP time exceeded)")        \
	X(MTU_EXCEEDED, 25, "packet larger than the egress MTU")                   \
	X(GSO_UNSUPPORTED, 26, "GSO packet the fast path cannot size-check")     \
	X(IPSEC, 27, "IPsec (xfrm) policies could apply to forwarded traffic")    \
	X(RESYNC, 28, "kernel events were lost: agent re-reading the kernel state")

#define LM_REASON_ENUM(name, value, text) LM_##name = value,
enum lm_reason { LM_REASONS(LM_REASON_ENUM) LM_REASON_MAX };

/* Route actions: LM_FORWARDED forwards, any other value is a punt reason. */
struct lm_route_key {
	__u32 prefixlen; /* LPM trie: prefix length in bits, then the data */
	__u32 addr;
};

struct lm_route {
	__u32 action;  /* LM_FORWARDED, or the enum lm_reason to punt with */
	__u32 oif;     /* egress ifindex */
	__u32 gateway; /* next hop; 0 = on-link, the destination itself */
	__u32 mtu;     /* effective path MTU: route metric or egress link MTU */
};

struct lm_neigh_key {
	__u32 ifindex;
	__u32 addr;
};

struct lm_neigh {
	__u8 mac[ETH_ALEN];
	__u16 pad;
	__u32 pad2;
	__u64 used;    /* jiffies; written by the datapath (at most once a
			  second) so the agent can ask the kernel to
			  re-confirm neighbours in use */
};

/* Link flags */
#define LM_LINK_UP (1 << 0)            /* oper up: may be used for egress */
#define LM_LINK_FORWARDING (1 << 1)    /* conf/<dev>/forwarding = 1 */
#define LM_LINK_REDIRECT_PEER (1 << 2) /* veth with peer in another netns,
					  nothing on the way to skip */
#define LM_LINK_RPF_STRICT (1 << 3)    /* effective rp_filter = 1 */
#define LM_LINK_RPF_LOOSE (1 << 4)     /* effective rp_filter = 2 */

struct lm_link {
	__u8 mac[ETH_ALEN];
	__u16 flags;
	__u32 mtu;
	__u8 peer_mac[ETH_ALEN]; /* LM_LINK_REDIRECT_PEER: the peer's own MAC */
	__u16 pad;
};

struct lm_config {
	__u32 punt_forward_reason; /* nonzero: punt every forwarded packet
				      with this reason */
	__u32 hz;                  /* jiffies per second, measured by the agent */
};

/*
 * The fail-safe.  The fast path works only while bpf_jiffies64() is below
 * `deadline`; the agent pushes it one second ahead every 250 ms by running
 * lm_heartbeat (BPF_PROG_TEST_RUN), so a dead or stuck agent turns the fast
 * path off within a second.  Jiffies, not ktime: reading the clock is then
 * a memory load instead of a ~50 ns clocksource read on every packet.
 */
struct lm_heartbeat {
	__u64 deadline; /* jiffies; 0 = fast path off */
	__u64 jiffies;  /* clock sample taken by the last beat, */
	__u64 ktime_ns; /* for the agent's jiffies <-> time conversion */
};

struct lm_counter {
	__u64 packets;
	__u64 bytes;
};

/* The maps. */
BPF_LPM_TRIE(routes, struct lm_route_key, struct lm_route, LM_MAX_ROUTES); /* main + local table, one LPM */
/*
 * The hash maps are not preallocated: a preallocated element that the agent
 * replaces goes straight back to the free list and may be reused for another
 * key while a packet still holds a pointer to it (a wrong MAC).  Without
 * preallocation replaced elements are freed after an RCU grace period.
 */
BPF_F_TABLE("hash", struct lm_neigh_key, struct lm_neigh, neighbors, LM_MAX_NEIGHBORS,
	    BPF_F_NO_PREALLOC);                            /* (ifindex, ip) -> MAC */
BPF_F_TABLE("hash", __u32, struct lm_link, links, LM_MAX_LINKS, BPF_F_NO_PREALLOC); /* ifindex -> link */
BPF_ARRAY(config, struct lm_config, 1);                /* slot 0: global switches */
BPF_ARRAY(heartbeat, struct lm_heartbeat, 1);          /* slot 0: written by lm_heartbeat only */
BPF_PERCPU_ARRAY(counters, struct lm_counter, LM_REASON_MAX); /* per reason */

#endif /* LM_COMMON_H */
