/* SPDX-License-Identifier: GPL-2.0 */
/*
 * nat.h - apply the NAT the kernel chose for the flow (stateful mode only):
 * addresses, ports, IPv4 and L4 checksums, as nf_nat_ipv4_manip_pkt() and
 * the TCP/UDP manip functions leave them.
 *
 * The kernel updates the checksums one field at a time; here the IPv4
 * checksum takes one csum_replace_by_diff() for both addresses, and the L4
 * checksum goes through bpf_l4_csum_replace() twice (addresses as pseudo
 * header, ports as data), which runs the kernel's own
 * inet_proto_csum_replace_by_diff() and so handles CHECKSUM_PARTIAL and
 * CHECKSUM_COMPLETE skbs as the NAT code does.  Every one of these updates
 * produces the canonical representation of the one's-complement result, so
 * grouping or order cannot change a byte (tests/bpf/test_ct_oracle.py
 * compares with the kernel's output).  A UDP checksum of 0 (none) stays 0,
 * a computed 0 is sent as 0xffff (BPF_F_MARK_MANGLED_0; CSUM_MANGLED_0 in
 * udp_manip_pkt()).
 *
 * Runs last, after lm_xmit(): the checksum helper invalidates every packet
 * pointer, and bpf_redirect() only acts when the program returns.
 */
#ifndef LM_NAT_H
#define LM_NAT_H

#include <uapi/linux/udp.h>
#include "pkt.h"

/* One's-complement 32-bit add (csum_add()). */
static __always_inline __u32 lm_csum_add(__u32 a, __u32 b)
{
	a += b;
	return a + (a < b);
}

/* The checksum difference of replacing @from by @to (csum_sub + csum_add). */
static __always_inline __u32 lm_csum_diff(__u32 from, __u32 to)
{
	return lm_csum_add(~from, to);
}

/* csum_replace_by_diff(): csum_fold(csum_add(diff, ~csum_unfold(check))). */
static __always_inline __u16 lm_csum_replace_by_diff(__u16 check, __u32 diff)
{
	__u32 s = lm_csum_add(diff, ~(__u32)check);

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

static __always_inline __u32 lm_nat(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct lm_ctinfo *ci = p->ci;
	struct iphdr *iph = p->iph;
	__u16 *ports = (void *)(iph + 1);
	__u32 l4_csum = ETH_HLEN + sizeof(struct iphdr);
	__u64 l4_flags = 0;
	__u32 addr_diff, port_diff;
	int addrs = ci->nat_saddr != ci->key.saddr || ci->nat_daddr != ci->key.daddr;
	int nports = ci->nat_sport != ci->key.sport || ci->nat_dport != ci->key.dport;
	int err = 0;

	/* ct.h pulled the L4 header and nothing has shrunk the packet since;
	 * the verifier still wants the check. */
	if ((void *)(ports + 2) > p->data_end)
		return LM_NAT_FAILED;
	addr_diff = lm_csum_add(lm_csum_diff(ci->key.saddr, ci->nat_saddr),
				lm_csum_diff(ci->key.daddr, ci->nat_daddr));
	port_diff = lm_csum_add(lm_csum_diff(ci->key.sport, ci->nat_sport),
				lm_csum_diff(ci->key.dport, ci->nat_dport));
	if (addrs) {
		iph->saddr = ci->nat_saddr;
		iph->daddr = ci->nat_daddr;
		iph->check = lm_csum_replace_by_diff(iph->check, addr_diff);
	}
	ports[0] = ci->nat_sport;
	ports[1] = ci->nat_dport;

	if (ci->key.proto == IPPROTO_TCP) {
		l4_csum += offsetof(struct tcphdr, check);
	} else {
		l4_csum += offsetof(struct udphdr, check);
		l4_flags = BPF_F_MARK_MANGLED_0;
	}
	if (addrs)
		err = bpf_l4_csum_replace(skb, l4_csum, 0, addr_diff, l4_flags | BPF_F_PSEUDO_HDR);
	if (nports)
		err |= bpf_l4_csum_replace(skb, l4_csum, 0, port_diff, l4_flags);
	/* Only if the header could not be made writable (the kernel's NAT
	 * drops then too); the packet is half rewritten, so it cannot punt. */
	return err ? LM_NAT_FAILED : LM_FORWARDED;
}

#endif /* LM_NAT_H */
