"""The reconciler's per-interface counter slots on the real maps: stamped
into lm_link, counted there by the datapath, retired (folded into the
totals, zeroed) when the link goes away, reused from zero."""

from lm_bpfrun import TC_ACT_UNSPEC, SkBuff, prog_test_run
from test_tc_ingress import FWD, UP, base_state, udp

from mirror.reasons import BY_NAME as R
from mirror.sync import Reconciler
from mirror.translate import Desired, LinkEntry

TABLES = ("routes", "neighbors", "links", "ports", "fdb", "config", "flows", "counters")


def _local_punt(datapath, topo):
    assert prog_test_run(datapath.fd, bytes(udp(dst="10.0.0.1")), SkBuff(ifindex=topo.in0)).retval == TC_ACT_UNSPEC


def test_slot_stamped_counted_retired_and_reused(topo, datapath, maps):
    base_state(maps, topo)  # routes: 10.0.0.1 is LOCAL
    sync = Reconciler({t: datapath.table(t) for t in TABLES}, beat=datapath.beat, hz=maps.hz)
    entry = LinkEntry(mac=":".join(f"{b:02x}" for b in topo.in0_mac), flags=UP | FWD, mtu=1500)
    sync.apply(Desired(links={topo.in0: entry}), full=False)
    maps.set_config(60)
    slot = maps.links[maps.links.Key(topo.in0)].slot
    assert slot == sync.counter_slots()[0][topo.in0] and slot > 0
    total_before = datapath.counters()["LOCAL"][0]
    for _ in range(3):
        _local_punt(datapath, topo)
    assert maps.slot_counters(slot)[R["LOCAL"]][0] == 3

    sync.apply(Desired(links={topo.in0: None}), full=False)  # link gone: its counts retire
    slots, retired = sync.counter_slots()
    assert topo.in0 not in slots and retired[R["LOCAL"]][0] == 3
    assert maps.slot_counters(slot)[R["LOCAL"]] == (0, 0)

    sync.apply(Desired(links={topo.in0: entry}), full=False)  # back: same slot, from zero
    maps.set_config(60)
    assert maps.links[maps.links.Key(topo.in0)].slot == slot
    _local_punt(datapath, topo)
    assert maps.slot_counters(slot)[R["LOCAL"]][0] == 1
    assert datapath.counters()["LOCAL"][0] + retired[R["LOCAL"]][0] == total_before + 4
