"""Transparency of the routed fast path where it used to differ from the
kernel (issue 5): each test sends the same frames through the kernel alone
and through loxi-mirror and compares what reaches pod2 and what pod1 gets
back, byte for byte.
"""

import json
import subprocess
import sys

import pytest
from scapy.layers.inet import UDP

from nstest import skip_unless_root, wait_for
from oracle import HERE, exchange, settle, udp_received
from test_routing import counters, delta, frame, silence, warm_neighbors

pytestmark = skip_unless_root

OTHER_GW, OTHER_MAC = "10.2.0.3", "02:00:00:00:99:99"  # a second next hop on veth2


def _shared_key_routes(topo):
    """prefix -> `ip route` commands that leave several routes for it."""
    via_pod2, via_other = ["via", topo.pod2_ip], ["via", OTHER_GW]
    return {
        "10.9.0.0/16": [["add", "blackhole", "10.9.0.0/16"], ["append", "10.9.0.0/16"] + via_pod2],
        "10.6.0.0/16": [["add", "unreachable", "10.6.0.0/16"], ["append", "10.6.0.0/16"] + via_pod2],
        "10.8.0.0/16": [["add", "10.8.0.0/16"] + via_pod2, ["append", "10.8.0.0/16"] + via_other],
        "10.5.0.0/16": [["add", "10.5.0.0/16"] + via_other, ["prepend", "10.5.0.0/16"] + via_pod2],
        "10.4.0.0/16": [["add", "10.4.0.0/16"] + via_pod2, ["prepend", "blackhole", "10.4.0.0/16"]],
    }


def _ip_route(topo, commands):
    for cmd in commands:
        topo.run("node", ["ip", "route"] + cmd)


def _flush(topo, prefixes):
    for prefix in prefixes:
        while topo.run("node", ["ip", "route", "del", prefix], check=False).returncode == 0:
            pass


def test_routes_sharing_a_key_same_as_kernel(routed_topology, agent):
    """`ip route append/prepend` leave several routes under one key; the
    kernel uses the first.  At start-up (dump) and while running."""
    topo = routed_topology
    warm_neighbors(topo)
    silence(topo)
    topo.run("node", ["ip", "neigh", "replace", OTHER_GW, "lladdr", OTHER_MAC, "dev", topo.node_if2, "nud", "permanent"])
    routes = _shared_key_routes(topo)
    frames = [frame(topo, dst=p.replace("0.0/16", "0.5")) for p in routes]
    for cmds in routes.values():
        _ip_route(topo, cmds)
    kernel = exchange(topo, frames)
    # The oracle: 10.8 and 10.5 forwarded to pod2's MAC; 10.6 answered with
    # ICMP unreachable; the blackholes drop silently.
    assert [f[30:32] for f in kernel[0]] == [bytes([10, 8]), bytes([10, 5])]
    assert all(f[:6] == bytes.fromhex(topo.pod2_mac.replace(":", "")) for f in kernel[0])
    assert len(kernel[1]) == 1
    a = agent(topo)
    c0 = counters(a)
    assert exchange(topo, frames) == kernel, "at start-up"
    assert delta(counters(a), c0).get("FORWARDED") == 2
    _flush(topo, routes)
    settle(topo)
    for cmds in routes.values():
        _ip_route(topo, cmds)
    settle(topo)
    c0 = counters(a)
    assert exchange(topo, frames) == kernel, "while running"
    assert delta(counters(a), c0).get("FORWARDED") == 2
    # Deleting the first of two leaves the other in use.
    _ip_route(topo, [["del", "10.8.0.0/16", "via", topo.pod2_ip], ["del", "blackhole", "10.4.0.0/16"]])
    settle(topo)
    two = [frame(topo, dst="10.8.0.5"), frame(topo, dst="10.4.0.5")]
    fast = exchange(topo, two)
    assert [f[:6] for f in fast[0]] == [bytes.fromhex(OTHER_MAC.replace(":", "")),
                                        bytes.fromhex(topo.pod2_mac.replace(":", ""))]


DEFAULT_RULE_CHANGES = [
    (["del", "pref", "32766"], ["add", "pref", "32766", "table", "main"]),
    (["del", "pref", "0"], ["add", "pref", "0", "table", "local"]),
    (["del", "pref", "32767"], ["add", "pref", "32767", "table", "default"]),
    (["add", "pref", "32766", "table", "main", "tos", "0x10"], ["del", "pref", "32766", "tos", "0x10"]),
]


def test_default_rules_changed_forward_by_the_kernel_lookup(routed_topology, agent):
    """Any difference from the three default rules, a missing one included,
    makes every forward ask the kernel's own FIB (bpf_fib_lookup, through
    the rules): without the main rule it answers 'network unreachable'
    instead of forwarding, and so does the fast path (it punts)."""
    topo = routed_topology
    warm_neighbors(topo)
    silence(topo)
    frames = [frame(topo), frame(topo, payload=UDP(sport=40000, dport=10) / b"second")]
    kernel = []
    for change, undo in DEFAULT_RULE_CHANGES:
        topo.run("node", ["ip", "rule"] + change)
        kernel.append(exchange(topo, frames))
        topo.run("node", ["ip", "rule"] + undo)
    # The oracle: not forwarded (and no ICMP either: there is no route back).
    assert kernel[0] == ([], []) and len(kernel[1][0]) == 2
    a = agent(topo)
    for (change, undo), expected in zip(DEFAULT_RULE_CHANGES, kernel):
        topo.run("node", ["ip", "rule"] + change)
        settle(topo)
        c0 = counters(a)
        assert exchange(topo, frames) == expected, change
        d = delta(counters(a), c0)
        want = {"FORWARDED": 2} if expected[0] else {"FIB_NOT_FORWARDED": 2}
        assert {k: v for k, v in d.items() if k in ("FORWARDED", "FIB_NOT_FORWARDED", "POLICY_ROUTING")} == want, \
            (change, d)
        topo.run("node", ["ip", "rule"] + undo)
    settle(topo)
    assert a.status()["forwarding_punted_because"] is None


def test_resync_under_a_route_storm_converges_and_never_forwards_stale(routed_topology, agent, monkeypatch,
                                                                      tmp_path):
    """A 20,000-route add/delete storm overruns a tiny event buffer
    (ENOBUFS).  Events queued before a re-dump must not be replayed over it:
    within 1 s of the storm's end the route map equals a fresh translation
    of the kernel's state, key by key, and a prefix deleted during the storm
    never reaches pod2."""
    topo = routed_topology
    monkeypatch.setenv("LOXI_MIRROR_NETLINK_RCVBUF", "4096")
    warm_neighbors(topo)
    silence(topo)
    topo.run("node", ["ip", "route", "add", "10.251.0.0/16", "via", topo.pod2_ip])
    a = agent(topo)
    probe = frame(topo, dst="10.251.0.5")
    assert len(exchange(topo, [probe])[0]) == 1  # forwarded while the route exists
    prefixes = [f"10.{100 + i // 256}.{i % 256}.0/24" for i in range(20000)]
    first = [f"route add {p} via {topo.pod2_ip}" for p in prefixes[:10000]]
    first.append("route del 10.251.0.0/16")
    rest = [f"route add {p} via {topo.pod2_ip}" for p in prefixes[10000:]]
    rest += [f"route del {p}" for p in prefixes[:19000]]  # the last 1,000 stay
    rest += [f"route append {p} via {OTHER_GW}" for p in prefixes[19500:]]  # and share a key
    topo.run("node", ["ip", "neigh", "replace", OTHER_GW, "lladdr", OTHER_MAC, "dev", topo.node_if2, "nud",
                      "permanent"])
    topo.run("node", ["ip", "-batch", "-"], input="\n".join(first) + "\n")
    batch = tmp_path / "storm.batch"
    batch.write_text("\n".join(rest) + "\n")
    # From the delete on, a stream of probes to the deleted prefix for the
    # rest of the storm and after: the kernel drops every one.
    prober = topo.popen("pod1", [sys.executable, "-c", PROBER, topo.pod1_if, probe.hex(), "8"])
    arrived = topo.popen("pod2", [sys.executable, f"{HERE}/pktio.py", "capture", topo.pod2_if, "10"],
                         stdout=subprocess.PIPE, text=True)
    assert arrived.stdout.readline().strip() == "ready"
    out = topo.run("node", [sys.executable, f"{HERE}/resync_check.py", str(batch), "5"], timeout=120).stdout
    result = json.loads(out)
    print("map equal to a fresh translation", result)
    prober.wait(timeout=30)
    got, _ = arrived.communicate(timeout=30)
    to_deleted = [f for f in json.loads(got.splitlines()[-1]) if bytes.fromhex(f)[30:32] == bytes([10, 251])]
    st = a.status()
    assert st["resyncs"] >= 1, st  # the buffer did overflow
    assert result["ms"] is not None and result["ms"] < 1000, result
    # The kernel dropped every probe (the route was gone); so must we.
    assert len(to_deleted) == 0, f"{len(to_deleted)} probes to the deleted prefix reached pod2"
    assert send_one_to(topo, a, "10.251.0.5") == 0


PROBER = """
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
frame, end = bytes.fromhex(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    s.send(frame)
    time.sleep(0.001)
"""


def send_one_to(topo, a, dst):
    return len(exchange(topo, [frame(topo, dst=dst)])[0])


# --- the peer's receive path and metadata (item 4) ---------------------------

def _set_neighbor(topo, mac):
    topo.run("node", ["ip", "neigh", "replace", topo.pod2_ip, "lladdr", mac, "dev", topo.node_if2, "nud", "permanent"])


def test_frame_for_another_mac_is_dropped_by_the_pod_as_by_the_kernel(routed_topology, agent):
    """A neighbour entry that is not the pod's MAC (stale, or the pod changed
    its MAC): the kernel's veth hands the frame to eth_type_trans() in the
    pod, which calls it PACKET_OTHERHOST and ip_rcv() drops it.  At start-up
    and when the pod's MAC changes while the agent runs."""
    topo = routed_topology
    steps = [
        ("stale neighbour", lambda: _set_neighbor(topo, "02:00:00:00:77:77")),
        ("neighbour right", lambda: _set_neighbor(topo, topo.pod2_mac)),
        ("pod changed its MAC", lambda: topo.run("pod2", ["ip", "link", "set", topo.pod2_if, "address",
                                                           "02:00:00:00:55:55"])),
        ("pod MAC back", lambda: topo.run("pod2", ["ip", "link", "set", topo.pod2_if, "address", topo.pod2_mac])),
    ]
    frames = [frame(topo), frame(topo, payload=UDP(sport=40000, dport=9) / b"second")]
    kernel = []
    for _, step in steps:
        step()
        kernel.append(udp_received(topo, 9, frames))
    assert [len(k) for k in kernel] == [0, 2, 0, 2]  # the oracle
    steps[0][1]()
    a = agent(topo)
    for (what, step), expected in zip(steps, kernel):
        if what != "stale neighbour":
            step()
            settle(topo)
        c0 = counters(a)
        assert udp_received(topo, 9, frames) == expected, what
        assert delta(counters(a), c0).get("FORWARDED") == 2, what  # still the fast path


def test_mark_is_scrubbed_across_namespaces(routed_topology, agent):
    """A mark set on the node (here by a tc filter before ours) does not
    reach the pod: veth_xmit() scrubs it when the frame changes namespace."""
    topo = routed_topology
    warm_neighbors(topo)
    topo.run("node", ["tc", "qdisc", "add", "dev", topo.node_if1, "clsact"])
    _attach(topo, "node", "tc-ingress", topo.node_if1, "1", "mark").wait(timeout=30)
    topo.run("pod2", ["iptables", "-A", "INPUT", "-m", "mark", "--mark", "5", "-j", "DROP"])
    frames = [frame(topo)]
    kernel = udp_received(topo, 9, frames)
    assert len(kernel) == 1  # the oracle: mark 0 in the pod
    a = agent(topo)
    c0 = counters(a)
    assert udp_received(topo, 9, frames) == kernel
    assert delta(counters(a), c0).get("FORWARDED") == 1


# --- programs and devices the fast path must not bypass (item 5) ------------

def _attach(topo, ns, kind, iface, *args):
    p = topo.popen(ns, [sys.executable, f"{HERE}/bpfattach.py", kind, iface, *args], stdout=subprocess.PIPE,
                   text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def _link_flags(topo, name):
    rows = json.loads(topo.run("node", ["loxi-mirror", "dump", "links", "--json"]).stdout)
    return next((r["flags"] for r in rows if r["name"] == name), None)


def test_xdp_on_the_pod_side_peer_runs(routed_topology, agent):
    """A native XDP program on the pod's veth end runs when the kernel's
    veth_xmit() delivers to it; redirect_peer would skip it.  Attached
    before the agent starts, removed and attached again while it runs."""
    topo = routed_topology
    warm_neighbors(topo)
    _set_neighbor(topo, topo.pod2_mac)  # no ARP needed once XDP drops IPv4 only
    frames = [frame(topo)]
    without = udp_received(topo, 9, frames)
    _attach(topo, "pod2", "xdp", topo.pod2_if).wait(timeout=30)
    with_xdp = udp_received(topo, 9, frames)
    assert len(without) == 1 and with_xdp == []  # the oracle: the program drops IPv4
    a = agent(topo)
    for step, expected in (("at start-up", with_xdp), ("removed", without), ("attached again", with_xdp)):
        if step == "removed":
            topo.run("pod2", ["ip", "link", "set", "dev", topo.pod2_if, "xdp", "off"])
        elif step == "attached again":
            _attach(topo, "pod2", "xdp", topo.pod2_if).wait(timeout=30)
        settle(topo)
        c0 = counters(a)
        assert udp_received(topo, 9, frames) == expected, step
        assert delta(counters(a), c0).get("FORWARDED") == 1, step  # still the fast path
    assert "redirect_peer" not in _link_flags(topo, topo.node_if2)


def test_tcx_egress_program_on_the_node_veth_runs(routed_topology, agent):
    topo = routed_topology
    warm_neighbors(topo)
    _set_neighbor(topo, topo.pod2_mac)
    frames = [frame(topo)]
    holder = _attach(topo, "node", "tcx-egress", topo.node_if2)
    kernel = udp_received(topo, 9, frames)
    assert kernel == []  # the oracle: the tcx program drops it
    topo.kill(holder)
    a = agent(topo)
    assert "redirect_peer" in _link_flags(topo, topo.node_if2)
    holder = _attach(topo, "node", "tcx-egress", topo.node_if2)  # no event: the poll must find it
    wait_for(lambda: "redirect_peer" not in _link_flags(topo, topo.node_if2), 5, "tcx program not noticed")
    for when in ("while running", "at start-up"):
        if when == "at start-up":
            a.stop()
            a = agent(topo)
        c0 = counters(a)
        assert udp_received(topo, 9, frames) == kernel, when
        assert delta(counters(a), c0).get("FORWARDED") == 1, when


def test_user_ingress_filter_after_ours_runs(routed_topology, agent):
    topo = routed_topology
    warm_neighbors(topo)
    frames = [frame(topo)]
    topo.run("node", ["tc", "qdisc", "add", "dev", topo.node_if1, "clsact"])

    def drop_after_us():
        _attach(topo, "node", "tc-ingress", topo.node_if1, "65521", "drop").wait(timeout=30)

    drop_after_us()
    kernel = udp_received(topo, 9, frames)
    assert kernel == []  # the oracle
    topo.run("node", ["tc", "filter", "del", "dev", topo.node_if1, "ingress", "prio", "65521"])
    a = agent(topo)
    for when in ("while running", "at start-up"):
        if when == "while running":
            drop_after_us()
            settle(topo)
        else:
            a.stop()
            a = agent(topo)
        assert udp_received(topo, 9, frames) == kernel, when
        assert topo.node_if1 not in a.status()["interfaces"], when


@pytest.mark.parametrize("mode", ["passthru", "source", "source, moved to another namespace"])
def test_macvlan_on_a_managed_interface(routed_topology, agent, mode):
    """passthru: the macvlan takes every frame of veth1 (here it does not
    forward: forwarding=0 on it); source: it gets a copy of frames from the
    listed MACs, also when it lives in another namespace (then only the
    promiscuity it gives veth1 shows on the node).  Either way the frame
    must not skip it: created while the agent runs, and at start-up."""
    topo = routed_topology
    warm_neighbors(topo)
    frames = [frame(topo)]
    where = "pod2" if "moved" in mode else "node"

    def create():
        topo.run("node", ["ip", "link", "add", "mv0", "link", topo.node_if1, "type", "macvlan", "mode",
                          mode.split(",")[0]])
        if mode.startswith("source"):
            topo.run("node", ["ip", "link", "set", "mv0", "type", "macvlan", "macaddr", "add", topo.pod1_mac])
        if where != "node":
            topo.run("node", ["ip", "link", "set", "mv0", "netns", topo.nsname(where)])
        topo.run(where, ["ip", "link", "set", "mv0", "up"])
        topo.run(where, ["sysctl", "-qw", "net.ipv4.conf.mv0.forwarding=0"])

    def outcome():
        cap = topo.popen(where, [sys.executable, f"{HERE}/pktio.py", "capture", "mv0", "1"],
                         stdout=subprocess.PIPE, text=True)
        assert cap.stdout.readline().strip() == "ready"
        at_pod2 = udp_received(topo, 9, frames)
        out, _ = cap.communicate(timeout=15)
        at_mv0 = [f for f in json.loads(out.splitlines()[-1]) if bytes.fromhex(f)[12:14] == b"\x08\x00"]
        return at_pod2, len(at_mv0)

    create()
    kernel = outcome()
    # The oracle: passthru drops it; the source macvlan gets its copy (in
    # pod2 it is delivered there too, so pod2's socket receives it twice).
    copies = {"passthru": 0, "source": 1}.get(mode, 2)
    assert kernel == ([bytes(frames[0][42:])] * copies, 1)
    topo.run(where, ["ip", "link", "del", "mv0"])
    a = agent(topo)
    assert topo.node_if1 in a.status()["interfaces"]
    create()
    # A macvlan elsewhere only raises veth1's promiscuity, silently: polled.
    wait_for(lambda: topo.node_if1 not in a.status()["interfaces"], 5, "veth1 still managed")
    assert outcome() == kernel, "created while the agent runs"
    a.stop()
    a = agent(topo)
    assert outcome() == kernel, "at start-up"
    assert topo.node_if1 not in a.status()["interfaces"]


# --- gaps the inventory found (docs/forward-path-inputs.md) -----------------

def test_forward_update_priority_off_is_obeyed(routed_topology, agent):
    """ip_forward_update_priority=0: ip_forward() keeps the packet's
    priority instead of setting it from the TOS, which an egress filter (or
    qdisc) on the node sees.  Here a filter drops priority 6 (TOS 0x10)."""
    topo = routed_topology
    warm_neighbors(topo)
    topo.run("node", ["tc", "qdisc", "add", "dev", topo.node_if2, "clsact"])
    _attach(topo, "node", "tc-egress", topo.node_if2, "1", "drop-prio6").wait(timeout=30)
    frames = [frame(topo, tos=0x10)]
    assert udp_received(topo, 9, frames) == []  # the oracle, default 1: priority 6, dropped
    topo.run("node", ["sysctl", "-qw", "net.ipv4.ip_forward_update_priority=0"])
    kernel = udp_received(topo, 9, frames)
    assert len(kernel) == 1  # priority kept (0): delivered
    a = agent(topo)
    c0 = counters(a)
    assert udp_received(topo, 9, frames) == kernel
    assert "ip_forward_update_priority" in (a.status()["forwarding_punted_because"] or "")
    assert "FORWARDED" not in delta(counters(a), c0)


def test_broadcast_source_after_custom_local_routes(routed_topology, agent):
    """Once a local-table route was added by hand (fib_has_custom_local_routes,
    which never resets) the kernel validates every source by a route lookup,
    even with rp_filter off, and drops one whose route is neither unicast
    nor an error route: here pod1's subnet broadcast address as source.
    Without such a route only our own addresses are refused."""
    topo = routed_topology
    warm_neighbors(topo)
    silence(topo)
    frames = [frame(topo, src="10.1.0.255"), frame(topo)]
    assert len(exchange(topo, frames)[0]) == 2  # before: both forwarded
    topo.run("node", ["ip", "route", "add", "local", "10.77.0.0/24", "dev", "lo", "table", "local"])
    topo.run("node", ["ip", "route", "del", "local", "10.77.0.0/24", "dev", "lo", "table", "local"])
    kernel = exchange(topo, frames)
    assert [f[26:30] for f in kernel[0]] == [bytes([10, 1, 0, 2])]  # the oracle: only the plain one
    a = agent(topo)
    c0 = counters(a)
    assert exchange(topo, frames) == kernel
    d = delta(counters(a), c0)
    assert d.get("RP_FILTER") == 1 and d.get("FORWARDED") == 1, d


@pytest.mark.parametrize("rp_filter", [1, 2])
def test_rp_filter_same_as_kernel(routed_topology, agent, rp_filter):
    """Sources routed via another interface (strict drops, loose keeps),
    with no route at all (both drop) and via the ingress (both keep)."""
    topo = routed_topology
    warm_neighbors(topo)
    silence(topo)
    topo.run("node", ["sysctl", "-qw", f"net.ipv4.conf.all.rp_filter={rp_filter}"])
    frames = [frame(topo, src="10.2.0.9"), frame(topo, src="10.99.0.1"), frame(topo)]
    kernel = exchange(topo, frames, sources=b"\x0a")
    kept = {1: [bytes([10, 1, 0, 2])], 2: [bytes([10, 2, 0, 9]), bytes([10, 1, 0, 2])]}[rp_filter]
    assert [f[26:30] for f in kernel[0]] == kept  # the oracle
    a = agent(topo)
    c0 = counters(a)
    assert exchange(topo, frames, sources=b"\x0a") == kernel
    d = delta(counters(a), c0)
    assert d.get("FORWARDED") == len(kept) and d.get("RP_FILTER") == 3 - len(kept), d


def test_agent_starts_while_a_route_never_stops_changing(routed_topology, agent, tmp_path):
    """A dump is redone while routes change during it, but not forever: a
    route flapping without pause must not keep the agent from starting.
    The flapping prefix punts (RESYNC) meanwhile; once it is quiet the maps
    equal a fresh translation."""
    topo = routed_topology
    warm_neighbors(topo)
    silence(topo)
    batch = "".join(f"route add 10.{100 + i // 256}.{i % 256}.0/24 via {topo.pod2_ip}\n" for i in range(5000))
    topo.run("node", ["ip", "-batch", "-"], input=batch)
    flap = topo.popen("node", ["sh", "-c", f"while :; do ip route replace 10.200.0.0/24 via {topo.pod2_ip}; "
                                          "ip route del 10.200.0.0/24; done"])
    try:
        a = agent(topo, timeout=30)
        c0 = counters(a)
        assert len(exchange(topo, [frame(topo, dst="10.100.7.9")])[0]) == 1
        assert delta(counters(a), c0).get("FORWARDED") == 1
    finally:
        topo.kill(flap)
    quiet = tmp_path / "quiet.batch"
    quiet.write_text("link show dev lo\n")
    out = topo.run("node", [sys.executable, f"{HERE}/resync_check.py", str(quiet), "10"], timeout=60).stdout
    assert json.loads(out)["ms"] is not None, out


CAPTURE_OUTGOING = """
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[1], 0))
s.settimeout(0.05)
print("ready", flush=True)
out, end = 0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        data, addr = s.recvfrom(65535)
    except socket.timeout:
        continue
    out += addr[2] == 4 and data[12:14] == b"\\x08\\x00" and data[26:30] == bytes([10, 1, 0, 2])
print(out, flush=True)
"""


def test_capture_on_the_node_veth_sees_forwarded_packets(routed_topology, agent):
    """A packet socket on the node's egress veth (tcpdump without -p) sees
    what the kernel transmits there; redirect_peer would skip it."""
    topo = routed_topology
    warm_neighbors(topo)
    silence(topo)
    frames = [frame(topo), frame(topo, payload=UDP(sport=40000, dport=9) / b"second")]

    def captured(seconds=4.0, before=None):
        cap = topo.popen("node", [sys.executable, "-c", CAPTURE_OUTGOING, topo.node_if2, str(seconds)],
                         stdout=subprocess.PIPE, text=True)
        assert cap.stdout.readline().strip() == "ready"
        if before:
            before()
        arrived = len(exchange(topo, frames)[0])
        return arrived, int(cap.communicate(timeout=seconds + 10)[0].split()[-1])

    kernel = captured()
    assert kernel == (2, 2)  # the oracle
    a = agent(topo)

    def noticed():  # a new capture has no event: the poll finds it
        wait_for(lambda: "redirect_peer" not in _link_flags(topo, topo.node_if2), 5, "capture not noticed")

    c0 = counters(a)
    assert captured(seconds=8, before=noticed) == kernel
    assert delta(counters(a), c0).get("FORWARDED") == 2
