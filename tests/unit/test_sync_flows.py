"""Reconciler: the `flows` map (codec and counters kept across verdicts). Pure: fake maps."""

import ctypes

from mirror.datapath import FlowKey as FlowKeyT  # struct lm_flow_key
from mirror.flows import FlowEntry, FlowKey
from mirror.sync import Reconciler, ip_to_u32
from test_sync_hold import FakeConfig


class FlowT(ctypes.Structure):  # struct lm_flow
    _fields_ = [(n, ctypes.c_uint32) for n in ("gen", "action", "oif", "ct_mark", "ct_status", "nat_saddr",
                                                "nat_daddr")] + \
               [("nat_sport", ctypes.c_uint16), ("nat_dport", ctypes.c_uint16),
                ("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class FlowTable(dict):
    Key, Leaf = FlowKeyT, FlowT

    def __setitem__(self, k, v):
        super().__setitem__(bytes(k), v)

    def __getitem__(self, k):
        return super().__getitem__(bytes(k))


def test_flow_entries_round_trip_in_network_order_and_keep_counters():
    flows = FlowTable()
    tables = {"routes": {}, "neighbors": {}, "links": {}, "config": FakeConfig(), "flows": flows}
    r = Reconciler(tables, beat=lambda ttl: None, hz=250)
    key = FlowKey(3, "10.1.0.2", "10.1.0.1", 40000, 8080, 6)
    entry = FlowEntry(7, 0, 4, 1, 6, "10.2.0.1", "10.2.0.2", 40000, 80)
    r.write_flow(key, entry)
    raw_key, leaf = next(iter(flows.items()))
    k = FlowKeyT.from_buffer_copy(raw_key)
    assert (k.saddr, k.sport, k.dport) == (ip_to_u32("10.1.0.2"), 0x409C, 0x901F)  # 40000, 8080 big-endian
    assert leaf.nat_dport == 0x5000 and leaf.nat_daddr == ip_to_u32("10.2.0.2")
    leaf.packets, leaf.bytes = 5, 500  # the datapath counts
    r.write_flow(key, FlowEntry(8, 38, 4, 1, 6, "10.2.0.1", "10.2.0.2", 40000, 80))
    assert r.read_flow(key) == (FlowEntry(8, 38, 4, 1, 6, "10.2.0.1", "10.2.0.2", 40000, 80), 5, 500)
