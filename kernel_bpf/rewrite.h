/* SPDX-License-Identifier: GPL-2.0 */
/*
 * rewrite.h - turn the packet into what the kernel would transmit: new MACs
 * (neigh_output()), TTL - 1 with the same incremental checksum update as
 * ip_decrease_ttl(), so the bytes match the kernel's exactly.
 *
 * The first stage that writes the packet: every check must be done before it.
 */
#ifndef LM_REWRITE_H
#define LM_REWRITE_H

#include "pkt.h"

static __always_inline __u32 lm_rewrite(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct ethhdr *eth = p->eth;
	struct iphdr *iph = p->iph;
	__u32 check;

	lm_mac_copy(eth->h_dest, p->nb->mac);
	lm_mac_copy(eth->h_source, p->out_link->mac);

	/* ip_decrease_ttl(), operation for operation (RFC 1141 style; it never
	 * produces 0xffff, and a full recompute could differ in that corner). */
	check = iph->check;
	check += LM_HTONS(0x0100);
	iph->check = (__u16)(check + (check >= 0xffff));
	iph->ttl--;
	return LM_FORWARDED;
}

#endif /* LM_REWRITE_H */
