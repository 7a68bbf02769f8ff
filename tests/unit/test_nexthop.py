"""Nexthop objects, multipath routes and policy rules, without root:
mirror/nexthop.py on messages captured from the kernel (tests/data/nexthop,
`ip nexthop` / `ip route` in a namespace), parse_route on captured
RTM_NEWROUTE messages, the model's nexthop flush and the translator's route
and fib_flags decisions."""

import json
import os

import pytest
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from mirror import model as m
from mirror import netlink, nexthop, nlmsg
from mirror.reasons import BY_NAME as R
from mirror.translate import (FIB_MP_ANY, FIB_MP_L4, FIB_MP_PUNT, FIB_RULE_PORTS, FIB_RULES, ROUTE_KERNEL,
                              RouteEntry, translate)
from test_translate import node

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "nexthop")


def captured(name):
    with open(os.path.join(DATA, "messages.json")) as f:
        case = json.load(f)[name]
    return [msg for dg in case["datagrams"] for msg in nlmsg.split(bytes.fromhex(dg))]


@pytest.mark.parametrize("name, kind, expected", [
    ("single", nexthop.RTM_NEWNEXTHOP, m.NexthopObject(1, oif=3, gateway="10.5.0.2")),
    ("group", nexthop.RTM_NEWNEXTHOP, m.NexthopObject(10, family=0, group=((1, 1), (2, 5)))),
    ("resilient", nexthop.RTM_NEWNEXTHOP, m.NexthopObject(11, family=0, group=((1, 1), (2, 1)),
                                                          group_type=m.NHG_RES)),
    ("blackhole", nexthop.RTM_NEWNEXTHOP, m.NexthopObject(12, blackhole=True)),
    ("fdb", nexthop.RTM_NEWNEXTHOP, m.NexthopObject(13, gateway="10.5.0.9", fdb=True)),
    ("onlink_dev", nexthop.RTM_NEWNEXTHOP, m.NexthopObject(14, oif=3)),
    ("delete", nexthop.RTM_DELNEXTHOP, m.NexthopObject(14, oif=3)),
])
def test_decodes_captured_messages(name, kind, expected):
    (msg,) = captured(name)
    assert nexthop.parse(msg) == (kind, expected)


def test_pyroute2_event_passes_the_raw_bytes_on():
    (msg,) = captured("group")
    (event,) = MarshalRtnl().parse(msg)
    assert nexthop.raw_message(event) == msg
    st = m.KernelState()
    netlink.apply(st, event)
    assert st.nexthops[10].group == ((1, 1), (2, 5))


def test_malformed_messages_raise():
    (msg,) = captured("single")
    with pytest.raises(ValueError):
        nexthop.parse(msg[:10])
    with pytest.raises(ValueError):
        nexthop.parse(msg[:24] + bytes([0xff, 0, 1, 0]) + msg[28:])  # attribute longer than the message


def test_unknown_and_encap_attributes_are_named():
    (msg,) = captured("single")
    extra = bytes([8, 0, nexthop.NHA_ENCAP_TYPE, 0, 1, 0, 0, 0])
    body = msg + extra
    body = len(body).to_bytes(4, "little") + body[4:]
    assert nexthop.parse(body)[1].unsupported == ("NHA_ENCAP_TYPE",)


def routes():
    with open(os.path.join(DATA, "routes.json")) as f:
        raw = json.load(f)["RTM_NEWROUTE"]
    parsed = [netlink.parse_route(msg) for hexmsg in raw for msg in MarshalRtnl().parse(bytes.fromhex(hexmsg))]
    return {(r.dst, r.dst_len): r for r in parsed if r.table == m.TABLE_MAIN}


def test_parse_route_nexthop_id_and_weights():
    r = routes()
    assert (r[("10.9.0.0", 24)].nhid, r[("10.9.0.0", 24)].unsupported) == (1, ())
    assert (r[("10.8.0.0", 24)].nhid, r[("10.8.0.0", 24)].unsupported) == (10, ())
    assert [nh.weight for nh in r[("10.8.0.0", 24)].nexthops] == [1, 5]  # compat mode: the group's hops
    assert [nh.weight for nh in r[("10.7.0.0", 24)].nexthops] == [3, 1]
    assert r[("10.7.0.0", 24)].nhid == 0


def with_nexthops(st, *objs):
    for nh in objs:
        st.set_nexthop(nh)
    return st


SINGLE = m.NexthopObject(1, oif=4, gateway="10.2.0.2")
OTHER = m.NexthopObject(2, oif=3, gateway="10.1.0.2")
GROUP = m.NexthopObject(10, family=0, group=((1, 1), (2, 1)))


@pytest.mark.parametrize("objs, nhid, expected", [
    ((SINGLE,), 1, RouteEntry(R["FORWARDED"], 4, "10.2.0.2", 1500)),
    ((SINGLE, OTHER, GROUP), 10, RouteEntry(ROUTE_KERNEL)),
    ((SINGLE, GROUP), 10, RouteEntry(R["NEXTHOP_UNSUPPORTED"])),  # a member missing
    ((), 1, RouteEntry(R["NEXTHOP_UNSUPPORTED"])),
    ((m.NexthopObject(1, blackhole=True),), 1, RouteEntry(R["NEXTHOP_UNSUPPORTED"])),
    ((m.NexthopObject(1, oif=4, unsupported=("NHA_ENCAP",)),), 1, RouteEntry(R["NEXTHOP_UNSUPPORTED"])),
    ((SINGLE, m.NexthopObject(2, oif=3, fdb=True), GROUP), 10, RouteEntry(R["NEXTHOP_UNSUPPORTED"])),
])
def test_routes_by_nexthop_id(objs, nhid, expected):
    st = with_nexthops(node(), *objs)
    st.set_route(m.Route(m.TABLE_MAIN, "10.9.0.0", 16, nhid=nhid))
    assert translate(st).routes[("10.9.0.0", 16)] == expected


def test_multipath_route_asks_the_kernel():
    st = node()
    hops = (m.Nexthop(3, "10.1.0.2", weight=2), m.Nexthop(4, "10.2.0.2", flags=m.RTNH_F_DEAD))
    st.set_route(m.Route(m.TABLE_MAIN, "10.9.0.0", 16, mtu=1400, nexthops=hops))
    assert translate(st).routes[("10.9.0.0", 16)] == RouteEntry(ROUTE_KERNEL, mtu=1400)


def test_nexthop_change_retranslates_and_deletion_flushes_its_routes():
    st = with_nexthops(node(), SINGLE)
    st.set_route(m.Route(m.TABLE_MAIN, "10.9.0.0", 16, nhid=1))
    st.take_changes()
    st.set_nexthop(m.NexthopObject(1, oif=3, gateway="10.1.0.2"))
    assert st.take_changes().all_routes
    assert translate(st).routes[("10.9.0.0", 16)].oif == 3
    st.del_nexthop(1)
    assert ("10.9.0.0", 16) not in translate(st).routes  # fib_flush: the route is gone too
    st.set_nexthop(SINGLE)  # a new object with the same id does not bring it back
    assert ("10.9.0.0", 16) not in translate(st).routes


@pytest.mark.parametrize("policy, flags", [(0, 0), (1, FIB_MP_L4), (2, FIB_MP_PUNT), (3, FIB_MP_PUNT),
                                           (-1, FIB_MP_PUNT)])
def test_hash_policy_flags(policy, flags):
    assert translate(node(multipath_hash_policy=policy)).fib_flags == flags


def test_rule_flags():
    st = node()
    st.rules.add(m.Rule(100, 100, frozenset({("FRA_FWMARK", "7")})))
    assert translate(st).fib_flags == FIB_RULES
    st.rules.add(m.Rule(110, 100, frozenset({("FRA_IP_PROTO", "6"), ("FRA_IIFNAME", "lo")})))
    assert translate(st).fib_flags == FIB_RULES  # iif lo: never a forwarded packet's, no dissection
    st.rules.add(m.Rule(120, 100, frozenset({("FRA_DPORT_RANGE", "80")})))
    assert translate(st).fib_flags == FIB_RULES | FIB_RULE_PORTS
    st.set_route(m.Route(100, "10.9.0.0", 16, nexthops=(m.Nexthop(3, "10.1.0.2"), m.Nexthop(4, "10.2.0.2"))))
    assert translate(st).fib_flags == FIB_RULES | FIB_RULE_PORTS | FIB_MP_ANY


@pytest.mark.parametrize("route", [
    m.Route(100, "10.9.0.0", 16, mtu=1400, nexthops=(m.Nexthop(3, "10.1.0.2"),)),
    m.Route(100, "10.9.0.0", 16, nexthops=(m.Nexthop(3),), unsupported=("RTA_FLOW",)),
])
def test_rules_punt_when_a_reachable_route_is_not_reproduced(route):
    st = node()
    st.rules.add(m.Rule(100, 100, frozenset({("FRA_SRC", "10.1.0.0"), ("src_len", 24)})))
    st.set_route(route)
    d = translate(st)
    assert (d.punt_forward_reason, d.fib_flags & FIB_RULES) == (R["POLICY_ROUTING"], 0)
