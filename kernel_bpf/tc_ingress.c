/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tc_ingress.c - loxi-mirror's TC-ingress fast path.
 *
 * Forwards routed IPv4 unicast exactly as the kernel's ip_forward() would
 * (same egress device, same MACs, TTL - 1, same checksum) and punts every
 * other packet to the kernel, counting why.  The pipeline is a list of
 * stages (one header each, see pkt.h for the stage contract); later stages
 * (conntrack, NAT, VXLAN, IPv6) slot in between these.  Frames on bridge
 * ports are switched by l2.h, or routed with the bridge as the L3 device;
 * switched IPv4 that br_netfilter hands to iptables takes the same parse,
 * conntrack and verdict stages as routed IPv4 (stateful mode), not routing.
 *
 * Attach: clsact ingress, direct-action (cls_bpf) or tcx.  Compiled and
 * loaded by mirror/datapath.py with BCC.
 */
#include "common.h"
#include "pkt.h"
#include "explain.h"
#include "gate.h"
#include "l2.h"
#include "parse.h"
#include "ct.h"
#include "fib.h"
#include "fwd.h"
#include "verdict.h"
#include "rewrite.h"
#include "xmit.h"
#include "nat.h"
#include "heartbeat.h"

/* The counters slot of the interface the packet arrived on: its link's
 * (the port's, not the bridge's, when routed through a bridge), else 0. */
static __always_inline __u32 lm_counter_slot(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct lm_link *in = p->in_link;
	__u32 ifindex = skb->ifindex;

	if (p->via_bridge)
		in = links.lookup(&ifindex);
	return in && in->slot < LM_MAX_IFACE_SLOTS ? in->slot : 0;
}

/*
 * The single exit: count the verdict (packets and bytes per ingress
 * interface and reason, per CPU; an explain run records it instead) and
 * return the TC action.
 *
 * Punt returns TC_ACT_UNSPEC, not TC_ACT_OK.  Both let the packet continue
 * into the kernel's stack, but TC_ACT_OK ends classification, so a filter
 * the user attached after ours would never run; TC_ACT_UNSPEC (== TCX_NEXT
 * under tcx) moves on to the next filter/program and, if there is none,
 * behaves like TC_ACT_OK.  Only the drop reasons (LM_DROP_REASONS: the
 * mirrored ruleset drops the flow) return TC_ACT_SHOT; whatever else the
 * kernel would drop, the kernel drops.
 */
static __always_inline int lm_exit(struct __sk_buff *skb, struct lm_pkt *p, __u32 reason)
{
	struct lm_counter *c;
	__u32 idx;

	/* Route actions come from the agent: never index past the counters. */
	if (p->trace)
		lm_explain_end(p, reason); /* and count nothing */
	if (reason >= LM_REASON_MAX)
		reason = LM_ROUTE_UNSUPPORTED;
	if (!p->trace) {
		idx = lm_counter_slot(skb, p) * LM_REASON_MAX + reason;
		c = counters.lookup(&idx);
		if (c) {
			c->packets++;
			c->bytes += skb->len;
		}
	}
	if (reason == LM_FORWARDED)
		return p->action;
	if (lm_is_drop(reason))
		return TC_ACT_SHOT;
	return TC_ACT_UNSPEC;
}

int lm_tc_ingress(struct __sk_buff *skb)
{
	struct lm_pkt p = {};
	struct lm_ctinfo ci; /* filled by lm_ct() before any use */
	__u32 reason;

	p.trace = lm_explain_begin(skb);
#ifdef LM_FAULT_VERIFIER
	/* Fault injection for the loader's failure path only (tests/integration/
	 * test_faults.py, LOXI_MIRROR_CFLAGS=-DLM_FAULT_VERIFIER): the verifier
	 * rejects this read through a pointer it cannot prove valid. */
	if (*(volatile __u32 *)(long)skb->mark)
		return TC_ACT_SHOT;
#endif
	LM_STAGE(reason, lm_gate(skb, &p));
	LM_STAGE(reason, lm_l2_ingress(skb, &p));
	/* Switched within a bridge: only br_netfilter's IPv4 goes on, through
	 * the same parse, conntrack and verdict stages, with no routing. */
	if (!p.bridged)
		LM_STAGE(reason, lm_parse_eth(skb, &p));
	if (!p.bridged || p.br_nf)
		LM_STAGE(reason, lm_parse_ipv4(skb, &p));
	if (p.cfg->nf_mode == LM_NF_STATEFUL && (!p.bridged || p.br_nf)) {
		p.ci = &ci;
		LM_STAGE(reason, lm_ct(skb, &p));
	}
	if (p.bridged)
		goto verdict;
	LM_STAGE(reason, lm_fib_route(skb, &p));
	LM_STAGE(reason, lm_fib_source(skb, &p));
	LM_STAGE(reason, lm_fib_egress(skb, &p));
	LM_STAGE(reason, lm_fwd_checks(skb, &p));
	/* FORWARD and POSTROUTING come after ip_forward()'s TTL/MTU checks. */
verdict:
	if (p.ci)
		LM_STAGE(reason, lm_verdict(skb, &p));
	if (p.bridged) {
		LM_STAGE(reason, lm_l2_forward(skb, &p));
		goto out;
	}
	LM_STAGE(reason, lm_fib_neigh(skb, &p));
	LM_STAGE(reason, lm_l2_egress(skb, &p));
	/* Past this line nothing may punt: the packet is being rewritten. */
	LM_STAGE(reason, lm_rewrite(skb, &p));
	LM_STAGE(reason, lm_xmit(skb, &p));
	if (p.ci)
		LM_STAGE(reason, lm_nat(skb, &p));
out:
	return lm_exit(skb, &p, reason);
}
