"""The model's route store (mirror/routestore.py): single-route prefixes
share a shape, everything reads back as full routes, and shapes are
counted so none outlives its last prefix."""

import random

import pytest

from mirror import model as m
from mirror.routestore import RouteStore

HOP = (m.Nexthop(3, "10.2.0.9"),)
OTHER_HOP = (m.Nexthop(4, "10.3.0.9"),)


def route(dst, plen, hops=HOP, table=m.TABLE_MAIN, **kw):
    return m.Route(table, dst, plen, nexthops=hops, **kw)


def store():
    return RouteStore(keep_listed=lambda r: r.table == m.TABLE_LOCAL)


def test_single_routes_share_a_shape_and_read_back_whole():
    s = store()
    s["10.1.0.0", 16] = [route("10.1.0.0", 16)]
    s["10.2.0.0", 24] = [route("10.2.0.0", 24)]
    assert s.shapes(("10.1.0.0", 16))[0] is s.shapes(("10.2.0.0", 24))[0]
    assert s[("10.2.0.0", 24)] == [route("10.2.0.0", 24)]
    assert s.get(("10.9.0.0", 16)) is None and ("10.1.0.0", 16) in s and len(s) == 2
    assert dict(s.items()) == {("10.1.0.0", 16): [route("10.1.0.0", 16)], ("10.2.0.0", 24): [route("10.2.0.0", 24)]}


def test_several_routes_read_back_in_order_and_local_ones_keep_their_identity():
    s = store()
    two = [route("10.1.0.0", 16, priority=10), route("10.1.0.0", 16, priority=20)]
    s["10.1.0.0", 16] = two
    local = route("10.0.0.1", 32, table=m.TABLE_LOCAL, type=m.RTN_LOCAL)
    s.add_new(("10.0.0.1", 32), local)
    assert len(s.shapes(("10.1.0.0", 16))) == 2 and s[("10.1.0.0", 16)] == two
    assert s.shapes(("10.0.0.1", 32)) is None and s[("10.0.0.1", 32)][0] is local  # listed: identity kept
    s["10.1.0.0", 16] = two[:1]  # down to one: a shape again
    assert len(s.shapes(("10.1.0.0", 16))) == 1 and s[("10.1.0.0", 16)] == two[:1]


def test_shapes_are_counted_and_dropped_with_their_last_prefix():
    s = store()
    s["10.1.0.0", 16] = [route("10.1.0.0", 16)]
    s["10.2.0.0", 16] = [route("10.2.0.0", 16)]
    s["10.3.0.0", 16] = [route("10.3.0.0", 16, hops=OTHER_HOP)]
    assert len(s._shapes) == 2
    del s["10.1.0.0", 16]
    s["10.3.0.0", 16] = [route("10.3.0.0", 16)]  # replaced: the other shape's last use
    assert len(s._shapes) == 1
    del s["10.2.0.0", 16], s["10.3.0.0", 16]
    assert not s and not s._shapes


def test_where_and_first_test_each_shape_once():
    s = store()
    for i in range(100):
        s[f"10.{i}.0.0", 16] = [route(f"10.{i}.0.0", 16)]
    s["10.200.0.0", 16] = [route("10.200.0.0", 16, hops=OTHER_HOP)]
    s["10.201.0.0", 16] = [route("10.201.0.0", 16, priority=1), route("10.201.0.0", 16, priority=2, hops=OTHER_HOP)]
    tested = []

    def via_4(r):
        tested.append(r)
        return any(nh.oif == 4 for nh in r.nexthops)
    assert sorted(s.where(via_4)) == [("10.200.0.0", 16), ("10.201.0.0", 16)]
    assert len(tested) == 4  # one test per shape: two single ones, the two of the prefix with two routes
    assert s.first(via_4).dst in ("10.200.0.0", "10.201.0.0")
    assert s.first(lambda r: r.priority == 7) is None


def test_load_stores_a_dump_and_hands_on_the_rest():
    s = store()
    shared = route("", 0)
    s.add_new(("10.5.0.0", 16), route("10.5.0.0", 16))
    other = []
    pairs = [(("10.1.0.0", 16), shared), (("10.2.0.0", 24), shared), (("10.5.0.0", 16), shared),
             (("127.0.0.1", 32), route("127.0.0.1", 32, table=m.TABLE_LOCAL))]
    stored = s.load(pairs, other=lambda prefix, r: other.append(prefix))
    assert stored == [(shared, 2)]
    assert other == [("10.5.0.0", 16), ("127.0.0.1", 32)]  # already stored; kept listed
    assert s[("10.2.0.0", 24)] == [route("10.2.0.0", 24)]
    assert s.shapes(("10.1.0.0", 16))[0] is s.shapes(("10.5.0.0", 16))[0]


def test_load_survives_a_shape_dropped_by_the_rest():
    """A dump's later route for a stored prefix makes it a list, dropping
    the shape it held; a following prefix with the same route object gets
    a live shape again (counted, released without error)."""
    s = store()
    shared = route("", 0)
    pairs = [(("10.1.0.0", 16), shared), (("10.1.0.0", 16), route("10.1.0.0", 16, priority=5)),
             (("10.2.0.0", 16), shared)]

    def other(prefix, r):
        s[prefix] = s[prefix] + [r.at(*prefix)]
    s.load(pairs, other=other)
    assert len(s[("10.1.0.0", 16)]) == 2 and s[("10.2.0.0", 16)] == [route("10.2.0.0", 16)]
    del s["10.2.0.0", 16], s["10.1.0.0", 16]
    assert not s._shapes


@pytest.mark.parametrize("seed", range(20))
def test_a_loaded_dump_equals_the_same_routes_set_one_by_one(seed):
    """KernelState.load_routes (the dump path: shared blank routes, several
    routes per prefix across tables and metrics, local ones) builds the
    same model as set_route for each route in the same order."""
    rng = random.Random(seed)
    blanks = [m.Route(table, "", 0, type=rtype, priority=prio, nexthops=hops)
              for table, rtype in ((m.TABLE_MAIN, m.RTN_UNICAST), (100, m.RTN_UNICAST), (m.TABLE_LOCAL, m.RTN_LOCAL))
              for prio in (0, 20) for hops in (HOP, OTHER_HOP)]
    pairs = []
    for _ in range(300):
        prefix = (f"10.{rng.randrange(8)}.{rng.randrange(4)}.0", rng.choice([16, 24, 32]))
        pairs.append((prefix, rng.choice(blanks)))
    loaded, one_by_one = m.KernelState(), m.KernelState()
    loaded.load_routes(pairs)
    for prefix, blank in pairs:
        one_by_one.set_route(blank.at(*prefix))
    assert dict(loaded.by_prefix.items()) == dict(one_by_one.by_prefix.items())
    assert loaded.by_oif == one_by_one.by_oif and loaded.local_short == one_by_one.local_short
    for prefix in list(one_by_one.by_prefix):  # and both empty out completely
        for route in list(loaded.by_prefix[prefix]):
            loaded.del_route(route)
    assert not loaded.by_prefix and not loaded.by_prefix._shapes and not loaded.by_oif


def test_prefixes_with_several_routes_are_scanned_by_shape_too():
    """Two full tables (main and 100) make every prefix hold two routes; a
    policy check over them still tests each kind of route once."""
    s = store()
    for i in range(1000):
        prefix = (f"10.{i // 256}.{i % 256}.0", 24)
        s[prefix] = [route(*prefix), route(*prefix, table=100)]
    tested = []

    def multipath(r):
        tested.append(r)
        return len(r.nexthops) > 1
    assert s.first(multipath) is None and s.where(multipath) == []
    assert len(tested) == 2 * 2
    assert s[("10.3.231.0", 24)] == [route("10.3.231.0", 24), route("10.3.231.0", 24, table=100)]
    assert s.first(lambda r: r.table == 100).table == 100
