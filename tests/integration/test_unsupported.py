"""Unsupported configuration (issue 8): each kind punts with a named reason,
visible in status/dump, and the agent logs it in ONE line per object, not
again per event, netfilter re-read or resync.  One agent serves the module;
each case adds its configuration and removes it again."""

import json
import subprocess
import sys
import time

import pytest

import topology
from nstest import skip_unless_root, unique_name, wait_for

pytestmark = skip_unless_root

XDP_PASS = """
import struct, sys
from pyroute2 import IPRoute
from mirror.bpfsys import prog_load
prog = struct.pack("<BBhi", 0xb7, 0, 0, 2) + struct.pack("<BBhi", 0x95, 0, 0, 0)  # r0 = XDP_PASS; exit
fd = prog_load(6, prog)  # BPF_PROG_TYPE_XDP
ipr = IPRoute()
ipr.link("set", index=ipr.link_lookup(ifname=sys.argv[1])[0], xdp_fd=fd)
"""


@pytest.fixture(scope="module")
def node():
    if not topology.agent_available():
        pytest.skip("loxi-mirror is not on PATH or its CLI does not load (run tools/setup)")
    with topology.RoutedTopology(unique_name("lmu"), unique=False) as topo:
        a = topology.Agent(topo, args=["-v"])
        a.start(timeout=60)
        try:
            yield topo, a
        finally:
            a.stop()


def dump(topo, table):
    return json.loads(topo.run("node", ["loxi-mirror", "dump", table, "--json"]).stdout)


def unrelated_changes(topo):
    """Events and a netfilter re-read that change nothing about the case."""
    for _ in range(3):
        topo.run("node", ["ip", "route", "add", "10.66.0.0/16", "via", topo.pod2_ip])
        topo.run("node", ["ip", "route", "del", "10.66.0.0/16"])
        topo.run("node", ["iptables", "-N", "lmt-unrelated"])
        topo.run("node", ["iptables", "-X", "lmt-unrelated"])
    time.sleep(1.0)


def skip_unless_kind(topo, *args):
    """args: what follows `ip link add NAME` (`[link DEV] type KIND ...`)."""
    kind = args[args.index("type") + 1]
    cp = topo.run("node", ["ip", "link", "add", "lmt-probe", *args], check=False)
    if cp.returncode != 0:
        pytest.skip(f"this kernel has no {kind} devices: {cp.stderr.strip()}")
    topo.run("node", ["ip", "link", "del", "lmt-probe"])


def interface_skipped(name, why):
    return lambda topo, a: a.status()["skipped_interfaces"].get(name, "").startswith(why)


def route_punts(prefix):
    return lambda topo, a: [r["action"] for r in dump(topo, "routes") if r["prefix"] == prefix] == ["punt:ROUTE_UNSUPPORTED"]


def forwarding_punts(why):
    return lambda topo, a: why in (a.status()["forwarding_punted_because"] or "")


def rule_punts(text, why):
    return lambda topo, a: any(text in r["rule"] and r["status"] == "punt" and why in r["reason"]
                               for r in dump(topo, "rules"))


# (id, kernel kind needed, setup commands, undo commands, the punt is visible, log line)
CASES = [
    ("macvlan", ("link", "veth1", "type", "macvlan"), [["ip", "link", "add", "lmt-mv", "link", "veth1", "type", "macvlan"]],
     [["ip", "link", "del", "lmt-mv"]], interface_skipped("lmt-mv", "macvlan interfaces are not handled"),
     "unsupported interface lmt-mv: macvlan interfaces are not handled yet"),
    ("tun", None, [["ip", "tuntap", "add", "mode", "tun", "name", "lmt-tun"]], [["ip", "link", "del", "lmt-tun"]],
     interface_skipped("lmt-tun", "not an Ethernet interface"), "unsupported interface lmt-tun: not an Ethernet"),
    ("ipip", ("type", "ipip", "remote", "10.9.9.9"), [["ip", "link", "add", "lmt-ipip", "type", "ipip", "remote", "10.9.9.9"]],
     [["ip", "link", "del", "lmt-ipip"]], interface_skipped("lmt-ipip", "not an Ethernet"), "unsupported interface lmt-ipip"),
    ("bond", ("type", "bond"), [["ip", "link", "add", "lmt-bond", "type", "bond"]], [["ip", "link", "del", "lmt-bond"]],
     interface_skipped("lmt-bond", "bond interfaces"), "unsupported interface lmt-bond: bond interfaces"),
    ("team", ("type", "team"), [["ip", "link", "add", "lmt-team", "type", "team"]], [["ip", "link", "del", "lmt-team"]],
     interface_skipped("lmt-team", "team interfaces"), "unsupported interface lmt-team: team interfaces"),
    ("ipvlan", ("link", "veth1", "type", "ipvlan"), [], [], None, None),
    ("vrf", ("type", "vrf", "table", "10"), [], [], None, None),
    ("wireguard", ("type", "wireguard"), [], [], None, None),
    ("blackhole route", None, [["ip", "route", "add", "blackhole", "10.77.0.0/16"]],
     [["ip", "route", "del", "blackhole", "10.77.0.0/16"]], route_punts("10.77.0.0/16"),
     "unsupported route 10.77.0.0/16: blackhole route"),
    ("multipath route", None, [["ip", "route", "add", "10.78.0.0/16", "nexthop", "via", "10.1.0.2", "realm", "1",
                                "nexthop", "via", "10.2.0.2"]],
     [["ip", "route", "del", "10.78.0.0/16"]], route_punts("10.78.0.0/16"),
     "unsupported route 10.78.0.0/16: attributes not mirrored: RTA_FLOW"),
    ("policy rule", None, [["ip", "rule", "add", "from", "10.9.0.0/16", "realms", "1", "table", "100", "pref", "100"]],
     [["ip", "rule", "del", "pref", "100"]], forwarding_punts("policy routing: rule pref 100: FRA_FLOW"),
     "unsupported setting forwarding: all forwarded traffic punts: policy routing: rule pref 100: FRA_FLOW"),
    ("iptables match", None, [["iptables", "-A", "FORWARD", "-p", "udp", "-m", "limit", "--limit", "1/s", "-j", "ACCEPT"]],
     [["iptables", "-F", "FORWARD"]], rule_punts("-m limit", "limit"),
     "unsupported iptables rule iptables-nft filter FORWARD '-p udp -m limit --limit 1/sec -j ACCEPT'"),
    ("iptables target", None, [["iptables", "-A", "FORWARD", "-p", "udp", "-j", "LOG"]], [["iptables", "-F", "FORWARD"]],
     rule_punts("-j LOG", "LOG"), "unsupported iptables rule iptables-nft filter FORWARD '-p udp -j LOG': target LOG"),
    ("ipset", None, [["ipset", "create", "lmt-set", "hash:ip"],
                     ["iptables", "-A", "FORWARD", "-m", "set", "--match-set", "lmt-set", "src", "-j", "DROP"]],
     [["iptables", "-F", "FORWARD"], ["ipset", "destroy", "lmt-set"]], rule_punts("--match-set", ""),
     "unsupported iptables rule iptables-nft filter FORWARD '-m set --match-set lmt-set src -j DROP'"),
    ("nftables table", None, [["nft", "add table inet lmt; add chain inet lmt lmtforward { type filter hook forward priority 0; }; add rule inet lmt lmtforward udp dport 9 counter"]],
     [["nft", "delete table inet lmt"]], forwarding_punts("nft"), "unsupported setting forwarding: all forwarded traffic punts: netfilter"),
    ("tc filter after ours", None, [["tc", "filter", "add", "dev", "veth1", "ingress", "pref", "65521", "u32",
                                     "match", "u32", "0", "0"]],
     [["tc", "filter", "del", "dev", "veth1", "ingress", "pref", "65521"]],
     interface_skipped("veth1", "a tc ingress filter runs after the agent's"),
     "unsupported interface veth1: a tc ingress filter runs after the agent's"),
    ("xdp on the veth peer", None, [["pod1", sys.executable, "-c", XDP_PASS, "eth0"]],
     [["pod1", "ip", "link", "set", "dev", "eth0", "xdp", "off"]],
     lambda topo, a: "redirect_peer" not in [r for r in dump(topo, "links") if r["name"] == "veth1"][0]["flags"],
     "unsupported veth peer veth1: an XDP program on the peer"),
]


def run(topo, cmd):
    ns = "node"
    if cmd[0] == "pod1":
        ns, cmd = "pod1", cmd[1:]
    if cmd[0] == "nft":
        cmd = ["nft", cmd[1]]
    topo.run(ns, cmd)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_unsupported_configuration_punts_and_is_logged_once(node, case):
    topo, a = node
    _, kind, setup, undo, visible, line = case
    if kind is not None:
        skip_unless_kind(topo, *kind)
    for cmd in setup:
        run(topo, cmd)
    try:
        wait_for(lambda: visible(topo, a), 5, f"{case[0]}: no punt reason shown")
        unrelated_changes(topo)
        assert visible(topo, a)
        log = a.log_tail(3000)
        assert log.count(line) == 1, f"{line!r} logged {log.count(line)} times:\n{log[-3000:]}"
    finally:
        for cmd in undo:
            run(topo, cmd)


def test_a_resync_does_not_repeat_the_lines(routed_topology, agent, monkeypatch):
    """Lost events (a tiny netlink buffer and a burst) make the agent re-dump
    and re-translate everything: what it logged stays logged once."""
    topo = routed_topology
    monkeypatch.setenv("LOXI_MIRROR_NETLINK_RCVBUF", "4096")
    topo.run("node", ["ip", "route", "add", "blackhole", "10.77.0.0/16"])
    topo.run("node", ["ip", "tuntap", "add", "mode", "tun", "name", "lmt-tun"])
    a = agent(topo, timeout=60)
    burst = [f"route add 10.{100 + i // 256}.{i % 256}.0/24 via {topo.pod2_ip}" for i in range(3000)]
    burst += [line.replace("add", "del", 1).split(" via ")[0] for line in burst]
    for _ in range(2):
        topo.run("node", ["ip", "-batch", "-"], input="\n".join(burst) + "\n")
    wait_for(lambda: a.status()["resyncs"] >= 1 and a.status()["tables"]["routes"] < 100, 20, "no resync")
    log = a.log_tail(5000)
    for line in ("unsupported route 10.77.0.0/16: blackhole route", "unsupported interface lmt-tun: not an Ethernet"):
        assert log.count(line) == 1, f"{line!r} logged {log.count(line)} times"
