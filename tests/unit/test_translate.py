"""Translator: model -> desired map contents (pure, no root)."""

import pytest

from mirror import model as m
from mirror.reasons import BY_NAME as R
from mirror.translate import (FIB_RULES, LINK_FORWARDING, LINK_REDIRECT_PEER, LINK_RPF_LOOSE, LINK_RPF_STRICT, LINK_UP,
                              CT_FLAG_ACCT, CT_FLAG_TSTAMP, NF_OFF, NF_STATEFUL, NfConfig, RouteEntry, Selection,
                              translate, translate_changes)

UP = m.IFF_UP | m.IFF_RUNNING | m.IFF_LOWER_UP


def node(**over):
    """A node routing between two pods: v1 (10.1.0.1/24), v2 (10.2.0.1/24)."""
    st = m.KernelState(netfilter_impact=None, xfrm_impact=None)
    st.set_link(m.Link(1, "lo", "", "00:00:00:00:00:00", 65536, UP, link_type=772))
    st.set_link(m.Link(3, "v1", "veth", "02:00:00:00:01:01", 1500, UP, peer_in_other_netns=True, link=2,
                       link_netnsid=0))
    st.set_link(m.Link(4, "v2", "veth", "02:00:00:00:02:01", 1500, UP, peer_in_other_netns=True, link=2,
                       link_netnsid=1))
    st.set_peer((0, 2), m.Peer("02:00:00:00:01:02", xdp=False))  # the pods' own MACs
    st.set_peer((1, 2), m.Peer("02:00:00:00:02:02", xdp=False))
    st.add_address(m.Address(3, "10.1.0.1", 24))
    st.add_address(m.Address(4, "10.2.0.1", 24))
    for idx, net, addr in ((3, "10.1.0.0", "10.1.0.1"), (4, "10.2.0.0", "10.2.0.1")):
        st.set_route(m.Route(m.TABLE_MAIN, net, 24, nexthops=(m.Nexthop(idx),)))
        st.set_route(m.Route(m.TABLE_LOCAL, addr, 32, type=m.RTN_LOCAL, nexthops=(m.Nexthop(idx),)))
        st.set_route(m.Route(m.TABLE_LOCAL, net[:-1] + "255", 32, type=m.RTN_BROADCAST, nexthops=(m.Nexthop(idx),)))
    st.set_route(m.Route(m.TABLE_LOCAL, "127.0.0.0", 8, type=m.RTN_LOCAL, nexthops=(m.Nexthop(1),)))
    st.set_neighbor(m.Neighbor(3, "10.1.0.2", "02:00:00:00:01:02", m.NUD_REACHABLE))
    st.set_neighbor(m.Neighbor(4, "10.2.0.2", "02:00:00:00:02:02", m.NUD_STALE))
    st.rules |= {m.Rule(0, 255), m.Rule(32766, 254), m.Rule(32767, 253)}
    st.set_sysctls(over.pop("sysctls", {"v1": m.LinkSysctls(True, 0), "v2": m.LinkSysctls(True, 0),
                                        "lo": m.LinkSysctls(True, 0)}))
    for index, what in over.pop("egress_tc", {}).items():
        st.set_egress_tc(index, what)
    for k, v in over.items():
        setattr(st, k, v)
    return st


def test_routed_node():
    d = translate(node())
    assert d.attach == {3: "v1", 4: "v2"}  # not lo
    assert d.links[3].flags == LINK_UP | LINK_FORWARDING | LINK_REDIRECT_PEER and d.links[3].mtu == 1500
    assert d.routes[("10.2.0.0", 24)] == RouteEntry(R["FORWARDED"], oif=4, gateway=None, mtu=1500)
    assert d.routes[("10.1.0.1", 32)].action == R["LOCAL"]
    assert d.routes[("10.1.0.255", 32)].action == R["IP_MULTICAST"]
    assert d.routes[("127.0.0.0", 8)].action == R["LOCAL"]
    assert d.neighbors == {(3, "10.1.0.2"): "02:00:00:00:01:02", (4, "10.2.0.2"): "02:00:00:00:02:02"}
    assert d.punt_forward_reason == 0


def test_lowest_metric_wins_and_route_mtu():
    st = node()
    st.set_route(m.Route(m.TABLE_MAIN, "10.9.0.0", 16, priority=200, nexthops=(m.Nexthop(3, "10.1.0.2"),)))
    st.set_route(m.Route(m.TABLE_MAIN, "10.9.0.0", 16, priority=100, mtu=1400, nexthops=(m.Nexthop(4, "10.2.0.2"),)))
    assert translate(st).routes[("10.9.0.0", 16)] == RouteEntry(R["FORWARDED"], 4, "10.2.0.2", 1400)


@pytest.mark.parametrize("route, reason", [
    (m.Route(m.TABLE_MAIN, "10.9.0.0", 16, type=6), "ROUTE_UNSUPPORTED"),  # blackhole
    (m.Route(m.TABLE_MAIN, "10.9.0.0", 16, type=7), "ROUTE_UNSUPPORTED"),  # unreachable
    (m.Route(m.TABLE_MAIN, "10.9.0.0", 16, nexthops=(m.Nexthop(3, "10.1.0.2", m.RTNH_F_DEAD),
                                                     m.Nexthop(4, "10.2.0.2", m.RTNH_F_DEAD))),
     "ROUTE_UNSUPPORTED"),  # multipath, every next hop dead: the kernel falls back
    (m.Route(m.TABLE_MAIN, "10.9.0.0", 16, nexthops=(m.Nexthop(3),), unsupported=("UNKNOWN",)), "ROUTE_UNSUPPORTED"),
    (m.Route(m.TABLE_MAIN, "10.9.0.0", 16, tos=0x10, nexthops=(m.Nexthop(3),)), "ROUTE_UNSUPPORTED"),
    (m.Route(m.TABLE_MAIN, "10.9.0.0", 16, nexthops=(m.Nexthop(3, flags=m.RTNH_F_DEAD),)), "ROUTE_UNSUPPORTED"),
    (m.Route(m.TABLE_MAIN, "10.9.0.0", 16, type=m.RTN_LOCAL, nexthops=(m.Nexthop(3),)), "LOCAL"),
])
def test_routes_the_fast_path_does_not_handle_punt(route, reason):
    st = node()
    st.set_route(route)
    assert translate(st).routes[("10.9.0.0", 16)] == RouteEntry(R[reason])


@pytest.mark.parametrize("aliases, reason", [
    ([(6, None), (1, "10.2.0.2")], "ROUTE_UNSUPPORTED"),  # blackhole first: the kernel drops
    ([(1, "10.2.0.2"), (6, None)], "FORWARDED"),
    ([(1, "10.1.0.2"), (1, "10.2.0.2")], "FORWARDED"),  # the first gateway, not the last
])
def test_routes_sharing_a_key_first_one_wins(aliases, reason):
    st = node()
    for rtype, gw in aliases:
        hops = (m.Nexthop(3 if gw == "10.1.0.2" else 4, gw),) if gw else ()
        st.set_route(m.Route(m.TABLE_MAIN, "10.9.0.0", 16, type=rtype, nexthops=hops), m.APPEND)
    entry = translate(st).routes[("10.9.0.0", 16)]
    assert entry.action == R[reason]
    if reason == "FORWARDED":
        assert entry.gateway == aliases[0][1]


def test_local_table_prefix_wins_over_main_inside_it():
    st = node()
    st.set_route(m.Route(m.TABLE_LOCAL, "10.2.0.0", 24, type=m.RTN_LOCAL, nexthops=(m.Nexthop(1),)))  # AnyIP
    st.set_route(m.Route(m.TABLE_MAIN, "10.2.0.128", 25, nexthops=(m.Nexthop(4),)))
    d = translate(st)
    assert d.routes[("10.2.0.0", 24)].action == R["LOCAL"]
    assert d.routes[("10.2.0.128", 25)].action == R["LOCAL"]


def test_addresses_are_local_even_without_local_table_routes():
    st = node()
    for route in [r for aliases in st.routes.values() for r in aliases if r.table == m.TABLE_LOCAL]:
        st.del_route(route)
    assert translate(st).routes[("10.2.0.1", 32)].action == R["LOCAL"]


def test_other_tables_ignored():
    st = node()
    st.set_route(m.Route(100, "10.9.0.0", 16, nexthops=(m.Nexthop(3, "10.1.0.2"),)))
    assert ("10.9.0.0", 16) not in translate(st).routes


def test_netfilter_and_policy_rules_punt_forwarding():
    assert translate(node(netfilter_impact="filter FORWARD: 1 rule")).punt_forward_reason == R["NETFILTER"]
    assert translate(node(netfilter_impact="netfilter state not read yet")).punt_forward_reason == R["NETFILTER"]
    assert translate(node(xfrm_impact="1 xfrm policy")).punt_forward_reason == R["IPSEC"]
    assert translate(node(fwd_use_pmtu=True)).punt_forward_reason == R["ROUTE_UNSUPPORTED"]
    assert translate(node(fwd_update_priority=False)).punt_forward_reason == R["ROUTE_UNSUPPORTED"]
    # Policy rules the kernel lookup evaluates exactly: every forward asks it.
    st = node()
    st.rules.add(m.Rule(100, 100, frozenset({("FRA_SRC", "1.2.3.4"), ("src_len", 32)})))
    assert (translate(st).punt_forward_reason, translate(st).fib_flags & FIB_RULES) == (0, FIB_RULES)
    st = node()
    st.rules.add(m.Rule(32766, 254, frozenset({("FRA_FWMARK", "1")})))
    assert (translate(st).punt_forward_reason, translate(st).fib_flags & FIB_RULES) == (0, FIB_RULES)
    for prio, table in m.DEFAULT_RULES:  # a missing default rule counts too
        st = node()
        st.rules.discard(m.Rule(prio, table))
        assert translate(st).fib_flags & FIB_RULES, prio
    # ... and those it cannot (realms, l3mdev) punt all forwarding.
    for selector in (("FRA_FLOW", "5"), ("FRA_L3MDEV", "1"), ("UNKNOWN", "x")):
        st = node()
        st.rules.add(m.Rule(100, 100, frozenset({selector})))
        d = translate(st)
        assert (d.punt_forward_reason, d.fib_flags & FIB_RULES) == (R["POLICY_ROUTING"], 0), selector


def test_neighbors_only_valid_states_on_managed_links():
    st = node()
    st.set_neighbor(m.Neighbor(3, "10.1.0.3", None, m.NUD_INCOMPLETE))
    st.set_neighbor(m.Neighbor(3, "10.1.0.4", "02:00:00:00:01:04", m.NUD_FAILED))
    st.set_neighbor(m.Neighbor(1, "127.0.0.5", "00:00:00:00:00:00", m.NUD_PERMANENT))  # lo: unmanaged
    for state in (m.NUD_DELAY, m.NUD_PROBE, m.NUD_PERMANENT, m.NUD_NOARP):
        st.set_neighbor(m.Neighbor(4, f"10.2.0.{state}", "02:00:00:00:02:09", state))
    keys = set(translate(st).neighbors)
    assert (3, "10.1.0.3") not in keys and (3, "10.1.0.4") not in keys and (1, "127.0.0.5") not in keys
    assert {(4, f"10.2.0.{s}") for s in (m.NUD_DELAY, m.NUD_PROBE, m.NUD_PERMANENT, m.NUD_NOARP)} <= keys


def test_link_flags_follow_state_and_sysctls():
    st = node(sysctls={"v1": m.LinkSysctls(False, 1), "v2": m.LinkSysctls(True, 2)})
    st.set_link(m.Link(4, "v2", "veth", "02:00:00:00:02:01", 1500, m.IFF_UP))  # no carrier, peer here
    d = translate(st)
    assert d.links[3].flags == LINK_UP | LINK_REDIRECT_PEER | LINK_RPF_STRICT
    assert d.links[4].flags == LINK_FORWARDING | LINK_RPF_LOOSE
    st.set_sysctls({})
    assert not translate(st).links[3].flags & LINK_FORWARDING  # unknown: punt


def test_eligibility_and_selection():
    st = node()
    st.set_link(m.Link(5, "br0", "bridge", "02:00:00:00:05:01", 1500, UP))
    st.set_link(m.Link(6, "v3", "veth", "02:00:00:00:06:01", 1500, UP, master=5))
    st.set_link(m.Link(7, "eth0", "", "02:00:00:00:07:01", 1500, UP))
    st.set_link(m.Link(8, "tun0", "tun", None, 1500, UP, link_type=65534))
    assert set(translate(st).attach) == {3, 4, 7}
    assert set(translate(st, Selection(include="v.*")).attach) == {3, 4}
    assert set(translate(st, Selection(exclude="v1|eth0")).attach) == {4}
    assert set(translate(st, Selection(include="v")).attach) == set()  # whole-name match


def test_no_redirect_peer_past_an_egress_qdisc_or_filter():
    st = node(egress_tc={4: "root qdisc tbf"})
    d = translate(st)
    assert d.links[3].flags & LINK_REDIRECT_PEER and not d.links[4].flags & LINK_REDIRECT_PEER


def test_evaluable_forward_rules_select_stateful_mode_with_the_conntrack_sysctls():
    ct = m.CtSysctls(tcp_timeout_established=600, tcp_timeout_unacknowledged=200, tcp_timeout_max_retrans=100,
                     tcp_max_retrans=5, udp_timeout=10, udp_timeout_stream=60)
    st = node(netfilter_impact="filter FORWARD: 3 rules", netfilter_unsupported=None, ct_sysctls=ct)
    d = translate(st)
    assert d.punt_forward_reason == 0
    assert d.nf == NfConfig(nf_mode=NF_STATEFUL, nf_gen=st.nf_gen, ct_flags=0, tcp_max_retrans=5,
                            to_tcp_established=600, to_tcp_unack=200, to_tcp_retrans=100, to_udp=10,
                            to_udp_stream=60)
    acct = node(netfilter_impact="x", netfilter_unsupported=None, ct_sysctls=m.CtSysctls(acct=True, timestamp=True))
    assert translate(acct).nf.ct_flags == CT_FLAG_ACCT | CT_FLAG_TSTAMP


def test_nothing_on_the_forward_path_is_nf_off_and_unevaluable_rules_punt_everything():
    assert translate(node(netfilter_unsupported=None, ct_sysctls=m.CtSysctls())).nf == NfConfig()
    native = node(netfilter_impact="nft table inet x", netfilter_unsupported="native nft table", ct_sysctls=m.CtSysctls())
    assert translate(native).punt_forward_reason == R["NETFILTER"] and translate(native).nf.nf_mode == NF_OFF
    unread = node(netfilter_impact="filter FORWARD: 1 rule", netfilter_unsupported=None, ct_sysctls=None)
    assert translate(unread).punt_forward_reason == R["NETFILTER"]


def test_every_ruleset_change_is_a_new_generation():
    st = node()
    gens = [st.nf_gen]
    for rulesets in ({"iptables-nft": "A"}, {"iptables-nft": "A"}, {"iptables-nft": "B"}, {}):
        st.set_netfilter("filter FORWARD" if rulesets else None, None, rulesets)
        gens.append(st.nf_gen)
    assert gens[1] != gens[0] and gens[2] == gens[1] and len(set(gens)) == 4 and 0 not in gens



def test_redirect_peer_only_to_a_known_peer_without_xdp():
    """The peer's own MAC goes with the flag (the datapath compares the
    neighbour's MAC with it); an XDP program on the peer, or a peer we
    cannot see, means bpf_redirect through veth_xmit(), which runs it."""
    d = translate(node())
    assert d.links[4].flags & LINK_REDIRECT_PEER and d.links[4].peer_mac == "02:00:00:00:02:02"
    st = node()
    st.take_changes()
    st.set_peer((1, 2), m.Peer("02:00:00:00:02:02", xdp=True))
    delta = translate_changes(st, st.take_changes())
    assert not delta.links[4].flags & LINK_REDIRECT_PEER and delta.links[4].peer_mac is None
    assert 3 not in delta.links  # only the veth whose peer changed
    st.set_peer((1, 2), None)
    assert not translate(st).links[4].flags & LINK_REDIRECT_PEER


@pytest.mark.parametrize("change", ["macvlan here", "promiscuous", "tc filter after ours"])
def test_links_with_something_beside_us_are_not_managed(change):
    st = node()
    if change == "macvlan here":
        st.set_link(m.Link(9, "mv0", "macvlan", "02:00:00:00:09:09", 1500, UP, link=4))
    elif change == "promiscuous":
        st.set_link(m.Link(4, "v2", "veth", "02:00:00:00:02:01", 1500, UP, peer_in_other_netns=True, link=2,
                           link_netnsid=1, promiscuity=1))
    else:
        st.set_ingress_tc_after(4, "1 ingress filter(s) after ours")
    d = translate(st)
    assert 4 not in d.attach and 4 not in d.links and not any(k[0] == 4 for k in d.neighbors)
    assert 3 in d.attach


def test_prefixes_uncertain_after_a_dump_punt():
    st = node()
    st.uncertain = {("10.2.0.0", 24), ("10.9.0.0", 16)}  # the second has no route now
    d = translate(st)
    assert d.routes[("10.2.0.0", 24)] == RouteEntry(R["RESYNC"]) == d.routes[("10.9.0.0", 16)]
    assert d.routes[("10.1.0.0", 24)].action == R["FORWARDED"]
