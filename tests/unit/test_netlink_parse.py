"""Netlink message -> model parsing and event application (no root)."""

import struct

from mirror import model as m
from mirror import netlink

from netlink_msgs import address, link, neighbor, route, rule


def test_link_veth_with_peer_elsewhere():
    lk = netlink.parse_link(link(3, "veth0", mac="02:aa:00:00:00:03", netnsid=0, mtu=9000))
    assert (lk.index, lk.name, lk.kind, lk.mac, lk.mtu) == (3, "veth0", "veth", "02:aa:00:00:00:03", 9000)
    assert lk.peer_in_other_netns and lk.oper_up and lk.master == 0


def test_link_physical_down_and_enslaved():
    lk = netlink.parse_link(link(4, "eth0", kind=None, flags=m.IFF_UP, master=7))
    assert lk.kind == "" and lk.admin_up and not lk.oper_up and lk.master == 7
    assert not lk.peer_in_other_netns


def test_route_single_nexthop_with_mtu():
    r = netlink.parse_route(route("10.2.0.0", 24, oif=3, gateway="10.1.0.9", priority=100, mtu=1400))
    assert r.key == (254, "10.2.0.0", 24, 0, 100)
    assert r.nexthops == (m.Nexthop(3, "10.1.0.9", 0),) and r.mtu == 1400 and not r.unsupported


def test_route_default_and_multipath():
    r = netlink.parse_route(route("0.0.0.0", 0, multipath=[(3, "10.0.0.1"), (4, "10.0.0.2")]))
    assert (r.dst, r.dst_len) == ("0.0.0.0", 0)
    assert [(nh.oif, nh.gateway) for nh in r.nexthops] == [(3, "10.0.0.1"), (4, "10.0.0.2")]


def test_route_with_unknown_attributes_is_unsupported():
    r = netlink.parse_route(route("10.9.0.0", 16, oif=3, extra=[("RTA_FLOW", 5), ("RTA_MARK", 1)]))
    assert r.unsupported == ("RTA_FLOW", "RTA_MARK")


def test_rules_default_vs_custom():
    assert netlink.parse_rule(rule(32766, 254)) == m.Rule(32766, 254)
    custom = netlink.parse_rule(rule(100, 100, extra=[("FRA_SRC", "1.2.3.4")]))
    assert custom.priority == 100 and ("FRA_SRC", "1.2.3.4") in custom.selectors
    # same priority and table as a default, but it selects packets: custom
    marked = netlink.parse_rule(rule(32766, 254, extra=[("FRA_FWMARK", 1)]))
    assert marked.selectors


def test_apply_events_converge():
    st = m.KernelState()
    for msg in (link(3, "v1"), link(4, "v2"), address(3, "10.1.0.1", 24),
                route("10.2.0.0", 24, oif=4), neighbor(4, "10.2.0.2", "02:00:00:00:00:22"),
                rule(0, 255), rule(32766, 254)):
        assert netlink.apply(st, msg)
    assert set(st.links) == {3, 4} and len(st.routes) == 1 and len(st.neighbors) == 1 and len(st.rules) == 2
    netlink.apply(st, route("10.2.0.0", 24, oif=4, event="RTM_DELROUTE"))
    assert not st.routes
    netlink.apply(st, neighbor(4, "10.2.0.2", "02:00:00:00:00:33", state=m.NUD_STALE))
    assert st.neighbors[(4, "10.2.0.2")].mac == "02:00:00:00:00:33"
    netlink.apply(st, route("10.3.0.0", 24, oif=4))
    netlink.apply(st, link(4, "v2", event="RTM_DELLINK"))
    assert set(st.links) == {3} and not st.neighbors and not st.routes  # gone with the link


def test_apply_ignores_other_families():
    st = m.KernelState()
    msg = neighbor(4, "10.2.0.2", "02:00:00:00:00:22")
    msg["family"] = 10
    assert not netlink.apply(st, msg)
    assert not st.neighbors


def test_read_sysctls(tmp_path):
    for name, fwd, rpf in (("all", 1, 2), ("v1", 1, 0), ("v2", 0, 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "forwarding").write_text(f"{fwd}\n")
        (tmp_path / name / "rp_filter").write_text(f"{rpf}\n")
    got = netlink.read_sysctls(["v1", "v2", "gone"], root=str(tmp_path))
    assert got == {"v1": m.LinkSysctls(True, 2), "v2": m.LinkSysctls(False, 2)}


def test_link_down_flushes_what_the_kernel_flushes_silently():
    st = m.KernelState()
    for msg in (link(3, "v1"), link(4, "v2"), route("10.2.0.0", 24, oif=4), route("10.9.0.0", 16, oif=4,
                gateway="10.2.0.2"), route("10.1.0.0", 24, oif=3), neighbor(4, "10.2.0.2", "02:00:00:00:00:22"),
                neighbor(4, "10.2.0.3", "02:00:00:00:00:23", state=m.NUD_PERMANENT)):
        netlink.apply(st, msg)
    # carrier lost: routes stay (flagged linkdown), dynamic neighbours go
    netlink.apply(st, link(4, "v2", flags=m.IFF_UP))
    assert len(st.routes) == 3 and set(st.neighbors) == {(4, "10.2.0.3")}
    # admin down: IPv4 routes through it and all its neighbours go
    netlink.apply(st, link(4, "v2", flags=0))
    assert [r.dst for aliases in st.routes.values() for r in aliases] == ["10.1.0.0"] and not st.neighbors


def _aliases(st, dst, plen):
    return [(r.type, r.nexthops[0].gateway if r.nexthops else None)
            for r in st.routes[(254, dst, plen, 0, 0)]]


def test_routes_sharing_a_key_keep_the_kernels_order():
    """The flags fib_table_insert() puts on RTM_NEWROUTE say where the route
    went; RTM_DELROUTE removes the first one that matches (kernel order as
    measured with `ip route add/append/prepend/replace/del` here)."""
    st = m.KernelState()
    netlink.apply(st, link(3, "v1"))
    for msg in (route("10.9.0.0", 16, rtype=6, nlmsg_flags=0x600),  # ip route add blackhole
                route("10.9.0.0", 16, oif=3, nlmsg_flags=0xc00),  # ip route append ... dev v1
                route("10.9.0.0", 16, rtype=7, nlmsg_flags=0x400)):  # ip route prepend unreachable
        netlink.apply(st, msg)
    assert _aliases(st, "10.9.0.0", 16) == [(7, None), (6, None), (1, None)]
    netlink.apply(st, route("10.9.0.0", 16, oif=3, gateway="10.5.0.3", nlmsg_flags=0x100))  # replace: the first
    assert _aliases(st, "10.9.0.0", 16) == [(1, "10.5.0.3"), (6, None), (1, None)]
    netlink.apply(st, route("10.9.0.0", 16, oif=3, gateway="10.5.0.3", event="RTM_DELROUTE", nlmsg_flags=0))
    assert _aliases(st, "10.9.0.0", 16) == [(6, None), (1, None)]
    # admin down flushes the unicast one (its only next hop), not the blackhole
    netlink.apply(st, link(3, "v1", flags=0))
    assert _aliases(st, "10.9.0.0", 16) == [(6, None)]
    netlink.apply(st, route("10.9.0.0", 16, rtype=6, event="RTM_DELROUTE", nlmsg_flags=0))
    assert not st.routes and not st.by_prefix and not st.by_oif


def test_delete_of_an_unknown_route_makes_the_key_punt():
    st = m.KernelState()
    netlink.apply(st, route("10.9.0.0", 16, oif=3, gateway="10.5.0.3"))
    netlink.apply(st, route("10.9.0.0", 16, oif=3, gateway="10.5.0.9", event="RTM_DELROUTE", nlmsg_flags=0))
    [only] = st.routes[(254, "10.9.0.0", 16, 0, 0)]
    assert only.unsupported and not only.nexthops


def test_route_with_locked_mtu_is_unsupported():
    r = netlink.parse_route(route("10.9.0.0", 16, oif=3, extra=[("RTA_METRICS", {"attrs": [("RTAX_MTU", 1400),
                                                                                            ("RTAX_LOCK", 1 << 2)]})]))
    assert r.unsupported == ("RTAX_LOCK mtu",)


def _with_raw_attr(msg, atype, payload):
    """The message's wire bytes with one more attribute pyroute2 cannot encode."""
    data = bytearray(msg.data[:msg["header"]["length"]])
    data += struct.pack("=HH", 4 + len(payload), atype) + payload + bytes(-len(payload) % 4)
    struct.pack_into("=I", data, 0, len(data))
    return bytes(data)


def test_route_with_nexthop_object_decodes_nhid():
    r = netlink.decode_route(_with_raw_attr(route("10.7.0.0", 16), netlink.RTA_NH_ID, struct.pack("=I", 42)))
    assert r.nhid == 42 and not r.unsupported and r.nexthops == ()
    unknown = netlink.decode_route(_with_raw_attr(route("10.7.0.0", 16, oif=3), 27, b"\x06"))  # RTA_IP_PROTO
    assert unknown.unsupported == ("UNKNOWN",) and unknown.nhid == 0


def test_route_multipath_weights_and_shared_hops():
    msg = route("10.3.0.0", 16, multipath=[(3, "10.0.0.1"), (4, "10.0.0.2")])
    r = netlink.parse_route(msg)
    assert [nh.weight for nh in r.nexthops] == [1, 1]
    assert netlink.parse_route(route("10.4.0.0", 16, multipath=[(3, "10.0.0.1"), (4, "10.0.0.2")])).nexthops \
        is r.nexthops  # one tuple for every route with the same next hops
    assert r.key == (254, "10.3.0.0", 16, 0, 0)


def test_route_mtu_lock_is_unsupported_last():
    r = netlink.parse_route(route("10.9.0.0", 16, oif=3, extra=[("RTA_MARK", 1), ("RTA_METRICS", {
        "attrs": [("RTAX_MTU", 1400), ("RTAX_LOCK", 1 << 2)]})]))
    assert r.mtu == 1400 and r.unsupported == ("RTA_MARK", "RTAX_LOCK mtu")


def test_route_in_the_kernels_dump_layout_decodes_like_any_other():
    """`ip route add P via G` as a dump sends it (RTA_TABLE, RTA_DST,
    RTA_GATEWAY, RTA_OIF): decoded alone and through the shared decoding
    (parse_route) it is the same Route, with the shared next-hop tuple."""
    attrs = struct.pack("=HHI", 8, 15, 254) + struct.pack("=HH4s", 8, 1, bytes([10, 7, 1, 0])) \
        + struct.pack("=HH4s", 8, 5, bytes([10, 2, 0, 9])) + struct.pack("=HHI", 8, 4, 3)
    body = struct.pack("=BBBBBBBBI", 2, 24, 0, 0, 254, 3, 0, 1, 0) + attrs
    fast = netlink.decode_route(struct.pack("=IHHII", 16 + len(body), 24, 2, 1, 0) + body)
    slow = netlink.parse_route(route("10.7.1.0", 24, oif=3, gateway="10.2.0.9"))
    assert fast == slow and fast.nexthops is slow.nexthops


def _dump_message(dst, dst_len, gateway=(10, 2, 0, 9), oif=3, metric=None):
    """An IPv4 route as the kernel's dump sends it (RTA_TABLE first, RTA_DST next)."""
    attrs = struct.pack("=HHI", 8, 15, 254) + (struct.pack("=HH4s", 8, 1, bytes(dst)) if dst_len else b"")
    if metric is not None:
        attrs += struct.pack("=HHI", 8, 6, metric)  # RTA_PRIORITY
    attrs += struct.pack("=HH4s", 8, 5, bytes(gateway)) + struct.pack("=HHI", 8, 4, oif)
    body = struct.pack("=BBBBBBBBI", 2, dst_len, 0, 0, 254, 3, 0, 1, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), 24, 2, 1, 0) + body


def test_dump_messages_equal_but_for_the_prefix_share_one_route():
    """decode_route_shared: one route object (prefix blanked) for messages
    that differ only in RTA_DST and dst_len; any other byte makes another."""
    a = netlink.decode_route_shared(_dump_message((10, 7, 1, 0), 24))
    b = netlink.decode_route_shared(_dump_message((10, 8, 0, 0), 16))
    other_hop = netlink.decode_route_shared(_dump_message((10, 7, 2, 0), 24, gateway=(10, 2, 0, 10)))
    metric = netlink.decode_route_shared(_dump_message((10, 7, 3, 0), 24, metric=20))
    assert a[0] == ("10.7.1.0", 24) and b[0] == ("10.8.0.0", 16)
    assert a[1] is b[1] and (a[1].dst, a[1].dst_len) == ("", 0)
    assert a[1].at(*a[0]) == netlink.decode_route(_dump_message((10, 7, 1, 0), 24))
    assert other_hop[1] is not a[1] and other_hop[1].nexthops[0].gateway == "10.2.0.10"
    assert metric[1].priority == 20 and metric[1] is not a[1]
    default = netlink.decode_route_shared(_dump_message(None, 0))  # no RTA_DST: decoded in full
    assert default[0] == ("0.0.0.0", 0) and default[1].dst == "0.0.0.0"
