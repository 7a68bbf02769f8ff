/* SPDX-License-Identifier: GPL-2.0 */
/*
 * pkt.h - the per-packet state the pipeline stages hand to each other, and
 * small helpers every stage uses.  Nothing here is shared with the agent.
 *
 * A stage is a static __always_inline function
 *	static __always_inline __u32 lm_<stage>(struct __sk_buff *skb, struct lm_pkt *p)
 * that returns LM_FORWARDED ("carry on") or the enum lm_reason to punt with.
 * Stages before rewrite.h only read the packet; rewrite.h is the first stage
 * that writes it, and nothing after it may punt (a punted packet must reach
 * the kernel exactly as it arrived).  nat.h (stateful mode) writes last,
 * after xmit.h, and can only forward or drop.
 */
#ifndef LM_PKT_H
#define LM_PKT_H

#include "common.h"

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "loxi-mirror's datapath assumes a little-endian host"
#endif
/* Byte order: the maps and headers hold network order; compare against
 * constants converted at compile time where possible. */
#define LM_HTONS(x) ((__u16)__builtin_bswap16((__u16)(x)))
#define LM_HTONL(x) ((__u32)__builtin_bswap32((__u32)(x)))
#define LM_NTOHS(x) LM_HTONS(x)


/* Run one stage; leave the pipeline with its reason unless it says go on.
 * Expects the pipeline's `struct lm_pkt p` in scope.  Each stage sets its
 * bit in p.ran for explain runs (explain.h): a bit per LM_STAGE_ID, the
 * how-many-th LM_STAGE call of the source it is (the agent counts them in
 * the compiled text, mirror/explain.py: no list of stages to keep in step).
 * No branch: along every path p.ran is a constant the compiler folds into
 * the jump to `out`. */
#define LM_STAGE_ID (__COUNTER__ - LM_STAGE_ID_BASE - 1)
#define LM_STAGE_BIT(id) ((id) < 32 ? 1U << (id) : 0)
#define LM_STAGE(reason, call)                                  \
	do {                                                    \
		p.ran |= LM_STAGE_BIT(LM_STAGE_ID);             \
		(reason) = (call);                              \
		if ((reason) != LM_FORWARDED)                   \
			goto out;                               \
	} while (0)

#define LM_DROP_CASE(name) case LM_##name:
static __always_inline int lm_is_drop(__u32 reason)
{
	switch (reason) {
	LM_DROP_REASONS(LM_DROP_CASE)
		return 1;
	}
	return 0;
}

/* ct.h: what the conntrack stage read from the kernel's entry (which it
 * has released by then), for the verdict and NAT stages. */
struct lm_ctinfo {
	struct lm_flow_key key;  /* wire tuple + ingress */
	__u32 nat_saddr, nat_daddr; /* as the packet leaves (== wire: no NAT) */
	__u16 nat_sport, nat_dport;
	__u32 mark;              /* ct->mark */
	__u32 status;            /* ct->status & LM_CT_VERDICT_BITS */
	__u8 dir;                /* conntrack direction of this packet */
	__u8 liberal;            /* UDP, or TCP with BE_LIBERAL both ways */
	__u16 tcp_win;           /* TCP: the segment's raw window field */
};

struct lm_pkt {
	void *data;              /* skb->data / data_end after the last pull */
	void *data_end;
	struct ethhdr *eth;      /* parse.h */
	struct iphdr *iph;       /* parse.h: validated IPv4 header, no options */
	struct lm_link *in_link; /* gate.h: ingress link, never NULL after it */
	struct lm_route *rt;     /* fib.h: route to the destination (routes
				    map, or the kernel FIB's answer in fib_answer) */
	struct lm_link *out_link;/* fib.h: egress link */
	struct lm_neigh *nb;     /* fib.h: next hop's neighbour entry */
	struct lm_link *xmit_link;/* fib.h/l2.h: the device xmit.h sends to */
	struct lm_config *cfg;   /* gate.h: config[0] */
	struct lm_ctinfo *ci;    /* stateful mode only (ct.h), else NULL */
	__u64 now;               /* bpf_jiffies64() once per packet */
	__u32 ifindex;           /* ingress ifindex (the bridge's after l2.h
				    hands a frame for the bridge's MAC on) */
	__u32 oif;               /* fib.h/l2.h: ifindex xmit.h sends to */
	__u32 tot_len;           /* host order iph->tot_len */
	__u32 daddr;             /* destination routed on: iph->daddr, or
				    after DNAT (ct.h) */
	int action;              /* xmit.h/l2.h: TC action when forwarded */
	__u8 via_bridge;         /* l2.h: arrived on a port, addressed to the bridge */
	/* Whole stack slots, written whole: the verifier then knows their
	 * value on every path, so the pipeline's branches on them stay
	 * correlated (a byte flag reads back as unknown and it would explore
	 * bridged stages on routed paths). */
	__u64 bridged;           /* l2.h: switched within a bridge (p->oif is
				    the egress port) */
	__u64 br_nf;             /* l2.h: bridged IPv4 that br_netfilter hands
				    to iptables (and conntrack) */
	__u8 via_kernel;         /* fib.h: p->rt is the kernel FIB's answer */
	__u32 fib_flags;         /* fib.h: cfg->fib_flags, read once (the agent
				    may change it while the packet runs) */
	__u32 fib_ports;         /* fib.h: TCP/UDP ports as routed, wire order */
	struct lm_trace *trace;  /* explain runs only (explain.h), else NULL:
				    no side effect on datapath state then */
	__u32 ran;               /* LM_STAGE: bit LM_STAGE_ID per stage run */
};

/* Make the first @len bytes linear and reload the packet pointers.
 * Returns 0 when at least @len bytes are directly accessible. */
static __always_inline int lm_pull(struct __sk_buff *skb, struct lm_pkt *p, __u32 len)
{
	p->data = (void *)(long)skb->data;
	p->data_end = (void *)(long)skb->data_end;
	if (p->data + len <= p->data_end)
		return 0;
	if (bpf_skb_pull_data(skb, len))
		return -1;
	p->data = (void *)(long)skb->data;
	p->data_end = (void *)(long)skb->data_end;
	if (p->data + len > p->data_end)
		return -1;
	return 0;
}

/* Re-derive the header pointers after lm_pull() moved the data (the
 * verifier invalidates every packet pointer a pull could have moved). */
static __always_inline void lm_reload_l3(struct lm_pkt *p)
{
	p->eth = p->data;
	p->iph = p->data + ETH_HLEN;
}

static __always_inline int lm_mac_eq(const __u8 *a, const __u8 *b)
{
	/* 6 bytes as a 4 + 2 byte compare: no loop, no helper. */
	return *(const __u32 *)a == *(const __u32 *)b &&
	       *(const __u16 *)(a + 4) == *(const __u16 *)(b + 4);
}

static __always_inline void lm_mac_copy(__u8 *dst, const __u8 *src)
{
	*(__u32 *)dst = *(const __u32 *)src;
	*(__u16 *)(dst + 4) = *(const __u16 *)(src + 4);
}

#endif /* LM_PKT_H */
