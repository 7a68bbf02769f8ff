/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ct_probe.c - test-only program: look the packet's tuple up with ct.h's
 * kfunc declarations and nf_conn offsets, and copy what the entry holds
 * into probe_out[0], so a test can compare it with `conntrack -L`.
 * Loaded by mirror.datapath.Datapath(entry=..., prog="lm_ct_probe").
 */
#include "common.h"
#include "pkt.h"
#include "ct.h"

struct lm_ct_probe {
	__s32 found;           /* 1: entry found */
	__u8 dir, tcp_state, flags0, flags1;
	__u64 status;
	__u32 mark;
	__u32 o_saddr, o_daddr, r_saddr, r_daddr;
	__u16 o_sport, o_dport, r_sport, r_dport;
};

BPF_ARRAY(probe_out, struct lm_ct_probe, 1);

int lm_ct_probe(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct iphdr *iph = data + ETH_HLEN;
	__u16 *ports = (void *)(iph + 1);
	struct bpf_sock_tuple tuple = {};
	struct lm_ct_opts opts = { .netns_id = -1 };
	struct lm_ct_probe *out;
	struct lm_nf_conn *ct;
	__u32 zero = 0;

	out = probe_out.lookup(&zero);
	if (!out || (void *)(ports + 2) > end)
		return TC_ACT_UNSPEC;
	tuple.ipv4.saddr = iph->saddr;
	tuple.ipv4.daddr = iph->daddr;
	tuple.ipv4.sport = ports[0];
	tuple.ipv4.dport = ports[1];
	opts.l4proto = iph->protocol;
	ct = lm_kf_skb_ct_lookup(skb, &tuple, sizeof(tuple.ipv4), &opts, LM_CT_OPTS_SIZE);
	out->found = ct ? 1 : -opts.error;
	if (!ct)
		return TC_ACT_UNSPEC;
	out->dir = opts.dir;
	out->status = LM_NFCT(ct, __u64, LM_NFCT_STATUS);
	out->mark = LM_NFCT(ct, __u32, LM_NFCT_MARK);
	out->o_saddr = LM_NFCT(ct, __u32, LM_NFCT_O_SRC_IP);
	out->o_daddr = LM_NFCT(ct, __u32, LM_NFCT_O_DST_IP);
	out->o_sport = LM_NFCT(ct, __u16, LM_NFCT_O_SRC_PORT);
	out->o_dport = LM_NFCT(ct, __u16, LM_NFCT_O_DST_PORT);
	out->r_saddr = LM_NFCT(ct, __u32, LM_NFCT_R_SRC_IP);
	out->r_daddr = LM_NFCT(ct, __u32, LM_NFCT_R_DST_IP);
	out->r_sport = LM_NFCT(ct, __u16, LM_NFCT_R_SRC_PORT);
	out->r_dport = LM_NFCT(ct, __u16, LM_NFCT_R_DST_PORT);
	out->tcp_state = LM_NFCT(ct, __u8, LM_NFCT_TCP_STATE);
	out->flags0 = LM_NFCT(ct, __u8, LM_NFCT_TCP_FLAGS0);
	out->flags1 = LM_NFCT(ct, __u8, LM_NFCT_TCP_FLAGS1);
	lm_kf_ct_release(ct);
	return TC_ACT_UNSPEC;
}
