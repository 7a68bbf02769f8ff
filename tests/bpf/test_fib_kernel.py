"""Packet tests of the kernel FIB paths of fib.h (bpf_fib_lookup): multipath
routes and nexthop groups (route action LM_ROUTE_KERNEL), policy rules
(fib_flags LM_FIB_RULES) and their reverse source check.

The test namespace's own kernel FIB is the oracle: the routes, nexthop
objects and rules are added there (module fixture, removed afterwards), and
the egress each forwarded packet must take is what `ip route get` says for
the same flow.  Maps as in test_tc_ingress.base_state.
"""

import json
import subprocess

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether

from lm_bpfrun import SkBuff, TC_ACT_REDIRECT, TC_ACT_UNSPEC, prog_test_run
from mirror.reasons import BY_NAME as R
from mirror.translate import FIB_MP_L4, FIB_MP_PUNT, FIB_RULES, ROUTE_KERNEL
from test_tc_ingress import (CLIENT_MAC, GW_MAC, IN0_MAC, OUT0_MAC, OUT1_MAC, P2_MAC, RPF_LOOSE, UP, FWD,
                             base_state, forwarded)

# The reasons these tests produce, and those no packet can (slots kept free
# for another branch); for test_tc_ingress.test_every_reason_is_exercised.
COVERED = {"MULTIPATH_HASH", "FIB_NOT_FORWARDED", "FIB_UNSUPPORTED", "NEXTHOP_UNSUPPORTED"}
UNREACHABLE = set()

KERNEL_SETUP = [
    "addr add 10.0.0.1/24 dev in0", "addr add 10.1.0.1/24 dev out0", "addr add 10.3.0.1/24 dev out1",
    "route add 10.20.0.0/16 nexthop via 10.1.0.254 dev out0 nexthop via 10.3.0.2 dev out1",
    "nexthop add id 501 via 10.1.0.254 dev out0", "nexthop add id 502 via 10.3.0.2 dev out1",
    "nexthop add id 510 group 501/502",
    "route add 10.21.0.0/16 nhid 510",
    "route add blackhole 10.22.0.0/16",
    "route add 10.30.0.0/16 via 10.1.0.254 dev out0 table 100",
    "route add 10.30.0.0/16 via 10.3.0.2 dev out1 table 101",
    "route add 10.30.0.0/16 dev out0 table 102",
    "route add blackhole 10.40.0.0/16",
    "rule add from 10.0.0.5 lookup 100 pref 100",
    "rule add fwmark 7 lookup 101 pref 90",
    "rule add iif in0 from 10.0.0.6 lookup 102 pref 95",
]


def ip_cmd(*args):
    cp = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert cp.returncode == 0, f"ip {' '.join(args)}: {cp.stderr}"


@pytest.fixture(scope="module")
def kernel_fib(topo):
    """The routes, nexthop objects and rules above in the test namespace's kernel."""
    for name in ("in0", "out0", "out1"):
        with open(f"/proc/sys/net/ipv4/conf/{name}/forwarding", "w") as f:
            f.write("1")
    for name in ("lo", "in0p", "out0p", "out1p"):  # carrier for the next hops
        ip_cmd("link", "set", name, "up")
    for cmd in KERNEL_SETUP:
        ip_cmd(*cmd.split())
    yield
    with open("/proc/sys/net/ipv4/fib_multipath_hash_policy", "w") as f:
        f.write("0")
    for cmd in reversed(KERNEL_SETUP):
        if not cmd.startswith(("addr", "nexthop add id 50")):
            subprocess.run(["ip", *cmd.replace(" add ", " del ", 1).split()], capture_output=True)
    for nh in (510, 502, 501):
        subprocess.run(["ip", "nexthop", "del", "id", str(nh)], capture_output=True)
    for dev, addr in (("in0", "10.0.0.1/24"), ("out0", "10.1.0.1/24"), ("out1", "10.3.0.1/24")):
        subprocess.run(["ip", "addr", "del", addr, "dev", dev], capture_output=True)


def kernel_egress(dst, src, sport, mark=0):
    """The egress device `ip route get` names for this UDP flow from in0."""
    args = ["ip", "-j", "route", "get", dst, "from", src, "iif", "in0", "ipproto", "udp",
            "sport", str(sport), "dport", "80", "mark", str(mark)]
    return json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)[0]["dev"]


def kernel_egress_icmp(dst, src):
    args = ["ip", "-j", "route", "get", dst, "from", src, "iif", "in0", "ipproto", "icmp"]
    return json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)[0]["dev"]


def udp(dst, src="10.0.0.5", sport=1234):
    return Ether(src=CLIENT_MAC, dst=IN0_MAC) / IP(src=src, dst=dst, ttl=64) / UDP(sport=sport, dport=80) / (b"x" * 32)


def run(datapath, maps, topo, pkt, mark=0):
    frame = bytes(pkt)
    before = maps.counters()
    res = prog_test_run(datapath.fd, frame, SkBuff(ifindex=topo.in0, mark=mark))
    after = maps.counters()
    counted = [name for name, v in R.items() if after[v] != before[v]]
    return res, counted


def expect_forwarded(datapath, maps, topo, pkt, egress, mark=0):
    res, counted = run(datapath, maps, topo, pkt, mark)
    assert (res.retval, counted) == (TC_ACT_REDIRECT, ["FORWARDED"])
    macs = {"out0": (OUT0_MAC, GW_MAC), "out1": (OUT1_MAC, P2_MAC)}[egress]
    assert res.data == forwarded(pkt, *macs), egress


def expect_punt(datapath, maps, topo, pkt, reason, mark=0):
    res, counted = run(datapath, maps, topo, pkt, mark)
    assert (res.retval, counted, res.data) == (TC_ACT_UNSPEC, [reason], bytes(pkt))


@pytest.fixture
def fib(topo, datapath, maps, kernel_fib):
    base_state(maps, topo)
    maps.route("10.20.0.0/16", action=ROUTE_KERNEL, mtu=0)
    maps.route("10.21.0.0/16", action=ROUTE_KERNEL, mtu=0)
    maps.route("10.22.0.0/16", action=ROUTE_KERNEL, mtu=0)  # as if multipath: the kernel says blackhole
    return lambda **cfg: maps.set_config(60, **cfg)


@pytest.mark.parametrize("prefix", ["10.20", "10.21"], ids=["multipath route", "nexthop group"])
@pytest.mark.parametrize("policy", [0, 1])
def test_multipath_egress_is_the_kernels(fib, topo, datapath, maps, prefix, policy):
    """Many flows through a 2-way multipath route / nexthop group: each one
    leaves where the kernel's own lookup sends it, and both ways are used."""
    fib(fib_flags=FIB_MP_L4 if policy else 0)
    with open("/proc/sys/net/ipv4/fib_multipath_hash_policy", "w") as f:
        f.write(str(policy))
    seen = set()
    for i in range(24):
        dst, sport = f"{prefix}.{i}.{i * 7 % 250 + 1}", 1000 + i * 37
        egress = kernel_egress(dst, "10.0.0.5", sport)
        expect_forwarded(datapath, maps, topo, udp(dst, sport=sport), egress)
        seen.add(egress)
    assert seen == {"out0", "out1"}


def test_multipath_hash_punts(fib, topo, datapath, maps):
    icmp = Ether(src=CLIENT_MAC, dst=IN0_MAC) / IP(src="10.0.0.5", dst="10.20.0.9") / ICMP()
    error = (Ether(src=CLIENT_MAC, dst=IN0_MAC) / IP(src="10.0.0.5", dst="10.20.0.9")
             / ICMP(type=3, code=3) / IP(src="10.20.0.9", dst="10.0.0.5") / UDP(sport=80, dport=1234))
    fib(fib_flags=0)  # policy 0: an ICMP error is hashed by the header it quotes
    expect_punt(datapath, maps, topo, error, "MULTIPATH_HASH")
    expect_forwarded(datapath, maps, topo, icmp, kernel_egress_icmp("10.20.0.9", "10.0.0.5"))  # echo: outer
    fib(fib_flags=FIB_MP_L4)  # policy 1: ports, TCP/UDP only here
    expect_punt(datapath, maps, topo, icmp, "MULTIPATH_HASH")
    fib(fib_flags=FIB_MP_PUNT)  # policy 2/3
    expect_punt(datapath, maps, topo, udp("10.20.0.9"), "MULTIPATH_HASH")


def test_kernel_says_not_forwarded(fib, topo, datapath, maps):
    fib(fib_flags=0)
    expect_punt(datapath, maps, topo, udp("10.22.0.9"), "FIB_NOT_FORWARDED")


def test_nexthop_unsupported_route_action(fib, topo, datapath, maps):
    fib(fib_flags=0)
    maps.route("10.23.0.0/16", action=R["NEXTHOP_UNSUPPORTED"])
    expect_punt(datapath, maps, topo, udp("10.23.0.9"), "NEXTHOP_UNSUPPORTED")


@pytest.mark.parametrize("src, mark, egress", [
    ("10.0.0.5", 0, "out0"),   # from 10.0.0.5 lookup 100
    ("10.0.0.5", 7, "out1"),   # fwmark 7 lookup 101 (first by priority)
    ("10.0.0.6", 0, "out0"),   # iif in0 from 10.0.0.6 lookup 102: on-link out0
])
def test_policy_rules_forward_like_the_kernel(fib, topo, datapath, maps, src, mark, egress):
    fib(fib_flags=FIB_RULES)
    maps.neigh(topo.out0, "10.30.1.2", GW_MAC)  # table 102 is on-link: the destination's own entry
    assert kernel_egress("10.30.1.2", src, 1234, mark) == egress
    expect_forwarded(datapath, maps, topo, udp("10.30.1.2", src=src), egress, mark)


def test_policy_rules_no_route(fib, topo, datapath, maps):
    fib(fib_flags=FIB_RULES)
    expect_punt(datapath, maps, topo, udp("10.30.1.2", src="10.0.0.9"), "FIB_NOT_FORWARDED")  # main: none
    expect_punt(datapath, maps, topo, udp("10.0.0.1", src="10.0.0.5"), "FIB_NOT_FORWARDED")  # local


def test_policy_rules_reverse_check(fib, topo, datapath, maps):
    """fib_validate_source() under rules: a source whose reverse lookup hits
    a blackhole passes without rp_filter, is dropped with it (punt)."""
    fib(fib_flags=FIB_RULES)
    maps.route("10.20.0.0/16", oif=topo.out0, gateway="10.1.0.254")  # not used under rules
    pkt = udp("10.20.0.9", src="10.40.0.5")
    egress = kernel_egress("10.20.0.9", "10.40.0.5", 1234)
    expect_forwarded(datapath, maps, topo, pkt, egress)
    maps.link(topo.in0, IN0_MAC, UP | FWD | RPF_LOOSE)
    expect_punt(datapath, maps, topo, pkt, "RP_FILTER")


def test_kernel_answer_not_handled(fib, topo, datapath, maps):
    """An IPv4 route via an IPv6 next hop (RTA_VIA): the helper answers
    with an IPv6 gateway, which the fast path does not handle."""
    cp = subprocess.run(["ip", "route", "add", "10.24.0.0/16", "via", "inet6", "fe80::1", "dev", "out0"],
                        capture_output=True, text=True)
    if cp.returncode:
        pytest.skip(f"no IPv6 next hop here: {cp.stderr.strip()}")
    try:
        fib(fib_flags=0)
        maps.route("10.24.0.0/16", action=ROUTE_KERNEL, mtu=0)
        expect_punt(datapath, maps, topo, udp("10.24.0.9"), "FIB_UNSUPPORTED")
    finally:
        subprocess.run(["ip", "route", "del", "10.24.0.0/16"], capture_output=True)
