/* SPDX-License-Identifier: GPL-2.0 */
/*
 * parse.h - Ethernet and IPv4 header validation: what eth_type_trans(),
 * ip_rcv_core() and the address checks at the top of ip_route_input_slow()
 * decide before the kernel routes a packet.  Anything that is not a plain,
 * valid, unicast IPv4 packet addressed to this host's MAC is punted.
 */
#ifndef LM_PARSE_H
#define LM_PARSE_H

#include <uapi/linux/if_packet.h>
#include "pkt.h"

#define LM_IP_MF 0x2000
#define LM_IP_OFFSET 0x1fff

/* First octet of an address held in network order (low byte on LE). */
#define LM_IP_OCTET0(a) ((__u32)(a) & 0xff)

static __always_inline __u32 lm_parse_eth(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct ethhdr *eth;
	__u16 proto;

	/* The VLAN tag was already moved into skb metadata (hw or
	 * skb_vlan_untag()): the kernel hands it to a VLAN device or drops it. */
	if (skb->vlan_present)
		return LM_VLAN;
	/* Runt frame: whatever it is, it is not IPv4 we could forward. */
	if (lm_pull(skb, p, ETH_HLEN))
		return LM_NOT_IP;
	eth = p->data;
	proto = eth->h_proto;
	/* Tagged frame still in the payload: VLAN devices / bridge decide. */
	if (proto == LM_HTONS(ETH_P_8021Q) || proto == LM_HTONS(ETH_P_8021AD))
		return LM_VLAN;
	/* IPv6: not handled by this fast path (yet). */
	if (proto == LM_HTONS(ETH_P_IPV6))
		return LM_IPV6;
	/* ARP, LLDP, ...: the kernel's protocol handlers own them. */
	if (proto != LM_HTONS(ETH_P_IP))
		return LM_NOT_IP;
	/* Broadcast/multicast frames go to local listeners, never forwarded
	 * as such by ip_forward. */
	if (eth->h_dest[0] & 1)
		return LM_L2_MULTICAST;
	/* Not for our MAC: ip_rcv() drops PACKET_OTHERHOST (a sniffer or a
	 * bridge port may still want it). */
	if (skb->pkt_type != PACKET_HOST || !lm_mac_eq(eth->h_dest, p->in_link->mac))
		return LM_L2_OTHERHOST;
	return LM_FORWARDED;
}

/* One's complement sum of the 20-byte header: 0xffff iff the checksum is
 * right (ip_fast_csum() == 0).  Five 32-bit loads, no loop, no helper. */
static __always_inline int lm_ipv4_csum_ok(const struct iphdr *iph)
{
	const __u32 *w = (const __u32 *)iph;
	__u64 s = (__u64)w[0] + w[1] + w[2] + w[3] + w[4];

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return s == 0xffff;
}

static __always_inline __u32 lm_parse_ipv4(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct iphdr *iph;
	__u32 saddr, daddr, s0, d0;

	/* Too short for an IPv4 header: ip_rcv_core() drops it. */
	if (lm_pull(skb, p, ETH_HLEN + sizeof(struct iphdr)))
		return LM_IP_MALFORMED;
	lm_reload_l3(p);
	iph = p->iph;
	if (iph->version != 4 || iph->ihl < 5)
		return LM_IP_MALFORMED;
	p->tot_len = LM_NTOHS(iph->tot_len);
	/* tot_len must match the frame exactly: the kernel trims Ethernet
	 * padding (pskb_trim_rcsum) and drops truncated packets; tot_len 0 is
	 * BIG TCP's jumbo marker.  All of that is the kernel's business. */
	if (p->tot_len < iph->ihl * 4 || p->tot_len + ETH_HLEN != skb->len)
		return LM_IP_MALFORMED;
	/* Options (record route, router alert, ...) need ip_options_compile()
	 * and ip_forward_options(). */
	if (iph->ihl != 5)
		return LM_IP_OPTIONS;
	/* Bad checksum: the kernel counts InCsumErrors and drops. */
	if (!lm_ipv4_csum_ok(iph))
		return LM_IP_CSUM;
	/* Fragments may need reassembly (conntrack/defrag) first. */
	if (iph->frag_off & LM_HTONS(LM_IP_MF | LM_IP_OFFSET))
		return LM_IP_FRAGMENT;

	saddr = iph->saddr;
	daddr = iph->daddr;
	p->daddr = daddr;
	d0 = LM_IP_OCTET0(daddr);
	s0 = LM_IP_OCTET0(saddr);
	/* Multicast and limited broadcast: ip_mr_input / local delivery. */
	if ((d0 & 0xf0) == 0xe0 || daddr == 0xffffffff)
		return LM_IP_MULTICAST;
	/* Martians (0/8, 127/8, multicast/broadcast/class E sources; 0/8,
	 * 127/8, class E destinations): the kernel logs and drops them, or
	 * route_localnet makes them local.  Class E is forwardable in Linux,
	 * but it is rare enough to leave to the kernel. */
	if (s0 == 0 || s0 == 127 || s0 >= 224 ||
	    d0 == 0 || d0 == 127 || d0 >= 240)
		return LM_MARTIAN;
	return LM_FORWARDED;
}

#endif /* LM_PARSE_H */
