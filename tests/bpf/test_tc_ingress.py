"""Packet tests of kernel_bpf/tc_ingress.c with BPF_PROG_TEST_RUN.

Table-driven (Katran style): each Case is {description, input packet, map
state, ctx (gso), expected TC verdict, expected counter reason, expected
output packet}.  Forwarded packets must come out byte-identical to what the
kernel's ip_forward() produces: new MACs, TTL - 1, header checksum as
ip_decrease_ttl() computes it (checked against scapy's full recompute).
Punted packets must come out untouched.

Base state (reset before every case), in a throwaway netns:
  in0  (ingress)  10.0.0.1/24 local, forwarding on, rp_filter off
  out0 (egress)   10.1.0.0/24 on-link, 10.2.0.0/16 via 10.1.0.254, mtu 1500
  out1 (egress, redirect_peer) 10.3.0.0/24 on-link
"""

from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Padding, Raw

from lm_bpfrun import TOPO_MACS as MACS, SkBuff, TC_ACT_REDIRECT, TC_ACT_UNSPEC, prog_test_run
from mirror.reasons import BY_NAME

R = BY_NAME

UP = 1 << 0
FWD = 1 << 1
PEER = 1 << 2
RPF_STRICT = 1 << 3
RPF_LOOSE = 1 << 4

IN0_MAC = MACS["in0"]
OUT0_MAC = MACS["out0"]
OUT1_MAC = MACS["out1"]
CLIENT_MAC = "02:aa:00:00:00:10"
GW_MAC = "02:bb:00:00:00:fe"
H7_MAC = "02:bb:00:00:00:07"
P2_MAC = "02:cc:00:00:00:02"



def base_state(m, t):
    m.clear()
    m.set_config(60)
    m.link(t.in0, t.in0_mac, UP | FWD)
    m.link(t.out0, t.out0_mac, UP | FWD)
    m.link(t.out1, t.out1_mac, UP | FWD | PEER, peer_mac=P2_MAC)
    m.route("10.0.0.0/24", oif=t.in0)
    m.route("10.0.0.1/32", action=R["LOCAL"])
    m.route("10.1.0.0/24", oif=t.out0)
    m.route("10.1.0.1/32", action=R["LOCAL"])
    m.route("10.2.0.0/16", oif=t.out0, gateway="10.1.0.254")
    m.route("10.3.0.0/24", oif=t.out1)
    m.route("10.9.0.0/16", action=R["ROUTE_UNSUPPORTED"])
    m.neigh(t.out0, "10.1.0.254", GW_MAC)
    m.neigh(t.out0, "10.1.0.7", H7_MAC)
    m.neigh(t.out1, "10.3.0.2", P2_MAC)


def udp(dst="10.1.0.7", src="10.0.0.5", ttl=64, eth_dst=IN0_MAC, payload=b"x" * 32, **ip):
    return Ether(src=CLIENT_MAC, dst=eth_dst) / IP(src=src, dst=dst, ttl=ttl, **ip) / UDP(sport=1234, dport=80) / payload


def tcp(dst="10.1.0.7", payload_len=64, opts=(), **ip):
    return (Ether(src=CLIENT_MAC, dst=IN0_MAC) / IP(src="10.0.0.5", dst=dst, flags="DF", **ip)
            / TCP(sport=40000, dport=5201, flags="A", options=list(opts)) / (b"t" * payload_len))


def forwarded(pkt, eth_src, eth_dst):
    """What the kernel transmits: new MACs, TTL - 1, IP checksum recomputed
    (transport checksums are left alone: TTL is not in the pseudo header)."""
    q = Ether(bytes(pkt))
    q[Ether].src = eth_src
    q[Ether].dst = eth_dst
    q[IP].ttl -= 1
    del q[IP].chksum
    return bytes(q)


def ip_decrease_ttl(frame: bytes) -> bytes:
    """The kernel's ip_decrease_ttl() on x86 (a little-endian load of the
    checksum field), for checksum corner cases."""
    f = bytearray(frame)
    check = int.from_bytes(f[24:26], "little") + 0x0001  # + htons(0x0100)
    check = (check + (check >= 0xFFFF)) & 0xFFFF
    f[24:26] = check.to_bytes(2, "little")
    f[22] -= 1
    return bytes(f)


def csum16(data: bytes) -> int:
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def with_ip_checksum(target: int):
    """A UDP packet whose IPv4 header checksum is exactly @target (chosen
    through the IP id, which enters the sum linearly)."""
    base = Ether(bytes(udp(id=0)))
    hdr = bytearray(bytes(base[IP])[:20])
    hdr[10:12] = b"\0\0"
    s = csum16(bytes(hdr))
    # want ~(s + id) == target  =>  id = ~target - s  (one's complement)
    ident = ((~target & 0xFFFF) + (~s & 0xFFFF))
    while ident >> 16:
        ident = (ident & 0xFFFF) + (ident >> 16)
    pkt = udp(id=ident)
    assert Ether(bytes(pkt))[IP].chksum == target
    return pkt


@dataclass
class Case:
    desc: str
    pkt: Callable  # topo -> scapy packet (or bytes)
    reason: str
    verdict: int = TC_ACT_UNSPEC
    out: Optional[Callable] = None  # topo -> expected bytes; None: unchanged
    setup: Optional[Callable] = None  # (maps, topo) -> None, after base_state
    ctx: dict = field(default_factory=dict)
    check: Optional[Callable] = None  # (maps, topo, RunResult) -> None


def fwd_case(desc, pkt, eth_src, eth_dst, **kw):
    return Case(desc, lambda t: pkt, "FORWARDED", TC_ACT_REDIRECT,
                out=lambda t: forwarded(pkt, eth_src, eth_dst), **kw)


def punt(desc, pkt, reason, **kw):
    return Case(desc, pkt if callable(pkt) else (lambda t: pkt), reason, TC_ACT_UNSPEC, **kw)


def set_link(name, flags):
    def f(m, t):
        idx = getattr(t, name)
        m.link(idx, getattr(t, name + "_mac"), flags)
    return f


def check_priority(prio):
    def f(m, t, res):
        assert res.ctx.priority == prio
    return f


def check_ctx(**want):
    def f(m, t, res):
        assert {k: getattr(res.ctx, k) for k in want} == want
    return f


def check_used(updated):
    def f(m, t, res):
        used = m.get_neigh(t.out0, "10.1.0.7").used
        if updated:
            assert 0 <= m.now_jiffies() - used <= m.hz
        else:
            assert used == USED_RECENTLY[0]
    return f


USED_RECENTLY = [0]


def neigh_used_recently(m, t):
    USED_RECENTLY[0] = m.now_jiffies() - m.hz // 2
    m.neigh(t.out0, "10.1.0.7", H7_MAC, used=USED_RECENTLY[0])


BIG = 2896  # two 1448-byte TCP segments
TS_OPT = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]  # 12 bytes: doff 8

CASES = [
    # --- forwarding --------------------------------------------------------
    fwd_case("forward on-link", udp(), OUT0_MAC, H7_MAC, check=check_used(True)),
    fwd_case("forward via gateway", udp(dst="10.2.3.4"), OUT0_MAC, GW_MAC),
    Case("forward to veth peer: redirect_peer, scrubbed as across namespaces", lambda t: udp(dst="10.3.0.2"),
         "FORWARDED", TC_ACT_REDIRECT, out=lambda t: forwarded(udp(dst="10.3.0.2"), OUT1_MAC, P2_MAC),
         ctx={"priority": 5, "mark": 7, "tstamp": 12345}, check=check_ctx(priority=0, mark=0, tstamp=0)),
    Case("neighbour MAC is not the peer's: bpf_redirect through veth_xmit (mark kept for it to scrub)",
         lambda t: udp(dst="10.3.0.3"), "FORWARDED", TC_ACT_REDIRECT,
         out=lambda t: forwarded(udp(dst="10.3.0.3"), OUT1_MAC, H7_MAC),
         setup=lambda m, t: m.neigh(t.out1, "10.3.0.3", H7_MAC),
         ctx={"mark": 7, "tstamp": 12345}, check=check_ctx(mark=7, tstamp=0)),
    fwd_case("forward TCP", tcp(), OUT0_MAC, H7_MAC),
    fwd_case("forward ICMP with DF", Ether(src=CLIENT_MAC, dst=IN0_MAC) / IP(src="10.0.0.5", dst="10.1.0.7", flags="DF")
             / ICMP() / b"ping", OUT0_MAC, H7_MAC),
    fwd_case("TTL 2 leaves with TTL 1", udp(ttl=2), OUT0_MAC, H7_MAC),
    fwd_case("TTL 255", udp(ttl=255), OUT0_MAC, H7_MAC),
    fwd_case("TOS lowdelay sets skb->priority like ip_forward", udp(tos=0x10), OUT0_MAC, H7_MAC,
             check=check_priority(6)),
    fwd_case("TOS throughput: priority bulk", udp(tos=0x08), OUT0_MAC, H7_MAC, check=check_priority(2),
             ctx={"priority": 5}),
    Case("checksum 0xfeff wraps to 0x0000 as in ip_decrease_ttl", lambda t: with_ip_checksum(0xFEFF), "FORWARDED",
         TC_ACT_REDIRECT, out=lambda t: ip_decrease_ttl(forwarded_macs_only(with_ip_checksum(0xFEFF)))),
    fwd_case("bare IPv4 header, no L4 header (ip_forward does not look)",
             Ether(src=CLIENT_MAC, dst=IN0_MAC) / IP(src="10.0.0.5", dst="10.1.0.7", proto=17), OUT0_MAC, H7_MAC),
    fwd_case("packet exactly at route MTU", udp(payload=b"m" * (1500 - 28)), OUT0_MAC, H7_MAC),
    fwd_case("neighbour used recently: used not rewritten", udp(), OUT0_MAC, H7_MAC,
             setup=neigh_used_recently, check=check_used(False)),
    fwd_case("rp_filter strict, source via ingress", udp(), OUT0_MAC, H7_MAC, setup=set_link("in0", UP | FWD | RPF_STRICT)),
    fwd_case("rp_filter loose, source via other link", udp(src="10.2.9.9"), OUT0_MAC, H7_MAC,
             setup=set_link("in0", UP | FWD | RPF_LOOSE)),
    fwd_case("rp_filter off, no route back to the source", udp(src="192.168.50.1"), OUT0_MAC, H7_MAC),
    fwd_case("GSO TCP, segments fit (20+20+1448)", tcp(payload_len=BIG), OUT0_MAC, H7_MAC,
             ctx={"gso_size": 1448, "gso_segs": 2}),
    fwd_case("GSO TCP with timestamps, segments fit exactly (20+32+1448)", tcp(payload_len=BIG, opts=TS_OPT),
             OUT0_MAC, H7_MAC, ctx={"gso_size": 1448, "gso_segs": 2}),
    # --- gate ----------------------------------------------------------------
    punt("agent not ready (deadline 0)", udp(), "AGENT_STALE", setup=lambda m, t: m.set_config(0)),
    punt("heartbeat expired", udp(), "AGENT_STALE", setup=lambda m, t: m.expire()),
    punt("ingress interface not managed", udp(), "IFACE_UNMANAGED", setup=lambda m, t: m.del_link(t.in0)),
    # --- Ethernet --------------------------------------------------------
    punt("ARP", Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.0.0.1"), "NOT_IP"),
    punt("LLDP", Ether(src=CLIENT_MAC, dst="01:80:c2:00:00:0e", type=0x88CC) / Raw(b"\0" * 46), "NOT_IP"),
    punt("IPv6", Ether(src=CLIENT_MAC, dst=IN0_MAC) / IPv6(dst="fd00::1") / UDP() / b"x", "IPV6"),
    punt("802.1Q tagged", Ether(src=CLIENT_MAC, dst=IN0_MAC) / Dot1Q(vlan=10) / IP(src="10.0.0.5", dst="10.1.0.7")
         / UDP() / b"x", "VLAN"),
    punt("802.1ad tagged", Ether(src=CLIENT_MAC, dst=IN0_MAC, type=0x88A8) / Dot1AD(vlan=10) / Dot1Q(vlan=20)
         / IP(src="10.0.0.5", dst="10.1.0.7") / UDP() / b"x", "VLAN"),
    punt("broadcast MAC", udp(eth_dst="ff:ff:ff:ff:ff:ff"), "L2_MULTICAST"),
    punt("multicast MAC", udp(eth_dst="01:00:5e:01:02:03"), "L2_MULTICAST"),
    punt("other host's MAC", udp(eth_dst="02:00:00:00:99:99"), "L2_OTHERHOST"),
    punt("map MAC differs from the frame's", udp(), "L2_OTHERHOST",
         setup=lambda m, t: m.link(t.in0, "02:00:00:00:77:77", UP | FWD)),
    # --- IPv4 header -------------------------------------------------------
    # (A runt IPv4 frame, < 34 bytes, cannot be fed in: BPF_PROG_TEST_RUN
    # itself rejects it with EINVAL.)
    punt("IP version 5", udp(version=5), "IP_MALFORMED"),
    punt("IHL 4", lambda t: bytes(udp(ihl=4)), "IP_MALFORMED"),
    punt("tot_len beyond the frame (truncated)", udp(len=200), "IP_MALFORMED"),
    punt("tot_len shorter than the frame", udp(len=40), "IP_MALFORMED"),
    punt("tot_len smaller than the header", udp(len=19), "IP_MALFORMED"),
    punt("tot_len 0 (BIG TCP marker)", udp(len=0), "IP_MALFORMED"),
    punt("Ethernet padding (kernel trims)", Ether(src=CLIENT_MAC, dst=IN0_MAC) / IP(src="10.0.0.5", dst="10.1.0.7")
         / UDP() / b"ab" / Padding(b"\0" * 16), "IP_MALFORMED"),
    punt("bad header checksum", udp(chksum=0x1234), "IP_CSUM"),
    punt("IP options (record route)", udp(options=[IPOption_RR(routers=["0.0.0.0"])]), "IP_OPTIONS"),
    punt("fragment with MF", udp(flags="MF"), "IP_FRAGMENT"),
    punt("fragment with offset", udp(frag=100), "IP_FRAGMENT"),
    punt("multicast destination", udp(dst="239.1.2.3"), "IP_MULTICAST"),
    punt("224.0.0.5 (OSPF)", udp(dst="224.0.0.5"), "IP_MULTICAST"),
    punt("limited broadcast destination", udp(dst="255.255.255.255"), "IP_MULTICAST"),
    punt("source 0.0.0.0/8", udp(src="0.1.2.3"), "MARTIAN"),
    punt("source 127/8", udp(src="127.0.0.1"), "MARTIAN"),
    punt("source multicast", udp(src="224.1.1.1"), "MARTIAN"),
    punt("source class E", udp(src="240.0.0.1"), "MARTIAN"),
    punt("source limited broadcast", udp(src="255.255.255.255"), "MARTIAN"),
    punt("destination 0/8", udp(dst="0.0.0.9"), "MARTIAN"),
    punt("destination 127/8", udp(dst="127.0.0.1"), "MARTIAN"),
    punt("destination class E", udp(dst="250.1.1.1"), "MARTIAN"),
    # --- routing -------------------------------------------------------------
    punt("destination is local", udp(dst="10.0.0.1"), "LOCAL"),
    punt("local destination while forwarding is off", udp(dst="10.1.0.1"), "LOCAL",
         setup=set_link("in0", UP)),
    punt("no route", udp(dst="192.168.77.1"), "NO_ROUTE"),
    punt("route action: unsupported", udp(dst="10.9.1.1"), "ROUTE_UNSUPPORTED"),
    punt("route action out of range counts as unsupported", udp(dst="10.9.1.1"), "ROUTE_UNSUPPORTED",
         setup=lambda m, t: m.route("10.9.0.0/16", action=9999)),
    punt("covering route of a route that did not fit in the map", udp(dst="10.2.7.7"), "ROUTE_OVERFLOW",
         setup=lambda m, t: m.route("10.2.0.0/16", action=R["ROUTE_OVERFLOW"])),
    punt("route action: policy routing", udp(dst="10.9.1.1"), "POLICY_ROUTING",
         setup=lambda m, t: m.route("10.9.0.0/16", action=R["POLICY_ROUTING"])),
    punt("forwarding off on ingress", udp(), "FORWARDING_OFF", setup=set_link("in0", UP)),
    punt("netfilter rules present", udp(), "NETFILTER",
         setup=lambda m, t: m.set_config(60, R["NETFILTER"])),
    punt("netfilter change under way", udp(), "NETFILTER_CHANGING",
         setup=lambda m, t: m.set_config(60, R["NETFILTER_CHANGING"])),
    punt("policy routing rules present", udp(), "POLICY_ROUTING",
         setup=lambda m, t: m.set_config(60, R["POLICY_ROUTING"])),
    punt("ipsec policies present", udp(), "IPSEC",
         setup=lambda m, t: m.set_config(60, R["IPSEC"])),
    punt("kernel events lost, agent re-dumping", udp(), "RESYNC",
         setup=lambda m, t: m.set_config(60, R["RESYNC"])),
    punt("source is one of our addresses", udp(src="10.1.0.1"), "MARTIAN"),
    punt("rp_filter off, source's route not unicast (custom local routes make the kernel check)",
         udp(src="10.9.1.1"), "RP_FILTER"),
    punt("rp_filter strict, source routed via another link", udp(src="10.2.9.9"), "RP_FILTER",
         setup=set_link("in0", UP | FWD | RPF_STRICT)),
    punt("rp_filter strict, no route to the source", udp(src="192.168.50.1"), "RP_FILTER",
         setup=set_link("in0", UP | FWD | RPF_STRICT)),
    punt("rp_filter loose, no route to the source", udp(src="192.168.50.1"), "RP_FILTER",
         setup=set_link("in0", UP | FWD | RPF_LOOSE)),
    punt("rp_filter loose, source route not plain unicast", udp(src="10.9.5.5"), "RP_FILTER",
         setup=set_link("in0", UP | FWD | RPF_LOOSE)),
    punt("hairpin (egress == ingress)", udp(dst="10.0.0.9"), "HAIRPIN"),
    punt("egress not managed", udp(), "EGRESS_UNMANAGED", setup=lambda m, t: m.del_link(t.out0)),
    punt("egress down", udp(), "EGRESS_UNMANAGED", setup=set_link("out0", FWD)),
    punt("TTL 1", udp(ttl=1), "TTL_EXCEEDED"),
    punt("TTL 0", udp(ttl=0), "TTL_EXCEEDED"),
    punt("larger than route MTU (DF)", udp(payload=b"m" * (1500 - 28 + 1), flags="DF"), "MTU_EXCEEDED"),
    punt("larger than route MTU (no DF: kernel fragments)", udp(payload=b"m" * (1500 - 28 + 1)), "MTU_EXCEEDED"),
    punt("route MTU smaller than the packet", udp(payload=b"m" * 600), "MTU_EXCEEDED",
         setup=lambda m, t: m.route("10.1.0.0/24", oif=t.out0, mtu=576)),
    punt("non-GSO aggregate-sized TCP", tcp(payload_len=BIG), "MTU_EXCEEDED"),
    punt("GSO TCP, segments too big (20+32+1460)", tcp(payload_len=BIG + 24, opts=TS_OPT), "MTU_EXCEEDED",
         ctx={"gso_size": 1460, "gso_segs": 2}),
    punt("GSO UDP", udp(payload=b"u" * BIG), "GSO_UNSUPPORTED", ctx={"gso_size": 1448, "gso_segs": 2}),
    punt("no neighbour", udp(dst="10.1.0.8"), "NO_NEIGHBOR"),
    punt("neighbour on another link only", udp(dst="10.3.0.9"), "NO_NEIGHBOR",
         setup=lambda m, t: m.neigh(t.out0, "10.3.0.9", H7_MAC)),
]


def forwarded_macs_only(pkt):
    f = bytearray(bytes(pkt))
    f[0:6] = bytes.fromhex(H7_MAC.replace(":", ""))
    f[6:12] = bytes.fromhex(OUT0_MAC.replace(":", ""))
    return bytes(f)


@pytest.mark.parametrize("case", CASES, ids=[c.desc for c in CASES])
def test_tc_ingress(case, topo, datapath, maps):
    base_state(maps, topo)
    run_case(case, topo, datapath, maps)


def run_case(case, topo, datapath, maps):
    """Run one Case on the prepared maps and check verdict, counter, bytes."""
    if case.setup:
        case.setup(maps, topo)
    frame = case.pkt(topo)
    frame = frame if isinstance(frame, bytes) else bytes(frame)

    ctx = SkBuff(ifindex=topo.in0, **case.ctx)
    before = maps.counters()
    res = prog_test_run(datapath.fd, frame, ctx)
    after = maps.counters()

    assert res.retval == case.verdict, f"retval {res.retval:#x}, want {case.verdict:#x}"
    delta = {r: (after[r][0] - before[r][0], after[r][1] - before[r][1])
             for r in after if after[r] != before[r]}
    assert delta == {R[case.reason]: (1, len(frame))}, \
        f"counted {[(name, d) for name, v in R.items() for r, d in delta.items() if r == v]}"
    expected = case.out(topo) if case.out else frame
    if res.data != expected:
        got, want = Ether(res.data), Ether(expected)
        pytest.fail(f"output differs:\n got  {got!r}\n want {want!r}\n"
                    f" got  {res.data[:40].hex()}\n want {expected[:40].hex()}")
    if case.verdict == TC_ACT_REDIRECT and csum16(frame[14:34]) == 0xFFFF:  # (bridges pass bad ones on)
        assert csum16(res.data[14:34]) == 0xFFFF, "IP header checksum invalid"
    if case.check:
        case.check(maps, topo, res)


def test_every_reason_is_exercised():
    """Every verdict reason in common.h has at least one case (here, in the
    bridge cases of test_l2.py, or the conntrack cases of test_ct.py, which
    need kernel conntrack entries)."""
    from test_ct import COVERED, UNREACHABLE
    from test_ct_bridge import COVERED as BRIDGED_CT
    from test_fib_kernel import COVERED as FIB_COVERED, UNREACHABLE as FIB_UNREACHABLE
    from test_l2 import L2_CASES

    covered = ({c.reason for c in CASES + L2_CASES} | COVERED | BRIDGED_CT | UNREACHABLE
               | FIB_COVERED | FIB_UNREACHABLE)
    assert covered == set(R), f"no case for {sorted(set(R) - covered)}"


def test_program_is_small(datapath):
    """Keep the fast path lean: the verifier-facing size of the program
    (in instructions) is a budget later stages must argue for.
    ~400 for the routed path; the stateful stages (ct.h, verdict.h, nat.h:
    lookup, status/extension checks, both tuple directions, the flow
    verdict and event, four checksum updates) add ~630, run only in
    LM_NF_STATEFUL; the bridge stages (l2.h: port, FDB and learning checks
    on ingress, the FDB port choice on egress) ~480.  Bridged frames under
    br_netfilter reuse the one copy of the parse, conntrack and verdict
    stages (the pipeline jumps past routing), so they add only the branches.  Explain runs
    (explain.h) add ~95: ~55 that run only in an explain run (trace slot,
    verdict, route) or are never-taken branches at the side-effect sites,
    and one constant move per exit edge for p.ran.  The kernel FIB lookup
    (fib.h: multipath routes, nexthop groups, policy rules) adds ~300: two
    64-byte bpf_fib_lookup parameter blocks (the forward lookup and, under
    rules, the reversed one of fib_validate_source()), the ports as routed
    and the multipath-hash guards (ICMP error type, skb->hash).  Counting
    per interface (the ingress link's counter slot at the single exit)
    adds ~30."""
    insns = len(datapath._bpf.dump_func(datapath.name.encode())) // 8
    assert insns < 2000, insns


def test_counts_per_interface_slot(topo, datapath, maps):
    """Every verdict counts in the slot of the link the packet arrived on
    (lm_link.slot), an unmanaged ingress in slot 0; the totals are the sum."""
    base_state(maps, topo)
    maps.link(topo.in0, topo.in0_mac, UP | FWD, slot=5)
    maps.link(topo.out0, topo.out0_mac, UP | FWD, slot=7)
    maps.del_link(topo.out1)
    sent = [(topo.in0, udp(), TC_ACT_REDIRECT),                          # forwarded
            (topo.in0, udp(dst="10.7.0.1"), TC_ACT_UNSPEC),              # NO_ROUTE
            (topo.in0, udp(dst="10.7.0.1"), TC_ACT_UNSPEC),
            (topo.out0, udp(dst="10.1.0.1", eth_dst=OUT0_MAC), TC_ACT_UNSPEC),  # LOCAL
            (topo.out1, udp(eth_dst=OUT1_MAC), TC_ACT_UNSPEC)]           # IFACE_UNMANAGED
    before = {s: maps.slot_counters(s) for s in (0, 5, 7)}
    total_before = maps.counters()
    for ifindex, frame, verdict in sent:
        assert prog_test_run(datapath.fd, bytes(frame), SkBuff(ifindex=ifindex)).retval == verdict
    delta = {s: {r: c[0] - before[s][r][0] for r, c in maps.slot_counters(s).items() if c != before[s][r]}
             for s in (0, 5, 7)}
    assert delta == {5: {R["FORWARDED"]: 1, R["NO_ROUTE"]: 2}, 7: {R["LOCAL"]: 1},
                     0: {R["IFACE_UNMANAGED"]: 1}}, delta
    total = {r: c[0] - total_before[r][0] for r, c in maps.counters().items() if c != total_before[r]}
    assert total == {R["FORWARDED"]: 1, R["NO_ROUTE"]: 2, R["LOCAL"]: 1, R["IFACE_UNMANAGED"]: 1}
