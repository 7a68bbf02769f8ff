/* SPDX-License-Identifier: GPL-2.0 */
/*
 * verdict.h - the ruleset's verdict for this flow (stateful mode only).
 *
 * The agent evaluates the mirrored iptables rules once per flow direction
 * (raw/mangle PREROUTING, mangle/filter/security FORWARD, mangle
 * POSTROUTING, for a packet of the confirmed entry; for bridged frames as
 * br_netfilter hands them to those hooks) and stores the result
 * in `flows`, together with everything the result depended on.  The
 * datapath uses it only while all of that still holds, so the per-packet
 * cost does not grow with the rule count; anything else punts and asks the
 * agent (ring buffer, at most one event per flow every ~100 ms).
 */
#ifndef LM_VERDICT_H
#define LM_VERDICT_H

#include "pkt.h"

static __always_inline void lm_flow_ask(struct lm_pkt *p, __u32 why, __u32 oif)
{
	struct lm_ctinfo *ci = p->ci;
	struct lm_flow_event ev = {};
	__u64 *last = flow_asked.lookup(&ci->key);
	__u64 now = p->now;

	if (p->trace) /* explain run: ask nobody */
		return;
	if (last) {
		if (now - *last < p->cfg->hz / 10)
			return;
		*last = now;
	} else {
		flow_asked.update(&ci->key, &now);
	}
	ev.key = ci->key;
	ev.oif = oif;
	ev.dir = ci->dir;
	ev.why = why;
	flow_events.ringbuf_output(&ev, sizeof(ev), 0);
}

/* Does the stored verdict still describe this packet's flow? */
static __always_inline int lm_flow_current(struct lm_pkt *p, struct lm_flow *f, __u32 oif)
{
	struct lm_ctinfo *ci = p->ci;

	return f->gen == p->cfg->nf_gen && f->oif == oif && f->ct_mark == ci->mark &&
	       f->ct_status == ci->status &&
	       f->nat_saddr == ci->nat_saddr && f->nat_daddr == ci->nat_daddr &&
	       f->nat_sport == ci->nat_sport && f->nat_dport == ci->nat_dport;
}

static __always_inline __u32 lm_verdict(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct lm_ctinfo *ci = p->ci;
	__u32 oif = p->oif; /* the route's (fib.h), or the bridged frame's port (l2.h) */
	struct lm_flow *f = flows.lookup(&ci->key);
	__u32 why;

	if (!f || !lm_flow_current(p, f, oif)) {
		/* One event asks for both: BE_LIBERAL (TCP) and the verdict. */
		why = ci->liberal ? LM_FLOW_PENDING : LM_CT_NOT_LIBERAL;
		lm_flow_ask(p, why, oif);
		return why;
	}
	/* The agent may cache "punt" as a punt reason: no more events. */
	if (f->action != LM_FORWARDED && !lm_is_drop(f->action))
		return f->action;
	/* Forwarded or dropped, the kernel never sees the segment: its window
	 * tracking must be liberal (or it would call later ones INVALID). */
	if (!ci->liberal) {
		lm_flow_ask(p, LM_CT_NOT_LIBERAL, oif);
		return LM_CT_NOT_LIBERAL;
	}
	if (!p->trace) {
		__sync_fetch_and_add(&f->packets, 1);
		__sync_fetch_and_add(&f->bytes, skb->len);
	}
	return f->action;
}

#endif /* LM_VERDICT_H */
