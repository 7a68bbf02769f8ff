"""Routes that do not fit in the route map: which entries punt instead
(translate.overflow_covers) and how the reconciler writes them.  Pure: a
fake route table with a capacity, no BPF."""

import ipaddress

from mirror.reasons import BY_NAME as R
from mirror.sync import ROUTE_SLOTS_RESERVED, Reconciler
from mirror.translate import Desired, RouteEntry, overflow_covers

OVERFLOW = RouteEntry(R["ROUTE_OVERFLOW"])


class FakeRoutes(dict):
    """A route map of fixed capacity: inserting beyond it fails like the kernel."""

    Key = staticmethod(lambda plen, addr: (plen, addr))
    Leaf = staticmethod(lambda *v: v)

    def __init__(self, capacity):
        super().__init__()
        self.max_entries = capacity
        self.writes = []

    def __setitem__(self, key, leaf):
        if key not in self and len(self) >= self.max_entries:
            raise OSError(28, "No space left on device")
        self.writes.append(key)
        super().__setitem__(key, leaf)


class FakeConfig:
    Leaf = staticmethod(lambda **kw: kw)

    def __setitem__(self, key, leaf):
        pass


def reconciler(capacity):
    tables = {"routes": FakeRoutes(capacity), "neighbors": {}, "links": {}, "ports": {}, "fdb": {},
              "config": FakeConfig()}
    return Reconciler(tables, beat=lambda ttl: None, hz=250, grow_routes=False)


def fwd(oif):
    return RouteEntry(R["FORWARDED"], oif=oif, mtu=1500)


def lookup(entries, ip):
    """The datapath's answer: the longest prefix in the map."""
    addr = ipaddress.ip_address(ip)
    best = None
    for (dst, plen), e in entries.items():
        if addr in ipaddress.ip_network(f"{dst}/{plen}") and (best is None or plen > best[0]):
            best = (plen, e)
    return best[1] if best else None


def test_covers_are_the_longest_shorter_prefix_present():
    present = {("10.0.0.0", 8), ("10.1.0.0", 16)}.__contains__
    assert overflow_covers({("10.1.2.0", 24): None}, present) == {("10.1.0.0", 16): OVERFLOW}
    assert overflow_covers({("10.2.2.0", 24): None}, present) == {("10.0.0.0", 8): OVERFLOW}
    # Nothing covers it: the cover of last resort.
    assert overflow_covers({("192.168.1.0", 24): None}, present) == {("0.0.0.0", 0): OVERFLOW}


def test_overflow_never_lets_a_less_specific_route_forward():
    r = reconciler(4 + ROUTE_SLOTS_RESERVED)
    want = {("0.0.0.0", 0): fwd(1), ("10.0.0.0", 8): fwd(2), ("10.1.0.0", 16): fwd(3),
            ("10.1.2.0", 24): fwd(4), ("10.1.3.0", 24): fwd(5), ("10.9.0.0", 16): fwd(6)}
    r.apply(Desired(routes=dict(want)))
    written = r.shadow.routes
    assert len(r.unwritten_routes) == 2 and r.route_overflow()["unwritten"] == 2
    for ip in ("10.1.2.1", "10.1.3.1", "10.9.1.1", "10.5.5.5", "8.8.8.8"):
        got, kernel = lookup(written, ip), lookup(want, ip)
        assert got == kernel or got == OVERFLOW, (ip, got, kernel)
    assert len(r.tables["routes"]) == len(written) <= r.route_capacity
    # Room again (a route deleted): everything is written, the punts are gone.
    del want[("10.9.0.0", 16)], want[("0.0.0.0", 0)]
    r.apply(Desired(routes=dict(want)))
    assert not r.unwritten_routes and r.route_overflow() is None
    assert r.shadow.routes == want


def test_the_last_resort_cover_is_removed_when_not_wanted():
    r = reconciler(1 + ROUTE_SLOTS_RESERVED)
    want = {("10.1.0.0", 16): fwd(1), ("192.168.0.0", 16): fwd(2)}
    r.apply(Desired(routes=dict(want)))
    assert r.shadow.routes[("0.0.0.0", 0)] == OVERFLOW
    del want[("10.1.0.0", 16)]
    r.apply(Desired(routes=dict(want)))
    assert r.shadow.routes == want


def test_a_cover_keeps_punting_through_translator_updates():
    r = reconciler(2 + ROUTE_SLOTS_RESERVED)
    r.apply(Desired(routes={("10.0.0.0", 8): fwd(1), ("10.1.0.0", 16): fwd(2), ("10.1.1.0", 24): fwd(3)}))
    assert r.shadow.routes[("10.1.0.0", 16)] == OVERFLOW
    r.apply(Desired(routes={("10.1.0.0", 16): fwd(7)}), full=False)  # the /16 changed in the kernel
    assert r.shadow.routes[("10.1.0.0", 16)] == OVERFLOW
    r.apply(Desired(routes={("10.1.1.0", 24): None}), full=False)  # the unwritten route is gone
    assert r.shadow.routes[("10.1.0.0", 16)] == fwd(7) and r.route_overflow() is None


class RefusingGrowth(FakeRoutes):
    def rebuild(self, capacity, keys, leaves, count):
        raise OSError(12, "Cannot allocate memory")


def test_a_refused_growth_overflows_instead_of_failing():
    tables = {"routes": RefusingGrowth(2 + ROUTE_SLOTS_RESERVED), "neighbors": {}, "links": {}, "ports": {},
              "fdb": {}, "config": FakeConfig()}
    r = Reconciler(tables, beat=lambda ttl: None, hz=250, grow_routes=True)
    r.apply(Desired(routes={("10.0.0.0", 8): fwd(1), ("10.1.0.0", 16): fwd(2), ("10.1.1.0", 24): fwd(3)}))
    assert r.route_overflow()["unwritten"] == 1 and r.shadow.routes[("10.1.0.0", 16)] == OVERFLOW
