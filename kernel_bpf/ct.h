/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ct.h - the conntrack stage (stateful netfilter mode only): continue a
 * flow the kernel's own conntrack has confirmed.
 *
 * Looks the packet's wire tuple up in the kernel's conntrack table
 * (bpf_skb_ct_lookup), checks that the fast path can do for this packet
 * exactly what nf_conntrack_in() would (no state change, no helper, no
 * sequence adjustment, ...), copies what the later stages need into
 * p->ci (NAT translation, mark, status, direction), refreshes the entry's
 * timeout to what tcp_packet()/udp_packet() would set, and releases the
 * entry - all in lm_ct(), so no reference outlives the stage.
 *
 * struct nf_conn is read at offsets the loader takes from the running
 * kernel's BTF (mirror/btf.py, passed as -D LM_NFCT_*): BCC compiles against
 * older headers, and a wrong offset would silently read another field.
 */
#ifndef LM_CT_H
#define LM_CT_H

#include <uapi/linux/udp.h>
#include "pkt.h"
#include "parse.h"

#if !defined(LM_NFCT_STATUS) || !defined(LM_KF_SKB_CT_LOOKUP)
#error "ct.h needs the nf_conn layout and kfunc placeholders from mirror/datapath.py"
#endif

/* uapi nf_conntrack_tcp.h / nf_conntrack_common.h: stable ABI values. */
#define LM_TCP_CONNTRACK_ESTABLISHED 3
#define LM_TCP_FLAG_BE_LIBERAL 0x08
#define LM_TCP_FLAG_DATA_UNACKNOWLEDGED 0x10
#define LM_IP_CT_DIR_REPLY 1

/* Status bits that end the fast path for the entry (see lm_ct_status). */
#define LM_CT_PUNT_BITS (LM_IPS_DYING | LM_IPS_SEQ_ADJUST | LM_IPS_UNTRACKED | \
			 LM_IPS_TEMPLATE | LM_IPS_HELPER | LM_IPS_FIXED_TIMEOUT | \
			 LM_IPS_OFFLOAD | LM_IPS_HW_OFFLOAD)

/* Opaque: read only through the LM_NFCT_* offsets. */
struct lm_nf_conn;

/* struct bpf_ct_opts (the loader checks these member offsets against the
 * kernel's BTF and passes the kernel's size as LM_CT_OPTS_SIZE). */
struct lm_ct_opts {
	__s32 netns_id;
	__s32 error;
	__u8 l4proto;
	__u8 dir;
	__u16 ct_zone_id;
	__u8 ct_zone_dir;
	__u8 reserved[3];
};

/*
 * The kfuncs.  BCC 0.26 cannot declare them, so they are called like BPF
 * helpers with placeholder numbers; the loader rewrites each such call into
 * a BPF_PSEUDO_KFUNC_CALL to the kernel function's BTF id before loading.
 */
static struct lm_nf_conn *(*lm_kf_skb_ct_lookup)(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
						  __u32 tuple_sz, struct lm_ct_opts *opts,
						  __u32 opts_sz) = (void *)LM_KF_SKB_CT_LOOKUP;
static void (*lm_kf_ct_release)(struct lm_nf_conn *ct) = (void *)LM_KF_CT_RELEASE;
static int (*lm_kf_ct_change_timeout)(struct lm_nf_conn *ct, __u32 ms) = (void *)LM_KF_CT_CHANGE_TIMEOUT;

#define LM_NFCT(ct, type, off) (*(type *)((char *)(ct) + (off)))

#ifdef LM_CT_EXT_SYNPROXY
/*
 * ctnetlink gives every entry it creates (conntrack -I, conntrackd) a
 * synproxy extension; only a nonzero timestamp offset makes the synproxy
 * hook rewrite established segments.  The extension sits at a variable
 * offset, which BTF-typed loads cannot follow: read it with probe_read.
 */
static __always_inline __u32 lm_ct_synproxy_tsoff(struct lm_nf_conn *ct, __u8 ext_off)
{
	__u64 ext = 0;
	__u32 tsoff = 1; /* unreadable: assume the worst */

	if (bpf_probe_read_kernel(&ext, sizeof(ext), (char *)ct + LM_NFCT_EXT) == 0)
		bpf_probe_read_kernel(&tsoff, sizeof(tsoff), (void *)(ext + ext_off + LM_SYNPROXY_TSOFF));
	return tsoff;
}
#endif

/* Status and extensions: punt what makes the kernel do per-packet work the
 * fast path cannot (sequence adjustment, helpers, accounting, a timeout
 * policy instead of the sysctls), and entries on their way out.  (A
 * seqadj extension only acts with IPS_SEQ_ADJUST.) */
static __always_inline __u32 lm_ct_status(struct lm_pkt *p, struct lm_nf_conn *ct, __u64 status)
{
	const __u8 *ext;

	if (!(status & LM_IPS_CONFIRMED) || (status & LM_CT_PUNT_BITS))
		return LM_CT_STATUS;
	if (p->cfg->ct_flags)
		return LM_CT_ACCT;
	ext = LM_NFCT(ct, const __u8 *, LM_NFCT_EXT);
	if (!ext)
		return LM_FORWARDED;
#ifdef LM_CT_EXT_ACCT
	if (ext[LM_CT_EXT_OFFSET + LM_CT_EXT_ACCT])
		return LM_CT_ACCT;
#endif
#ifdef LM_CT_EXT_HELPER
	if (ext[LM_CT_EXT_OFFSET + LM_CT_EXT_HELPER])
		return LM_CT_EXTENSION;
#endif
#ifdef LM_CT_EXT_TIMEOUT
	if (ext[LM_CT_EXT_OFFSET + LM_CT_EXT_TIMEOUT])
		return LM_CT_EXTENSION;
#endif
#ifdef LM_CT_EXT_SYNPROXY
	/* The synproxy hook only touches TCP. */
	if (p->iph->protocol == IPPROTO_TCP && ext[LM_CT_EXT_OFFSET + LM_CT_EXT_SYNPROXY] &&
	    lm_ct_synproxy_tsoff(ct, ext[LM_CT_EXT_OFFSET + LM_CT_EXT_SYNPROXY]))
		return LM_CT_EXTENSION;
#endif
	return LM_FORWARDED;
}

/*
 * TCP: only ESTABLISHED+ASSURED entries whose window tracking the agent
 * has made liberal (both directions), so that the segments the kernel does
 * not see cannot make a later punted one INVALID.  The timeout is
 * tcp_packet()'s choice for an ESTABLISHED segment: unacknowledged data as
 * the entry records it (the kernel saw the segments before takeover, not
 * the fast-pathed ones), the zero-window case from this segment's window,
 * which tcp_in_window() stores in last_win before the choice.  When this
 * segment could be the retransmission that reaches tcp_max_retrans (the
 * entry has counted one less), only the kernel can tell.
 */
static __always_inline __u32 lm_ct_tcp(struct lm_pkt *p, struct lm_nf_conn *ct, __u64 status, __u32 *timeout)
{
	struct lm_config *cfg = p->cfg;
	__u8 flags0 = LM_NFCT(ct, __u8, LM_NFCT_TCP_FLAGS0);
	__u8 flags1 = LM_NFCT(ct, __u8, LM_NFCT_TCP_FLAGS1);
	__u32 est = cfg->to_tcp_established;

	if (LM_NFCT(ct, __u8, LM_NFCT_TCP_STATE) != LM_TCP_CONNTRACK_ESTABLISHED ||
	    (status & (LM_IPS_ASSURED | LM_IPS_SEEN_REPLY)) != (LM_IPS_ASSURED | LM_IPS_SEEN_REPLY))
		return LM_CT_NOT_ESTABLISHED;
	if (LM_NFCT(ct, __u8, LM_NFCT_TCP_RETRANS) + 1 >= cfg->tcp_max_retrans && est > cfg->to_tcp_retrans)
		return LM_CT_TCP_RETRANS;
	p->ci->liberal = flags0 & flags1 & LM_TCP_FLAG_BE_LIBERAL;
	if (((flags0 | flags1) & LM_TCP_FLAG_DATA_UNACKNOWLEDGED) && est > cfg->to_tcp_unack)
		*timeout = cfg->to_tcp_unack;
	else if (p->ci->tcp_win == 0 && est > cfg->to_tcp_retrans)
		*timeout = cfg->to_tcp_retrans;
	else
		*timeout = est;
	return LM_FORWARDED;
}

/*
 * UDP: udp_packet().  One-way flows in the original direction (ctstate NEW
 * of a confirmed entry) and replied flows younger than 2 s get the
 * unreplied timeout, ASSURED ones the stream timeout.  The packets on which
 * the kernel changes the entry (the first reply sets SEEN_REPLY, the first
 * replied one past 2 s sets ASSURED) are its job.
 */
static __always_inline __u32 lm_ct_udp(struct lm_pkt *p, struct lm_nf_conn *ct, __u64 status, __u32 *timeout)
{
	struct lm_config *cfg = p->cfg;
	/* time_after(jiffies, ct->proto.udp.stream_ts) */
	int stream = (__s64)(LM_NFCT(ct, __u64, LM_NFCT_UDP_STREAM_TS) - p->now) < 0;

	p->ci->liberal = 1;
	if (!(status & LM_IPS_SEEN_REPLY)) {
		if (p->ci->dir == LM_IP_CT_DIR_REPLY)
			return LM_CT_NOT_ESTABLISHED;
		*timeout = cfg->to_udp;
		return LM_FORWARDED;
	}
	if (!(status & LM_IPS_ASSURED)) {
		if (stream)
			return LM_CT_NOT_ESTABLISHED;
		*timeout = cfg->to_udp;
		return LM_FORWARDED;
	}
	*timeout = stream ? cfg->to_udp_stream : cfg->to_udp;
	return LM_FORWARDED;
}

/* Leave as the inverse of tuple T (O: original, R: reply).  A macro: the
 * verifier accepts only constant offsets into nf_conn. */
#define LM_CT_INVERT(ci, ct, T)                                                \
	do {                                                                   \
		(ci)->nat_daddr = LM_NFCT(ct, __u32, LM_NFCT_##T##_SRC_IP);    \
		(ci)->nat_dport = LM_NFCT(ct, __u16, LM_NFCT_##T##_SRC_PORT);  \
		(ci)->nat_saddr = LM_NFCT(ct, __u32, LM_NFCT_##T##_DST_IP);    \
		(ci)->nat_sport = LM_NFCT(ct, __u16, LM_NFCT_##T##_DST_PORT);  \
	} while (0)

/* The translation from the entry's two tuples: the packet leaves as the
 * inverse of the other direction's tuple.  nf_nat_packet() only rewrites
 * when the status says NAT for that manip; anything else punts. */
static __always_inline __u32 lm_ct_nat(struct lm_pkt *p, struct lm_nf_conn *ct, __u64 status)
{
	struct lm_ctinfo *ci = p->ci;
	__u64 dnat_bit, snat_bit;

	/* A bridged frame whose destination PREROUTING changes is re-routed
	 * by br_netfilter (maybe out of the bridge), one whose source
	 * POSTROUTING changes is rewritten: both are the kernel's. */
	if (p->bridged && (status & (LM_IPS_SRC_NAT | LM_IPS_DST_NAT)))
		return LM_BR_CT_NAT;
	if (ci->dir == LM_IP_CT_DIR_REPLY) {
		LM_CT_INVERT(ci, ct, O);
		dnat_bit = LM_IPS_SRC_NAT;
		snat_bit = LM_IPS_DST_NAT;
	} else {
		LM_CT_INVERT(ci, ct, R);
		dnat_bit = LM_IPS_DST_NAT;
		snat_bit = LM_IPS_SRC_NAT;
	}
	if ((ci->nat_daddr != ci->key.daddr || ci->nat_dport != ci->key.dport) && !(status & dnat_bit))
		return LM_CT_STATUS;
	if ((ci->nat_saddr != ci->key.saddr || ci->nat_sport != ci->key.sport) && !(status & snat_bit))
		return LM_CT_STATUS;
	return LM_FORWARDED;
}

/* Everything lm_ct() decides while it holds the entry. */
static __always_inline __u32 lm_ct_entry(struct lm_pkt *p, struct lm_nf_conn *ct)
{
	struct lm_ctinfo *ci = p->ci;
	__u64 status = LM_NFCT(ct, __u64, LM_NFCT_STATUS);
	__u32 timeout = 0, reason;

	reason = lm_ct_status(p, ct, status);
	if (reason != LM_FORWARDED)
		return reason;
	if (ci->key.proto == IPPROTO_TCP)
		reason = lm_ct_tcp(p, ct, status, &timeout);
	else
		reason = lm_ct_udp(p, ct, status, &timeout);
	if (reason != LM_FORWARDED)
		return reason;
	reason = lm_ct_nat(p, ct, status);
	if (reason != LM_FORWARDED)
		return reason;
	/* 0: sysctls not mirrored (refreshing to 0 would kill the entry and
	 * its NAT mid-flow); the ms argument is a u32. */
	if (timeout == 0 || timeout > 0xffffffffU / 1000)
		return LM_CT_STATUS;
	ci->mark = LM_NFCT(ct, __u32, LM_NFCT_MARK);
	ci->status = status & LM_CT_VERDICT_BITS;
	/* A not-yet-liberal TCP entry is only reported later, once routing
	 * says the packet would be forwarded; the kernel refreshes it then.
	 * An explain run leaves the entry as it is. */
	if (ci->liberal && !p->trace)
		lm_kf_ct_change_timeout(ct, timeout * 1000);
	return LM_FORWARDED;
}

/* The packet's L4 header: what tcp_error()/udp_error() would accept
 * (checksums aside), and TCP segments that change no conntrack state. */
static __always_inline __u32 lm_ct_l4(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct lm_ctinfo *ci = p->ci;
	__u32 l4len = p->tot_len - sizeof(struct iphdr);
	__u8 proto = p->iph->protocol;

	if (proto == IPPROTO_TCP) {
		struct tcphdr *th;

		if (lm_pull(skb, p, ETH_HLEN + sizeof(struct iphdr) + sizeof(struct tcphdr)))
			return LM_CT_PROTO;
		lm_reload_l3(p);
		th = p->data + ETH_HLEN + sizeof(struct iphdr);
		if (th->doff < 5 || th->doff * 4 > l4len)
			return LM_CT_PROTO;
		/* SYN/FIN/RST change the state; no ACK is not ESTABLISHED. */
		if (th->syn || th->fin || th->rst || !th->ack)
			return LM_CT_TCP_FLAGS;
		ci->key.sport = th->source;
		ci->key.dport = th->dest;
		ci->tcp_win = th->window;
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *uh;
		__u32 ulen;

		if (lm_pull(skb, p, ETH_HLEN + sizeof(struct iphdr) + sizeof(struct udphdr)))
			return LM_CT_PROTO;
		lm_reload_l3(p);
		uh = p->data + ETH_HLEN + sizeof(struct iphdr);
		ulen = LM_NTOHS(uh->len);
		if (ulen < sizeof(struct udphdr) || ulen > l4len)
			return LM_CT_PROTO;
		ci->key.sport = uh->source;
		ci->key.dport = uh->dest;
	} else {
		return LM_CT_PROTO;
	}
	/* proto, bridged, and pad = 0: map key bytes */
	*(__u32 *)&ci->key.proto = proto | (__u32)p->bridged << 8;
	return LM_FORWARDED;
}

static __always_inline __u32 lm_ct(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct lm_ctinfo *ci = p->ci;
	struct bpf_sock_tuple tuple = {};
	struct lm_ct_opts opts = { .netns_id = -1 };
	struct lm_nf_conn *ct;
	__u32 reason;

	/* A mark set before us (another tc program) could steer rules. */
	if (skb->mark)
		return LM_SKB_MARK;
	reason = lm_ct_l4(skb, p);
	if (reason != LM_FORWARDED)
		return reason;
	/* The device it arrived on: for a frame from a bridge port (bridged,
	 * or routed with the bridge as L3 device) the port, which physdev
	 * matches see. */
	ci->key.ifindex = skb->ifindex;
	ci->key.saddr = p->iph->saddr;
	ci->key.daddr = p->iph->daddr;
	ci->liberal = 0;

	tuple.ipv4.saddr = ci->key.saddr;
	tuple.ipv4.daddr = ci->key.daddr;
	tuple.ipv4.sport = ci->key.sport;
	tuple.ipv4.dport = ci->key.dport;
	opts.l4proto = ci->key.proto;
	ct = lm_kf_skb_ct_lookup(skb, &tuple, sizeof(tuple.ipv4), &opts, LM_CT_OPTS_SIZE);
	if (!ct)
		return LM_CT_MISS;
	ci->dir = opts.dir;
	reason = lm_ct_entry(p, ct);
	lm_kf_ct_release(ct);
	if (reason != LM_FORWARDED)
		return reason;
	/* DNAT happens in PREROUTING, before the routing decision: route the
	 * translated destination (and apply ip_route_input's address checks
	 * to it); SNAT happens after routing. */
	p->daddr = ci->nat_daddr;
	if ((LM_IP_OCTET0(p->daddr) & 0xf0) == 0xe0 || p->daddr == 0xffffffff)
		return LM_IP_MULTICAST;
	if (LM_IP_OCTET0(p->daddr) == 0 || LM_IP_OCTET0(p->daddr) == 127 || LM_IP_OCTET0(p->daddr) >= 240)
		return LM_MARTIAN;
	return LM_FORWARDED;
}

#endif /* LM_CT_H */
