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
