"""Metrics endpoint and `top` of a real agent carrying real traffic."""

import json
import re
import socket

from prometheus_client.parser import text_string_to_metric_families

from nstest import skip_unless_root, wait_for

pytestmark = skip_unless_root

SCRAPE = ("import sys, urllib.request; "
          "sys.stdout.write(urllib.request.urlopen('http://%s/metrics', timeout=5).read().decode())")


def _free_port():
    with socket.socket() as s:  # any free port number; the endpoint lives in the node namespace
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(t, python, address):
    text = t.run("node", [python, "-c", SCRAPE % address]).stdout
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_endpoint_scraped_and_parsed(routed_topology, agent):
    import sys
    t = routed_topology
    address = f"127.0.0.1:{_free_port()}"
    t.run("node", ["ip", "link", "set", "lo", "up"])
    a = agent(t, "--metrics", address)
    t.run("pod1", ["ping", "-c", "20", "-i", "0.01", "-W", "1", t.pod2_ip])
    wait_for(lambda: _scrape(t, sys.executable, address).get(("loxi_mirror_fast_path_packets_total", ()), 0) >= 30,
             10, "fast-path packets never showed up in the metrics")
    m = _scrape(t, sys.executable, address)
    st = a.status()
    assert m[("loxi_mirror_ready", ())] == 1
    assert m[("loxi_mirror_table_capacity", (("table", "routes"),))] == st["table_capacity"]["routes"] > 0
    assert m[("loxi_mirror_table_entries", (("table", "routes"),))] == st["tables"]["routes"]
    assert m[("loxi_mirror_reconcile_seconds_count", ())] >= 0
    assert ("loxi_mirror_punted_packets_total", (("reason", "NO_ROUTE"),)) in m
    assert m[("loxi_mirror_fast_path_packets_total", ())] <= st["counters"]["fast_path_packets"]


def _per_interface(m, family, **labels):
    return {dict(lb)["interface"]: v for (name, lb), v in m.items()
            if name == family and all(dict(lb).get(k) == want for k, want in labels.items())}


def test_metrics_per_interface_and_reason(routed_topology, agent):
    """Echo requests arrive on veth1 and replies on veth2, both fast-pathed;
    packets to an address without a route punt NO_ROUTE on veth1 only."""
    import sys
    t = routed_topology
    address = f"127.0.0.1:{_free_port()}"
    t.run("node", ["ip", "link", "set", "lo", "up"])
    a = agent(t, "--metrics", address)
    t.run("pod1", ["ping", "-c", "30", "-i", "0.01", "-W", "1", t.pod2_ip])
    t.run("pod1", ["ping", "-c", "5", "-i", "0.01", "-W", "0.2", "10.99.0.1"], check=False)
    fast = "loxi_mirror_interface_fast_path_packets_total"
    punted = "loxi_mirror_interface_punted_packets_total"

    def counted():
        m = _scrape(t, sys.executable, address)
        f, p = _per_interface(m, fast), _per_interface(m, punted, reason="NO_ROUTE")
        return (f.get(t.node_if1, 0) >= 25 and f.get(t.node_if2, 0) >= 25 and p.get(t.node_if1, 0) >= 5) and m
    m = wait_for(counted, 10, "per-interface counts never showed up in the metrics")
    assert _per_interface(m, punted, reason="NO_ROUTE").get(t.node_if2, 0) == 0
    # The breakdown adds up to the totals of the same scrape.
    assert sum(_per_interface(m, fast).values()) == m[("loxi_mirror_fast_path_packets_total", ())]
    assert sum(_per_interface(m, punted, reason="NO_ROUTE").values()) == \
        m[("loxi_mirror_punted_packets_total", (("reason", "NO_ROUTE"),))]
    st = a.status()["counters"]["interfaces"]
    assert st[t.node_if1]["fast_path_packets"] >= m[(fast, (("interface", t.node_if1),))]


def test_no_metrics_port_unless_asked(routed_topology, agent):
    t = routed_topology
    agent(t)
    listening = t.run("node", ["ss", "-Hltn"]).stdout.strip()
    assert listening == "", listening


def test_top_shows_rates(routed_topology, agent):
    t = routed_topology
    agent(t)
    pinger = t.popen("pod1", ["ping", "-i", "0.01", "-c", "300", t.pod2_ip])
    try:
        out = t.run("node", ["loxi-mirror", "top", "--interval", "0.5", "--count", "2"]).stdout
    finally:
        t.kill(pinger)
    lines = [l for l in out.splitlines() if l.startswith("FORWARDED")]
    assert len(lines) == 2 and float(lines[-1].split()[1].replace(",", "")) > 0, out
    # Per interface: requests come in on veth1, replies on veth2, both fast.
    last = out.split("loxi-mirror top")[-1].splitlines()
    rows = {l.split()[0]: l.split() for l in last if l.startswith(("veth1 ", "veth2 "))}
    assert set(rows) == {"veth1", "veth2"}, out
    assert all(float(r[1].replace(",", "")) > 0 for r in rows.values()), out


def test_status_summary_plain_and_rich(routed_topology, agent):
    import io

    from rich.console import Console

    from mirror.observe import status_view

    t = routed_topology
    t.run("node", ["ip", "link", "add", "xa0", "type", "veth", "peer", "name", "xa1"])
    a = agent(t, "--exclude", "xa.*")
    t.run("pod1", ["ping", "-c", "20", "-i", "0.01", t.pod2_ip])
    t.run("pod1", ["ping", "-c", "3", "-i", "0.01", "-W", "0.2", "10.99.0.1"], check=False)  # no route: punted
    wait_for(lambda: a.status()["counters"]["punt"].get("NO_ROUTE", 0) >= 3, 5, "NO_ROUTE punts not counted")
    text = t.run("node", ["loxi-mirror", "status"]).stdout
    assert "skipped xa0: left out by --include/--exclude" in text
    assert "routes " in text and f"/{a.status()['table_capacity']['routes']}" in text
    assert "NO_ROUTE" in text and "no route in the fast path table" in text
    veth1 = next(l for l in text.splitlines() if l.startswith("  veth1: "))
    assert re.search(r"^  veth1: \d+ fast path, \d+ punted/dropped \(.*NO_ROUTE [3-9]", veth1), text
    buf = io.StringIO()
    status_view.render_rich(a.status(), Console(file=buf, force_terminal=True, width=160))
    rich_text = buf.getvalue()
    assert "attached" in rich_text and "NO_ROUTE" in rich_text and "capacity" in rich_text
