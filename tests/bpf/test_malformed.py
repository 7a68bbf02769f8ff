"""Malformed and unusual packets through the datapath (BPF_PROG_TEST_RUN):
each is handled exactly as the kernel would or punted, untouched.

Complements the table in test_tc_ingress.py (same base state, same runner);
tools/fuzz sends the same classes live, through both the kernel alone and
loxi-mirror.  Frames shorter than an Ethernet + IPv4 header cannot be fed
in here (BPF_PROG_TEST_RUN refuses them); the fuzzer covers those.

The kernel's ip_forward() never looks past the IPv4 header, so a routed
packet with a damaged, truncated or tunnelled payload is forwarded as it is.
"""

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_Router_Alert
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Ether
from scapy.packet import Raw

import test_tc_ingress as base
from test_tc_ingress import CLIENT_MAC, H7_MAC, IN0_MAC, OUT0_MAC, fwd_case, punt, udp


def ip(dst="10.1.0.7", **kw):
    return Ether(src=CLIENT_MAC, dst=IN0_MAC) / IP(src="10.0.0.5", dst=dst, **kw)


def raw_header(pkt, **edits):
    """The frame with IPv4 header bytes edited after scapy built it
    (checksum recomputed unless 'check' is given)."""
    f = bytearray(bytes(pkt))
    for off, value in edits.get("bytes", {}).items():
        f[14 + off] = value
    if "check" in edits:
        f[24:26] = edits["check"].to_bytes(2, "big")
    else:
        ihl = max((f[14] & 0xF) * 4, 20)
        f[24:26] = b"\0\0"
        f[24:26] = (~base.csum16(bytes(f[14:14 + ihl])) & 0xFFFF).to_bytes(2, "big")
    return bytes(f)


def with_tot_len(pkt, tot_len):
    return raw_header(pkt, bytes={2: tot_len >> 8, 3: tot_len & 0xFF})


GRE_IN = Raw(b"\x00\x00\x08\x00" + bytes(IP(src="192.0.2.1", dst="192.0.2.2") / UDP() / b"inner"))
BIG = 3000  # the largest frames BPF_PROG_TEST_RUN takes are about a page

CASES = [
    # --- L4 headers: not the router's business ----------------------------------
    fwd_case("truncated UDP header (4 of 8 bytes)", ip(proto=17) / Raw(b"\x04\xd2\x00\x50"), OUT0_MAC, H7_MAC),
    fwd_case("truncated TCP header (8 of 20 bytes)", ip(proto=6) / Raw(b"\x9c\x40\x14\x51\0\0\0\1"),
             OUT0_MAC, H7_MAC),
    fwd_case("UDP checksum zero", ip() / UDP(sport=1, dport=2, chksum=0) / b"zero", OUT0_MAC, H7_MAC),
    fwd_case("UDP checksum wrong", ip() / UDP(sport=1, dport=2, chksum=0xdead) / b"bad", OUT0_MAC, H7_MAC),
    fwd_case("TCP checksum wrong", ip(flags="DF") / TCP(chksum=0xbeef) / b"bad", OUT0_MAC, H7_MAC),
    fwd_case("ICMP error inside", ip() / ICMP(type=3, code=1) / IP(src="10.1.0.7", dst="10.0.0.5") / UDP(),
             OUT0_MAC, H7_MAC),
    fwd_case("GRE inside", ip(proto=47) / GRE_IN, OUT0_MAC, H7_MAC),
    fwd_case("IPIP inside", ip() / IP(src="192.0.2.1", dst="192.0.2.2") / UDP() / b"inner", OUT0_MAC, H7_MAC),
    punt("GRE to a local address", ip(dst="10.0.0.1", proto=47) / GRE_IN, "LOCAL"),
    punt("IPIP to a local address", ip(dst="10.0.0.1") / IP(src="192.0.2.1", dst="192.0.2.2") / UDP(), "LOCAL"),
    # --- IPv4 header -----------------------------------------------------------
    punt("IHL 0", lambda t: raw_header(udp(), bytes={0: 0x40}), "IP_MALFORMED"),
    punt("IHL 15 but tot_len shorter than 60", lambda t: raw_header(udp(payload=b""), bytes={0: 0x4F}),
         "IP_MALFORMED"),
    punt("version 6 in an IPv4 frame", lambda t: raw_header(udp(), bytes={0: 0x65}), "IP_MALFORMED"),
    punt("header checksum zero", lambda t: raw_header(udp(), check=0), "IP_CSUM"),
    punt("header checksum 0xffff", lambda t: raw_header(udp(), check=0xFFFF), "IP_CSUM"),
    punt("tot_len one byte short of the frame", lambda t: with_tot_len(udp(), len(udp()) - 14 - 1), "IP_MALFORMED"),
    punt("tot_len one byte beyond the frame", lambda t: with_tot_len(udp(), len(udp()) - 14 + 1), "IP_MALFORMED"),
    punt("Ethernet padding to 60 bytes after a short packet",
         lambda t: bytes(ip() / UDP() / b"a") + b"\0" * (60 - len(ip() / UDP() / b"a")), "IP_MALFORMED"),
    punt("options: four NOPs", udp(options=[IPOption_NOP()] * 4), "IP_OPTIONS"),
    punt("options: router alert", udp(options=[IPOption_Router_Alert()]), "IP_OPTIONS"),
    punt("options with a bad header checksum", lambda t: raw_header(udp(options=[IPOption_NOP()] * 4),
                                                                    check=0x1234), "IP_OPTIONS"),
    # --- fragments ---------------------------------------------------------------
    punt("first fragment (MF, offset 0)", udp(flags="MF", payload=b"f" * 64), "IP_FRAGMENT"),
    punt("middle fragment (MF, offset 8)", ip(flags="MF", frag=1, proto=17) / Raw(b"m" * 64), "IP_FRAGMENT"),
    punt("last fragment (offset, no MF)", ip(frag=9, proto=17) / Raw(b"l" * 64), "IP_FRAGMENT"),
    punt("DF and MF together", udp(flags="DF+MF"), "IP_FRAGMENT"),
    punt("fragment with TTL 1", udp(flags="MF", ttl=1), "IP_FRAGMENT"),
    # --- sizes -------------------------------------------------------------------
    fwd_case("3000-byte packet, route MTU 9000", udp(payload=b"j" * (BIG - 28)), OUT0_MAC, H7_MAC,
             setup=lambda m, t: m.route("10.1.0.0/24", oif=t.out0, mtu=9000)),
    punt("3000-byte packet over a 1500 MTU, DF", udp(payload=b"j" * (BIG - 28), flags="DF"), "MTU_EXCEEDED"),
    punt("3000-byte packet over a 1500 MTU, no DF", udp(payload=b"j" * (BIG - 28)), "MTU_EXCEEDED"),
    # --- not IPv4 ----------------------------------------------------------------
    punt("IPv6 with hop-by-hop and fragment headers", Ether(src=CLIENT_MAC, dst=IN0_MAC)
         / IPv6(dst="fd00::1") / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment() / UDP() / b"x", "IPV6"),
    punt("IPv6 ethertype carrying an IPv4 packet", lambda t: bytes(udp())[:12] + b"\x86\xdd" + bytes(udp())[14:],
         "IPV6"),
    punt("IPv4 ethertype carrying an IPv6 packet",
         lambda t: bytes(Ether(src=CLIENT_MAC, dst=IN0_MAC, type=0x0800) / IPv6(dst="fd00::1") / UDP() / b"x"),
         "IP_MALFORMED"),
    punt("unknown ethertype 0x88b5", Ether(src=CLIENT_MAC, dst=IN0_MAC, type=0x88B5) / Raw(b"\0" * 46), "NOT_IP"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.desc for c in CASES])
def test_malformed(case, topo, datapath, maps):
    base.test_tc_ingress(case, topo, datapath, maps)
