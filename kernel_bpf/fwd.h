/* SPDX-License-Identifier: GPL-2.0 */
/*
 * fwd.h - the checks of ip_forward() itself once a route is known: TTL and
 * MTU (ip_exceeds_mtu(), including the per-segment size of GSO packets).
 */
#ifndef LM_FWD_H
#define LM_FWD_H

#include "pkt.h"

static __always_inline __u32 lm_fwd_checks(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct tcphdr *th;
	__u32 gso_size = skb->gso_size;
	__u32 mtu = p->rt->mtu;

	/* TTL would reach 0: the kernel answers ICMP time exceeded. */
	if (p->iph->ttl <= 1)
		return LM_TTL_EXCEEDED;
	if (!gso_size) {
		/* Too big: the kernel fragments it (DF clear) or answers ICMP
		 * fragmentation needed (DF set). */
		if (p->tot_len > mtu)
			return LM_MTU_EXCEEDED;
		return LM_FORWARDED;
	}
	/* A GSO aggregate is judged by the size of the segments it will be
	 * cut into (skb_gso_validate_network_len()); we can only compute that
	 * for plain TCP.  UDP GSO, tunnels, ...: let the kernel check. */
	if (p->iph->protocol != IPPROTO_TCP)
		return LM_GSO_UNSUPPORTED;
	if (lm_pull(skb, p, ETH_HLEN + sizeof(struct iphdr) + sizeof(struct tcphdr)))
		return LM_GSO_UNSUPPORTED;
	lm_reload_l3(p);
	th = p->data + ETH_HLEN + sizeof(struct iphdr);
	if (th->doff < 5)
		return LM_GSO_UNSUPPORTED;
	/* Oversized segments: fragmented or ICMP, as above. */
	if (sizeof(struct iphdr) + th->doff * 4 + gso_size > mtu)
		return LM_MTU_EXCEEDED;
	return LM_FORWARDED;
}

#endif /* LM_FWD_H */
