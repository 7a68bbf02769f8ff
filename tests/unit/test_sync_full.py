"""Reconciler: a full map refuses new entries (E2BIG); they stay absent (the
datapath punts on the miss), are retried once there is room, and a bridge
port whose port entry does not fit loses its link entry too. Pure: fake maps."""

import errno
import os

from mirror.sync import Reconciler
from mirror.translate import Desired, LinkEntry, PortEntry
from test_sync_hold import FakeConfig


class BoundedTable(dict):
    """A hash map of `capacity` entries that fails like BCC does when full."""

    def __init__(self, capacity):
        super().__init__()
        self.capacity = capacity

    def __setitem__(self, key, value):
        if key not in self and len(self) >= self.capacity:
            raise Exception(f"Could not update table: {os.strerror(errno.E2BIG)}")
        super().__setitem__(key, value)


class Identity:
    """Keys and leaves as the translator has them."""

    def __getattr__(self, name):
        return lambda value: value


def reconciler(**capacity):
    tables = {name: BoundedTable(capacity.get(name, 100)) for name in ("routes", "neighbors", "links", "ports", "fdb")}
    tables["config"] = FakeConfig()
    r = Reconciler(tables, beat=lambda ttl: None, hz=250)
    r.codec = Identity()
    refused = []
    r.on_full = lambda table, key: refused.append((table, key))
    return r, tables, refused


def neighbors(*ips):
    return {(2, ip): "02:00:00:00:00:01" for ip in ips}


def test_full_neighbor_map_leaves_new_entries_out_and_retries_them():
    r, t, refused = reconciler(neighbors=2)
    r.apply(Desired(neighbors=neighbors("10.0.0.1", "10.0.0.2", "10.0.0.3")))
    assert set(t["neighbors"]) == {(2, "10.0.0.1"), (2, "10.0.0.2")}
    assert set(refused) == {("neighbors", (2, "10.0.0.3"))} and list(r.unwritten["neighbors"]) == [(2, "10.0.0.3")]
    # One goes: the refused one gets its place in the same apply.
    r.apply(Desired(neighbors=neighbors("10.0.0.2", "10.0.0.3")))
    assert set(t["neighbors"]) == {(2, "10.0.0.2"), (2, "10.0.0.3")} and not r.unwritten["neighbors"]


def test_an_unwritten_entry_no_longer_wanted_is_never_written():
    r, t, _ = reconciler(neighbors=1)
    r.apply(Desired(neighbors=neighbors("10.0.0.1", "10.0.0.2")))
    r.apply(Desired(neighbors={}))                        # full: neither is wanted now
    assert not t["neighbors"] and not r.unwritten["neighbors"]
    r.apply(Desired(neighbors=neighbors("10.0.0.1", "10.0.0.2")))
    r.apply(Desired(neighbors={(2, "10.0.0.2"): None}), full=False)   # delta: the refused one deleted
    assert set(t["neighbors"]) == {(2, "10.0.0.1")} and not r.unwritten["neighbors"]


def test_a_port_that_does_not_fit_takes_its_link_out():
    r, t, refused = reconciler(ports=1)
    link = LinkEntry("02:00:00:00:00:01", 1, 1500)
    port = PortEntry(9, 1, 0, 0, 0)
    r.apply(Desired(links={3: link, 4: link}, ports={3: port, 4: port}))
    assert set(t["ports"]) == {3} and set(t["links"]) == {3}   # 4 would be routed as a plain interface
    assert set(refused) == {("ports", 4)}
    r.apply(Desired(links={4: link}), full=False)             # a link change alone does not bring it back
    assert set(t["links"]) == {3}
    r.apply(Desired(links={3: None, 4: link}, ports={3: None}), full=False)
    assert set(t["ports"]) == {4} and set(t["links"]) == {4}
