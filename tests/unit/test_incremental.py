"""Incremental translation must always land where a full one does.

Random event sequences are applied to a KernelState; after each step the
delta for the recorded changes is folded into the running map contents,
which must then equal a fresh full translation.
"""

import random

import pytest

from mirror import model as m
from mirror.translate import Selection, translate, translate_changes

UP = m.IFF_UP | m.IFF_RUNNING | m.IFF_LOWER_UP
SELECTION = Selection(exclude="skip.*")


def fold(current, delta):
    for table in ("routes", "links", "neighbors"):
        cur = getattr(current, table)
        for key, value in getattr(delta, table).items():
            if value is None:
                cur.pop(key, None)
            else:
                cur[key] = value
    current.punt_forward_reason = delta.punt_forward_reason
    current.attach = delta.attach


def random_step(rng, st):
    idx = rng.choice([3, 4, 5, 6])
    name = {3: "v1", 4: "v2", 5: "v3", 6: "skip0"}[idx]
    net = rng.choice(["10.1.0.0", "10.2.0.0", "10.3.0.0", "10.2.0.128", "10.9.0.0"])
    plen = 25 if net.endswith("128") else rng.choice([16, 24])
    kind = rng.randrange(14)
    if kind == 0:
        st.set_link(m.Link(idx, name, "veth", f"02:00:00:00:00:0{idx}", rng.choice([1400, 1500]),
                           rng.choice([UP, m.IFF_UP, 0]), peer_in_other_netns=rng.random() < 0.5,
                           master=rng.choice([0, 0, 0, 9])))
    elif kind == 1:
        st.del_link(idx)
    elif kind in (2, 3, 4):
        hops = (m.Nexthop(idx, rng.choice([None, "10.2.0.2"])),)
        if rng.random() < 0.1:
            hops += (m.Nexthop(3, "10.1.0.2"),)
        st.set_route(m.Route(m.TABLE_MAIN, net, plen, type=rng.choice([1, 1, 1, 6]), priority=rng.choice([0, 100]),
                             nexthops=hops, mtu=rng.choice([0, 1300])))
    elif kind == 5 and st.routes:
        st.del_route(rng.choice([r for aliases in st.routes.values() for r in aliases]))
    elif kind == 6:
        st.set_route(m.Route(m.TABLE_LOCAL, rng.choice(["10.2.0.1", "10.2.0.0", "127.0.0.0"]),
                             rng.choice([32, 24, 8]), type=m.RTN_LOCAL, nexthops=(m.Nexthop(idx),)))
    elif kind == 7:
        addr = m.Address(idx, rng.choice(["10.1.0.1", "10.2.0.1", "10.9.0.1"]), 24)
        st.add_address(addr) if rng.random() < 0.6 else st.del_address(addr)
    elif kind in (8, 9):
        st.set_neighbor(m.Neighbor(idx, rng.choice(["10.2.0.2", "10.1.0.2", "10.9.0.5"]),
                                   rng.choice(["02:aa:00:00:00:01", "02:aa:00:00:00:02", None]),
                                   rng.choice([m.NUD_REACHABLE, m.NUD_STALE, m.NUD_FAILED, m.NUD_PERMANENT])))
    elif kind == 10 and st.neighbors:
        st.del_neighbor(rng.choice(list(st.neighbors.values())))
    elif kind == 11:
        st.set_sysctls({n: m.LinkSysctls(rng.random() < 0.8, rng.choice([0, 1, 2]))
                        for n in ("v1", "v2", "v3") if rng.random() < 0.9})
    elif kind == 12:
        st.set_egress_tc(idx, rng.choice([None, "root qdisc tbf"]))
    else:
        st.netfilter_impact = rng.choice([None, None, "filter FORWARD: 1 rule"])


@pytest.mark.parametrize("seed", range(40))
def test_incremental_equals_full(seed):
    rng = random.Random(seed)
    st = m.KernelState()
    current = translate(st, SELECTION)
    st.take_changes()
    for _ in range(120):
        random_step(rng, st)
        fold(current, translate_changes(st, st.take_changes(), SELECTION))
        full = translate(st, SELECTION)
        assert current == full
