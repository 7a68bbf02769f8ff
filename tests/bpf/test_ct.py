"""Packet tests of the stateful stages (ct.h, verdict.h, nat.h) with
BPF_PROG_TEST_RUN against real kernel conntrack entries.

The entries are made with `conntrack -I` (with --dst-nat/--src-nat for NAT'd
flows) in the test's own netns, the one the program's lookup searches
(netns_id -1: the ingress device's).  BE_LIBERAL is set through ctnetlink
as the agent does.  The routed topology is test_tc_ingress's base state:

  client 10.0.0.5 --in0-- [fast path] --out0-- server 10.1.0.7
  VIP 10.1.0.100:80 is DNAT'd to 10.1.0.7:8080, the client MASQUERADEd to
  10.1.0.1:40001 (the router's address on out0).
"""

import ctypes
import struct
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from lm_bpfrun import (SkBuff, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, conntrack, ct_get, ct_list,
                       ct_set_synproxy_tsoff, ct_set_tcp_flags, ip4, prog_test_run)
from mirror.datapath import BPF_DIR, Datapath
from test_tc_ingress import CLIENT_MAC, H7_MAC, IN0_MAC, OUT0_MAC, R, base_state

TESTS = BPF_DIR.parent / "tests" / "bpf"

CLIENT, VIP, SERVER, MASQ = "10.0.0.5", "10.1.0.100", "10.1.0.7", "10.1.0.1"
CPORT, VPORT, SPORT, MPORT = 40000, 80, 8080, 40001
GEN = 5
BE_LIBERAL, DATA_UNACK = 0x08, 0x10
IPS_SEEN_REPLY, IPS_ASSURED, IPS_CONFIRMED = 1 << 1, 1 << 2, 1 << 3
IPS_SRC_NAT, IPS_DST_NAT, IPS_SRC_NAT_DONE, IPS_DST_NAT_DONE = 1 << 4, 1 << 5, 1 << 7, 1 << 8
VERDICT_BITS = IPS_SEEN_REPLY | IPS_ASSURED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE

# Distinct values, so a timeout read back proves which one was chosen.
SYSCTLS = {
    "nf_conntrack_tcp_timeout_established": 4321,
    "nf_conntrack_tcp_timeout_unacknowledged": 1301,
    "nf_conntrack_tcp_timeout_max_retrans": 1302,
    "nf_conntrack_tcp_max_retrans": 3,
    "nf_conntrack_udp_timeout": 41,
    "nf_conntrack_udp_timeout_stream": 191,
}

NAT_ENTRY = ("-p", "tcp", "-s", CLIENT, "-d", VIP, "--sport", str(CPORT), "--dport", str(VPORT),
             "--dst-nat", f"{SERVER}:{SPORT}", "--src-nat", f"{MASQ}:{MPORT}",
             "--state", "ESTABLISHED", "--status", "ASSURED,SEEN_REPLY", "-t", "100", "--mark", "7")


def sysctl_path(name):
    return f"/proc/sys/net/netfilter/{name}"


@pytest.fixture(scope="module")
def nf_sysctls(topo):
    """This netns's conntrack sysctls, set to the distinct values above and
    read back: what the agent would mirror into the config map."""
    for name, value in SYSCTLS.items():
        with open(sysctl_path(name), "w") as f:
            f.write(str(value))
    read = {name: int(open(sysctl_path(name)).read()) for name in SYSCTLS}
    assert read == SYSCTLS
    return read


def nf_config(s, **over):
    cfg = dict(nf_mode=1, nf_gen=GEN, ct_flags=0,
               tcp_max_retrans=s["nf_conntrack_tcp_max_retrans"],
               to_tcp_established=s["nf_conntrack_tcp_timeout_established"],
               to_tcp_unack=s["nf_conntrack_tcp_timeout_unacknowledged"],
               to_tcp_retrans=s["nf_conntrack_tcp_timeout_max_retrans"],
               to_udp=s["nf_conntrack_udp_timeout"],
               to_udp_stream=s["nf_conntrack_udp_timeout_stream"])
    cfg.update(over)
    return cfg


@pytest.fixture
def st(topo, datapath, maps, nf_sysctls):
    """Stateful mode on the base routing state; an empty conntrack table."""
    base_state(maps, topo)
    maps.neigh(topo.in0, CLIENT, CLIENT_MAC)
    maps.set_config(60, **nf_config(nf_sysctls))
    conntrack("-F")
    yield maps
    conntrack("-F")


# --- packets ------------------------------------------------------------------


def c2s(flags="A", payload=b"c" * 40, window=8192, **ip):
    """Client -> VIP as it arrives on in0."""
    return (Ether(src=CLIENT_MAC, dst=IN0_MAC) / IP(src=CLIENT, dst=VIP, ttl=64, flags="DF", id=7, **ip)
            / TCP(sport=CPORT, dport=VPORT, flags=flags, seq=1000, ack=2000, window=window) / payload)


def s2c(payload=b"s" * 40):
    """Server -> masqueraded client as it arrives on out0."""
    return (Ether(src=H7_MAC, dst=OUT0_MAC) / IP(src=SERVER, dst=MASQ, ttl=64, flags="DF", id=9)
            / TCP(sport=SPORT, dport=MPORT, flags="PA", seq=2000, ack=1040, window=500) / payload)


def udp_pkt(src=CLIENT, dst=SERVER, sport=1234, dport=53, eth=(CLIENT_MAC, IN0_MAC), payload=b"u" * 30, chksum=None):
    p = Ether(src=eth[0], dst=eth[1]) / IP(src=src, dst=dst, ttl=64, id=3) / UDP(sport=sport, dport=dport) / payload
    if chksum is not None:
        p[UDP].chksum = chksum
    return p


def translated(frame, eth_src, eth_dst, src, dst, sport, dport):
    """The kernel's output, computed independently: every checksum from
    scratch by scapy (a UDP checksum of 0 stays 0)."""
    q = Ether(bytes(frame))
    q[Ether].src, q[Ether].dst = eth_src, eth_dst
    q[IP].src, q[IP].dst, q[IP].ttl = src, dst, q[IP].ttl - 1
    del q[IP].chksum
    l4 = q[TCP] if TCP in q else q[UDP]
    l4.sport, l4.dport = sport, dport
    if TCP in q or l4.chksum != 0:
        del l4.chksum
    return bytes(q)


def run(dp, maps, frame, ifindex, **ctx):
    frame = bytes(frame)
    before = maps.counters()
    res = prog_test_run(dp.fd, frame, SkBuff(ifindex=ifindex, **ctx))
    after = maps.counters()
    delta = {r: after[r][0] - before[r][0] for r in after if after[r] != before[r]}
    assert len(delta) == 1 and list(delta.values()) == [1], delta
    res.reason = next(name for name, v in R.items() if v == next(iter(delta)))
    return res


def assert_punted(res, frame, reason):
    assert (res.reason, res.retval) == (reason, TC_ACT_UNSPEC)
    assert res.data == bytes(frame), "a punted packet must reach the kernel unchanged"


# --- flows as the agent would write them ---------------------------------------


def liberal_nat_entry():
    conntrack("-I", *NAT_ENTRY)
    ct_set_tcp_flags(CLIENT, VIP, CPORT, VPORT, BE_LIBERAL, BE_LIBERAL)


def c2s_key(maps, topo):
    return maps.flow_key(topo.in0, CLIENT, VIP, CPORT, VPORT, 6)


def s2c_key(maps, topo):
    return maps.flow_key(topo.out0, SERVER, MASQ, SPORT, MPORT, 6)


def c2s_flow(maps, topo, action=0, **over):
    kw = dict(action=action, oif=topo.out0, nat=(MASQ, SERVER, MPORT, SPORT), gen=GEN,
              ct_mark=7, ct_status=probe_status() & VERDICT_BITS)
    kw.update(over)
    maps.flow(c2s_key(maps, topo), **kw)


# --- acceptance 1: the loader and the nf_conn layout ----------------------------


class Probe(ctypes.Structure):
    _fields_ = [("found", ctypes.c_int32), ("dir", ctypes.c_uint8), ("tcp_state", ctypes.c_uint8),
                ("flags0", ctypes.c_uint8), ("flags1", ctypes.c_uint8), ("status", ctypes.c_uint64),
                ("mark", ctypes.c_uint32),
                ("o_saddr", ctypes.c_uint32), ("o_daddr", ctypes.c_uint32),
                ("r_saddr", ctypes.c_uint32), ("r_daddr", ctypes.c_uint32),
                ("o_sport", ctypes.c_uint16), ("o_dport", ctypes.c_uint16),
                ("r_sport", ctypes.c_uint16), ("r_dport", ctypes.c_uint16)]


_probe = {}


@pytest.fixture(scope="module")
def probe(topo):
    dp = Datapath(entry=TESTS / "ct_probe.c", prog="lm_ct_probe", sizes={"LM_MAX_FLOWS": 16})
    _probe["dp"] = dp
    try:
        yield dp
    finally:
        _probe.clear()
        dp.close()


def probe_read(dp, frame, ifindex):
    prog_test_run(dp.fd, bytes(frame), SkBuff(ifindex=ifindex))
    t = dp.table("probe_out")
    return Probe.from_buffer_copy(bytes(t[t.Key(0)]))


def probe_status():
    """ct->status of the NAT entry as the probe program reads it."""
    return probe_read(_probe["dp"], c2s(), 0).status


def kallsyms(*names):
    out = {}
    with open("/proc/kallsyms") as f:
        for line in f:
            addr, _, name = line.split()[:3]
            if name in names:
                out[name] = int(addr, 16)
    return out


def test_loader_patches_every_kfunc_call_site(datapath, probe):
    """Each kfunc call of the compiled programs became a kfunc call the
    verifier accepted: the kernel's translated program holds exactly the
    patched calls, to the right functions."""
    from mirror.bpfsys import prog_xlated_insns

    # The probe has one call site per kfunc it uses, as written.
    assert probe.kfunc_calls == {"bpf_skb_ct_lookup": 1, "bpf_ct_release": 1, "bpf_ct_change_timeout": 0}
    assert all(n >= 1 for n in datapath.kfunc_calls.values()), datapath.kfunc_calls
    syms = kallsyms("__bpf_call_base", *datapath.kfunc_calls)
    for dp in (datapath, probe):
        x = prog_xlated_insns(dp.fd)
        calls = [struct.unpack_from("<BBhi", x, o) for o in range(0, len(x), 8)]
        kcalls = [imm for code, regs, _, imm in calls if code == 0x85 and regs >> 4 == 2]
        assert len(kcalls) == sum(dp.kfunc_calls.values())
        for name, n in dp.kfunc_calls.items():
            target = syms[name] - syms["__bpf_call_base"]
            assert kcalls.count(target) == n, name


def test_probe_reads_a_conntrack_entry_exactly(st, probe, topo):
    """A `conntrack -I` entry (DNAT + SNAT, mark 7) read through ct.h's
    offsets: tuples, status bits and mark as the kernel holds them."""
    conntrack("-I", *NAT_ENTRY)
    [(proto, _, e)] = ct_list()
    assert proto == "tcp" and e["mark"] == "7"
    for frame, direction in ((c2s(), 0), (s2c(), 1)):
        p = probe_read(probe, frame, topo.in0)
        assert (p.found, p.dir) == (1, direction)
        assert (p.o_saddr, p.o_daddr, p.o_sport, p.o_dport) == \
            (ip4(e["src"]), ip4(e["dst"]), *struct.unpack("<HH", struct.pack(">HH", int(e["sport"]), int(e["dport"]))))
        assert (p.r_saddr, p.r_daddr, p.r_sport, p.r_dport) == \
            (ip4(e["reply_src"]), ip4(e["reply_dst"]),
             *struct.unpack("<HH", struct.pack(">HH", int(e["reply_sport"]), int(e["reply_dport"]))))
        assert p.mark == 7
        assert p.tcp_state == 3  # ESTABLISHED
        want = IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED | IPS_SRC_NAT | IPS_DST_NAT
        assert p.status & want == want, hex(p.status)
        assert (p.status, p.mark) == tuple(ct_get(CLIENT, VIP, CPORT, VPORT, 6).values())
    ct_set_tcp_flags(CLIENT, VIP, CPORT, VPORT, BE_LIBERAL, BE_LIBERAL)
    p = probe_read(probe, c2s(), topo.in0)
    assert (p.flags0 & BE_LIBERAL, p.flags1 & BE_LIBERAL) == (BE_LIBERAL, BE_LIBERAL)


# --- forwarding with NAT, both directions ------------------------------------------


def test_nat_both_directions_byte_identical(st, datapath, topo, probe):
    liberal_nat_entry()
    c2s_flow(st, topo)
    st.flow(s2c_key(st, topo), action=0, oif=topo.in0, nat=(VIP, CLIENT, VPORT, CPORT), gen=GEN,
            ct_mark=7, ct_status=probe_status() & VERDICT_BITS)

    res = run(datapath, st, c2s(), topo.in0)
    assert (res.reason, res.retval) == ("FORWARDED", TC_ACT_REDIRECT)
    assert res.data == translated(c2s(), OUT0_MAC, H7_MAC, MASQ, SERVER, MPORT, SPORT), \
        f"\n got  {Ether(res.data)!r}\n want {Ether(translated(c2s(), OUT0_MAC, H7_MAC, MASQ, SERVER, MPORT, SPORT))!r}"

    res = run(datapath, st, s2c(), topo.out0)
    assert (res.reason, res.retval) == ("FORWARDED", TC_ACT_REDIRECT)
    assert res.data == translated(s2c(), IN0_MAC, CLIENT_MAC, VIP, CLIENT, VPORT, CPORT)

    f = st.flows[c2s_key(st, topo)]
    assert (f.packets, f.bytes) == (1, len(c2s()))
    assert st.events() == []


@pytest.mark.parametrize("chksum", [None, 0], ids=["udp-csum", "udp-csum-0-stays-0"])
def test_udp_dnat_checksum(st, datapath, topo, chksum):
    conntrack("-I", "-p", "udp", "-s", CLIENT, "-d", VIP, "--sport", "1234", "--dport", "53",
              "--dst-nat", f"{SERVER}:5353", "-t", "30")
    st.flow(st.flow_key(topo.in0, CLIENT, VIP, 1234, 53, 17), action=0, oif=topo.out0,
            nat=(CLIENT, SERVER, 1234, 5353), gen=GEN, ct_status=IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE)
    frame = udp_pkt(dst=VIP, chksum=chksum)
    res = run(datapath, st, frame, topo.in0)
    assert res.reason == "FORWARDED", res.reason
    want = translated(frame, OUT0_MAC, H7_MAC, CLIENT, SERVER, 1234, 5353)
    assert res.data == want, f"\n got  {Ether(res.data)!r}\n want {Ether(want)!r}"
    if chksum == 0:
        assert Ether(res.data)[UDP].chksum == 0


def test_udp_checksum_that_becomes_zero_is_sent_as_ffff(st, datapath, topo):
    """udp_manip_pkt(): a computed 0 is CSUM_MANGLED_0; scapy agrees."""
    conntrack("-I", "-p", "udp", "-s", CLIENT, "-d", VIP, "--sport", "1234", "--dport", "53",
              "--dst-nat", f"{SERVER}:5353", "-t", "30")
    st.flow(st.flow_key(topo.in0, CLIENT, VIP, 1234, 53, 17), action=0, oif=topo.out0,
            nat=(CLIENT, SERVER, 1234, 5353), gen=GEN, ct_status=IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE)
    # Choose two payload bytes so the translated datagram sums to 0xffff.
    base = udp_pkt(dst=VIP, payload=b"\0\0" + b"u" * 30)
    out = Ether(translated(base, OUT0_MAC, H7_MAC, CLIENT, SERVER, 1234, 5353))
    fill = out[UDP].chksum if out[UDP].chksum != 0xFFFF else 0
    frame = udp_pkt(dst=VIP, payload=struct.pack(">H", fill) + b"u" * 30)
    want = translated(frame, OUT0_MAC, H7_MAC, CLIENT, SERVER, 1234, 5353)
    assert Ether(want)[UDP].chksum == 0xFFFF
    res = run(datapath, st, frame, topo.in0)
    assert res.reason == "FORWARDED" and res.data == want


# --- the verdict: drops, pending flows, events ---------------------------------------


def test_drop_verdict_is_shot_and_counted(st, datapath, topo, probe):
    liberal_nat_entry()
    c2s_flow(st, topo, action=R["NF_DROP"])
    res = run(datapath, st, c2s(), topo.in0)
    assert (res.reason, res.retval) == ("NF_DROP", TC_ACT_SHOT)
    assert st.flows[c2s_key(st, topo)].packets == 1


def test_cached_punt_verdict_punts_without_asking(st, datapath, topo, probe):
    liberal_nat_entry()
    c2s_flow(st, topo, action=R["NETFILTER"])
    assert_punted(run(datapath, st, c2s(), topo.in0), c2s(), "NETFILTER")
    assert st.events() == []


def _assert_one_event(st, topo, why, dir_=0):
    evs = st.events()
    assert len(evs) == 1, evs
    ev = evs[0]
    assert (ev.key.ifindex, ev.key.saddr, ev.key.daddr, ev.key.proto) == (topo.in0, ip4(CLIENT), ip4(VIP), 6)
    assert (ev.oif, ev.dir, ev.why) == (topo.out0, dir_, R[why])


def test_missing_flow_punts_pending_and_asks_once(st, datapath, topo):
    liberal_nat_entry()
    for _ in range(3):
        assert_punted(run(datapath, st, c2s(), topo.in0), c2s(), "FLOW_PENDING")
    _assert_one_event(st, topo, "FLOW_PENDING")
    time.sleep(0.15)  # past the ~100 ms rate limit: asked again
    assert_punted(run(datapath, st, c2s(), topo.in0), c2s(), "FLOW_PENDING")
    _assert_one_event(st, topo, "FLOW_PENDING")


@pytest.mark.parametrize("stale", [
    dict(gen=GEN - 1), dict(oif="out1"), dict(ct_mark=8), dict(ct_status=0),
    dict(nat=(MASQ, SERVER, MPORT, SPORT + 1)),
], ids=["generation", "oif", "ct_mark", "ct_status", "translation"])
def test_stale_flow_punts_pending(st, datapath, topo, probe, stale):
    liberal_nat_entry()
    if stale.get("oif") == "out1":
        stale["oif"] = topo.out1
    c2s_flow(st, topo, **stale)
    assert_punted(run(datapath, st, c2s(), topo.in0), c2s(), "FLOW_PENDING")
    _assert_one_event(st, topo, "FLOW_PENDING")


def test_tcp_without_be_liberal_asks_for_it(st, datapath, topo, probe):
    conntrack("-I", *NAT_ENTRY)
    # ctnetlink creates entries liberal; kernel-made ones start without it.
    ct_set_tcp_flags(CLIENT, VIP, CPORT, VPORT, 0, BE_LIBERAL)
    c2s_flow(st, topo)  # even with a verdict: the kernel's window tracking must be liberal
    assert_punted(run(datapath, st, c2s(), topo.in0), c2s(), "CT_NOT_LIBERAL")
    _assert_one_event(st, topo, "CT_NOT_LIBERAL")


# --- entries and packets the fast path leaves to the kernel ---------------------------


@pytest.mark.parametrize("flags", ["S", "SA", "FA", "R", "RA", "P"])
def test_tcp_state_changing_segments_punt(st, datapath, topo, flags):
    liberal_nat_entry()
    assert_punted(run(datapath, st, c2s(flags=flags), topo.in0), c2s(flags=flags), "CT_TCP_FLAGS")


def test_no_entry_punts_ct_miss(st, datapath, topo):
    assert_punted(run(datapath, st, c2s(), topo.in0), c2s(), "CT_MISS")


def _icmp():
    return Ether(src=CLIENT_MAC, dst=IN0_MAC) / IP(src=CLIENT, dst=SERVER) / ICMP()


def _udp_bad_length():
    p = udp_pkt()
    p[UDP].len = 200  # longer than the datagram: udp_error() says INVALID
    return p


def _tcp_bad_doff():
    p = c2s(payload=b"")
    p[TCP].dataofs = 15  # header longer than the segment: tcp_error() says INVALID
    return p


@pytest.mark.parametrize("make", [_icmp, _udp_bad_length, _tcp_bad_doff], ids=lambda f: f.__name__[1:])
def test_not_tcp_udp_or_bad_l4_punts(st, datapath, topo, make):
    pkt = make()
    assert_punted(run(datapath, st, pkt, topo.in0), pkt, "CT_PROTO")


def test_skb_mark_punts(st, datapath, topo):
    liberal_nat_entry()
    assert_punted(run(datapath, st, c2s(), topo.in0, mark=1), c2s(), "SKB_MARK")


def test_reply_tuple_without_nat_status_punts(st, datapath, topo):
    """An entry whose tuples differ without NAT status bits: nf_nat_packet()
    would not rewrite, so the fast path must not either."""
    conntrack("-I", "-p", "udp", "-s", CLIENT, "-d", SERVER, "--sport", "1234", "--dport", "53",
              "-r", SERVER, "-q", MASQ, "--reply-port-src", "53", "--reply-port-dst", "999",
              "--status", "ASSURED,SEEN_REPLY", "-t", "30")
    frame = udp_pkt()
    assert_punted(run(datapath, st, frame, topo.in0), frame, "CT_STATUS")


def test_synproxy_timestamp_offset_punts(st, datapath, topo, probe):
    """Every ctnetlink-made entry has a synproxy extension (the tests above
    forward through it); one with a timestamp offset is rewritten by the
    synproxy hook, so it punts."""
    liberal_nat_entry()
    c2s_flow(st, topo)
    ct_set_synproxy_tsoff(CLIENT, VIP, CPORT, VPORT, 12345)
    assert_punted(run(datapath, st, c2s(), topo.in0), c2s(), "CT_EXTENSION")


def test_not_established_punts(st, datapath, topo):
    conntrack("-I", "-p", "tcp", "-s", CLIENT, "-d", VIP, "--sport", str(CPORT), "--dport", str(VPORT),
              "--state", "SYN_RECV", "--status", "SEEN_REPLY", "-t", "50")
    assert_punted(run(datapath, st, c2s(), topo.in0), c2s(), "CT_NOT_ESTABLISHED")


def test_udp_reply_before_assured_punts(st, datapath, topo):
    conntrack("-I", "-p", "udp", "-s", CLIENT, "-d", SERVER, "--sport", "1234", "--dport", "53", "-t", "30")
    reply = udp_pkt(src=SERVER, dst=CLIENT, sport=53, dport=1234, eth=(H7_MAC, OUT0_MAC))
    # First reply: the kernel sets SEEN_REPLY.
    assert_punted(run(datapath, st, reply, topo.out0), reply, "CT_NOT_ESTABLISHED")
    conntrack("-F")
    conntrack("-I", "-p", "udp", "-s", CLIENT, "-d", SERVER, "--sport", "1234", "--dport", "53",
              "--status", "SEEN_REPLY", "-t", "30")
    # Replied, not ASSURED, older than 2 s (ctnetlink entries: stream_ts 0):
    # this packet makes the kernel set ASSURED.
    assert_punted(run(datapath, st, udp_pkt(), topo.in0), udp_pkt(), "CT_NOT_ESTABLISHED")


def test_acct_punts(st, datapath, topo, nf_sysctls):
    liberal_nat_entry()
    st.set_config(60, **nf_config(nf_sysctls, ct_flags=1))
    assert_punted(run(datapath, st, c2s(), topo.in0), c2s(), "CT_ACCT")
    # Per entry: one created while nf_conntrack_acct=1 carries counters.
    st.set_config(60, **nf_config(nf_sysctls))
    conntrack("-F")
    with open(sysctl_path("nf_conntrack_acct"), "w") as f:
        f.write("1")
    try:
        liberal_nat_entry()
    finally:
        with open(sysctl_path("nf_conntrack_acct"), "w") as f:
            f.write("0")
    assert_punted(run(datapath, st, c2s(), topo.in0), c2s(), "CT_ACCT")


# --- the timeout the fast path sets ----------------------------------------------------


def _timeout_left():
    [(_, left, _)] = ct_list()
    return left


def test_timeout_established_tcp(st, datapath, topo, probe, nf_sysctls):
    liberal_nat_entry()
    c2s_flow(st, topo)
    assert _timeout_left() <= 100
    assert run(datapath, st, c2s(), topo.in0).reason == "FORWARDED"
    want = nf_sysctls["nf_conntrack_tcp_timeout_established"]
    assert want - 2 <= _timeout_left() <= want


@pytest.mark.parametrize("case", ["unacknowledged", "zero-window"])
def test_timeout_tcp_short_states(st, datapath, topo, probe, nf_sysctls, case):
    """tcp_packet(): unacknowledged data in the entry -> unack timeout; a
    zero window (last_win of this segment) -> retrans timeout."""
    liberal_nat_entry()
    if case == "unacknowledged":
        ct_set_tcp_flags(CLIENT, VIP, CPORT, VPORT, DATA_UNACK, DATA_UNACK)
        frame, want = c2s(), nf_sysctls["nf_conntrack_tcp_timeout_unacknowledged"]
    else:
        frame, want = c2s(window=0), nf_sysctls["nf_conntrack_tcp_timeout_max_retrans"]
    c2s_flow(st, topo)
    assert run(datapath, st, frame, topo.in0).reason == "FORWARDED"
    assert want - 2 <= _timeout_left() <= want


@pytest.mark.parametrize("assured", [False, True], ids=["unreplied", "assured"])
def test_timeout_udp(st, datapath, topo, nf_sysctls, assured):
    args = ("-p", "udp", "-s", CLIENT, "-d", SERVER, "--sport", "1234", "--dport", "53", "-t", "5")
    conntrack("-I", *args, *(("--status", "ASSURED,SEEN_REPLY") if assured else ()))
    status = IPS_ASSURED | IPS_SEEN_REPLY if assured else 0
    st.flow(st.flow_key(topo.in0, CLIENT, SERVER, 1234, 53, 17), action=0, oif=topo.out0,
            nat=(CLIENT, SERVER, 1234, 53), gen=GEN, ct_status=status)
    res = run(datapath, st, udp_pkt(), topo.in0)
    assert res.reason == "FORWARDED"
    assert res.data == translated(udp_pkt(), OUT0_MAC, H7_MAC, CLIENT, SERVER, 1234, 53)
    want = nf_sysctls["nf_conntrack_udp_timeout_stream" if assured else "nf_conntrack_udp_timeout"]
    assert want - 2 <= _timeout_left() <= want


def test_mode_off_ignores_conntrack(st, datapath, topo, nf_sysctls):
    """nf_mode 0: no lookup, today's plain routed path (the VIP is simply
    routed, untranslated)."""
    liberal_nat_entry()
    st.set_config(60, **nf_config(nf_sysctls, nf_mode=0))
    frame = c2s()
    st.route(VIP + "/32", oif=topo.out0)
    st.neigh(topo.out0, VIP, H7_MAC)
    res = run(datapath, st, frame, topo.in0)
    assert res.reason == "FORWARDED"
    assert Ether(res.data)[IP].dst == VIP
    assert _timeout_left() <= 100


# Reasons this file exercises (test_tc_ingress.test_every_reason_is_exercised).
COVERED = {"CT_PROTO", "SKB_MARK", "CT_TCP_FLAGS", "CT_MISS", "CT_STATUS", "CT_EXTENSION", "CT_NOT_ESTABLISHED",
           "CT_NOT_LIBERAL", "CT_ACCT", "FLOW_PENDING", "NF_DROP",
           "CT_TCP_RETRANS"}  # test_ct_oracle.py (retransmissions through the kernel)
# NAT_FAILED: the header ct.h pulled is already private and writable, so the
# checksum helpers cannot fail; the reason exists so that a failure would be
# a counted drop rather than a half-rewritten packet sent on.
UNREACHABLE = {"NAT_FAILED"}


def test_flow_event_ctypes_match_common_h(datapath):
    """mirror.datapath.FlowKey/FlowEvent mirror common.h's structs (BCC
    knows the map key's layout; the ring-buffer record follows it)."""
    from mirror.datapath import FlowEvent, FlowKey

    key = datapath.table("flows").Key
    assert [f[0] for f in FlowKey._fields_] == [f[0] for f in key._fields_]
    assert ctypes.sizeof(FlowKey) == ctypes.sizeof(key)
    assert ctypes.sizeof(FlowEvent) == ctypes.sizeof(FlowKey) + 8
