"""Bridged pods under br_netfilter with iptables rules (issue 6, bridges):
the kernel alone vs loxi-mirror on the same traffic.

pod1 (10.1.0.11) --vp1-- [br1 in the node: iptables, agent] --vp2-- pod2
(10.1.0.12).  bridge-nf-call-iptables is 1 (the default here), so every
frame between the pods meets the IPv4 hooks and conntrack; the fast path
continues a flow only through the kernel's entry and the verdict of the
rules for the bridged packet (-i/-o br1, physdev vp1/vp2).
"""

import json
import os
import time

import pytest

from nstest import skip_unless_root, unique_name
from test_stateful import (HERE, both, conntrack, counters, delta, fast_share, iperf, policy_scenario,
                           rule_inserted_mid_flow, server, shape, talk)
from topology import BridgedTopology

pytestmark = skip_unless_root


@pytest.fixture
def pods(require_root):
    with BridgedTopology(unique_name("lmbs"), unique=False, bridges=1, pods=2, ipv6=False) as topo:
        yield topo


def warm(t):
    """ARP and FDB learned both ways (through the kernel) before any scenario."""
    for k, j in ((1, 2), (2, 1)):
        t.run(f"pod{k}", ["ping", "-c", "1", "-W", "1", t.pod_ip(j)], check=False)


# tests/data/iptables/docker28-usernet-portmap.rules (Docker 28 chains) with its
# network on this bridge: bridge1 -> br1, 192.0.2.0/24 -> 10.1.0.0/24, the
# published container 192.0.2.2 -> pod2 (10.1.0.12).
def docker28(t):
    text = open(os.path.join(HERE, "..", "data", "iptables", "docker28-usernet-portmap.rules")).read()
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return (text.replace("bridge1", "br1").replace("192.0.2.0/24", "10.1.0.0/24")
            .replace("192.0.2.2", t.pod2_ip)) + "\n"


def physdev_policy(t):
    """A stateful policy on bridged traffic: DROP policy, established flows
    accepted, pod1 -> pod2 TCP 5201 allowed by port (physdev), UDP 7000 too."""
    return f"""*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate INVALID -j DROP
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -i br1 -o br1 -m physdev --physdev-in {t.port_name(1)} --physdev-out {t.port_name(2)} -p tcp -m tcp --dport 5201 -j ACCEPT
-A FORWARD -m physdev --physdev-in {t.port_name(1)} --physdev-is-bridged -p udp -m udp --dport 7000 -j ACCEPT
COMMIT
"""


def test_docker_bridge_pod_to_pod_through_conntrack(pods, agent):
    """Docker 28's chains: TCP and UDP between two pods of the bridge work,
    are carried by the fast path once taken over, and the kernel's entries
    are the ones Linux alone has (state, ASSURED, established timeout)."""
    t = pods
    warm(t)

    def scenario(a):
        c0 = counters(a)
        tcp = iperf(t, t.pod2_ip, 5201, seconds=3)
        udp = iperf(t, t.pod2_ip, 5202, seconds=2, udp=True)
        d = delta(counters(a), c0)
        echo = server(t, "pod2", "tcp-echo", 5203)
        p = talk(t, "pod1", t.pod2_ip, 5203, 2, end="hold:3")
        r = json.loads(p.stdout.readline())
        time.sleep(0.5)  # delayed ACKs out: with data unacknowledged the kernel's timeout is 300 s
        entries = [e for e in conntrack(t, "-p", "tcp", "--dport", "5203") if e["state"] == "ESTABLISHED"]
        p.wait(10)
        t.kill(echo)
        talked = r["error"] is None and r["echoed"] == r["sent"]
        return {"tcp": tcp > 10_000_000, "udp": udp > 1_000_000, "talk": talked,
                "entries": [shape(e, e["orig"]["sport"]) for e in entries],
                "timeouts": [e["timeout"] for e in entries]}, d

    (alone, _), (mirrored, d), a = both(t, agent, docker28(t), scenario)
    assert alone["tcp"] and alone["udp"] and alone["talk"]
    assert {k: v for k, v in mirrored.items() if k != "timeouts"} == {k: v for k, v in alone.items() if k != "timeouts"}
    assert alone["entries"] and all(e[4] == ("ASSURED",) for e in alone["entries"])
    assert all(to > 431990 for to in alone["timeouts"] + mirrored["timeouts"]), (alone, mirrored)
    assert fast_share(d) > 0.9, d
    assert a.status()["offload"]["written"] >= 4  # both directions of both data connections
    rows = json.loads(t.run("node", ["loxi-mirror", "dump", "conntrack", "--json"]).stdout)
    carried = {(r["in"], r["out"], r["rule"].split(" ", 1)[1]) for r in rows if r["bridged"] and r["packets"]}
    assert (t.port_name(1), t.port_name(2), "filter DOCKER-CT #2") in carried, rows  # -o br1 ESTABLISHED


def test_stateful_physdev_policy_on_bridged_traffic(pods, agent):
    """FORWARD DROP, ESTABLISHED accepted, one port allowed by physdev: the
    allowed flow is fast, the reverse direction cannot open connections and
    ping (not allowed) fails, as with Linux alone."""
    t = pods
    warm(t)

    (alone, _), (mirrored, d), _ = both(t, agent, physdev_policy(t), lambda a: policy_scenario(t, a))
    assert alone == {"allowed_bytes": True, "reverse_connects": False, "ping": False}
    assert mirrored == alone
    assert fast_share(d) > 0.9, d


NO_RULES = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"


@pytest.mark.parametrize("rules,rule", [
    ("physdev", "FORWARD -m physdev --physdev-in {port1} -j DROP"),
    ("docker28", "DOCKER-USER -s {pod1} -j DROP"),
    ("none", "FORWARD -m physdev --physdev-in {port1} -j DROP"),  # the first rule: switched without conntrack until then
], ids=["physdev", "docker-user", "first-rule"])
def test_rule_inserted_mid_flow_drops_the_next_bridged_packet(pods, agent, rules, rule):
    t = pods
    warm(t)
    rule = rule.format(port1=t.port_name(1), pod1=t.pod1_ip).split()
    ruleset = {"physdev": physdev_policy, "docker28": docker28, "none": lambda t: NO_RULES}[rules](t)
    (alone, _), (mirrored, c0), _ = both(t, agent, ruleset, lambda a: rule_inserted_mid_flow(t, a, rule))
    assert alone == {"late": [], "before": True, "sent_after": True}
    assert mirrored == alone
    assert c0.get("FORWARDED", 0) > 100  # the flow was on the fast path when the rule came
