/* SPDX-License-Identifier: GPL-2.0 */
/*
 * fib.h - the routing decision: destination route (main + local table in one
 * LPM), forwarding switch, source validation (local source, rp_filter), egress
 * link, and the next hop's neighbour entry.  Mirrors ip_route_input_slow(),
 * fib_validate_source() and the neighbour lookup of ip_finish_output2().
 */
#ifndef LM_FIB_H
#define LM_FIB_H

#include "pkt.h"

static __always_inline __u32 lm_fib_route(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct lm_route_key key = { .prefixlen = 32, .addr = p->daddr };
	struct lm_route *rt = lm_route_lookup(&key);

	/* No route we mirror: the kernel answers ICMP unreachable, or has a
	 * route the agent has not (yet) compiled. */
	if (!rt)
		return LM_NO_ROUTE;
	/* Local delivery, or a route the agent cannot compile (blackhole,
	 * multipath, ...): the agent stored the punt reason as the action. */
	if (rt->action != LM_FORWARDED)
		return rt->action;
	p->rt = rt;
	/* conf/<dev>/forwarding = 0: the kernel refuses to forward. */
	if (!(p->in_link->flags & LM_LINK_FORWARDING))
		return LM_FORWARDING_OFF;
	/* Something the maps do not model (netfilter FORWARD rules, policy
	 * routing) could change the outcome of any forwarded packet. */
	if (p->cfg->punt_forward_reason)
		return p->cfg->punt_forward_reason;
	return LM_FORWARDED;
}

static __always_inline __u32 lm_fib_source(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct lm_route_key key = { .prefixlen = 32, .addr = p->iph->saddr };
	struct lm_route *src = lm_route_lookup(&key);
	__u16 flags = p->in_link->flags;

	/* A source address of our own: fib_validate_source() rejects it as a
	 * martian source. */
	if (src && src->action == LM_LOCAL)
		return LM_MARTIAN;
	/* Even without rp_filter the kernel looks the source up once local-
	 * table routes were ever added by hand (fib_has_custom_local_routes,
	 * which never resets) and then drops it if that route is not unicast
	 * (blackhole, broadcast, ...).  Whether it does is not visible: punt. */
	if (src && src->action != LM_FORWARDED)
		return LM_RP_FILTER;
	if (!(flags & (LM_LINK_RPF_STRICT | LM_LINK_RPF_LOOSE)))
		return LM_FORWARDED;
	/* rp_filter: the reverse route must be plain unicast (loose), via the
	 * ingress interface (strict); otherwise the kernel drops the packet
	 * (or the case is subtle enough to let it decide). */
	if (!src || src->action != LM_FORWARDED)
		return LM_RP_FILTER;
	if ((flags & LM_LINK_RPF_STRICT) && src->oif != p->ifindex)
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
