"""Route tables bigger than the route map (issue 9): with the map forced
small and its growth off, the routes that do not fit make their covering
route punt, so every packet still goes where the kernel sends it; with
growth on, the agent rebuilds a bigger map and fast-paths them all.  The
kernel alone is the oracle (same frames, byte for byte)."""

import json

from nstest import skip_unless_root, wait_for
from oracle import exchange, settle
from test_routing import counters, delta, frame, silence, warm_neighbors

pytestmark = skip_unless_root

OTHER_GW, OTHER_MAC = "10.2.0.3", "02:00:00:00:99:99"  # the /16's next hop, on veth2
SPECIFIC = 100  # /24s via pod2 inside the /16
PROBES = ("10.50.0.7", "10.50.37.7", "10.50.99.7", "10.50.200.7")  # the last: only the /16


def _mac(text):
    return bytes.fromhex(text.replace(":", ""))


def _table(topo, first=0, count=SPECIFIC):
    """10.50.0.0/16 via OTHER_GW and `count` more specific /24s via pod2."""
    lines = [f"route replace 10.50.{i}.0/24 via {topo.pod2_ip}" for i in range(first, first + count)]
    topo.run("node", ["ip", "-batch", "-"], input="\n".join(lines) + "\n")


def _prepare(topo):
    warm_neighbors(topo)
    silence(topo)
    topo.run("node", ["ip", "neigh", "replace", OTHER_GW, "lladdr", OTHER_MAC, "dev", topo.node_if2, "nud", "permanent"])
    topo.run("node", ["ip", "route", "add", "10.50.0.0/16", "via", OTHER_GW])
    _table(topo)
    frames = [frame(topo, dst=ip) for ip in PROBES]
    kernel = exchange(topo, frames)
    # The oracle: the /24s' addresses reach pod2's MAC, the rest the /16's next hop.
    assert [f[:6] for f in kernel[0]] == [_mac(topo.pod2_mac)] * 3 + [_mac(OTHER_MAC)], kernel
    return frames, kernel


def test_overflow_punts_instead_of_using_a_less_specific_route(routed_topology, agent, monkeypatch):
    topo = routed_topology
    monkeypatch.setenv("LOXI_MIRROR_ROUTE_CAPACITY", "64")
    monkeypatch.setenv("LOXI_MIRROR_ROUTE_GROWTH", "0")
    frames, kernel = _prepare(topo)
    a = agent(topo)
    over = a.status()["route_overflow"]
    assert over and over["capacity"] == 64 and over["unwritten"] > 0, over
    assert "route map full" in topo.run("node", ["loxi-mirror", "status"]).stdout
    c0 = counters(a)
    assert exchange(topo, frames) == kernel, "at start-up"
    assert delta(counters(a), c0).get("ROUTE_OVERFLOW", 0) >= 1
    # While running: more routes that do not fit, then room again.
    _table(topo, SPECIFIC, 50)
    settle(topo, marker="neigh")  # a marker route would not fit either
    assert a.status()["route_overflow"]["unwritten"] > over["unwritten"]
    assert exchange(topo, frames) == kernel, "more routes than fit, while running"
    topo.run("node", ["ip", "-batch", "-"],
              input="".join(f"route del 10.50.{i}.0/24\n" for i in range(1, SPECIFIC + 50) if i not in (37, 99)))
    settle(topo, marker="neigh")
    assert a.status()["route_overflow"] is None
    c0 = counters(a)
    assert exchange(topo, frames) == kernel, "after the overflow cleared"
    assert delta(counters(a), c0).get("FORWARDED") == len(PROBES)
    assert a.running()


def test_route_map_grows_when_the_routes_need_it(routed_topology, agent, monkeypatch):
    topo = routed_topology
    monkeypatch.setenv("LOXI_MIRROR_ROUTE_CAPACITY", "64")
    frames, kernel = _prepare(topo)
    a = agent(topo)
    st = a.status()
    assert st["route_overflow"] is None and st["route_map"]["capacity"] > 64, st["route_map"]
    capacity = st["route_map"]["capacity"]
    more = "".join(f"route add 10.{60 + i // 256}.{i % 256}.0/24 via {topo.pod2_ip}\n" for i in range(capacity))
    topo.run("node", ["ip", "-batch", "-"], input=more)  # more than the grown map holds
    settle(topo)
    st = a.status()
    assert st["route_overflow"] is None and st["route_map"]["capacity"] > capacity, st["route_map"]
    assert st["route_map"]["growths"] >= 2 and st["route_map"]["memlock_bytes"] > 0
    c0 = counters(a)
    assert exchange(topo, frames) == kernel
    assert delta(counters(a), c0).get("FORWARDED") == len(PROBES)
    rows = json.loads(topo.run("node", ["loxi-mirror", "dump", "routes", "--json"]).stdout)
    assert sum(r["prefix"].startswith(("10.50.", "10.6")) for r in rows) == 1 + SPECIFIC + capacity
