"""Agent lifecycle: fail-safe after SIGKILL, clean stop, interfaces that
come later, interface selection, kernel switches the fast path must obey."""

import json
import os
import re
import signal
import subprocess
import time

from nstest import skip_unless_root, unique_name, wait_for
from test_routing import HERE, PY, counters, delta, frame, send_and_capture, send_one, silence, warm_neighbors

pytestmark = skip_unless_root


def tc_state(topo):
    out = []
    for dev in (topo.node_if1, topo.node_if2):
        for what in (["qdisc", "show", "dev", dev], ["filter", "show", "dev", dev, "ingress"]):
            out.append(topo.run("node", ["tc"] + what).stdout)
    return out


def forward_counter(topo):
    """Packets the kernel's FORWARD chain saw from pod1 (rule added by the test)."""
    out = topo.run("node", ["iptables", "-nvxL", "FORWARD"]).stdout
    for line in out.splitlines():
        if topo.pod1_ip in line:
            return int(line.split()[0])
    raise AssertionError(f"no counting rule in:\n{out}")


def test_sigkill_falls_back_to_the_kernel_within_a_second(routed_topology, agent):
    topo = routed_topology
    before_tc = tc_state(topo)
    a = agent(topo)
    warm_neighbors(topo)
    arrived, d = send_one(topo, a)
    assert arrived == 1
    assert d["FORWARDED"] >= 1

    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait(timeout=5)
    # The dead agent cannot see this rule; only packets the kernel forwards
    # are counted by it.
    topo.run("node", ["iptables", "-A", "FORWARD", "-s", topo.pod1_ip, "-p", "icmp", "-j", "ACCEPT"])
    out = topo.run("pod1", ["ping", "-c", "200", "-i", "0.01", "-q", topo.pod2_ip]).stdout
    assert " 0% packet loss" in out
    via_kernel = forward_counter(topo)
    fallback_s = (200 - via_kernel) * 0.01  # pings still fast-pathed after the kill
    print(f"fast path still used for {200 - via_kernel} of 200 pings (~{fallback_s:.2f} s) after SIGKILL")
    assert via_kernel >= 200 - 150, f"only {via_kernel} of 200 went through the kernel"

    # Leftovers stay until stop (or the next start) removes them.
    assert tc_state(topo) != before_tc
    out = topo.run("node", ["loxi-mirror", "stop"]).stdout
    assert "removed leftovers from 2 interface(s)" in out
    assert tc_state(topo) == before_tc


def test_sigterm_stops_cleanly(routed_topology, agent):
    topo = routed_topology
    before_tc = tc_state(topo)
    a = agent(topo)
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(timeout=10) == 0
    assert tc_state(topo) == before_tc
    assert "not running" in topo.run("node", ["loxi-mirror", "status"]).stdout


def add_pod(topo, name, node_if, node_ip, pod_ip):
    """A third pod on the node, added while the agent runs."""
    ns = unique_name("lmt") + "-" + name
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        topo.run("node", ["ip", "link", "add", node_if, "type", "veth", "peer", "name", "eth0", "netns", ns])
        topo.run("node", ["ip", "addr", "add", f"{node_ip}/24", "dev", node_if])
        topo.run("node", ["ip", "link", "set", node_if, "up"])
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{pod_ip}/24", "dev", "eth0"],
                    ["ip", "link", "set", "eth0", "up"], ["ip", "route", "add", "default", "via", node_ip]):
            topo.run(ns, cmd)
    except BaseException:
        subprocess.run(["ip", "netns", "del", ns])
        raise
    return ns


def test_interface_added_later_is_attached_and_fast_pathed(routed_topology, agent):
    topo = routed_topology
    a = agent(topo)
    pod3 = add_pod(topo, "pod3", "veth3", "10.3.0.1", "10.3.0.2")
    try:
        wait_for(lambda: "veth3" in a.status()["interfaces"], 2, "veth3 not attached")
        topo.run("pod1", ["ping", "-c", "2", "-W", "1", "10.3.0.2"])  # resolve neighbours
        c0 = counters(a)
        out = topo.run("pod1", ["ping", "-c", "10", "-i", "0.01", "-q", "10.3.0.2"]).stdout
        assert " 0% packet loss" in out
        assert delta(counters(a), c0).get("FORWARDED", 0) >= 20  # requests and replies
    finally:
        subprocess.run(["ip", "netns", "del", pod3])


def test_exclude_leaves_an_interface_to_the_kernel(routed_topology, agent):
    topo = routed_topology
    a = agent(topo, "--exclude", topo.node_if2)
    assert a.status()["interfaces"] == [topo.node_if1]
    assert "veth2" not in topo.run("node", ["loxi-mirror", "dump", "links"]).stdout
    warm_neighbors(topo)
    silence(topo)
    arrived, d = send_one(topo, a)
    assert arrived == 1
    assert d.get("EGRESS_UNMANAGED") == 1 and "FORWARDED" not in d, d


def test_forwarding_switched_off_is_obeyed(routed_topology, agent):
    topo = routed_topology
    a = agent(topo)
    warm_neighbors(topo)
    silence(topo)
    topo.run("node", ["sysctl", "-qw", "net.ipv4.ip_forward=0"])
    time.sleep(0.3)  # netconf event, else the 2 s sysctl poll
    arrived, d = send_one(topo, a)  # the kernel does not forward
    assert arrived == 0
    assert d.get("FORWARDING_OFF") == 1
    topo.run("node", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    time.sleep(0.3)
    arrived, d = send_one(topo, a)
    assert arrived == 1
    assert d.get("FORWARDED") == 1


def test_status_and_dump_read_the_maps(routed_topology, agent):
    topo = routed_topology
    a = agent(topo)
    warm_neighbors(topo)
    st = a.status()
    assert st["running"] and st["ready"] and st["pid"] == a.proc.pid
    assert st["tables"]["links"] == 2 and st["tables"]["routes"] >= 4
    routes = topo.run("node", ["loxi-mirror", "dump", "routes"]).stdout
    assert re.search(r"^10\.2\.0\.0/24 dev veth2 mtu 1500 forward$", routes, re.M), routes
    assert re.search(r"^10\.2\.0\.1/32 punt:LOCAL$", routes, re.M), routes
    neigh = topo.run("node", ["loxi-mirror", "dump", "neighbors"]).stdout
    assert f"{topo.pod2_ip} dev veth2 lladdr {topo.pod2_mac}" in neigh
    links = topo.run("node", ["loxi-mirror", "dump", "links"]).stdout
    assert re.search(r"veth1 \S+ mtu 1500 <up,forwarding,redirect_peer>", links), links


def test_stale_neighbor_in_use_is_reconfirmed(routed_topology, agent):
    """The kernel re-probes a STALE neighbour it transmits to; when the fast
    path transmits instead, the agent must make the kernel do the same
    (otherwise a pod that moved or died would be fed its old MAC forever)."""
    topo = routed_topology
    dev = topo.node_if2
    topo.run("node", ["sysctl", "-qw", f"net.ipv4.neigh.{dev}.delay_first_probe_time=1"])
    a = agent(topo)
    warm_neighbors(topo)
    silence(topo)  # only pod1 -> pod2 traffic, all of it fast-pathed
    # STALE and unused by the kernel: left alone, the kernel never probes it.
    topo.run("node", ["ip", "neigh", "change", topo.pod2_ip, "lladdr", topo.pod2_mac, "dev", dev, "nud", "stale"])
    cap = topo.popen("pod2", [PY, f"{HERE}/pktio.py", "capture", topo.pod2_if, "4"],
                     stdout=subprocess.PIPE, text=True)
    assert cap.stdout.readline().strip() == "ready"
    c0 = counters(a)
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        topo.run("pod1", [PY, f"{HERE}/pktio.py", "send", topo.pod1_if] + [frame(topo).hex()] * 5)
        time.sleep(0.05)
    frames = [bytes.fromhex(h) for h in json.loads(cap.communicate(timeout=15)[0].splitlines()[-1])]
    arp_requests = [f for f in frames if f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x01"]
    assert delta(counters(a), c0).get("FORWARDED", 0) > 0
    assert arp_requests, "the node never re-confirmed pod2 while the fast path used it"
    assert "STALE" not in topo.run("node", ["ip", "neigh", "show", topo.pod2_ip, "dev", dev]).stdout


def test_egress_qdisc_is_not_bypassed(routed_topology, agent):
    """A shaper on the node's veth towards pod2 (as the Kubernetes bandwidth
    plugin installs) must keep shaping: no redirect_peer past it."""
    topo = routed_topology
    dev = topo.node_if2
    a = agent(topo)

    def throughput_mbit():
        port = 5203
        srv = topo.popen("pod2", ["iperf3", "-s", "-1", "-p", str(port)], stdout=subprocess.DEVNULL)
        topo.wait_listen("pod2", port, proc=srv)
        res = json.loads(topo.run("pod1", ["iperf3", "-c", topo.pod2_ip, "-p", str(port), "-t", "2", "-J"]).stdout)
        srv.wait(timeout=10)
        return res["end"]["sum_received"]["bits_per_second"] / 1e6

    def link_flags():
        return topo.run("node", ["loxi-mirror", "dump", "links"]).stdout

    assert re.search(rf"{dev} \S+ mtu 1500 <up,forwarding,redirect_peer>", link_flags())
    topo.run("node", ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "20mbit", "burst", "32kbit",
                      "latency", "50ms"])
    time.sleep(0.2)
    assert re.search(rf"{dev} \S+ mtu 1500 <up,forwarding>", link_flags())
    c0 = counters(a)
    assert throughput_mbit() < 25  # shaped, as by the kernel alone
    assert delta(counters(a), c0)["FORWARDED"] > 0  # still the fast path, via the qdisc
    topo.run("node", ["tc", "qdisc", "del", "dev", dev, "root"])
    time.sleep(0.2)
    assert re.search(rf"{dev} \S+ mtu 1500 <up,forwarding,redirect_peer>", link_flags())


def test_removed_filter_is_attached_again(routed_topology, agent):
    """Someone deletes the clsact qdisc under the agent: it re-attaches, and
    stop still leaves tc as it was before start."""
    topo = routed_topology
    before_tc = tc_state(topo)
    a = agent(topo)
    topo.run("node", ["tc", "qdisc", "del", "dev", topo.node_if1, "clsact"])
    ours = ["tc", "filter", "show", "dev", topo.node_if1, "ingress"]
    wait_for(lambda: "loxi_mirror" in topo.run("node", ours).stdout, 2, "not attached again")
    warm_neighbors(topo)
    c0 = counters(a)
    topo.run("pod1", ["ping", "-c", "3", "-i", "0.05", topo.pod2_ip])
    assert delta(counters(a), c0).get("FORWARDED", 0) >= 6
    assert a.stop() == 0
    assert tc_state(topo) == before_tc


def test_forward_use_pmtu_makes_forwarding_punt(routed_topology, agent):
    """ip_forward_use_pmtu=1 lets learned path MTUs (not mirrored) decide."""
    topo = routed_topology
    a = agent(topo)
    warm_neighbors(topo)
    silence(topo)
    topo.run("node", ["sysctl", "-qw", "net.ipv4.ip_forward_use_pmtu=1"])
    # No netconf event for this one: the 2 s poll notices it.
    wait_for(lambda: a.status()["forwarding_punted_because"], 3, "sysctl not noticed", interval=0.1)
    arrived, d = send_one(topo, a)  # the kernel forwards it
    assert arrived == 1
    assert d.get("ROUTE_UNSUPPORTED") == 1 and "FORWARDED" not in d, d


def test_agent_exits_when_its_namespace_is_deleted(routed_topology, agent):
    """`ip netns del` leaves the agent as the namespace's last user: it must
    notice and exit cleanly instead of running on as an orphan."""
    topo = routed_topology
    a = agent(topo)
    subprocess.run(["ip", "netns", "del", topo.nsname("node")], check=True)
    t0 = time.monotonic()
    assert a.proc.wait(timeout=10) == 0
    print(f"agent exited {time.monotonic() - t0:.1f} s after the namespace was deleted")
    assert "namespace was deleted" in a.log_tail(50)
