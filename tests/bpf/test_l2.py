"""Packet tests of the bridge stages (kernel_bpf/l2.h) with BPF_PROG_TEST_RUN.

Same table-driven Cases as test_tc_ingress.py, on top of its base state,
with the three veths made ports of one bridge BR (a fake ifindex: nothing is
ever redirected to the bridge itself):
  in0  port, forwarding + learning; CLIENT_MAC learned on it
  out0 port (bpf_redirect);          H7_MAC learned on it
  out1 port, veth peer elsewhere (bpf_redirect_peer); P2_MAC (the peer's) and
       BEHIND_MAC (something behind the peer) learned on it
  BR_MAC: the bridge's own address (local entry), BR routes 10.5.0.0/24.
Switched frames must leave byte-identical; frames for the bridge's MAC are
routed like the kernel's ip_forward() with the bridge as L3 device.
"""

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from lm_bpfrun import TC_ACT_REDIRECT
from test_tc_ingress import (CLIENT_MAC, FWD, GW_MAC, H7_MAC, IN0_MAC, OUT0_MAC, P2_MAC, PEER, UP, Case, R,
                             base_state, check_ctx, check_priority, forwarded, punt, run_case, udp)

BRIDGE = 1 << 5
PFWD, PLEARN, PISOLATED, PNF = 1, 2, 4, 8
BR = 900
BR_MAC = "02:00:00:00:0b:00"
OTHER_BR = 901
MOVED_MAC = "02:aa:00:00:00:99"  # learned on in0 (hairpin target)
BEHIND_MAC = "02:cc:00:00:00:42"  # learned on out1, not the peer's own MAC


def bridge_state(m, t):
    base_state(m, t)
    m.link(BR, BR_MAC, UP | FWD | BRIDGE)
    for port in (t.in0, t.out0):
        m.port(port, BR, PFWD | PLEARN)
    m.port(t.out1, BR, PFWD | PLEARN)  # its peer's MAC: the link's (base_state)
    m.fdb(BR, CLIENT_MAC, t.in0)
    m.fdb(BR, MOVED_MAC, t.in0)
    m.fdb(BR, H7_MAC, t.out0)
    m.fdb(BR, P2_MAC, t.out1)
    m.fdb(BR, BEHIND_MAC, t.out1)
    m.fdb(BR, BR_MAC, BR, local=True)
    m.fdb(BR, IN0_MAC, t.in0, local=True)  # a port's own address is local too
    m.route("10.5.0.0/24", oif=BR)
    m.neigh(BR, "10.5.0.9", P2_MAC)
    m.neigh(BR, "10.5.0.8", GW_MAC)


def l2(dst=H7_MAC, src=CLIENT_MAC, **ip):
    """A frame between two hosts of the bridged segment 10.0.0.0/24."""
    return Ether(src=src, dst=dst) / IP(src="10.0.0.5", dst="10.0.0.7", **ip) / UDP(sport=7, dport=9) / (b"b" * 40)


def switched(desc, pkt, **kw):
    return Case(desc, lambda t: pkt, "FORWARDED", TC_ACT_REDIRECT, out=lambda t: bytes(pkt), **kw)


def port(name, flags, **punts):
    def f(m, t):
        m.port(getattr(t, name), BR, flags, **punts)
    return f


def link(name, flags, mtu=1500, peer_mac="00:00:00:00:00:00"):
    def f(m, t):
        m.link(getattr(t, name), getattr(t, name + "_mac"), flags, mtu, peer_mac=peer_mac)
    return f


def steps(*fns):
    def f(m, t):
        for fn in fns:
            fn(m, t)
    return f


def check_source_used(m, t, res):
    assert 0 <= m.now_jiffies() - m.get_fdb(BR, CLIENT_MAC).used <= m.hz


def hold(reason):
    """config.punt_forward_reason = reason, as the agent or the change signal sets it."""
    def f(m, t):
        m.set_config(60, punt_forward_reason=R[reason])
    return f


def not_a_port(m, t):
    del m.ports[m.ports.Key(t.in0)]


def to_bridge(dst="10.1.0.7", **ip):
    return udp(dst=dst, eth_dst=BR_MAC, **ip)


L2_CASES = [
    # --- switched within the bridge ----------------------------------------
    switched("known unicast to another port: redirected unchanged", l2(), ctx={"priority": 5},
             check=lambda m, t, res: (check_priority(5)(m, t, res), check_source_used(m, t, res))),
    switched("to a veth port: redirect_peer, priority and mark 0 as veth_xmit's scrub", l2(dst=P2_MAC),
             ctx={"priority": 5, "mark": 7}, check=check_ctx(priority=0, mark=0)),
    switched("to a veth port, not the peer's MAC: plain redirect (veth_xmit sets the packet type)",
             l2(dst=BEHIND_MAC), ctx={"priority": 5, "mark": 7}, check=check_ctx(priority=5, mark=7)),
    switched("learning off: source need not be known", l2(src="02:aa:00:00:00:42"),
             setup=port("in0", PFWD)),
    switched("only the egress port isolated", l2(), setup=port("out0", PFWD | PLEARN | PISOLATED)),
    switched("TTL 1 is bridged as is (no router in the way)", l2(ttl=1)),
    switched("frame of MTU + 18 bytes: is_skb_forwardable() lets it pass",
             Ether(src=CLIENT_MAC, dst=H7_MAC) / IP(src="10.0.0.5", dst="10.0.0.7") / UDP() / (b"j" * 1476)),
    switched("bridge-nf-call-iptables, no rules: a valid packet", l2(), setup=port("in0", PFWD | PLEARN | PNF)),
    switched("without br_netfilter a bad checksum is bridged as is", l2(chksum=0x1234)),
    punt("bridge-nf-call-iptables: bad checksum (br_validate_ipv4 drops)", l2(chksum=0x1234), "IP_CSUM",
         setup=port("in0", PFWD | PLEARN | PNF)),
    punt("bridge-nf-call-iptables: bytes after tot_len (trimmed)", lambda t: bytes(l2()) + b"\xee" * 20,
         "IP_MALFORMED", setup=port("in0", PFWD | PLEARN | PNF)),
    punt("bridge-nf-call-iptables: tot_len beyond the frame (dropped)", l2(len=300), "IP_MALFORMED",
         setup=port("in0", PFWD | PLEARN | PNF)),
    punt("bridge-nf-call-iptables: options", l2(options=[b"\x94\x04\x00\x00"]), "IP_OPTIONS",
         setup=port("in0", PFWD | PLEARN | PNF)),
    punt("longer than egress MTU + 18 bytes", Ether(src=CLIENT_MAC, dst=H7_MAC) / IP(src="10.0.0.5", dst="10.0.0.7")
         / UDP() / (b"j" * 1477), "MTU_EXCEEDED"),
    # --- what the bridge floods, consumes or learns from --------------------
    punt("unknown unicast", l2(dst="02:aa:00:00:00:77"), "BR_UNKNOWN_UNICAST"),
    punt("broadcast", l2(dst="ff:ff:ff:ff:ff:ff"), "L2_MULTICAST"),
    punt("IPv4 multicast MAC", l2(dst="01:00:5e:00:00:05"), "L2_MULTICAST"),
    punt("STP group 01:80:c2:00:00:00", Ether(src=CLIENT_MAC, dst="01:80:c2:00:00:00", type=0x0026)
         / Raw(b"\x42\x42\x03" + b"\0" * 40), "BR_LINK_LOCAL"),
    punt("LLDP group 01:80:c2:00:00:0e", Ether(src=CLIENT_MAC, dst="01:80:c2:00:00:0e", type=0x88CC)
         / Raw(b"\0" * 46), "BR_LINK_LOCAL"),
    punt("01:80:c2:00:00:10 is not link-local: plain multicast", l2(dst="01:80:c2:00:00:10"), "L2_MULTICAST"),
    punt("source MAC not learned", l2(src="02:aa:00:00:00:42"), "BR_LEARN"),
    punt("source MAC learned on another port (it moved)", l2(src=H7_MAC, dst=P2_MAC), "BR_LEARN"),
    punt("source MAC is the bridge's own", l2(src=BR_MAC), "BR_LEARN"),
    punt("hairpin: destination behind the ingress port", l2(dst=MOVED_MAC), "BR_HAIRPIN"),
    punt("both ports isolated", l2(), "BR_ISOLATED",
         setup=steps(port("in0", PFWD | PLEARN | PISOLATED), port("out0", PFWD | PLEARN | PISOLATED))),
    punt("ingress port blocking (STP)", l2(), "BR_BLOCKED", setup=port("in0", PLEARN)),
    punt("egress port blocking (STP)", l2(), "BR_BLOCKED", setup=port("out0", 0)),
    punt("egress port of another bridge", l2(), "BR_BLOCKED",
         setup=lambda m, t: m.port(t.out0, OTHER_BR, PFWD | PLEARN)),
    punt("egress port not managed", l2(), "BR_BLOCKED", setup=lambda m, t: m.ports.__delitem__(m.ports.Key(t.out0))),
    punt("egress port down", l2(), "EGRESS_UNMANAGED", setup=link("out0", FWD)),
    punt("bridge down: every frame of the port", l2(), "BR_BLOCKED",
         setup=port("in0", PFWD | PLEARN, punt=R["BR_BLOCKED"])),
    punt("bridge setting not modelled (vlan_filtering)", l2(), "BR_UNSUPPORTED",
         setup=port("in0", PFWD | PLEARN, punt=R["BR_UNSUPPORTED"])),
    punt("bridge-family netfilter chains", l2(), "NETFILTER", setup=port("in0", PFWD | PLEARN, punt=R["NETFILTER"])),
    punt("bridge-nf-call-iptables with rules the agent cannot evaluate", l2(), "NETFILTER",
         setup=port("in0", PFWD | PLEARN | PNF, ipv4_punt=R["NETFILTER"])),
    punt("bridge-nf-call-iptables during a netfilter change (the forwarding hold)", l2(), "NETFILTER_CHANGING",
         setup=steps(port("in0", PFWD | PLEARN | PNF), hold("NETFILTER_CHANGING"))),
    punt("bridge-nf-call-iptables, rules unreadable (global NETFILTER)", l2(), "NETFILTER",
         setup=steps(port("in0", PFWD | PLEARN | PNF), hold("NETFILTER"))),
    switched("without br_netfilter the netfilter hold does not apply", l2(), setup=hold("NETFILTER_CHANGING")),
    switched("br_netfilter, policy routing punts routed traffic only", l2(),
             setup=steps(port("in0", PFWD | PLEARN | PNF), hold("POLICY_ROUTING"))),
    punt("bridge-nf-call-iptables: larger than the egress MTU (br_nf_dev_queue_xmit fragments)",
         Ether(src=CLIENT_MAC, dst=H7_MAC) / IP(src="10.0.0.5", dst="10.0.0.7") / UDP() / (b"j" * 1473),
         "MTU_EXCEEDED", setup=port("in0", PFWD | PLEARN | PNF)),
    switched("bridge-nf-call-iptables: exactly the egress MTU",
             Ether(src=CLIENT_MAC, dst=H7_MAC) / IP(src="10.0.0.5", dst="10.0.0.7") / UDP() / (b"j" * 1472),
             setup=port("in0", PFWD | PLEARN | PNF)),
    punt("bridge-nf-call-iptables: a fragment (conntrack would reassemble it)", l2(flags="MF"), "IP_FRAGMENT",
         setup=port("in0", PFWD | PLEARN | PNF)),
    punt("to a port's own MAC (local, not the bridge's)", l2(dst=IN0_MAC), "BR_LOCAL"),
    punt("unicast ARP between ports (arptables)", Ether(src=CLIENT_MAC, dst=H7_MAC) / ARP(op=2, psrc="10.0.0.5",
         pdst="10.0.0.7"), "NOT_IP"),
    punt("IPv6 between ports (ip6tables)", Ether(src=CLIENT_MAC, dst=H7_MAC) / IPv6(dst="fd00::7") / UDP() / b"x",
         "IPV6"),
    punt("802.1Q tagged", Ether(src=CLIENT_MAC, dst=H7_MAC) / Dot1Q(vlan=10) / IP(src="10.0.0.5", dst="10.0.0.7")
         / UDP() / b"x", "VLAN"),
    punt("802.1ad tagged", Ether(src=CLIENT_MAC, dst=H7_MAC, type=0x88A8) / Dot1AD(vlan=10) / Dot1Q(vlan=20)
         / IP(src="10.0.0.5", dst="10.0.0.7") / UDP() / b"x", "VLAN"),
    punt("802.1Q tagged to the bridge's MAC", Ether(src=CLIENT_MAC, dst=BR_MAC) / Dot1Q(vlan=10)
         / IP(src="10.0.0.5", dst="10.1.0.7") / UDP() / b"x", "VLAN"),
    # --- for the bridge's own MAC: routed with the bridge as L3 device ------
    Case("to the bridge's MAC: routed out of another link", lambda t: to_bridge(), "FORWARDED", TC_ACT_REDIRECT,
         out=lambda t: forwarded(to_bridge(), OUT0_MAC, H7_MAC)),
    punt("to the bridge's MAC, source learned on another port", to_bridge(), "BR_LEARN",
         setup=lambda m, t: m.fdb(BR, CLIENT_MAC, t.out0)),
    punt("to the bridge's MAC, a filter on the bridge's ingress", to_bridge(), "BR_UNSUPPORTED",
         setup=port("in0", PFWD | PLEARN, up_punt=R["BR_UNSUPPORTED"])),
    punt("to the bridge's MAC, forwarding off on the bridge", to_bridge(), "FORWARDING_OFF",
         setup=lambda m, t: m.link(BR, BR_MAC, UP | BRIDGE)),
    punt("to the bridge's MAC, for the host itself", to_bridge(dst="10.1.0.1"), "LOCAL"),
    punt("to the bridge's MAC, routed back into the bridge", to_bridge(dst="10.5.0.9"), "HAIRPIN"),
    punt("to the bridge's MAC, TTL 1", to_bridge(ttl=1), "TTL_EXCEEDED"),
    # --- routed out of a bridge: the FDB picks the port ----------------------
    Case("routed out of a bridge to a veth port", lambda t: udp(dst="10.5.0.9"), "FORWARDED", TC_ACT_REDIRECT,
         out=lambda t: forwarded(udp(dst="10.5.0.9"), BR_MAC, P2_MAC), setup=not_a_port, ctx={"priority": 5},
         check=check_priority(0)),
    punt("routed out of a bridge, next hop behind the veth peer (not its MAC)", udp(dst="10.5.0.7"), "PEER_MAC",
         setup=steps(not_a_port, lambda m, t: m.neigh(BR, "10.5.0.7", BEHIND_MAC))),
    punt("routed out of a bridge, next hop not in the FDB", udp(dst="10.5.0.8"), "BR_UNKNOWN_UNICAST",
         setup=not_a_port),
    punt("routed out of a bridge, next hop's port blocking", udp(dst="10.5.0.9"), "BR_BLOCKED",
         setup=steps(not_a_port, port("out1", PLEARN))),
    punt("routed out of a bridge, next hop is a local address", udp(dst="10.5.0.9"), "BR_LOCAL",
         setup=steps(not_a_port, lambda m, t: m.neigh(BR, "10.5.0.9", BR_MAC))),
    punt("routed out of a bridge whose egress is busy (no UP)", udp(dst="10.5.0.9"), "EGRESS_UNMANAGED",
         setup=steps(not_a_port, lambda m, t: m.link(BR, BR_MAC, FWD | BRIDGE))),
    punt("routed out of a bridge, port MTU below the packet", udp(dst="10.5.0.9", payload=b"m" * 1000),
         "MTU_EXCEEDED", setup=steps(not_a_port, link("out1", UP | FWD | PEER, mtu=1000, peer_mac=P2_MAC))),
]


@pytest.mark.parametrize("case", L2_CASES, ids=[c.desc for c in L2_CASES])
def test_l2(case, topo, datapath, maps):
    bridge_state(maps, topo)
    run_case(case, topo, datapath, maps)


def test_counts_on_the_ingress_port(topo, datapath, maps):
    """Switched and routed-through-the-bridge frames count in the slot of the
    port they arrived on, not the bridge's."""
    from lm_bpfrun import SkBuff, prog_test_run

    bridge_state(maps, topo)
    maps.link(topo.in0, topo.in0_mac, UP | FWD, slot=3)
    maps.link(BR, BR_MAC, UP | FWD | BRIDGE, slot=4)
    before = {s: maps.slot_counters(s)[R["FORWARDED"]][0] for s in (3, 4)}
    for frame in (l2(), to_bridge()):
        assert prog_test_run(datapath.fd, bytes(frame), SkBuff(ifindex=topo.in0)).retval == TC_ACT_REDIRECT
    after = {s: maps.slot_counters(s)[R["FORWARDED"]][0] for s in (3, 4)}
    assert (after[3] - before[3], after[4] - before[4]) == (2, 0)
