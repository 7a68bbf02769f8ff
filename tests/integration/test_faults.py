"""Faults the agent must survive (issue 8): a hung agent (SIGSTOP), restarts
(clean and after SIGKILL), start/stop cycles, a datapath that does not compile
or verify, full maps, interfaces churning under traffic.  Leftovers are
checked with tools/faults_check.py (tc, live BPF ids, pins, processes, state
file); tools/faults runs the long versions and records the figures."""

import json
import os
import signal
import subprocess
import time

import pytest

import faults_check as fc
import storm
from nstest import skip_unless_root, wait_for
from test_routing import HERE, PY, counters, delta, send_one, silence, warm_neighbors

pytestmark = skip_unless_root

CYCLES = 3  # start/stop cycles in the suite (~8 s each under load); `tools/faults --cycles 100` runs 100


def start_with_cflags(topo, cflags, timeout=60):
    return topo.run("node", ["env", f"LOXI_MIRROR_CFLAGS={cflags}", "loxi-mirror", "start"],
                    check=False, timeout=timeout)


def test_sigstop_falls_back_to_the_kernel_and_recovers(routed_topology, agent):
    """A hung agent: its heartbeat expires, traffic goes to the kernel (which
    also decides a route changed meanwhile); after SIGCONT it catches up."""
    topo = routed_topology
    a = agent(topo, timeout=60)
    warm_neighbors(topo)
    silence(topo)
    arrived, d = send_one(topo, a)
    assert arrived == 1 and d.get("FORWARDED") == 1, d
    c0 = counters(a)
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(1.5)  # HEARTBEAT_GRACE is 1 s
        # Behind the stopped agent's back: the kernel now drops traffic to pod2.
        topo.run("node", ["ip", "route", "add", "blackhole", f"{topo.pod2_ip}/32"])
        kernel = topo.run("pod1", ["ping", "-c", "20", "-i", "0.01", "-W", "1", "-q", topo.pod2_ip], check=False).stdout
        assert " 100% packet loss" in kernel, kernel  # the maps still say forward: they must not decide
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    d = delta(counters(a), c0)
    assert d.get("AGENT_STALE", 0) >= 20 and "FORWARDED" not in d, d
    wait_for(lambda: a.status()["ready"] and not send_one(topo, a)[0], 5, "blackhole not mirrored after SIGCONT")
    topo.run("node", ["ip", "route", "del", "blackhole", f"{topo.pod2_ip}/32"])
    wait_for(lambda: send_one(topo, a)[1].get("FORWARDED") == 1, 5, "not fast-pathed again after SIGCONT")


@pytest.mark.parametrize("how", ["stop", "kill -9"])
def test_restart_is_ready_again_without_duplicates(routed_topology, agent, how):
    topo = routed_topology
    before = fc.snapshot(topo)
    first = agent(topo, timeout=60)
    held = fc.held_by(first.proc.pid)
    if how == "stop":
        first.stop()
        assert fc.leftovers(topo, before, held) == []
    else:
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=5)
    second = agent(topo, timeout=60)
    assert fc.our_filters(fc.tc_view(topo)) == {topo.node_if1: 1, topo.node_if2: 1}
    assert not (held["progs"] | held["maps"]) & (fc.live_ids(fc.BPF_PROG_GET_NEXT_ID) | fc.live_ids(fc.BPF_MAP_GET_NEXT_ID))
    if how == "kill -9":
        assert "removed leftovers of an earlier agent on 2 interface(s)" in second.log_tail(50)
    warm_neighbors(topo)
    silence(topo)
    arrived, d = send_one(topo, second)
    assert arrived == 1 and d.get("FORWARDED") == 1, d
    held = fc.held_by(second.proc.pid)
    second.stop()
    assert fc.leftovers(topo, before, held) == []


def test_start_stop_cycles_leak_nothing(routed_topology, agent):
    topo = routed_topology
    before = fc.snapshot(topo)
    fds = []
    for _ in range(CYCLES):
        a = agent(topo, timeout=60)
        held = fc.held_by(a.proc.pid)
        fds.append(held["fds"])
        assert a.stop() == 0
        assert fc.leftovers(topo, before, held) == []
    assert len(set(fds)) == 1, f"the agent's fd count at ready differs between runs: {fds}"


@pytest.mark.parametrize("cflags, says", [
    ("-DLM_MAX_ROUTES=lm_no_such_size", "compiling tc_ingress.c failed: "),
    ("-DLM_FAULT_VERIFIER", "loading lm_tc_ingress failed: "),
])
def test_datapath_failure_is_one_clear_line_and_attaches_nothing(routed_topology, agent_available, cflags, says):
    topo = routed_topology
    before = fc.snapshot(topo)
    cp = start_with_cflags(topo, cflags)
    assert cp.returncode == 1
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "-v shows the full output" in lines[0], cp.stderr
    assert ("error:" if "compiling" in says else "invalid mem access") in lines[0]
    assert fc.leftovers(topo, before, {"progs": set(), "maps": set()}) == []
    verbose = topo.run("node", ["env", f"LOXI_MIRROR_CFLAGS={cflags}", "loxi-mirror", "start", "-v"],
                       check=False, timeout=60)
    assert verbose.returncode == 1 and len(verbose.stderr.splitlines()) > 2  # the compiler's or verifier's output


def test_full_maps_punt_new_entries_and_recover(routed_topology, agent, monkeypatch):
    """Neighbour and link maps of one entry: what does not fit punts (the
    kernel forwards it, same outcome), the agent stays up, logs it once per
    map, and writes the entries once there is room."""
    topo = routed_topology
    warm_neighbors(topo)
    monkeypatch.setenv("LOXI_MIRROR_CFLAGS", "-DLM_MAX_NEIGHBORS=1 -DLM_MAX_LINKS=1")
    a = agent(topo, timeout=60)
    st = a.status()
    assert st["unwritten"] == {"links": 1, "neighbors": 1}, st["unwritten"]
    c0 = counters(a)
    out = topo.run("pod1", ["ping", "-c", "20", "-i", "0.01", "-q", topo.pod2_ip]).stdout
    assert " 0% packet loss" in out
    d = delta(counters(a), c0)
    assert d.get("IFACE_UNMANAGED", 0) + d.get("EGRESS_UNMANAGED", 0) + d.get("NO_NEIGHBOR", 0) >= 20, d
    for _ in range(3):  # events and a resync do not repeat the warning
        topo.run("node", ["ip", "neigh", "replace", "10.2.0.77", "lladdr", "02:00:00:00:00:77", "dev", topo.node_if2])
        topo.run("node", ["ip", "neigh", "del", "10.2.0.77", "dev", topo.node_if2])
    time.sleep(0.5)
    log = a.log_tail(500)
    assert log.count("the neighbors map is full (1 entries)") == 1, log
    assert log.count("the links map is full (1 entries)") == 1, log
    # Room again: veth1 goes, and veth2's entries are written (whichever fitted first).
    topo.run("node", ["ip", "link", "del", topo.node_if1])
    wait_for(lambda: not a.status()["unwritten"], 5, "entries not written once there was room")
    dump = lambda table: json.loads(topo.run("node", ["loxi-mirror", "dump", table, "--json"]).stdout)
    assert [row["name"] for row in dump("links")] == [topo.node_if2]
    assert [(row["interface"], row["ip"]) for row in dump("neighbors")] == [(topo.node_if2, topo.pod2_ip)]
    assert a.status()["ready"]



def test_interface_churn_under_traffic(routed_topology, agent, tmp_path):
    """veth pairs created, given the route under traffic, then deleted,
    renamed or moved to another namespace as fast as `ip` can; then the
    namespace's last interfaces vanish.  The agent stays up, no probe
    reaches an interface after it was gone, its maps equal a fresh
    translation, and it holds no more file descriptors than before."""
    topo = routed_topology
    peer_ns, move_ns = topo.nsname("node") + "-peers", topo.nsname("node") + "-moved"
    for ns in (peer_ns, move_ns):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        a = agent(topo, timeout=60)
        warm_neighbors(topo)
        fds = fc.held_by(a.proc.pid)["fds"]
        c0 = counters(a)
        arrivals = subprocess.Popen(["ip", "netns", "exec", peer_ns, PY, f"{HERE}/probes.py", "arrivals", "8"],
                                    stdout=subprocess.PIPE, text=True)
        assert arrivals.stdout.readline().strip() == "ready"
        sender = topo.popen("pod1", [PY, f"{HERE}/probes.py", "send", topo.pod1_if, topo.pod1_mac, topo.node_mac1,
                                     topo.pod1_ip, "10.201.0.5", "5.5"], stdout=subprocess.PIPE, text=True)
        churn = json.loads(topo.run("node", [PY, f"{HERE}/churn.py", peer_ns, move_ns, "5"], timeout=120).stdout)
        sent = int(sender.communicate(timeout=30)[0])
        got = json.loads(arrivals.communicate(timeout=30)[0].splitlines()[-1])
        gone = churn["gone"]
        late = [(name, seq, t - gone[name]) for name, seq, t, _ in got if name in gone and t > gone[name]]
        print(f"{churn['cycles']} interfaces churned in 5 s; {sent} probes sent, {len(got)} arrived on churned "
              f"interfaces, {len(late)} after their interface was gone")
        assert late == [], late[:10]
        assert churn["cycles"] >= 20 and len(got) > 0
        st = a.status()
        assert st["ready"] and a.running()
        assert delta(counters(a), c0).get("FORWARDED", 0) > 0  # the fast path carried probes to churned ones
        quiet = tmp_path / "quiet.batch"
        quiet.write_text("link show dev lo\n")
        check = [PY, f"{HERE}/resync_check.py", str(quiet), "10", "--all"]
        result = json.loads(topo.run("node", check, timeout=60).stdout)
        assert result["ms"] is not None, result
        assert fc.held_by(a.proc.pid)["fds"] == fds
        # The namespace's last interfaces (lo aside) vanish.
        for dev in (topo.node_if1, topo.node_if2):
            topo.run("node", ["ip", "link", "del", dev])
        wait_for(lambda: a.status()["interfaces"] == [], 5, "interfaces still listed after they vanished")
        result = json.loads(topo.run("node", check, timeout=60).stdout)
        assert result["ms"] is not None, result
        assert a.status()["ready"] and a.running()
    finally:
        for ns in (peer_ns, move_ns):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def test_change_storms_never_forward_after_the_agent_applied_them(routed_topology, agent):
    """20,000 route changes with a route deleted amid them, then an
    iptables-restore of 5,000 rules whose last drops the probes, both under
    probe traffic.  The old state may decide until the agent has applied the
    change (tools/faults measures that window); after it, never."""
    topo = routed_topology
    a = agent(topo, timeout=60)
    routes = storm.route_storm(topo, a.proc.pid, changes=20000)
    print("route storm:", routes)
    assert routes["window_ms"] is not None, routes  # the maps did stop deciding
    assert routes["arrived_before_delete"] > 0  # probes were fast-pathed: the check is not blind
    assert routes["after_applied"] == 0, routes
    rules = storm.nf_storm(topo, a.proc.pid, rules=5000)
    print("iptables storm:", rules)
    assert rules["probes_arrived"] > 0 and rules["punting_from_ms"] is not None, rules
    assert rules["after_commit"] == 0, rules
    assert a.status()["ready"]
