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
#ifndef LM_MAX_FLOWS
#define LM_MAX_FLOWS 262144
#endif
#ifndef LM_MAX_FDB
#define LM_MAX_FDB 65536
#endif
#ifndef LM_MAX_IFACE_SLOTS
#define LM_MAX_IFACE_SLOTS 256 /* per-interface counter slots, 0 included */
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
	X(IPSEC, 27, "IPsec (xfrm) policies could apply to forwarded traffic")  \
	X(CT_PROTO, 28, "stateful mode: not TCP/UDP, or L4 header incomplete")    \
	X(SKB_MARK, 29, "stateful mode: packet already carries an skb mark")      \
	X(CT_TCP_FLAGS, 30, "TCP SYN, FIN, RST or no ACK: the kernel tracks it")  \
	X(CT_MISS, 31, "no confirmed kernel conntrack entry for the tuple")       \
	X(CT_STATUS, 32, "conntrack status the fast path cannot honour (dying, seqadj, ...)") \
	X(CT_EXTENSION, 33, "conntrack entry has a helper, timeout policy, seqadj or synproxy") \
	X(CT_NOT_ESTABLISHED, 34, "TCP not ESTABLISHED+ASSURED; UDP packet that sets SEEN_REPLY or ASSURED") \
	X(CT_NOT_LIBERAL, 35, "TCP entry not yet taken over (no BE_LIBERAL): agent asked") \
	X(CT_ACCT, 36, "conntrack accounting or timestamps on: the kernel counts")  \
	X(FLOW_PENDING, 37, "no current flow verdict for this flow: agent asked")  \
	X(NF_DROP, 38, "dropped: the mirrored ruleset drops this flow")          \
	X(NAT_FAILED, 39, "dropped: NAT rewrite failed (header not writable)")   \
	X(CT_TCP_RETRANS, 40, "TCP segment may reach the retransmission limit: the kernel tracks it")  \
	X(BR_BLOCKED, 41, "bridge port not forwarding (STP state, bridge down)") \
	X(BR_LINK_LOCAL, 42, "link-local group 01:80:c2:00:00:0X (STP, LACP, LLDP, 802.1X)") \
	X(BR_UNKNOWN_UNICAST, 43, "destination MAC not in the bridge FDB (the bridge floods)") \
	X(BR_LEARN, 44, "source MAC not learned on the ingress port (the bridge learns it)") \
	X(BR_HAIRPIN, 45, "the bridge would send the frame back out of its ingress port") \
	X(BR_ISOLATED, 46, "both bridge ports isolated (the bridge drops it)") \
	X(BR_LOCAL, 47, "destination is a local FDB entry other than the bridge's own MAC") \
	X(BR_UNSUPPORTED, 48, "bridge or port setting not modelled (vlan_filtering, locked, MAB, tc on the bridge)") \
	X(PEER_MAC, 49, "next hop's MAC is not the veth peer's (redirect_peer would mark it PACKET_HOST)") \
	X(NETFILTER_CHANGING, 50, "a netfilter change is under way: punt until it is re-read") \
	X(RESYNC, 51, "kernel events were lost: agent re-reading the kernel state") \
	X(ROUTE_OVERFLOW, 52, "a more specific route did not fit in the route map: the kernel decides") \
	X(MULTIPATH_HASH, 53, "multipath route: the kernel's hash for this packet is not reproducible (socket hash, ICMP, protocol, hash policy)") \
	X(FIB_NOT_FORWARDED, 54, "kernel FIB lookup: not a unicast forward (local, blackhole, unreachable, prohibit, no route)") \
	X(FIB_UNSUPPORTED, 55, "kernel FIB lookup: a result the fast path does not handle (lwtunnel, IPv6 next hop, MTU, forwarding off)") \
	X(NEXTHOP_UNSUPPORTED, 56, "route uses a nexthop object the fast path does not handle (blackhole, fdb, encap, unknown id)") \
	X(BR_CT_NAT, 57, "bridged flow with NAT in its conntrack entry (br_netfilter would re-route or rewrite it)")

/*
 * The reasons that are drops, not punts: the packet is dropped
 * (TC_ACT_SHOT) because the kernel would drop it too.  Everything else in
 * LM_REASONS except FORWARDED hands the packet to the kernel.
 */
#define LM_DROP_REASONS(X) X(NF_DROP) X(NAT_FAILED)

#define LM_REASON_ENUM(name, value, text) LM_##name = value,
enum lm_reason { LM_REASONS(LM_REASON_ENUM) LM_REASON_MAX };

/* Route actions: LM_FORWARDED forwards, LM_ROUTE_KERNEL asks the kernel's
 * FIB (multipath routes, nexthop groups: fib.h), any other value is a punt
 * reason. */
#define LM_ROUTE_KERNEL 0x100
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
#define LM_LINK_BRIDGE (1 << 5)        /* a bridge: routes out of it pick the port by FDB */
#define LM_LINK_SRC_VMARK (1 << 6)     /* src_valid_mark: the source check routes by the mark */

struct lm_link {
	__u8 mac[ETH_ALEN];
	__u16 flags;
	__u32 mtu;
	__u8 peer_mac[ETH_ALEN]; /* LM_LINK_REDIRECT_PEER: the peer's own MAC */
	__u16 slot;              /* counters slot the agent gave the link (1..
				    LM_MAX_IFACE_SLOTS-1); 0: none */
};

/* lm_config.nf_mode */
#define LM_NF_OFF 0      /* nothing on the forward path: no conntrack stage */
#define LM_NF_STATEFUL 1 /* forwarded TCP/UDP needs a kernel ct entry + flow verdict */

/* lm_config.ct_flags: conntrack features whose per-packet work only the
 * kernel does; flows punt (CT_ACCT) while they are on.  (Not LM_CT_ACCT:
 * that is the reason's enum name.) */
#define LM_CT_FLAG_ACCT (1 << 0)   /* net.netfilter.nf_conntrack_acct = 1 */
#define LM_CT_FLAG_TSTAMP (1 << 1) /* net.netfilter.nf_conntrack_timestamp = 1 */

/*
 * Bridges.  A port's entry says what the bridge does with frames arriving
 * on it; each `*_punt` is 0 or the reason the agent wants such frames to
 * punt with (bridge down, settings not modelled, br_netfilter ...).
 */
#define LM_PORT_FORWARDING (1 << 0) /* STP state forwarding */
#define LM_PORT_LEARNING (1 << 1)   /* the bridge learns source MACs here */
#define LM_PORT_ISOLATED (1 << 2)   /* isolated: no forwarding to other isolated ports */
#define LM_PORT_NF_IPV4 (1 << 3)    /* br_netfilter sees bridged IPv4 here (bridge-nf-call-iptables
				       or the bridge's nf_call_iptables): validated as it does,
				       and in LM_NF_STATEFUL continued through conntrack and
				       a flow verdict like routed IPv4 */

struct lm_port {
	__u32 bridge;     /* ifindex of the bridge this port belongs to */
	__u8 flags;       /* LM_PORT_* */
	__u8 punt;        /* every frame arriving on the port */
	__u8 ipv4_punt;   /* bridged IPv4 (br_netfilter -> iptables the
			     agent cannot evaluate) */
	__u8 up_punt;     /* frames for the bridge device itself (routed) */
	/* A veth port's peer MAC is its lm_link's peer_mac (one source). */
};

struct lm_fdb_key {
	__u32 bridge;     /* bridge ifindex */
	__u8 mac[ETH_ALEN];
	__u16 pad;        /* 0 (VLAN 0: no vlan_filtering) */
};

#define LM_FDB_LOCAL (1 << 0) /* the bridge's own address: delivered up the stack */

struct lm_fdb {
	__u32 port;     /* egress port ifindex */
	__u32 flags;    /* LM_FDB_* */
	__u64 used;     /* jiffies: a frame from this MAC was fast-pathed (at
			   most every 1/4 s) so the agent refreshes the
			   kernel's entry as the bridge's learning would */
};

struct lm_config {
	__u32 punt_forward_reason; /* nonzero: punt every forwarded packet
				      with this reason */
	__u32 hz;                  /* jiffies per second, measured by the agent */
	__u32 nf_mode;             /* LM_NF_OFF / LM_NF_STATEFUL */
	__u32 nf_gen;              /* ruleset generation; bumped on every change */
	__u32 ct_flags;            /* LM_CT_FLAG_ACCT | LM_CT_FLAG_TSTAMP */
	__u32 tcp_max_retrans;     /* nf_conntrack_tcp_max_retrans */
	/* nf_conntrack_*timeout* sysctls, seconds */
	__u32 to_tcp_established, to_tcp_unack, to_tcp_retrans, to_udp, to_udp_stream;
	__u32 fib_flags;           /* LM_FIB_*: how routes are decided (fib.h) */
};

/* lm_config.fib_flags */
#define LM_FIB_RULES (1 << 0)      /* policy rules: every forward asks the kernel's FIB (bpf_fib_lookup) */
#define LM_FIB_MP_L4 (1 << 1)      /* fib_multipath_hash_policy 1: ports hashed, skb->hash used if set */
#define LM_FIB_MP_ANY (1 << 2)     /* LM_FIB_RULES and a multipath route or group in some table */
#define LM_FIB_RULE_PORTS (1 << 3) /* a rule selects by ipproto/sport/dport (fib rules dissect L4) */
#define LM_FIB_MP_PUNT (1 << 4)    /* hash policy 2/3 (inner headers, custom fields): multipath punts */

/*
 * Conntrack status bits (uapi enum ip_conntrack_status) the fast path and
 * the agent both look at.  LM_CT_VERDICT_BITS: the part of ct->status a flow
 * verdict depends on (--ctstatus/--ctstate, whether nat chains could still be
 * traversed); lm_flow.ct_status holds (status & LM_CT_VERDICT_BITS).
 */
#define LM_IPS_SEEN_REPLY (1 << 1)
#define LM_IPS_ASSURED (1 << 2)
#define LM_IPS_CONFIRMED (1 << 3)
#define LM_IPS_SRC_NAT (1 << 4)
#define LM_IPS_DST_NAT (1 << 5)
#define LM_IPS_SEQ_ADJUST (1 << 6)
#define LM_IPS_SRC_NAT_DONE (1 << 7)
#define LM_IPS_DST_NAT_DONE (1 << 8)
#define LM_IPS_DYING (1 << 9)
#define LM_IPS_FIXED_TIMEOUT (1 << 10)
#define LM_IPS_TEMPLATE (1 << 11)
#define LM_IPS_UNTRACKED (1 << 12) /* also IPS_NAT_CLASH */
#define LM_IPS_HELPER (1 << 13)
#define LM_IPS_OFFLOAD (1 << 14)
#define LM_IPS_HW_OFFLOAD (1 << 15)
#define LM_CT_VERDICT_BITS (LM_IPS_SEEN_REPLY | LM_IPS_ASSURED | \
			    LM_IPS_SRC_NAT_DONE | LM_IPS_DST_NAT_DONE)

/* One direction of a flow as it arrives: the wire tuple and the ingress.
 * The verdict of a bridged flow depends on its ports (physdev, and -i/-o
 * being the bridge), so ingress port and `bridged` are part of the key and
 * the entry's oif is the egress port. */
struct lm_flow_key {
	__u32 ifindex;     /* the device it arrived on (a bridge port for
			      bridged and for routed-from-a-port packets) */
	__u32 saddr, daddr;
	__u16 sport, dport;
	__u8 proto;
	__u8 bridged;      /* 1: switched between two ports of a bridge
			      (br_netfilter), 0: routed */
	__u8 pad[2];
};

/* What the agent decided for one direction of a flow, and what it assumed;
 * the datapath uses it only while every assumption still holds. */
struct lm_flow {
	__u32 gen;                /* config.nf_gen it was computed for */
	__u32 action;             /* LM_FORWARDED, or a drop reason */
	__u32 oif;                /* egress the verdict assumed */
	__u32 ct_mark;            /* ct->mark the verdict assumed */
	__u32 ct_status;          /* ct->status & LM_CT_VERDICT_BITS assumed */
	__u32 nat_saddr, nat_daddr; /* the translation it assumed (as sent) */
	__u16 nat_sport, nat_dport;
	__u64 packets, bytes;     /* taken by the fast path (dump conntrack) */
};

/* Ring-buffer event: "decide this flow" (FLOW_PENDING) or "set BE_LIBERAL
 * on this entry" (CT_NOT_LIBERAL).  At most one per key per ~100 ms. */
struct lm_flow_event {
	struct lm_flow_key key;
	__u32 oif;   /* egress of the translated destination; 0 if unknown */
	__u8 dir;    /* conntrack direction of the packet: 0 original, 1 reply */
	__u8 why;    /* LM_FLOW_PENDING or LM_CT_NOT_LIBERAL */
	__u16 pad;
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

/*
 * Explain runs (`loxi-mirror explain`, explain.h): the agent runs a crafted
 * frame through lm_tc_ingress with BPF_PROG_TEST_RUN, skb->cb[0] =
 * LM_EXPLAIN_MAGIC, cb[1] = a nonce of its own and ingress_ifindex 0.  A
 * real packet at TC ingress always has ingress_ifindex == its device's
 * ifindex, so whatever its cb holds it is never taken for one.  An explain
 * run changes no datapath state (counters, conntrack timeouts, neighbour
 * stamps, flow counters, events); it records every stage it runs into its
 * CPU's explain_trace slot, tagged with the nonce.
 */
#define LM_EXPLAIN_MAGIC 0x4c4d5845 /* "EXML" */

struct lm_trace {
	__u32 nonce;  /* skb->cb[1] of the run that wrote it */
	__u32 ran;    /* bit LM_STAGE_ID (pkt.h) set for every stage that ran;
			 all said LM_FORWARDED but the last one */
	__u32 reason; /* the last stage's verdict, as lm_exit() got it */
	__u32 daddr;  /* destination routed on (after DNAT) */
	__u32 oif, gateway, mtu; /* the route's, if one was found */
	__u32 pad;    /* per-CPU values: a multiple of 8 bytes */
};

/* The maps. */
/*
 * Routes (main + local table, one LPM trie): the agent creates the trie at
 * the size the table needs and swaps a bigger one into slot 0 of `routes`
 * when it must grow (mirror/routemap.py).  routes_trie is only the type
 * template the outer map is declared with.
 */
BPF_LPM_TRIE(routes_trie, struct lm_route_key, struct lm_route, LM_MAX_ROUTES);
BPF_ARRAY_OF_MAPS(routes, "routes_trie", 1);
/*
 * The hash maps are not preallocated: a preallocated element that the agent
 * replaces goes straight back to the free list and may be reused for another
 * key while a packet still holds a pointer to it (a wrong MAC).  Without
 * preallocation replaced elements are freed after an RCU grace period.
 */
BPF_F_TABLE("hash", struct lm_neigh_key, struct lm_neigh, neighbors, LM_MAX_NEIGHBORS,
	    BPF_F_NO_PREALLOC);                            /* (ifindex, ip) -> MAC */
BPF_F_TABLE("hash", __u32, struct lm_link, links, LM_MAX_LINKS, BPF_F_NO_PREALLOC); /* ifindex -> link */
BPF_F_TABLE("hash", struct lm_fdb_key, struct lm_fdb, fdb, LM_MAX_FDB,
	    BPF_F_NO_PREALLOC);                            /* (bridge, MAC) -> port */
BPF_F_TABLE("hash", __u32, struct lm_port, ports, LM_MAX_LINKS, BPF_F_NO_PREALLOC); /* ifindex -> bridge port */
BPF_ARRAY(config, struct lm_config, 1);                /* slot 0: global switches */
BPF_ARRAY(heartbeat, struct lm_heartbeat, 1);          /* slot 0: written by lm_heartbeat only */
/* Per ingress interface and reason: [slot * LM_REASON_MAX + reason].  Slot 0
 * counts packets of no slot: agent not ready, unmanaged ingress. */
BPF_PERCPU_ARRAY(counters, struct lm_counter, LM_MAX_IFACE_SLOTS * LM_REASON_MAX);
/* Stateful mode (LM_NF_STATEFUL).  LRU: the agent never has to expire
 * verdicts of dead flows; an evicted verdict is asked for again. */
BPF_TABLE("lru_hash", struct lm_flow_key, struct lm_flow, flows, LM_MAX_FLOWS);
BPF_TABLE("lru_hash", struct lm_flow_key, __u64, flow_asked, 16384); /* key -> jiffies of the last event */
BPF_RINGBUF_OUTPUT(flow_events, 64);                   /* struct lm_flow_event, 64 pages */
BPF_PERCPU_ARRAY(explain_trace, struct lm_trace, 1);  /* explain runs only (explain.h) */
BPF_PERCPU_ARRAY(fib_answer, struct lm_route, 1);     /* fib.h: this packet's kernel FIB answer */

/* The route for the key's address (the longest prefix), or NULL. */
static __always_inline struct lm_route *lm_route_lookup(struct lm_route_key *key)
{
	int slot = 0;
	void *trie = routes.lookup(&slot);

	return trie ? bpf_map_lookup_elem(trie, key) : NULL;
}

#endif /* LM_COMMON_H */
