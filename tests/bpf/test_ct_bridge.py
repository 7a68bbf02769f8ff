"""Packet tests of the stateful stages on bridged frames (br_netfilter):
BPF_PROG_TEST_RUN against real kernel conntrack entries, on test_l2's
bridge (in0, out0, out1 ports of BR) in stateful mode.

With bridge-nf-call-iptables a frame switched between two ports meets
conntrack and the IPv4 hooks like a routed packet, so the fast path
continues it only with a kernel entry and a flow verdict; the verdict's key
is the ingress port plus `bridged`, its oif the egress port (the ruleset
sees -i/-o as the bridge and physdev as the ports).  The frame leaves
unchanged: no TTL, no MAC rewrite, no NAT (entries with NAT punt).
"""

import pytest
from scapy.layers.inet import TCP, UDP, IP
from scapy.layers.l2 import Ether

from lm_bpfrun import TC_ACT_REDIRECT, TC_ACT_SHOT, conntrack, ct_get, ct_list, ct_set_tcp_flags
from test_ct import BE_LIBERAL, GEN, SYSCTLS, VERDICT_BITS, assert_punted, nf_config, nf_sysctls, run  # noqa: F401
from test_l2 import BR, BR_MAC, PFWD, PLEARN, PNF, bridge_state
from test_tc_ingress import CLIENT_MAC, H7_MAC, R

A, B, AP, BP = "10.0.0.5", "10.0.0.7", 40000, 80  # A behind in0, B behind out0


@pytest.fixture
def br(topo, datapath, maps, nf_sysctls):
    """Stateful mode; in0 is a br_netfilter port; an empty conntrack table."""
    bridge_state(maps, topo)
    maps.port(topo.in0, BR, PFWD | PLEARN | PNF)
    maps.set_config(60, **nf_config(nf_sysctls))
    conntrack("-F")
    yield maps
    conntrack("-F")


def a2b(flags="A", dst_mac=H7_MAC, **ip):
    return (Ether(src=CLIENT_MAC, dst=dst_mac) / IP(src=A, dst=B, ttl=64, id=5, **ip)
            / TCP(sport=AP, dport=BP, flags=flags, seq=100, ack=200, window=4000) / (b"a" * 40))


def entry(*extra):
    conntrack("-I", "-p", "tcp", "-s", A, "-d", B, "--sport", str(AP), "--dport", str(BP), "--state", "ESTABLISHED",
              "--status", "ASSURED,SEEN_REPLY", "-t", "100", *extra)
    ct_set_tcp_flags(A, B, AP, BP, BE_LIBERAL, BE_LIBERAL)


def key(m, t, bridged=1):
    return m.flow_key(t.in0, A, B, AP, BP, 6, bridged=bridged)


def verdict(m, t, action=0, oif=None, bridged=1):
    status = ct_get(A, B, AP, BP, 6)["status"]
    m.flow(key(m, t, bridged), action=action, oif=t.out0 if oif is None else oif, nat=(A, B, AP, BP), gen=GEN,
           ct_status=status & VERDICT_BITS)


def test_bridged_flow_is_switched_unchanged_and_refreshed(br, datapath, topo):
    entry()
    verdict(br, topo)
    res = run(datapath, br, a2b(), topo.in0)
    assert (res.reason, res.retval) == ("FORWARDED", TC_ACT_REDIRECT)
    assert res.data == bytes(a2b())  # no TTL, MAC or NAT change: a bridge
    [(_, seconds, e)] = ct_list()
    assert e["state"] == "ESTABLISHED" and seconds > 4300  # tcp_timeout_established (4321 s here), not 100
    f = br.flows[key(br, topo)]
    assert (f.packets, f.bytes) == (1, len(a2b()))
    assert br.events() == []


def test_bridged_flow_without_verdict_asks_with_its_ports(br, datapath, topo):
    entry()
    assert_punted(run(datapath, br, a2b(), topo.in0), a2b(), "FLOW_PENDING")
    [ev] = br.events()
    assert (ev.key.ifindex, ev.key.bridged, ev.oif, ev.dir) == (topo.in0, 1, topo.out0, 0)


@pytest.mark.parametrize("other", ["routed", "other-port"])
def test_a_verdict_for_another_path_does_not_serve_it(br, datapath, topo, other):
    """The routed flow with this tuple (-i/-o, physdev differ), or the same
    bridged flow towards another port (the MAC moved): not this verdict."""
    entry()
    if other == "routed":
        verdict(br, topo, bridged=0)
    else:
        verdict(br, topo, oif=topo.out1)
    assert_punted(run(datapath, br, a2b(), topo.in0), a2b(), "FLOW_PENDING")


def test_bridged_drop_verdict_is_shot(br, datapath, topo):
    entry()
    verdict(br, topo, action=R["NF_DROP"])
    res = run(datapath, br, a2b(), topo.in0)
    assert (res.reason, res.retval) == ("NF_DROP", TC_ACT_SHOT)


def test_bridged_entry_with_nat_punts(br, datapath, topo):
    """DNAT of a bridged frame makes br_netfilter re-route it: the kernel's."""
    entry("--dst-nat", f"{B}:8080")
    assert_punted(run(datapath, br, a2b(), topo.in0), a2b(), "BR_CT_NAT")
    assert br.events() == []


@pytest.mark.parametrize("flags", ["S", "FA", "R"])
def test_bridged_state_changes_punt(br, datapath, topo, flags):
    entry()
    verdict(br, topo)
    assert_punted(run(datapath, br, a2b(flags=flags), topo.in0), a2b(flags=flags), "CT_TCP_FLAGS")


def test_bridged_without_entry_punts(br, datapath, topo):
    assert_punted(run(datapath, br, a2b(), topo.in0), a2b(), "CT_MISS")


def test_not_liberal_punts_and_asks(br, datapath, topo):
    entry()
    ct_set_tcp_flags(A, B, AP, BP, 0, BE_LIBERAL)
    verdict(br, topo)
    assert_punted(run(datapath, br, a2b(), topo.in0), a2b(), "CT_NOT_LIBERAL")


def test_port_without_br_netfilter_switches_without_conntrack(br, datapath, topo):
    """bridge-nf-call-iptables off for this bridge: no rule sees the frame."""
    br.port(topo.in0, BR, PFWD | PLEARN)
    res = run(datapath, br, a2b(), topo.in0)
    assert (res.reason, res.retval) == ("FORWARDED", TC_ACT_REDIRECT)
    assert ct_list() == []


def test_routed_from_a_port_is_keyed_by_the_port(br, datapath, topo):
    """A frame for the bridge's MAC is routed with the bridge as L3 device,
    but physdev --physdev-in sees the port: the verdict key names the port."""
    dst = "10.1.0.7"  # routed out of out0 (base_state)
    conntrack("-I", "-p", "udp", "-s", A, "-d", dst, "--sport", "1234", "--dport", "53", "-t", "30")
    frame = Ether(src=CLIENT_MAC, dst=BR_MAC) / IP(src=A, dst=dst, ttl=64) / UDP(sport=1234, dport=53) / b"q"
    assert_punted(run(datapath, br, frame, topo.in0), frame, "FLOW_PENDING")
    [ev] = br.events()
    assert (ev.key.ifindex, ev.key.bridged, ev.oif) == (topo.in0, 0, topo.out0)
    br.flow(br.flow_key(topo.in0, A, dst, 1234, 53, 17), action=0, oif=topo.out0, nat=(A, dst, 1234, 53), gen=GEN)
    res = run(datapath, br, frame, topo.in0)
    assert (res.reason, res.retval) == ("FORWARDED", TC_ACT_REDIRECT)
    assert Ether(res.data).dst == H7_MAC and Ether(res.data)[IP].ttl == 63


# Reasons this file exercises (test_tc_ingress.test_every_reason_is_exercised).
COVERED = {"BR_CT_NAT"}
