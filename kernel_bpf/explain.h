/* SPDX-License-Identifier: GPL-2.0 */
/*
 * explain.h - explain runs: `loxi-mirror explain` asks the loaded program
 * itself what it does with a packet (see LM_EXPLAIN_MAGIC in common.h).
 *
 * lm_explain_begin() recognises the run and hands the pipeline its CPU's
 * trace slot (p->trace); lm_explain_end() records there which stages ran
 * (p->ran, kept by LM_STAGE) and the verdict.  Every stage with a side
 * effect on datapath state skips it while p->trace is set.  On real
 * traffic the cost is the compare of skb->cb[0] and a never-taken branch at
 * each side-effect site.
 *
 * The slot is per CPU and a test run does not migrate, so a concurrent run
 * on another CPU cannot touch it; the agent finds its slot by the nonce.
 */
#ifndef LM_EXPLAIN_H
#define LM_EXPLAIN_H

#include "pkt.h"

/* LM_STAGE_ID counts from here: the first LM_STAGE after this line is 0. */
enum { LM_STAGE_ID_BASE = __COUNTER__ };

static __always_inline struct lm_trace *lm_explain_begin(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct lm_trace *t;

	if (skb->cb[0] != LM_EXPLAIN_MAGIC || skb->ingress_ifindex)
		return NULL;
	t = explain_trace.lookup(&zero);
	if (!t)
		return NULL;
	__builtin_memset(t, 0, sizeof(*t));
	t->nonce = skb->cb[1];
	return t;
}

static __always_inline void lm_explain_end(struct lm_pkt *p, __u32 reason)
{
	struct lm_trace *t = p->trace;

	t->ran = p->ran;
	t->reason = reason;
	t->daddr = p->daddr;
	if (p->rt) {
		t->oif = p->rt->oif;
		t->gateway = p->rt->gateway;
		t->mtu = p->rt->mtu;
	}
}

#endif /* LM_EXPLAIN_H */
