"""Bridges without root: netlink messages -> model -> translation."""

import pytest

from mirror import model as m
from mirror import netlink
from mirror.reasons import BY_NAME as R
from mirror.translate import (LINK_BRIDGE, LINK_FORWARDING, LINK_REDIRECT_PEER, LINK_UP, PORT_FORWARDING,
                              PORT_ISOLATED, PORT_LEARNING, PORT_NF_IPV4, FdbTarget, PortEntry, Selection, translate)

from netlink_msgs import bridge, bridge_port_event, fdb, neighbor, port_link, vlan_link

BR, V1, V2, V3 = 2, 3, 4, 5
POD1, POD2 = "02:aa:00:00:00:01", "02:aa:00:00:00:02"
BR_MAC = "02:00:00:00:0b:00"


def apply(state, *msgs):
    for msg in msgs:
        netlink.apply(state, msg)
    return state


def bridged(**over):
    """br0 with ports v1, v2 (veths into pods), two learned pods, the
    bridge's own address; sysctls and netfilter as on a fresh namespace
    without rules."""
    st = m.KernelState(netfilter_impact=None, xfrm_impact=None, bridge_nf_impact=None)
    apply(st, bridge(BR, "br0", mac=BR_MAC), port_link(V1, "v1", BR, mac="02:00:00:00:00:01"),
          port_link(V2, "v2", BR, mac="02:00:00:00:00:02"),
          fdb(V1, POD1, master=BR), fdb(V2, POD2, master=BR), fdb(BR, BR_MAC, master=BR, state=m.NUD_PERMANENT),
          fdb(V1, "02:00:00:00:00:01", master=BR, state=m.NUD_PERMANENT),
          fdb(V1, "33:33:00:00:00:01", flags=netlink.NTF_SELF, state=m.NUD_PERMANENT))  # own list: ignored
    st.set_sysctls({"br0": m.LinkSysctls(True, 0), "v1": m.LinkSysctls(False, 0), "v2": m.LinkSysctls(False, 0)})
    # The pods' ends of the port veths (netnsid 0, ifindex port + 100, as port_link() says).
    st.set_peer((0, V1 + 100), m.Peer(POD1, xdp=False))
    st.set_peer((0, V2 + 100), m.Peer(POD2, xdp=False))
    for k, v in over.items():
        setattr(st, k, v)
    return st


def test_bridge_and_ports_are_managed_ports_attached():
    d = translate(bridged())
    assert d.attach == {V1: "v1", V2: "v2"}  # not the bridge: its frames arrive on the ports
    assert d.links[BR].flags == LINK_UP | LINK_FORWARDING | LINK_BRIDGE and d.links[BR].mac == BR_MAC
    assert d.links[V1].flags == LINK_UP | LINK_REDIRECT_PEER
    # bridge-nf-call-iptables=1 (the default): br_netfilter validates bridged IPv4.
    assert d.ports[V1] == PortEntry(BR, PORT_FORWARDING | PORT_LEARNING | PORT_NF_IPV4)
    assert d.links[V1].peer_mac == POD1
    assert d.fdb == {(BR, POD1): FdbTarget(V1), (BR, POD2): FdbTarget(V2), (BR, BR_MAC): FdbTarget(BR, local=True),
                     (BR, "02:00:00:00:00:01"): FdbTarget(V1, local=True)}


def test_bridge_messages_keep_the_link_kind():
    """The bridge's AF_BRIDGE RTM_NEWLINK has no IFLA_LINKINFO: it must only
    change the port state; its RTM_DELLINK (port left) must not delete the link."""
    st = bridged()
    apply(st, bridge_port_event(V1, "v1", BR, state=m.BR_STATE_BLOCKING, learning=0))
    assert st.links[V1].kind == "veth" and st.links[V1].port.state == m.BR_STATE_BLOCKING
    assert translate(st).ports[V1] == PortEntry(BR, PORT_NF_IPV4)
    apply(st, bridge_port_event(V1, "v1", BR, event="RTM_DELLINK"))
    assert V1 in st.links and st.links[V1].port is None and st.links[V1].master == 0
    assert (BR, POD1, 0) not in st.fdb  # the kernel flushes the port's entries
    d = translate(st)
    assert V1 not in d.ports and d.attach[V1] == "v1"  # now a plain veth


def test_fdb_events_add_move_delete():
    st = bridged()
    apply(st, fdb(V2, POD1, master=BR))  # moved
    assert translate(st).fdb[(BR, POD1)] == FdbTarget(V2)
    apply(st, fdb(V2, POD1, master=BR, event="RTM_DELNEIGH"))  # aged out / bridge fdb del
    assert (BR, POD1) not in translate(st).fdb


def test_fdb_vlan_entries_do_not_reach_the_untagged_lookup():
    st = apply(bridged(), fdb(V1, "02:aa:00:00:00:07", master=BR, vlan=10))
    assert st.fdb[(BR, "02:aa:00:00:00:07", 10)].vlan == 10
    assert (BR, "02:aa:00:00:00:07") not in translate(st).fdb


def test_vlan_device_is_mirrored_but_not_managed():
    st = apply(bridged(), vlan_link(9, "v1.10", 10, V1, protocol=0x88A8))
    assert st.links[9].vlan == m.VlanInfo(10, 0x88A8)
    assert 9 not in translate(st).links  # tagged traffic punts (VLAN)


@pytest.mark.parametrize("change, field, reason", [
    (lambda st: apply(st, bridge(BR, "br0", mac=BR_MAC, flags=0)), "punt", "BR_BLOCKED"),
    (lambda st: apply(st, bridge(BR, "br0", mac=BR_MAC, vlan_filtering=1)), "punt", "BR_UNSUPPORTED"),
    (lambda st: apply(st, port_link(V1, "v1", BR, locked=1)), "punt", "BR_UNSUPPORTED"),
    (lambda st: setattr(st, "bridge_nf_impact", "nft bridge filter forward: 1 rule"), "punt", "NETFILTER"),
    (lambda st: setattr(st, "netfilter_impact", "filter FORWARD: 1 rule"), "ipv4_punt", "NETFILTER"),
    (lambda st: st.set_ingress_tc(BR, "1 ingress filter(s)"), "up_punt", "BR_UNSUPPORTED"),
])
def test_port_punts(change, field, reason):
    st = bridged()
    change(st)
    assert getattr(translate(st).ports[V1], field) == R[reason]


def test_br_netfilter_off_lets_bridged_ipv4_through_forward_rules():
    st = bridged(netfilter_impact="filter FORWARD: 1 rule", bridge_sysctls=m.BridgeSysctls(call_iptables=False))
    assert translate(st).ports[V1].ipv4_punt == 0 and not translate(st).ports[V1].flags & PORT_NF_IPV4
    apply(st, bridge(BR, "br0", mac=BR_MAC, nf_call_iptables=1))  # the per-bridge switch
    assert translate(st).ports[V1].ipv4_punt == R["NETFILTER"]


def test_evaluable_rules_send_bridged_ipv4_through_conntrack_not_to_the_kernel():
    """iptables rules the agent can evaluate: stateful mode, and br_netfilter
    ports carry bridged IPv4 through the conntrack stages (no ipv4_punt);
    rules it cannot evaluate punt bridged IPv4 as they punt forwarding."""
    st = bridged(netfilter_impact="filter FORWARD: 1 rule", netfilter_unsupported=None, ct_sysctls=m.CtSysctls())
    d = translate(st)
    assert d.nf.nf_mode == 1 and d.punt_forward_reason != R["NETFILTER"]
    assert d.ports[V1].ipv4_punt == 0 and d.ports[V1].flags & PORT_NF_IPV4
    st.netfilter_unsupported = "nft: native table inet filter"
    d = translate(st)
    assert d.nf.nf_mode == 0 and d.ports[V1].ipv4_punt == R["NETFILTER"] == d.punt_forward_reason


def test_isolated_port_and_stp_states():
    st = apply(bridged(), port_link(V2, "v2", BR, isolated=1, state=m.BR_STATE_LEARNING))
    assert translate(st).ports[V2].flags == PORT_LEARNING | PORT_ISOLATED | PORT_NF_IPV4


def test_bridge_egress_busy_clears_up():
    st = bridged()
    st.set_egress_tc(BR, "root qdisc tbf")
    assert not translate(st).links[BR].flags & LINK_UP


def test_excluded_bridge_leaves_its_ports_alone():
    d = translate(bridged(), Selection(exclude="br0"))
    assert d.attach == {} and d.ports == {} and d.fdb == {}


def test_neighbours_on_the_bridge():
    st = apply(bridged(), neighbor(BR, "10.1.0.11", POD1))
    assert translate(st).neighbors == {(BR, "10.1.0.11"): POD1}


def test_dump_reads_ports_and_fdb_from_bridge_messages():
    st = apply(m.KernelState(), bridge(BR, "br0", ageing=300), port_link(V3, "v3", BR, state=m.BR_STATE_DISABLED))
    assert st.links[BR].bridge.ageing_time == 300
    assert st.links[V3].port.state == m.BR_STATE_DISABLED and st.ports_of(BR) == [V3]


def test_peer_macs_reach_the_ports_link_entries():
    st = bridged()
    st.take_changes()
    st.set_peer((0, V1 + 100), m.Peer("02:aa:00:00:00:09", xdp=False))  # the pod's MAC changed
    st.set_peer((0, V2 + 100), None)  # gone from view
    assert V1 in st.take_changes().links
    assert translate(st).links[V1].peer_mac == "02:aa:00:00:00:09" and translate(st).links[V2].peer_mac is None
    st.set_peer((0, V1 + 100), m.Peer("02:aa:00:00:00:09", xdp=True))  # veth_xmit() would run its XDP
    assert translate(st).links[V1].peer_mac is None


def test_veth_peer_location_is_parsed():
    lk = netlink.parse_link(port_link(V1, "v1", BR))
    assert (lk.link_netnsid, lk.link, lk.peer_in_other_netns) == (0, V1 + 100, True)


def test_port_vlans_from_bridge_messages():
    """pvid 1 untagged, 10 tagged, 20-22 as a compressed range: mirrored
    (vlan_filtering bridges punt, so they do not reach the maps)."""
    st = bridged()
    apply(st, bridge_port_event(V1, "v1", BR, vlans=[(netlink.BRIDGE_VLAN_INFO_PVID | netlink.BRIDGE_VLAN_INFO_UNTAGGED,
                                                      1), (0, 10), (netlink.BRIDGE_VLAN_INFO_RANGE_BEGIN, 20),
                                                     (0x10, 22)]))
    assert st.port_vlans[V1] == (m.PortVlan(1, True, True), m.PortVlan(10), m.PortVlan(20), m.PortVlan(21),
                                 m.PortVlan(22))
    assert st.links[V1].kind == "veth"
    apply(st, bridge_port_event(V1, "v1", BR))  # a state change without a VLAN list keeps them
    assert len(st.port_vlans[V1]) == 5
    apply(st, bridge_port_event(V1, "v1", BR, event="RTM_DELLINK"))
    assert V1 not in st.port_vlans
