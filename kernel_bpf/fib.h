/* SPDX-License-Identifier: GPL-2.0 */
/*
 * fib.h - the routing decision: destination route (main + local table in one
 * LPM; multipath routes, nexthop groups and policy rules asked of the
 * kernel's own FIB with bpf_fib_lookup), forwarding switch, source validation
 * (local source, rp_filter, the reverse lookup under rules), egress link, and
 * the next hop's neighbour entry (always from the mirrored map, so the MACs
 * are exact).  Mirrors ip_route_input_slow(), fib_validate_source() and the
 * neighbour lookup of ip_finish_output2().
 */
#ifndef LM_FIB_H
#define LM_FIB_H

#include "pkt.h"

/* The kernel headers BCC compiles against may predate these (uapi values:
 * SKIP_NEIGH Linux 6.3; MARK 6.10, `mark` sharing its offset with smac[0..3]). */
#ifndef BPF_FIB_LOOKUP_SKIP_NEIGH
#define BPF_FIB_LOOKUP_SKIP_NEIGH (1U << 2)
#endif
#ifndef BPF_FIB_LOOKUP_MARK
#define BPF_FIB_LOOKUP_MARK (1U << 5)
#endif
#define LM_FIB_MARK(fp) (*(__u32 *)(fp)->smac)

/*
 * The kernel's own FIB lookup (bpf_fib_lookup without DIRECT: policy rules,
 * every table, multipath selection, nexthop objects), with the flowi4 that
 * ip_route_input_slow() builds: ingress ifindex, TOS, mark, protocol and
 * ports.  tot_len 1: no MTU verdict from the helper (it would count learned
 * path MTUs that forwarding ignores); fwd.h checks the MTU.
 */
static __always_inline int lm_fib_ask(struct __sk_buff *skb, struct lm_pkt *p, struct bpf_fib_lookup *fp,
				      __u32 ifindex, __u32 src, __u32 dst, __u32 ports, __u8 proto, __u32 mark)
{
	__builtin_memset(fp, 0, sizeof(*fp));
	fp->family = 2; /* AF_INET */
	fp->tos = p->iph->tos;
	fp->l4_protocol = proto;
	*(__u32 *)&fp->sport = ports; /* sport, dport: adjacent, network order */
	fp->tot_len = 1;
	fp->ifindex = ifindex;
	fp->ipv4_src = src;
	fp->ipv4_dst = dst;
	LM_FIB_MARK(fp) = mark;
	return bpf_fib_lookup(skb, fp, sizeof(*fp), BPF_FIB_LOOKUP_SKIP_NEIGH | BPF_FIB_LOOKUP_MARK);
}

/* TCP/UDP source and destination port as routed (after DNAT), one word
 * in wire order; 0 for other protocols.  Returns -1 if unreadable. */
static __always_inline int lm_fib_ports(struct __sk_buff *skb, struct lm_pkt *p, __u32 *ports)
{
	__u8 proto = p->iph->protocol;

	*ports = 0;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 0;
	if (lm_pull(skb, p, ETH_HLEN + sizeof(struct iphdr) + 4))
		return -1;
	lm_reload_l3(p);
	*ports = *(__u32 *)(p->data + ETH_HLEN + sizeof(struct iphdr));
	if (p->ci) /* routed after DNAT: the translated destination port */
		*ports = (*ports & 0xffff) | ((__u32)p->ci->nat_dport << 16);
	return 0;
}

/* An ICMP error (icmp_is_err()): multipath forwarding hashes it by the
 * header it quotes (ip_multipath_l3_keys()).  Unreadable: as if it were. */
static __always_inline int lm_icmp_error(struct __sk_buff *skb, struct lm_pkt *p)
{
	__u8 type;

	if (lm_pull(skb, p, ETH_HLEN + sizeof(struct iphdr) + 1))
		return 1;
	lm_reload_l3(p);
	type = *(__u8 *)(p->data + ETH_HLEN + sizeof(struct iphdr));
	return type == 3 || type == 4 || type == 5 || type == 11 || type == 12;
}

/*
 * Ask the kernel where the packet goes.  mp: a multipath route or group may
 * answer, so the kernel's hash must be reproducible: bpf_fib_lookup hashes
 * the flowi4 (addresses; policy 1 also protocol and ports), while forwarding
 * hashes the packet: an ICMP error by its inner header (policy 0), and under
 * policy 1 a packet that carries a socket's or the flow dissector's hash
 * (skb->hash, l4_hash) by that hash.
 */
static __always_inline __u32 lm_fib_kernel(struct __sk_buff *skb, struct lm_pkt *p, int mp, __u32 mtu)
{
	struct bpf_fib_lookup fp;
	__u32 flags = p->fib_flags;
	__u8 proto = p->iph->protocol;
	int l4 = proto == IPPROTO_TCP || proto == IPPROTO_UDP;
	__u32 ports, zero = 0;
	struct lm_route *rt;
	int rc;

	if (mp && (flags & LM_FIB_MP_PUNT))
		return LM_MULTIPATH_HASH;
	if (mp && (flags & LM_FIB_MP_L4) && (skb->hash || !l4))
		return LM_MULTIPATH_HASH;
	if (mp && !(flags & LM_FIB_MP_L4) && proto == IPPROTO_ICMP && lm_icmp_error(skb, p))
		return LM_MULTIPATH_HASH;
	/* Rules by protocol/port see what the flow dissector reads: TCP/UDP only. */
	if ((flags & LM_FIB_RULE_PORTS) && !l4)
		return LM_POLICY_ROUTING;
	if (lm_fib_ports(skb, p, &ports))
		return LM_FIB_UNSUPPORTED;
	p->fib_ports = ports;
	rc = lm_fib_ask(skb, p, &fp, p->ifindex, p->iph->saddr, p->daddr, ports, proto, skb->mark);
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED)
		return LM_FORWARDING_OFF;
	if (rc == BPF_FIB_LKUP_RET_BLACKHOLE || rc == BPF_FIB_LKUP_RET_UNREACHABLE ||
	    rc == BPF_FIB_LKUP_RET_PROHIBIT || rc == BPF_FIB_LKUP_RET_NOT_FWDED)
		return LM_FIB_NOT_FORWARDED;
	/* Lightweight tunnels, an IPv6 next hop (RTA_VIA), errors. */
	if (rc != BPF_FIB_LKUP_RET_SUCCESS || fp.family != 2)
		return LM_FIB_UNSUPPORTED;
	rt = fib_answer.lookup(&zero);
	if (!rt)
		return LM_FIB_UNSUPPORTED;
	rt->action = LM_FORWARDED;
	rt->oif = fp.ifindex;
	rt->gateway = fp.ipv4_dst; /* the gateway, or the destination on-link */
	rt->mtu = mtu;             /* 0: the egress link's (lm_fib_egress) */
	p->rt = rt;
	p->via_kernel = 1;
	return LM_FORWARDED;
}

/*
 * The source check under policy rules: fib_validate_source() then always
 * looks the reversed flow up through the rules (__fib_validate_source(),
 * iif = the chosen egress, mark only with src_valid_mark, protocol and
 * ports only if some rule selects by them).  A unicast answer passes
 * (strict rp_filter: via the ingress device); a failed lookup passes
 * without rp_filter; anything else (local, broadcast, which the helper
 * cannot tell from "no route") is left to the kernel.  It runs right after
 * the forward lookup; lm_fib_source()'s checks still apply on top (they
 * can only add punts).
 */
static __always_inline __u32 lm_fib_reverse(struct __sk_buff *skb, struct lm_pkt *p)
{
	__u16 rpf = p->in_link->flags & (LM_LINK_RPF_STRICT | LM_LINK_RPF_LOOSE);
	struct bpf_fib_lookup fp;
	__u32 ports = 0, mark = 0;
	__u8 proto = 0;
	int rc;

	if (p->fib_flags & LM_FIB_RULE_PORTS) {
		ports = (p->fib_ports >> 16) | (p->fib_ports << 16);
		proto = p->iph->protocol;
	}
	if (p->in_link->flags & LM_LINK_SRC_VMARK)
		mark = skb->mark;
	rc = lm_fib_ask(skb, p, &fp, p->rt->oif, p->daddr, p->iph->saddr, ports, proto, mark);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS)
		return (rpf & LM_LINK_RPF_STRICT) && fp.ifindex != p->ifindex ? LM_RP_FILTER : LM_FORWARDED;
	if (!rpf && (rc == BPF_FIB_LKUP_RET_BLACKHOLE || rc == BPF_FIB_LKUP_RET_UNREACHABLE ||
		     rc == BPF_FIB_LKUP_RET_PROHIBIT))
		return LM_FORWARDED;
	return LM_RP_FILTER;
}

/* What stops any forwarding, whatever the route. */
static __always_inline __u32 lm_fib_may_forward(struct lm_pkt *p)
{
	/* conf/<dev>/forwarding = 0: the kernel refuses to forward. */
	if (!(p->in_link->flags & LM_LINK_FORWARDING))
		return LM_FORWARDING_OFF;
	/* Something the maps do not model (netfilter FORWARD rules, rules
	 * the kernel lookup cannot reproduce) could change the outcome of any
	 * forwarded packet. */
	return p->cfg->punt_forward_reason;
}

static __always_inline __u32 lm_fib_route(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct lm_route_key key = { .prefixlen = 32, .addr = p->daddr };
	struct lm_route *rt = 0;
	__u32 reason, mtu = 0;
	int mp;

	p->fib_flags = *(volatile __u32 *)&p->cfg->fib_flags;
	/* Policy rules in force: the main + local LPM is not the answer;
	 * the kernel's FIB answers, and checks the source the same way. */
	mp = p->fib_flags & LM_FIB_MP_ANY;
	if (!(p->fib_flags & LM_FIB_RULES)) {
		rt = lm_route_lookup(&key);
		/* No route we mirror: the kernel answers ICMP unreachable, or
		 * has a route the agent has not (yet) compiled. */
		if (!rt)
			return LM_NO_ROUTE;
		/* Local delivery, or a route the agent cannot compile
		 * (blackhole, ...): the agent stored the punt reason as the
		 * action.  LM_ROUTE_KERNEL: several next hops (multipath route,
		 * nexthop group), the kernel picks one. */
		if (rt->action != LM_ROUTE_KERNEL) {
			if (rt->action != LM_FORWARDED)
				return rt->action;
			p->rt = rt;
			return lm_fib_may_forward(p);
		}
		mp = 1;
		mtu = rt->mtu;
	}
	reason = lm_fib_may_forward(p);
	if (reason == LM_FORWARDED)
		reason = lm_fib_kernel(skb, p, mp, mtu);
	if (reason != LM_FORWARDED || rt)
		return reason;
	return lm_fib_reverse(skb, p);
}

static __always_inline __u32 lm_fib_source(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct lm_route_key key = { .prefixlen = 32, .addr = p->iph->saddr };
	struct lm_route *src = lm_route_lookup(&key);
	__u16 rpf = p->in_link->flags & (LM_LINK_RPF_STRICT | LM_LINK_RPF_LOOSE);
	int unicast = src && (src->action == LM_FORWARDED || src->action == LM_ROUTE_KERNEL);

	/* A source address of our own: fib_validate_source() rejects it as a
	 * martian source. */
	if (src && src->action == LM_LOCAL)
		return LM_MARTIAN;
	/* Even without rp_filter the kernel looks the source up once local-
	 * table routes were ever added by hand (fib_has_custom_local_routes,
	 * which never resets) and then drops it if that route is not unicast
	 * (blackhole, broadcast, ...).  Whether it does is not visible: punt. */
	if (src && !unicast)
		return LM_RP_FILTER;
	if (!rpf)
		return LM_FORWARDED;
	/* rp_filter: the reverse route must be plain unicast (loose), via the
	 * ingress interface (strict; of a multipath route any next hop would
	 * do, which only the kernel can tell); otherwise the kernel drops the
	 * packet (or the case is subtle enough to let it decide). */
	if (!unicast)
		return LM_RP_FILTER;
	if ((rpf & LM_LINK_RPF_STRICT) && (src->action != LM_FORWARDED || src->oif != p->ifindex))
		return LM_RP_FILTER;
	return LM_FORWARDED;
}

static __always_inline __u32 lm_fib_egress(struct __sk_buff *skb, struct lm_pkt *p)
{
	__u32 oif = p->rt->oif;

	/* Out the way it came in: the kernel forwards it but also sends an
	 * ICMP redirect (send_redirects), which only it can do. */
	if (oif == p->ifindex)
		return LM_HAIRPIN;
	p->out_link = links.lookup(&oif);
	/* Egress we do not mirror, or down: let the kernel queue/drop/report. */
	if (!p->out_link || !(p->out_link->flags & LM_LINK_UP))
		return LM_EGRESS_UNMANAGED;
	p->oif = oif;
	if (p->via_kernel && !p->rt->mtu)
		p->rt->mtu = p->out_link->mtu; /* no route MTU metric: the link's */
	p->xmit_link = p->out_link; /* l2.h picks a port if it is a bridge */
	return LM_FORWARDED;
}

static __always_inline __u32 lm_fib_neigh(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct lm_neigh_key key = {
		.ifindex = p->rt->oif,
		.addr = p->rt->gateway ? p->rt->gateway : p->daddr,
	};
	struct lm_neigh *nb = neighbors.lookup(&key);

	/* Unresolved next hop: the kernel sends ARP and queues the packet. */
	if (!nb)
		return LM_NO_NEIGHBOR;
	/* Tell the agent the entry is in use, at most once a second per entry
	 * (a map write per packet would bounce the cache line between CPUs). */
	if (p->now - nb->used > p->cfg->hz && !p->trace)
		nb->used = p->now;
	p->nb = nb;
	return LM_FORWARDED;
}

#endif /* LM_FIB_H */
