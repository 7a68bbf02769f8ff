/* SPDX-License-Identifier: GPL-2.0 */
/*
 * xmit.h - hand the rewritten packet to the egress interface.
 *
 * veth whose peer lives in another netns: bpf_redirect_peer() puts it
 * straight into the peer's ingress (no backlog softirq hop); that is what
 * veth_xmit() would have done with it, where nothing on the way is skipped
 * (the agent's LM_LINK_REDIRECT_PEER) and the frame is for the peer's MAC.
 * Anything else: bpf_redirect() to the egress device's transmit path, as
 * dev_queue_xmit() after ip_output().
 */
#ifndef LM_XMIT_H
#define LM_XMIT_H

#include "pkt.h"

/* rt_tos2priority(): ip_tos2prio[IPTOS_TOS(tos) >> 1], 16 nibbles
 * (BESTEFFORT 0, BULK 2, INTERACTIVE 6, INTERACTIVE_BULK 4; 4 each). */
#define LM_TOS2PRIO_NIBBLES 0x4444666622220000ULL

static __always_inline __u32 lm_tos2prio(__u8 tos)
{
	return (LM_TOS2PRIO_NIBBLES >> (((tos & 0x1e) >> 1) * 4)) & 0xf;
}

static __always_inline __u32 lm_xmit(struct __sk_buff *skb, struct lm_pkt *p)
{
	__u32 oif = p->oif;

	/* ip_forward_finish(): skb_clear_tstamp() drops a receive timestamp
	 * but keeps a delivery time (EDT); TC reads the latter as 0. */
	if (skb->tstamp)
		skb->tstamp = 0;
	/* redirect_peer hands the frame to the peer as received: only if the
	 * peer's eth_type_trans() would call it PACKET_HOST (a stale neighbour
	 * MAC makes the kernel's peer drop it as PACKET_OTHERHOST). */
	if ((p->xmit_link->flags & LM_LINK_REDIRECT_PEER) && lm_mac_eq(p->nb->mac, p->xmit_link->peer_mac)) {
		/* The kernel path ends in veth_xmit(): ____dev_forward_skb()
		 * resets the priority, and skb_scrub_packet() across
		 * namespaces clears the mark (redirect_peer scrubs the rest:
		 * pkt_type, dst, conntrack, skb_iif ...). */
		skb->priority = 0;
		skb->mark = 0;
		p->action = bpf_redirect_peer(oif, 0);
	} else {
		/* ip_forward() sets the priority from the TOS; the egress
		 * qdisc may look at it. */
		skb->priority = lm_tos2prio(p->iph->tos);
		p->action = bpf_redirect(oif, 0);
	}
	return LM_FORWARDED;
}

#endif /* LM_XMIT_H */
