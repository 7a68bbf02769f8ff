"""`loxi-mirror explain` with a running agent, checked against real traffic.

pod1 -- veth1 [node, agent] veth2 -- pod2 (tests/integration/test_routing.py's
topology).  Frames across the routed features are explained with `explain
--pcap` (the agent runs each through the attached program as an explain
run), then sent for real from pod1: the counter that moves and what arrives
at pod2 must be what explain said.  (The stateful mode needs the agent's
flow verdicts, which this agent does not write yet: tests/bpf/test_explain_runs.py
covers it against real conntrack entries.)
"""

import json

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.utils import wrpcap
from scapy.layers.l2 import Ether

from nstest import skip_unless_root, wait_for
from test_routing import counters, delta, frame, send_and_capture, silence, warm_neighbors

pytestmark = skip_unless_root


def explain(topo, *args):
    out = topo.run("node", ["loxi-mirror", "explain", "--in", topo.node_if1, *args, "--json"]).stdout
    return json.loads(out)["results"]


def cases(topo):
    return [
        frame(topo),
        frame(topo, payload=TCP(sport=40001, dport=80, flags="A") / (b"t" * 100)),
        frame(topo, payload=ICMP(type=8, id=7, seq=1) / (b"p" * 56)),
        frame(topo, ttl=2),
        frame(topo, ttl=1),
        frame(topo, ttl=0),
        frame(topo, dst=topo.gw2_ip),
        frame(topo, dst="10.9.9.9"),
        frame(topo, src=topo.gw2_ip),
        frame(topo, chksum=0x0001),
        frame(topo, options=[IPOption_Router_Alert()]),
        frame(topo, flags="MF"),
        frame(topo, payload=UDP(sport=40000, dport=9) / (b"m" * 1420)),  # > veth2 mtu 1400
        frame(topo, dst="10.2.0.99"),  # nobody there: no neighbour
    ]


def test_explain_agrees_with_real_traffic(routed_topology, agent, tmp_path):
    topo = routed_topology
    topo.run("node", ["ip", "link", "set", topo.node_if2, "mtu", "1400"])
    a = agent(topo)
    warm_neighbors(topo)
    silence(topo)
    frames = cases(topo)
    pcap = tmp_path / "frames.pcap"
    wrpcap(str(pcap), [Ether(f) for f in frames])
    results = explain(topo, "--pcap", str(pcap))
    verdicts = [r["verdict"] for r in results]
    assert set(verdicts) >= {"FORWARDED", "TTL_EXCEEDED", "LOCAL", "NO_ROUTE", "MARTIAN", "IP_CSUM",
                             "IP_OPTIONS", "IP_FRAGMENT", "MTU_EXCEEDED", "NO_NEIGHBOR"}, verdicts
    for f, r in zip(frames, results):
        before = counters(a)
        got = send_and_capture(topo, [f], seconds=0.3)
        moved = delta(counters(a), before)
        assert moved.get(r["verdict"]) == 1, (r["verdict"], moved)
        assert moved.get("FORWARDED", 0) == (r["verdict"] == "FORWARDED"), (r["verdict"], moved)
        if r["verdict"] == "FORWARDED":
            assert [g.hex() for g in got] == [r["frame_out"]]


def test_explain_names_the_culprit(routed_topology, agent):
    topo = routed_topology
    a = agent(topo)
    warm_neighbors(topo)
    [fwd] = explain(topo, "--src", topo.pod1_ip, "--dst", topo.pod2_ip, "--proto", "tcp", "--dport", "443")
    assert fwd["verdict"] == "FORWARDED" and fwd["out"]["ttl"] == 63
    notes = {s["stage"]: s.get("note") for s in fwd["steps"]}
    assert notes["fib_route"] == f"route 10.2.0.0/24 dev {topo.node_if2} mtu 1500"
    assert notes["fib_neigh"].startswith(f"{topo.pod2_ip} dev {topo.node_if2} lladdr ")
    [none] = explain(topo, "--src", topo.pod1_ip, "--dst", "10.7.7.7")
    assert none["verdict"] == "NO_ROUTE" and none["steps"][-1]["note"] == "no route to 10.7.7.7 in the fast path table"
    [nb] = explain(topo, "--src", topo.pod1_ip, "--dst", "10.2.0.99")
    assert nb["verdict"] == "NO_NEIGHBOR" and nb["steps"][-1]["note"].startswith(f"10.2.0.99 dev {topo.node_if2}: ")

    # A native nftables forward chain: the agent cannot evaluate it, so all
    # forwarded traffic punts (iptables rules would only make flows stateful).
    topo.run("node", ["nft", "add table inet lmx; add chain inet lmx fw { type filter hook forward priority 0; }; "
                             "add rule inet lmx fw udp dport 9 drop"])
    wait_for(lambda: a.status().get("forwarding_punted_because"), 5, "agent did not see the nft forward chain")
    [nf] = explain(topo, "--src", topo.pod1_ip, "--dst", topo.pod2_ip)
    assert nf["verdict"] == "NETFILTER"
    assert nf["steps"][-1]["note"] == a.status()["forwarding_punted_because"]

    text = topo.run("node", ["loxi-mirror", "explain", "--in", topo.node_if1, "--src", topo.pod1_ip,
                             "--dst", topo.pod2_ip]).stdout
    assert "route" in text and text.strip().splitlines()[-1].startswith("verdict: punt NETFILTER")


def test_explain_without_agent_or_interface(routed_topology, agent_available):
    topo = routed_topology
    cp = topo.run("node", ["loxi-mirror", "explain", "--in", "veth1", "--src", "10.1.0.2", "--dst", "10.2.0.2"],
                  check=False)
    assert cp.returncode == 1 and "no agent running" in cp.stderr
