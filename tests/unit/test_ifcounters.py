"""Per-interface counter slots (mirror/ifcounters.py) and how the reconciler
hands them out and retires them."""

import struct

from mirror import ifcounters
from mirror.ifcounters import OTHER, SlotAllocator
from mirror.reasons import BY_NAME, REASONS


def test_slots_lowest_free_first_and_exhausted_to_zero():
    a = SlotAllocator(4)  # slots 1..3
    assert [a.assign(i) for i in (10, 11, 10)] == [(1, True), (2, True), (1, False)]
    assert a.release(10) == 1 and a.release(10) is None
    assert a.assign(12) == (1, True)  # reused
    assert a.assign(13) == (3, True) and a.assign(14) == (0, False)  # none left: slot 0, not remembered
    assert ifcounters.high_water(a.by_ifindex) == 4


def test_decode_sums_cpus_per_slot_and_reason():
    nreasons, ncpus = 3, 2
    values = []
    for key in range(2 * nreasons):
        for cpu in range(ncpus):
            values += [key * 10 + cpu, key * 100 + cpu]  # packets, bytes
    rows = ifcounters.decode(struct.pack(f"={len(values)}Q", *values), 2, ncpus, nreasons)
    assert rows[0] == [(1, 1), (21, 201), (41, 401)]
    assert rows[1][2] == (5 * 20 + 1, 5 * 200 + 1)


def _rows(nslots):
    return [[(0, 0)] * len(REASONS) for _ in range(nslots)]


def test_totals_and_by_interface():
    rows = _rows(3)
    fwd, local = BY_NAME["FORWARDED"], BY_NAME["LOCAL"]
    rows[0][BY_NAME["AGENT_STALE"]] = (4, 400)
    rows[1][fwd] = (10, 1000)
    rows[2][local] = (3, 300)
    retired = [(0, 0)] * len(REASONS)
    retired[fwd] = (5, 500)
    assert ifcounters.totals(rows, retired)["FORWARDED"] == (15, 1500)
    per = ifcounters.by_interface(rows, {7: 1, 8: 2, 9: 2}, {7: "veth1", 8: "veth2"})
    assert per == {"veth1": {"FORWARDED": (10, 1000)}, "veth2": {"LOCAL": (3, 300)},
                   OTHER: {"AGENT_STALE": (4, 400)}}
    s = ifcounters.summary(per["veth2"])
    assert s == {"fast_path_packets": 0, "fast_path_bytes": 0, "punt": {"LOCAL": 3}, "punt_bytes": {"LOCAL": 300},
                 "drop": {}}
