"""`loxi-mirror dump rules`: every iptables rule of both backends, as the agent
classifies it (compiled, punt with a reason, unused), and native nft tables on
the forward path reported as unsupported."""

import json
import shutil

import pytest

from nstest import skip_unless_root, wait_for

pytestmark = skip_unless_root


def dump_rules(topo, *extra):
    cp = topo.run("node", ["loxi-mirror", "dump", "rules", *extra])
    return cp.stdout if extra != ("--json",) else json.loads(cp.stdout)


@pytest.mark.skipif(not (shutil.which("iptables-nft") and shutil.which("iptables-legacy")),
                    reason="needs iptables-nft and iptables-legacy")
def test_dump_rules_both_backends(routed_topology, agent):
    topo = routed_topology
    agent(topo)
    topo.run("node", ["iptables-nft", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED",
                      "-j", "ACCEPT"])
    topo.run("node", ["iptables-nft", "-A", "FORWARD", "-m", "length", "--length", "0:100", "-j", "LOG"])
    topo.run("node", ["iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-o", "veth2", "-j", "MASQUERADE"])

    def three_rules():
        rows = dump_rules(topo, "--json")
        return rows if len(rows) == 3 else None
    rows = wait_for(three_rules, 10, "three rules in dump rules")
    by = {(r["backend"], r["table"], r["chain"], r["index"]): r for r in rows}
    assert by[("iptables-nft", "filter", "FORWARD", 1)]["status"] == "compiled"
    log = by[("iptables-nft", "filter", "FORWARD", 2)]
    assert log["status"] == "punt" and "length" in log["reason"] and "LOG" in log["reason"]
    masq = by[("iptables-legacy", "nat", "POSTROUTING", 1)]
    assert masq["status"] == "unused" and "nat" in masq["reason"]
    text = dump_rules(topo)
    assert "iptables-nft filter FORWARD #2: punt" in text and "-A FORWARD" in text


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft")
def test_dump_rules_reports_native_nft_tables(routed_topology, agent):
    topo = routed_topology
    agent(topo)
    topo.run("node", ["nft", "add table inet lmt; add chain inet lmt fw1 { type filter hook forward priority 0; }; "
                             "add rule inet lmt fw1 counter"])
    rows = wait_for(lambda: [r for r in dump_rules(topo, "--json") if r["backend"] == "*"] or None, 10,
                    "the native table in dump rules")
    assert rows[0]["status"] == "punt" and "nft inet lmt fw1" in rows[0]["reason"]


def test_dump_rules_shows_fast_path_packets_beside_the_kernels(routed_topology, agent):
    """The kernel's rule counters only see what the kernel forwarded; dump
    rules puts the fast path's packets (per deciding rule) beside them."""
    from test_stateful import iperf

    topo = routed_topology
    topo.run("node", ["iptables-nft", "-P", "FORWARD", "DROP"])
    topo.run("node", ["iptables-nft", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
                      "-j", "ACCEPT"])
    topo.run("node", ["iptables-nft", "-A", "FORWARD", "-s", topo.pod1_ip, "-d", topo.pod2_ip, "-j", "ACCEPT"])
    agent(topo)
    assert iperf(topo, topo.pod2_ip, 5201, seconds=2) > 0

    def established_rule():
        rows = dump_rules(topo, "--json")
        row = next((r for r in rows if (r["table"], r["chain"], r["index"]) == ("filter", "FORWARD", 1)), None)
        return row if row and row["fast_path_packets"] > 1000 else None
    row = wait_for(established_rule, 10, "fast-path packets counted for the ESTABLISHED rule")
    # The kernel counted the packets it forwarded itself (before the takeover), far fewer.
    assert row["kernel_packets"] is not None and row["kernel_packets"] < row["fast_path_packets"]
    assert "fast path" in dump_rules(topo)
