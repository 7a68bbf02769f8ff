"""Flow translator (mirror/flows.py): kernel conntrack entry -> FlowView and lm_flow (pure)."""

import pytest

from mirror import conntrack as ct
from mirror.flows import (VERDICT_BITS, Devices, FlowEntry, FlowKey, flow_devices, flow_entry, flow_view, kernel_keeps,
                          translation)
from mirror.nfverdict import Verdict
from mirror.reasons import BY_NAME as R

S = ct.IPS
EST = S["CONFIRMED"] | S["SEEN_REPLY"] | S["ASSURED"]
LIBERAL = (0x2b, 0x2b)

# Docker-like published port: 10.1.0.2:40000 -> 10.1.0.1:8080, DNAT to 10.2.0.2:80, MASQUERADE to 10.2.0.1.
ORIG = ct.Tuple("10.1.0.2", "10.1.0.1", 40000, 8080)
REPLY = ct.Tuple("10.2.0.2", "10.2.0.1", 80, 40000)


def entry(proto=6, status=EST | S["SRC_NAT"] | S["DST_NAT"], tcp_state=ct.TCP_ESTABLISHED, **kw):
    if proto != 6:
        tcp_state = None
    return ct.Entry(proto=proto, orig=ORIG, reply=REPLY, status=status, tcp_state=tcp_state,
                    tcp_flags=LIBERAL if proto == 6 else None, **kw)


def test_translation_is_the_other_tuple_reversed_in_both_directions():
    e = entry()
    assert translation(e, ct.ORIGINAL) == ct.Tuple("10.2.0.1", "10.2.0.2", 40000, 80)
    assert translation(e, ct.REPLY) == ct.Tuple("10.1.0.1", "10.1.0.2", 8080, 40000)
    plain = ct.Entry(proto=17, orig=ct.Tuple("a", "b", 1, 2), reply=ct.Tuple("b", "a", 2, 1), status=EST)
    assert translation(plain, ct.ORIGINAL) == plain.orig and translation(plain, ct.REPLY) == plain.reply


def test_flow_view_describes_the_packet_before_and_after_nat():
    v = flow_view(entry(mark=5), ct.ORIGINAL, ORIG, Devices("veth1", "veth2"))
    assert (v.src, v.dst, v.sport, v.dport) == ORIG
    assert (v.xsrc, v.xdst, v.xsport, v.xdport) == ("10.2.0.1", "10.2.0.2", 40000, 80)
    assert (v.in_iface, v.out_iface, v.ctstate, v.ctdir, v.ctmark) == ("veth1", "veth2", "ESTABLISHED", "ORIGINAL", 5)
    assert v.ctstatus == {"SEEN_REPLY", "ASSURED", "CONFIRMED"} and v.nat == {"SNAT", "DNAT"}
    assert v.orig == tuple(ORIG) and v.reply == tuple(REPLY)
    r = flow_view(entry(), ct.REPLY, REPLY, Devices("veth2", "veth1"))
    assert (r.ctdir, r.xsrc, r.xdst, r.xsport, r.xdport) == ("REPLY", "10.1.0.1", "10.1.0.2", 8080, 40000)


def test_one_way_udp_is_ctstate_new_in_the_original_direction():
    e = entry(proto=17, status=S["CONFIRMED"])
    assert kernel_keeps(e, ct.ORIGINAL) is None
    assert flow_view(e, ct.ORIGINAL, ORIG, Devices("a", "b")).ctstate == "NEW"
    assert kernel_keeps(e, ct.REPLY) is not None  # its first reply changes the entry
    # Replied, not yet assured (younger than 2 s): the datapath takes each
    # packet that leaves the entry unchanged and punts the one that assures it.
    seen = entry(proto=17, status=S["CONFIRMED"] | S["SEEN_REPLY"])
    assert kernel_keeps(seen, ct.ORIGINAL) is None and kernel_keeps(seen, ct.REPLY) is None
    assert flow_view(seen, ct.REPLY, REPLY, Devices("a", "b")).ctstate == "ESTABLISHED"
    assert kernel_keeps(entry(proto=17), ct.REPLY) is None  # assured


@pytest.mark.parametrize("change, why", [
    (dict(status=EST & ~S["CONFIRMED"]), "not confirmed"),
    (dict(status=EST | S["DYING"]), "DYING"),
    (dict(status=EST & ~S["ASSURED"]), "not assured"),
    (dict(status=EST | S["SEQ_ADJUST"]), "SEQ_ADJUST"),
    (dict(status=EST | S["NAT_CLASH"]), "NAT_CLASH"),
    (dict(helper="ftp"), "helper"),
    (dict(zone=3), "zone"),
    (dict(tcp_state=ct.TCP_STATES.index("FIN_WAIT")), "FIN_WAIT"),
    (dict(tcp_state=ct.TCP_STATES.index("SYN_RECV")), "SYN_RECV"),
    (dict(proto=1), "neither"),
])
def test_what_the_kernel_keeps(change, why):
    assert why in kernel_keeps(entry(**change), ct.ORIGINAL)


def test_established_tcp_is_taken_and_a_foreign_tuple_is_not():
    assert kernel_keeps(entry(), ct.ORIGINAL) is None and kernel_keeps(entry(), ct.REPLY) is None
    assert kernel_keeps(entry(), None) is not None


def test_flow_entry_carries_what_the_verdict_assumed():
    e = entry(mark=9)
    got = flow_entry(Verdict("ACCEPT", "rule 2"), 7, 4, e, ct.ORIGINAL)
    assert got == FlowEntry(gen=7, action=R["FORWARDED"], oif=4, ct_mark=9, ct_status=e.status & VERDICT_BITS,
                            nat_saddr="10.2.0.1", nat_daddr="10.2.0.2", nat_sport=40000, nat_dport=80)
    assert got.ct_status == S["SEEN_REPLY"] | S["ASSURED"]  # no *_NAT_DONE in this entry
    assert flow_entry(Verdict("PUNT", "LOG target"), 7, 4, e, ct.ORIGINAL).action == R["NETFILTER"]


def test_a_proven_drop_becomes_a_drop_entry():
    got = flow_entry(Verdict("DROP", "policy"), 7, 4, entry(), ct.REPLY)
    assert got.action == R["NF_DROP"] and (got.nat_saddr, got.nat_daddr) == ("10.1.0.1", "10.1.0.2")


def test_host_view_lists_own_and_broadcast_addresses():
    from mirror import model as m
    from mirror.flows import host_view
    st = m.KernelState()
    st.add_address(m.Address(3, "10.1.0.1", 24))
    st.set_route(m.Route(m.TABLE_LOCAL, "10.1.0.255", 32, type=m.RTN_BROADCAST, nexthops=(m.Nexthop(3),)))
    st.set_route(m.Route(m.TABLE_LOCAL, "10.1.0.1", 32, type=m.RTN_LOCAL, nexthops=(m.Nexthop(3),)))
    h = host_view(st)
    assert h.local_addrs == {"10.1.0.1"} and h.broadcast_addrs == {"10.1.0.255"}


# --------------------------------------------------------------------------- bridge ports

def bridge_state(call_iptables=True, bridge_option=False):
    """br0 (2) with ports vethA (3) and vethB (4); eth1 (5) a plain device."""
    from mirror import model as m

    st = m.KernelState(bridge_sysctls=m.BridgeSysctls(call_iptables=call_iptables))
    def link(index, name, kind, **kw):
        st.links[index] = m.Link(index=index, name=name, kind=kind, mac="02:00:00:00:00:0%d" % index, mtu=1500,
                                 flags=0, **kw)
    link(2, "br0", "bridge", bridge=m.BridgeInfo(nf_call_iptables=bridge_option))
    link(3, "vethA", "veth", master=2, port=m.BridgePort())
    link(4, "vethB", "veth", master=2, port=m.BridgePort())
    link(5, "eth1", "veth")
    return st


def key(ifindex, bridged=False):
    return FlowKey(ifindex, "10.0.0.2", "10.0.0.3", 40000, 80, 6, bridged)


def test_bridged_flow_sees_the_bridge_as_i_and_o_and_the_ports_as_physdev():
    assert flow_devices(bridge_state(), key(3, True), 4) == Devices("br0", "br0", True, "vethA", "vethB")
    # the bridge's own nf_call_iptables option does it too
    assert flow_devices(bridge_state(False, True), key(3, True), 4) == Devices("br0", "br0", True, "vethA", "vethB")
    # no br_netfilter for this bridge: the datapath would not have asked
    assert flow_devices(bridge_state(False), key(3, True), 4) is None
    # an egress that is not a port of the same bridge: inconsistent, wait for events
    assert flow_devices(bridge_state(), key(3, True), 5) is None


def test_routed_from_a_port_keeps_its_physdev_in_only_under_br_netfilter():
    assert flow_devices(bridge_state(), key(3), 5) == Devices("br0", "eth1", False, "vethA", "")
    assert flow_devices(bridge_state(False), key(3), 5) == Devices("br0", "eth1")
    assert flow_devices(bridge_state(), key(5), 2) == Devices("eth1", "br0")  # routed into the bridge
    assert flow_devices(bridge_state(), key(9), 2) is None


def test_bridged_flow_view_and_nat():
    d = Devices("br0", "br0", True, "vethA", "vethB")
    plain = entry(status=EST)
    v = flow_view(plain, ct.ORIGINAL, ORIG, d)
    assert (v.in_iface, v.out_iface, v.bridged, v.physdev_in, v.physdev_out) == ("br0", "br0", True, "vethA", "vethB")
    assert kernel_keeps(plain, ct.ORIGINAL, bridged=True) is None
    assert "NAT" in kernel_keeps(entry(), ct.ORIGINAL, bridged=True)
    assert kernel_keeps(entry(), ct.ORIGINAL) is None  # routed NAT is the fast path's
