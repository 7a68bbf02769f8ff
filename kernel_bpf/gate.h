/* SPDX-License-Identifier: GPL-2.0 */
/*
 * gate.h - is the fast path allowed to touch this packet at all?
 *
 * Two questions before any packet byte is read: is the agent alive (its
 * heartbeat deadline lies in the future), and does the agent manage the
 * ingress interface?
 */
#ifndef LM_GATE_H
#define LM_GATE_H

#include "pkt.h"

static __always_inline __u32 lm_gate(struct __sk_buff *skb, struct lm_pkt *p)
{
	__u32 zero = 0;
	struct lm_config *cfg = config.lookup(&zero);
	struct lm_heartbeat *hb = heartbeat.lookup(&zero);

	p->cfg = cfg;
	p->now = bpf_jiffies64();
	/* Agent not ready (deadline 0) or dead/hung: its maps may be stale, so
	 * the kernel must decide.  This is the fail-safe after SIGKILL. */
	if (!cfg || !hb || p->now >= hb->deadline)
		return LM_AGENT_STALE;

	p->ifindex = skb->ifindex;
	p->in_link = links.lookup(&p->ifindex);
	/* Not an interface the agent mirrors: we know nothing of its state. */
	if (!p->in_link)
		return LM_IFACE_UNMANAGED;
	return LM_FORWARDED;
}

#endif /* LM_GATE_H */
