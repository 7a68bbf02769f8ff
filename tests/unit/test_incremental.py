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
    for table in ("routes", "links", "neighbors", "ports", "fdb"):
        cur = getattr(current, table)
        for key, value in getattr(delta, table).items():
            if value is None:
                cur.pop(key, None)
            else:
                cur[key] = value
    current.punt_forward_reason = delta.punt_forward_reason
    current.fib_flags = delta.fib_flags
    current.nf = delta.nf
    current.attach = delta.attach


def random_step(rng, st):
    idx = rng.choice([3, 4, 5, 6])
    name = {3: "v1", 4: "v2", 5: "v3", 6: "skip0"}[idx]
    net = rng.choice(["10.1.0.0", "10.2.0.0", "10.3.0.0", "10.2.0.128", "10.9.0.0"])
    plen = 25 if net.endswith("128") else rng.choice([16, 24])
    kind = rng.randrange(20)
    if kind >= 14:
        bridge_step(rng, st, idx, name, kind)
    elif kind == 0:
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


def bridge_step(rng, st, idx, name, kind):
    """Bridges: br0 (ifindex 8) comes and goes, v1..v3 join and leave it,
    port state changes, FDB entries are learned, moved, aged out."""
    if kind == 14:
        info = m.BridgeInfo(vlan_filtering=rng.random() < 0.2, nf_call_iptables=rng.random() < 0.3)
        st.set_link(m.Link(8, "br0", "bridge", "02:00:00:00:00:08", 1500, rng.choice([UP, UP, 0]), bridge=info))
    elif kind == 15:
        st.del_link(8) if rng.random() < 0.3 else None
    elif kind == 16 and idx in st.links:
        port = m.BridgePort(state=rng.choice([m.BR_STATE_FORWARDING, m.BR_STATE_BLOCKING]),
                            learning=rng.random() < 0.8, isolated=rng.random() < 0.2, locked=rng.random() < 0.1)
        st.set_port(idx, port if rng.random() < 0.8 else None, 8)
    elif kind == 17:
        st.set_link(m.Link(idx, name, "veth", f"02:00:00:00:00:0{idx}", 1500, UP, master=8,
                           port=m.BridgePort()))
    elif kind == 18:
        entry = m.FdbEntry(8, rng.choice(["02:bb:00:00:00:01", "02:bb:00:00:00:02", "02:00:00:00:00:08"]),
                           rng.choice([idx, 8]), rng.choice([m.NUD_REACHABLE, m.NUD_NOARP, m.NUD_PERMANENT]),
                           vlan=rng.choice([0, 0, 0, 10]))
        st.set_fdb(entry) if rng.random() < 0.7 else st.del_fdb(entry)
    else:
        st.bridge_sysctls = m.BridgeSysctls(call_iptables=rng.random() < 0.5)
        st.bridge_nf_impact = rng.choice([None, None, "nft bridge filter forward: 1 rule"])
        st.set_ingress_tc(8, rng.choice([None, None, "1 ingress filter(s)"]))


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
