/* SPDX-License-Identifier: GPL-2.0 */
/*
 * nat.h - apply the NAT the kernel chose for the flow (stateful mode only):
 * addresses, ports, IPv4 and L4 checksums, as nf_nat_ipv4_manip_pkt() and
 * the TCP/UDP manip functions do.  The checksums go through the same kernel
 * functions (bpf_l4_csum_replace -> inet_proto_csum_replace4/2, which know
 * CHECKSUM_PARTIAL/COMPLETE; bpf_l3_csum_replace -> csum_replace4), so the
 * bytes match the kernel's; each result is canonical, so their order does
 * not matter.  A UDP checksum of 0 (none) stays 0; a computed 0 is sent as
 * 0xffff (BPF_F_MARK_MANGLED_0, CSUM_MANGLED_0 in udp_manip_pkt()).
 *
 * Runs last, after lm_xmit(): the checksum helpers invalidate every packet
 * pointer, and bpf_redirect() only acts when the program returns.
 */
#ifndef LM_NAT_H
#define LM_NAT_H

#include <uapi/linux/udp.h>
#include "pkt.h"

#define LM_IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))

static __always_inline int lm_nat_addr(struct __sk_buff *skb, __u32 l4_csum, __u64 l4_flags,
				       __u32 from, __u32 to)
{
	if (from == to)
		return 0;
	return bpf_l4_csum_replace(skb, l4_csum, from, to, l4_flags | BPF_F_PSEUDO_HDR | 4) |
	       bpf_l3_csum_replace(skb, LM_IP_CSUM_OFF, from, to, 4);
}

static __always_inline int lm_nat_port(struct __sk_buff *skb, __u32 l4_csum, __u64 l4_flags,
				       __u16 from, __u16 to)
{
	if (from == to)
		return 0;
	return bpf_l4_csum_replace(skb, l4_csum, from, to, l4_flags | 2);
}

static __always_inline __u32 lm_nat(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct lm_ctinfo *ci = p->ci;
	struct iphdr *iph = p->iph;
	__u16 *ports = (void *)(iph + 1);
	__u32 l4_csum = ETH_HLEN + sizeof(struct iphdr);
	__u64 l4_flags = 0;
	int err;

	/* ct.h pulled the L4 header and nothing has shrunk the packet since;
	 * the verifier still wants the check. */
	if ((void *)(ports + 2) > p->data_end)
		return LM_NAT_FAILED;
	iph->saddr = ci->nat_saddr;
	iph->daddr = ci->nat_daddr;
	ports[0] = ci->nat_sport;
	ports[1] = ci->nat_dport;

	if (ci->key.proto == IPPROTO_TCP) {
		l4_csum += offsetof(struct tcphdr, check);
	} else {
		l4_csum += offsetof(struct udphdr, check);
		l4_flags = BPF_F_MARK_MANGLED_0;
	}
	err = lm_nat_addr(skb, l4_csum, l4_flags, ci->key.daddr, ci->nat_daddr);
	err |= lm_nat_port(skb, l4_csum, l4_flags, ci->key.dport, ci->nat_dport);
	err |= lm_nat_addr(skb, l4_csum, l4_flags, ci->key.saddr, ci->nat_saddr);
	err |= lm_nat_port(skb, l4_csum, l4_flags, ci->key.sport, ci->nat_sport);
	/* Only if the header could not be made writable (the kernel's NAT
	 * drops then too); the packet is half rewritten, so it cannot punt. */
	return err ? LM_NAT_FAILED : LM_FORWARDED;
}

#endif /* LM_NAT_H */
