/* SPDX-License-Identifier: GPL-2.0 */
/*
 * heartbeat.h - lm_heartbeat, not a hook: the agent runs it with
 * BPF_PROG_TEST_RUN every 250 ms.  It moves the fast path's deadline
 * skb->cb[0] jiffies ahead (0 turns the fast path off) and samples both
 * clocks, so the agent can measure HZ and read neighbours' `used` stamps.
 * Compiled with the datapath because BCC maps belong to one object.
 */
#ifndef LM_HEARTBEAT_H
#define LM_HEARTBEAT_H

#include "common.h"

int lm_heartbeat(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct lm_heartbeat *hb = heartbeat.lookup(&zero);

	if (!hb)
		return 0;
	hb->jiffies = bpf_jiffies64();
	hb->ktime_ns = bpf_ktime_get_ns();
	hb->deadline = skb->cb[0] ? hb->jiffies + skb->cb[0] : 0;
	return 0;
}

#endif /* LM_HEARTBEAT_H */
