/* SPDX-License-Identifier: GPL-2.0 */
/*
 * l2.h - Linux bridges: what br_handle_frame() and br_forward() decide for
 * a frame arriving on a bridge port, and which port br_dev_xmit() picks for
 * a routed packet leaving through a bridge.
 *
 * lm_l2_ingress (right after the gate) handles every frame arriving on a
 * port the agent mirrors:
 *  - known unicast to another forwarding port of the same bridge: redirected
 *    there unchanged by lm_l2_forward() (p->bridged); with br_netfilter in
 *    stateful mode (p->br_nf) the IPv4 parse, conntrack and verdict stages
 *    run first, exactly as for routed IPv4 but with no routing;
 *  - addressed to the bridge's own MAC: handed on to the routed stages with
 *    the bridge as the L3 ingress device (p->via_bridge);
 *  - anything the bridge floods, learns from, filters or hairpins: punted.
 * lm_l2_egress (after the neighbour lookup) turns "out of bridge B to MAC M"
 * into "out of the port the FDB has for M".
 *
 * The source check keeps learning exact: a frame is fast-pathed only if the
 * bridge already has its source MAC on the ingress port, i.e. seeing it
 * would change nothing but the entry's age; that age the agent refreshes
 * (NTF_USE) from the `used` stamp written here.
 */
#ifndef LM_L2_H
#define LM_L2_H

#include "pkt.h"
#include "parse.h"

#define LM_VLAN_HLEN 4

/* 01:80:c2:00:00:0X: IEEE 802.1D reserved groups (STP, pause, LACP, 802.1X,
 * LLDP); the bridge consumes or forwards them by group_fwd_mask. */
static __always_inline int lm_is_link_local(const __u8 *d)
{
	return d[0] == 0x01 && d[1] == 0x80 && d[2] == 0xc2 && d[3] == 0 && d[4] == 0 &&
	       (d[5] & 0xf0) == 0;
}

static __always_inline struct lm_fdb *lm_fdb_find(__u32 bridge, const __u8 *mac)
{
	struct lm_fdb_key key = { .bridge = bridge };

	lm_mac_copy(key.mac, mac);
	return fdb.lookup(&key);
}

/* The bridge learns the source MAC on the ingress port (br_fdb_update()):
 * only if it already sits there is skipping the bridge invisible. */
static __always_inline __u32 lm_l2_source(struct lm_pkt *p, struct lm_port *port)
{
	struct lm_fdb *src;

	if (!(port->flags & LM_PORT_LEARNING))
		return LM_FORWARDED;
	src = lm_fdb_find(port->bridge, p->eth->h_source);
	/* Unknown, on another port (a move) or one of the bridge's own
	 * addresses (the bridge warns and ignores): the kernel decides. */
	if (!src || (src->flags & LM_FDB_LOCAL) || src->port != p->ifindex)
		return LM_BR_LEARN;
	if (p->now - src->used > (p->cfg->hz >> 2) && !p->trace)
		src->used = p->now;
	return LM_FORWARDED;
}

/* Addressed to a local entry: the bridge passes it up its own device. */
static __always_inline __u32 lm_l2_up(struct lm_pkt *p, struct lm_port *port)
{
	struct lm_link *br = links.lookup(&port->bridge);

	/* A port's own MAC is local too, but then the frame is not for the
	 * bridge's IP configuration as the routed stages know it. */
	if (!br || !lm_mac_eq(p->eth->h_dest, br->mac))
		return LM_BR_LOCAL;
	if (port->up_punt)
		return port->up_punt;
	p->ifindex = port->bridge;
	p->in_link = br;
	p->via_bridge = 1;
	return LM_FORWARDED;
}

/* Known unicast to another port: br_forward() -> should_deliver().  Only
 * decides: lm_l2_forward() sends, once the netfilter stages (br_netfilter)
 * have had their say. */
static __always_inline __u32 lm_l2_switch(struct __sk_buff *skb, struct lm_pkt *p, struct lm_port *port,
					  struct lm_fdb *dst)
{
	__u32 oif = dst->port, hold;
	struct lm_port *out;
	struct lm_link *ol;

	/* Back out of the ingress port: dropped, or sent back in hairpin
	 * mode; both are the kernel's. */
	if (oif == p->ifindex)
		return LM_BR_HAIRPIN;
	out = ports.lookup(&oif);
	if (!out || out->bridge != port->bridge || !(out->flags & LM_PORT_FORWARDING))
		return LM_BR_BLOCKED;
	if (port->flags & out->flags & LM_PORT_ISOLATED)
		return LM_BR_ISOLATED;
	ol = links.lookup(&oif);
	if (!ol || !(ol->flags & LM_LINK_UP))
		return LM_EGRESS_UNMANAGED;
	/* Only IPv4 is switched here: ARP and IPv6 would need arptables and
	 * ip6tables mirrored (br_netfilter hands them to those too). */
	if (p->eth->h_proto == LM_HTONS(ETH_P_IPV6))
		return LM_IPV6;
	if (p->eth->h_proto != LM_HTONS(ETH_P_IP))
		return LM_NOT_IP;
	/* is_skb_forwardable() in br_dev_queue_push_xmit() drops frames
	 * longer than the egress MTU + header + one VLAN tag. */
	if (!skb->gso_size && skb->len > ol->mtu + ETH_HLEN + LM_VLAN_HLEN)
		return LM_MTU_EXCEEDED;
	if (port->flags & LM_PORT_NF_IPV4) {
		/* bridge-nf-call-iptables: iptables and conntrack see this
		 * frame.  Rules the agent cannot evaluate punt it; so does a
		 * netfilter change under way (the hold the change signal sets
		 * for forwarding holds bridged frames too). */
		if (port->ipv4_punt)
			return port->ipv4_punt;
		hold = p->cfg->punt_forward_reason;
		if (hold == LM_NETFILTER || hold == LM_NETFILTER_CHANGING)
			return hold;
		p->br_nf = 1;
	}
	p->oif = oif;
	p->xmit_link = ol;
	p->bridged = 1;
	return LM_FORWARDED;
}

/* Send a switched frame unchanged to its egress port.  Into the peer's
 * netns directly only for the peer's own MAC: skb_scrub_packet() makes it
 * PACKET_HOST there, where veth_xmit() would let eth_type_trans() decide
 * (OTHERHOST for other MACs). */
static __always_inline __u32 lm_l2_forward(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct lm_link *ol = p->xmit_link;

	/* br_nf_dev_queue_xmit(): with br_netfilter, an IPv4 packet (not
	 * GSO) larger than the egress MTU is fragmented, or dropped with DF. */
	if (p->br_nf && !skb->gso_size && p->tot_len > ol->mtu)
		return LM_MTU_EXCEEDED;
	if ((ol->flags & LM_LINK_REDIRECT_PEER) && lm_mac_eq(p->eth->h_dest, ol->peer_mac)) {
		/* veth_xmit(): ____dev_forward_skb() resets the priority and
		 * the scrub across namespaces clears the mark. */
		skb->priority = 0;
		skb->mark = 0;
		p->action = bpf_redirect_peer(p->oif, 0);
	} else {
		p->action = bpf_redirect(p->oif, 0);
	}
	return LM_FORWARDED;
}

static __always_inline __u32 lm_l2_ingress(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct lm_port *port = ports.lookup(&p->ifindex);
	struct lm_fdb *dst;
	__u16 proto;
	__u32 reason;

	if (!port)
		return LM_FORWARDED; /* not a bridge port: the routed path */
	/* Bridge down, settings not modelled, bridge-family netfilter ... */
	if (port->punt)
		return port->punt;
	if (skb->vlan_present)
		return LM_VLAN;
	if (lm_pull(skb, p, ETH_HLEN))
		return LM_NOT_IP;
	p->eth = p->data;
	proto = p->eth->h_proto;
	if (proto == LM_HTONS(ETH_P_8021Q) || proto == LM_HTONS(ETH_P_8021AD))
		return LM_VLAN;
	/* Blocking, listening, learning, disabled: STP's or the kernel's. */
	if (!(port->flags & LM_PORT_FORWARDING))
		return LM_BR_BLOCKED;
	if (p->eth->h_dest[0] & 1)
		return lm_is_link_local(p->eth->h_dest) ? LM_BR_LINK_LOCAL : LM_L2_MULTICAST;
	reason = lm_l2_source(p, port);
	if (reason != LM_FORWARDED)
		return reason;
	dst = lm_fdb_find(port->bridge, p->eth->h_dest);
	if (!dst)
		return LM_BR_UNKNOWN_UNICAST;
	if (dst->flags & LM_FDB_LOCAL)
		return lm_l2_up(p, port);
	return lm_l2_switch(skb, p, port, dst);
}

/* Routed out of a bridge: br_dev_xmit() sends it to the port the FDB has
 * for the next hop's MAC.  The bridge's own egress must be empty (the
 * agent clears the bridge's LM_LINK_UP otherwise). */
static __always_inline __u32 lm_l2_egress(struct __sk_buff *skb, struct lm_pkt *p)
{
	struct lm_fdb *dst;
	struct lm_port *out;
	struct lm_link *ol;
	__u32 oif;

	if (!(p->out_link->flags & LM_LINK_BRIDGE))
		return LM_FORWARDED;
	dst = lm_fdb_find(p->oif, p->nb->mac);
	/* Unknown: the bridge floods it to every port. */
	if (!dst)
		return LM_BR_UNKNOWN_UNICAST;
	if (dst->flags & LM_FDB_LOCAL)
		return LM_BR_LOCAL;
	oif = dst->port;
	out = ports.lookup(&oif);
	if (!out || out->bridge != p->oif || !(out->flags & LM_PORT_FORWARDING))
		return LM_BR_BLOCKED;
	ol = links.lookup(&oif);
	if (!ol || !(ol->flags & LM_LINK_UP))
		return LM_EGRESS_UNMANAGED;
	/* xmit.h redirects into a veth peer's netns: only right for the
	 * peer's own MAC (see lm_l2_forward()). */
	if ((ol->flags & LM_LINK_REDIRECT_PEER) && !lm_mac_eq(p->nb->mac, ol->peer_mac))
		return LM_PEER_MAC;
	/* The port's MTU may be below the bridge's (is_skb_forwardable()). */
	if (!skb->gso_size && p->tot_len > ol->mtu)
		return LM_MTU_EXCEEDED;
	p->oif = oif;
	p->xmit_link = ol;
	return LM_FORWARDED;
}

#endif /* LM_L2_H */
