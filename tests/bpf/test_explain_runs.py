"""`loxi-mirror explain` agrees with the datapath (issue 10).

Every packet is first explained (an explain run of the loaded program:
BPF_PROG_TEST_RUN marked with LM_EXPLAIN_MAGIC) and then sent through the
same program as a plain run, the way an attached program sees it: the
counter that moves, the TC verdict and (forwarded) the bytes that leave must
be what explain said.  The cases: every table case of test_tc_ingress.py
that BPF_PROG_TEST_RUN can reproduce without GSO metadata, a grid of frames
from explain's own builder, and the stateful mode against real kernel
conntrack entries (test_ct.py's fixtures).  An explain run must leave
counters, conntrack timeouts, events, neighbour stamps and flow counters as
they were.
"""

import os
import threading

import pytest

from lm_bpfrun import SkBuff, TC_ACT_REDIRECT, TC_ACT_SHOT, conntrack, ct_list, ct_set_tcp_flags, prog_test_run
from mirror.datapath import COMMON_H
from mirror.explain import STAGE_TITLES, Explainer, PacketSpec, build_frame, conntrack_entry, stage_notes
from test_ct import (BE_LIBERAL, CLIENT, CPORT, SERVER, VIP, VPORT, s2c, c2s, c2s_flow, c2s_key, liberal_nat_entry,  # noqa: F401 (fixtures)
                     nf_sysctls, probe, st, udp_pkt, NAT_ENTRY, GEN)
from test_tc_ingress import CASES, IN0_MAC, R, base_state

ROUTED = [c for c in CASES if not set(c.ctx) - {"priority"}]  # explain runs carry no GSO metadata


@pytest.fixture(scope="module")
def explainer(datapath):
    return Explainer(datapath, COMMON_H.read_text())


def agree(explainer, dp, maps, frame, ifindex):
    """Explain the frame, then run it for real; both must say the same."""
    frame = bytes(frame)
    ex = explainer.run(frame, ifindex)
    before = maps.counters()
    res = prog_test_run(dp.fd, frame, SkBuff(ifindex=ifindex))
    after = maps.counters()
    moved = {r: after[r][0] - before[r][0] for r in after if after[r] != before[r]}
    assert moved == {R[ex["verdict"]]: 1}, (ex["verdict"], moved)
    assert res.retval == ex["retval"]
    if ex["verdict"] == "FORWARDED":
        assert res.retval == TC_ACT_REDIRECT
        assert bytes.fromhex(ex["frame_out"]) == res.data
    steps = ex["steps"]
    assert steps[0]["stage"] == "gate"
    assert all(s["verdict"] == "FORWARDED" for s in steps[:-1])
    assert all(s["stage"] in STAGE_TITLES for s in steps)
    return ex


@pytest.mark.parametrize("case", ROUTED, ids=[c.desc for c in ROUTED])
def test_explain_agrees_routed_cases(case, topo, datapath, maps, explainer):
    base_state(maps, topo)
    if case.setup:
        case.setup(maps, topo)
    frame = case.pkt(topo)
    ex = agree(explainer, datapath, maps, frame, topo.in0)
    assert ex["verdict"] == case.reason


GRID = [(proto, dst, ttl) for proto in ("tcp", "udp", "icmp")
        for dst in ("10.1.0.7", "10.2.3.4", "10.3.0.2", "10.0.0.1", "192.168.77.1", "10.1.0.8", "10.9.1.1")
        for ttl in (1, 64)]


@pytest.mark.parametrize("proto,dst,ttl", GRID)
def test_explain_agrees_built_frames(proto, dst, ttl, topo, datapath, maps, explainer):
    base_state(maps, topo)
    for length in (60, 1500, 1501):
        frame = build_frame(PacketSpec("10.0.0.5", dst, proto=proto, ttl=ttl, length=length), IN0_MAC)
        agree(explainer, datapath, maps, frame, topo.in0)


def _udp_flow(st, topo, action=0):
    conntrack("-I", "-p", "udp", "-s", CLIENT, "-d", SERVER, "--sport", "1234", "--dport", "53", "-t", "30")
    st.flow(st.flow_key(topo.in0, CLIENT, SERVER, 1234, 53, 17), action=action, oif=topo.out0,
            nat=(CLIENT, SERVER, 1234, 53), gen=GEN)


STATEFUL = {
    "CT_MISS": lambda st, topo: None,
    "FLOW_PENDING": lambda st, topo: liberal_nat_entry(),
    "FORWARDED": lambda st, topo: (liberal_nat_entry(), c2s_flow(st, topo)),
    "NF_DROP": lambda st, topo: (liberal_nat_entry(), c2s_flow(st, topo, action=R["NF_DROP"])),
    # ctnetlink creates entries liberal; kernel-made ones start without it.
    "CT_NOT_LIBERAL": lambda st, topo: (conntrack("-I", *NAT_ENTRY),
                                        ct_set_tcp_flags(CLIENT, VIP, CPORT, VPORT, 0, BE_LIBERAL),
                                        c2s_flow(st, topo)),
    "stale verdict": lambda st, topo: (liberal_nat_entry(), c2s_flow(st, topo, gen=GEN - 1)),
}
STATEFUL_WANT = {"stale verdict": "FLOW_PENDING"}


@pytest.mark.parametrize("scenario", list(STATEFUL))
def test_explain_agrees_stateful(scenario, st, topo, datapath, probe, explainer):
    STATEFUL[scenario](st, topo)
    ex = agree(explainer, datapath, st, c2s(), topo.in0)
    assert ex["verdict"] == STATEFUL_WANT.get(scenario, scenario)
    assert "ct" in [s["stage"] for s in ex["steps"]]
    # What the agent adds to the conntrack stage, from ctnetlink.
    stage_notes(ex, {"conntrack": conntrack_entry(ex["packet"])})
    ct_note = next(s["note"] for s in ex["steps"] if s["stage"] == "ct")
    if scenario == "CT_MISS":
        assert ct_note == f"no kernel conntrack entry for tcp {CLIENT}:{CPORT} -> {VIP}:{VPORT}"
    else:
        assert ct_note.startswith(f"kernel entry {CLIENT}:{CPORT} -> {VIP}:{VPORT} / {SERVER}:8080 -> ")
        assert "ESTABLISHED" in ct_note and ct_note.endswith("the original direction")
    if scenario == "FORWARDED":  # NAT applied: leaves DNAT'd and masqueraded
        assert ex["out"]["dst"] == SERVER and ex["out"]["sport"] == 40001
    if scenario == "NF_DROP":
        assert ex["retval"] == TC_ACT_SHOT and ex["action"] == "drop"
    for flags, want in (("S", "CT_TCP_FLAGS"), ("FA", "CT_TCP_FLAGS")):
        assert agree(explainer, datapath, st, c2s(flags=flags), topo.in0)["verdict"] == want


def test_explain_agrees_stateful_udp_and_icmp(st, topo, datapath, probe, explainer):
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether
    assert agree(explainer, datapath, st, udp_pkt(), topo.in0)["verdict"] == "CT_MISS"
    _udp_flow(st, topo)
    assert agree(explainer, datapath, st, udp_pkt(), topo.in0)["verdict"] == "FORWARDED"
    icmp = Ether(src="02:aa:00:00:00:10", dst=IN0_MAC) / IP(src=CLIENT, dst=SERVER) / ICMP()
    assert agree(explainer, datapath, st, icmp, topo.in0)["verdict"] == "CT_PROTO"


# --- no side effects ----------------------------------------------------------


def _ct_timeout():
    [(_, left, _)] = ct_list("-p", "tcp")
    return left


def test_explain_leaves_counters_ct_timeout_events_and_flow_counters(st, topo, datapath, probe, explainer):
    liberal_nat_entry()  # timeout 100 s; a forwarded packet refreshes it to 4321 s
    frame = bytes(c2s())
    before = st.counters()
    # Without a verdict: the real run would ask the agent (event + flow_asked).
    assert explainer.run(frame, topo.in0)["verdict"] == "FLOW_PENDING"
    assert st.events() == [] and list(st.flow_asked.keys()) == []
    c2s_flow(st, topo)
    assert explainer.run(frame, topo.in0)["verdict"] == "FORWARDED"
    assert st.counters() == before
    assert _ct_timeout() <= 100
    assert st.flows[c2s_key(st, topo)].packets == 0
    # The same frame as real traffic changes all of them: the checks can fail.
    prog_test_run(datapath.fd, frame, SkBuff(ifindex=topo.in0))
    assert st.counters() != before
    assert _ct_timeout() > 1000
    assert st.flows[c2s_key(st, topo)].packets == 1


def test_explain_leaves_the_neighbour_stamp(topo, datapath, maps, explainer):
    base_state(maps, topo)
    frame = build_frame(PacketSpec("10.0.0.5", "10.1.0.7"), IN0_MAC)
    assert explainer.run(frame, topo.in0)["verdict"] == "FORWARDED"
    assert maps.get_neigh(topo.out0, "10.1.0.7").used == 0
    prog_test_run(datapath.fd, frame, SkBuff(ifindex=topo.in0))
    assert maps.get_neigh(topo.out0, "10.1.0.7").used != 0


def test_explain_finds_its_trace_on_every_cpu(topo, datapath, maps, explainer):
    """The trace slot is per CPU; the run is found by its nonce wherever the
    thread ran (each thread pinned to one CPU)."""
    base_state(maps, topo)
    frame = build_frame(PacketSpec("10.0.0.5", "10.1.0.8"), IN0_MAC)
    got = {}

    def on(cpu):
        os.sched_setaffinity(0, {cpu})  # this thread only
        got[cpu] = explainer.run(frame, topo.in0)["verdict"]

    # Threads start in the test's netns (the thread that entered it is this one).
    for cpu in sorted(os.sched_getaffinity(0)):
        t = threading.Thread(target=on, args=(cpu,))
        t.start()
        t.join()
    assert set(got.values()) == {"NO_NEIGHBOR"} and len(got) == len(os.sched_getaffinity(0))


def test_plain_runs_are_not_explain_runs(topo, datapath, maps, explainer):
    """The magic alone is not enough: a packet with ingress_ifindex set (all
    real traffic at TC ingress) counts, whatever its cb holds."""
    base_state(maps, topo)
    frame = build_frame(PacketSpec("10.0.0.5", "10.1.0.8"), IN0_MAC)
    ctx = SkBuff(ifindex=topo.in0, ingress_ifindex=topo.in0)
    ctx.cb[0], ctx.cb[1] = explainer.magic, 12345
    before = maps.counters()
    prog_test_run(datapath.fd, frame, ctx)
    after = maps.counters()
    assert after[R["NO_NEIGHBOR"]][0] == before[R["NO_NEIGHBOR"]][0] + 1


def test_explain_reply_direction_names_the_entry(st, topo, datapath, probe, explainer):
    liberal_nat_entry()
    ex = agree(explainer, datapath, st, s2c(), topo.out0)
    assert ex["verdict"] == "FLOW_PENDING"
    stage_notes(ex, {"conntrack": conntrack_entry(ex["packet"]), "flow": None})
    notes = {s["stage"]: s.get("note") for s in ex["steps"]}
    assert notes["ct"].endswith("the reply direction")
    assert notes["verdict"] == "no flows entry for this flow direction"
