"""Stateful fast path (issue 6): iptables rules and NAT through the kernel's own
conntrack, with the kernel alone as the oracle.

pod1 (10.1.0.2) -- veth1 [node: iptables, agent] veth2 -- pod2 (10.2.0.2).  Every
test runs the same traffic through the node twice, first with Linux alone, then
with loxi-mirror, and compares what the pods and the node's conntrack table saw;
the agent's counters say the flows were really carried by the fast path.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from nstest import skip_unless_root, wait_for

pytestmark = skip_unless_root

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
FLOWIO = os.path.join(HERE, "flowio.py")

# A host firewall: DROP policy, established flows accepted, one TCP and one
# UDP port allowed from pod1 to pod2, INVALID dropped (kube-proxy, ufw ...).
STATEFUL = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate INVALID -j DROP
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -i veth1 -o veth2 -p tcp -m tcp --dport 5201 -j ACCEPT
-A FORWARD -i veth1 -o veth2 -p udp -m udp --dport 7000 -j ACCEPT
COMMIT
"""

# ../shared/fixtures/iptables/docker28-usernet-portmap.rules (Docker 28, 'docker run
# --network bridge1 -p 8080:80'), with the container network moved to pod2's side:
# bridge1 -> veth2, 192.0.2.2:80 -> 10.2.0.2:5201.  docker0 rules stay (no such device).
DOCKER28 = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-BRIDGE - [0:0]
:DOCKER-CT - [0:0]
:DOCKER-FORWARD - [0:0]
:DOCKER-INTERNAL - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-FORWARD
-A DOCKER -d 10.2.0.2/32 ! -i veth2 -o veth2 -p tcp -m tcp --dport 5201 -j ACCEPT
-A DOCKER ! -i docker0 -o docker0 -j DROP
-A DOCKER ! -i veth2 -o veth2 -j DROP
-A DOCKER-BRIDGE -o docker0 -j DOCKER
-A DOCKER-BRIDGE -o veth2 -j DOCKER
-A DOCKER-CT -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A DOCKER-CT -o veth2 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A DOCKER-FORWARD -j DOCKER-CT
-A DOCKER-FORWARD -j DOCKER-INTERNAL
-A DOCKER-FORWARD -j DOCKER-BRIDGE
-A DOCKER-FORWARD -i docker0 -j ACCEPT
-A DOCKER-FORWARD -i veth2 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 10.2.0.0/24 ! -o veth2 -j MASQUERADE
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER ! -i veth2 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.2.0.2:5201
-A DOCKER ! -i veth2 -p udp -m udp --dport 9000 -j DNAT --to-destination 10.2.0.2:7000
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -d 10.2.0.2/32 ! -i veth2 -j DROP
COMMIT
"""


def kube_proxy_rules(vip, endpoints, other_services=300):
    """kube-proxy's iptables mode (tests/data/iptables/kube-proxy-test-overall-rules.restore
    shape): KUBE-SERVICES -> KUBE-SVC (statistic) -> KUBE-SEP DNAT, KUBE-MARK-MASQ +
    MASQUERADE --random-fully, KUBE-FORWARD with INVALID DROP, and other services."""
    nat = [":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
           ":POSTROUTING ACCEPT [0:0]", ":KUBE-SERVICES - [0:0]", ":KUBE-MARK-MASQ - [0:0]",
           ":KUBE-POSTROUTING - [0:0]", ":KUBE-SVC-TEST - [0:0]"]
    nat += [f":KUBE-SEP-{i} - [0:0]" for i in range(len(endpoints))]
    nat += [f":KUBE-SVC-OTHER{i} - [0:0]" for i in range(other_services)]
    nat += ['-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
            '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
            "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
            '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
            "-j MASQUERADE --random-fully"]
    nat += [f"-A KUBE-SERVICES -d 10.97.{i // 250}.{i % 250 + 1}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-OTHER{i}"
            for i in range(other_services)]
    nat += [f"-A KUBE-SVC-OTHER{i} -j KUBE-MARK-MASQ" for i in range(other_services)]
    nat.append(f"-A KUBE-SERVICES -d {vip}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-TEST")
    nat.append(f"-A KUBE-SVC-TEST ! -s 10.244.0.0/16 -d {vip}/32 -p tcp -m tcp --dport 80 -j KUBE-MARK-MASQ")
    for i, ep in enumerate(endpoints):
        left = len(endpoints) - i
        stat = f"-m statistic --mode random --probability {1 / left:.11f} " if left > 1 else ""
        nat.append(f"-A KUBE-SVC-TEST {stat}-j KUBE-SEP-{i}")
        nat.append(f"-A KUBE-SEP-{i} -s {ep}/32 -j KUBE-MARK-MASQ")
        nat.append(f"-A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination {ep}:5201")
    filt = [":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":KUBE-FORWARD - [0:0]",
            '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
            '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT',
            '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"]
    return "\n".join(["*nat", *nat, "COMMIT", "*filter", *filt, "COMMIT", ""])


# -- helpers ---------------------------------------------------------------
def load_rules(topo, rules):
    topo.run("node", ["iptables-restore"], input=rules)


def counters(a):
    if a is None:
        return {}
    c = a.status()["counters"]
    return dict(c["punt"], FORWARDED=c["fast_path_packets"])


def delta(after, before):
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}


def fast_share(d):
    """Share of the packets the fast path forwarded.  Holds for netfilter
    changes elsewhere do not count: the xtables lock is shared by every
    namespace, so other tests' iptables-legacy calls hold forwarding here too."""
    total = sum(v for k, v in d.items() if k != "NETFILTER_CHANGING")
    return d.get("FORWARDED", 0) / total if total else 0.0


def iperf(topo, dst, port, server_port=None, seconds=3, udp=False):
    """iperf3 pod1 -> dst:port (server in pod2 on server_port); bytes received or 0."""
    srv = topo.popen("pod2", ["iperf3", "-s", "-1", "-p", str(server_port or port)], stdout=subprocess.DEVNULL)
    topo.wait_listen("pod2", server_port or port, proc=srv)
    args = ["iperf3", "-c", dst, "-p", str(port), "-t", str(seconds), "-J", "--connect-timeout", "2000"]
    cp = topo.run("pod1", args + (["-u", "-b", "200M"] if udp else []), check=False, timeout=seconds + 30)
    topo.kill(srv)
    try:
        end = json.loads(cp.stdout)["end"]
    except (ValueError, KeyError):
        return 0
    return int((end.get("sum_received") or end.get("sum") or {}).get("bytes", 0))


def server(topo, ns, *args):
    p = topo.popen(ns, [PY, "-u", FLOWIO, *map(str, args)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def talk(topo, ns, dst, port, seconds, interval=0.01, end="fin"):
    """tcp-talk in the background: returns the Popen (JSON on stdout)."""
    return topo.popen(ns, [PY, "-u", FLOWIO, "tcp-talk", dst, str(port), str(seconds), str(interval), end],
                      stdout=subprocess.PIPE, text=True)


def result(proc, timeout=30):
    out, _ = proc.communicate(timeout=timeout)
    return json.loads(out.splitlines()[-1])


def conntrack(topo, *filters):
    """The node's conntrack entries as normalised dicts."""
    out = topo.run("node", ["conntrack", "-L", *filters], check=False).stdout
    return [parse_ct(line) for line in out.splitlines() if line.strip()]


def parse_ct(line):
    words = line.split()
    kv = [w.split("=", 1) for w in words if "=" in w]
    half = len([k for k, _ in kv if k == "src"]) and [i for i, (k, _) in enumerate(kv) if k == "src"][1]
    orig, reply = dict(kv[:half]), dict(kv[half:])
    state = next((w for w in words[3:5] if w.isupper() and "=" not in w), None)
    return {"proto": words[0], "timeout": int(words[2]), "state": state, "orig": orig, "reply": reply,
            "flags": sorted(re.findall(r"\[(\w+)\]", line))}


def shape(entry, client_port=None):
    """An entry without what legitimately differs between two runs (the
    client's ephemeral port, the timeout's exact second)."""
    def side(d):
        return {k: ("P" if v == str(client_port) else v) for k, v in d.items() if k in ("src", "dst", "sport", "dport")}
    return (entry["proto"], entry["state"], tuple(sorted(side(entry["orig"]).items())),
            tuple(sorted(side(entry["reply"]).items())), tuple(entry["flags"]))


def both(topo, agent, rules, scenario, **agent_kw):
    """scenario(a) with Linux alone (a=None), then with the agent: both results."""
    load_rules(topo, rules)
    alone = scenario(None)
    topo.run("node", ["conntrack", "-F"], check=False)
    a = agent(topo, **agent_kw)
    wait_for(lambda: a.status().get("forwarding_punted_because") is None, 10, "agent in stateful mode")
    return alone, scenario(a), a


# -- (2) stateful FORWARD policy --------------------------------------------
def policy_scenario(t, a):
    """iperf3 pod1 -> pod2:5201, a connection pod2 -> pod1:5201, ping pod1 ->
    pod2: what got through, and the counters of the iperf3 run."""
    c0 = counters(a)
    got = iperf(t, t.pod2_ip, 5201, seconds=3)
    d = delta(counters(a), c0)
    back = server(t, "pod1", "tcp-echo", 5201)
    reverse = result(talk(t, "pod2", t.pod1_ip, 5201, 0.3))
    t.kill(back)
    ping = t.run("pod1", ["ping", "-c", "2", "-i", "0.2", "-W", "1", t.pod2_ip], check=False).returncode
    return {"allowed_bytes": got > 1_000_000, "reverse_connects": reverse["error"] is None, "ping": ping == 0}, d


def test_stateful_forward_policy(routed_topology, agent):
    t = routed_topology
    t.run("pod1", ["ping", "-c", "1", "-W", "1", t.gw1_ip])  # warm ARP on the node side

    def scenario(a):
        t.run("pod2", ["ping", "-c", "1", "-W", "1", t.gw2_ip])
        return policy_scenario(t, a)

    (alone, _), (mirrored, d), a = both(t, agent, STATEFUL, scenario)
    assert alone == {"allowed_bytes": True, "reverse_connects": False, "ping": False}
    assert mirrored == alone
    assert fast_share(d) > 0.9, d
    assert a.status()["offload"]["written"] >= 2  # both directions of the data connection


def test_one_way_udp_is_taken_over(routed_topology, agent):
    t = routed_topology

    def scenario(a):
        sink = t.popen("pod2", [PY, "-u", FLOWIO, "udp-sink", "7000", "4"], stdout=subprocess.PIPE, text=True)
        assert sink.stdout.readline().strip() == "ready"
        c0 = counters(a)
        sent = json.loads(t.run("pod1", [PY, FLOWIO, "udp-source", t.pod2_ip, "7000", "2", "0.002", "40000"]).stdout)
        d = delta(counters(a), c0)
        got = result(sink)
        entries = [shape(e) for e in conntrack(t, "-p", "udp")]
        return {"sent": len(sent), "got": len(got), "entries": entries}, d

    (alone, _), (mirrored, d), _ = both(t, agent, STATEFUL, scenario)
    assert alone["got"] == alone["sent"] and mirrored["got"] == mirrored["sent"]
    assert alone["entries"] == mirrored["entries"]  # one UNREPLIED entry, same tuples
    assert fast_share(d) > 0.9, d


# -- (3) Docker 28 published port + MASQUERADE --------------------------------
@pytest.mark.xfail(strict=False, reason="known difference (README): the unacknowledged-data flag is frozen at "
                   "takeover, so an entry can keep the 300 s timeout instead of 432000 s (seen in 1 of 3 CI runs); "
                   "exact needs a shadow tcp_in_window in the datapath")
def test_docker_published_port_and_masquerade(routed_topology, agent):
    t = routed_topology

    def scenario(a):
        c0 = counters(a)
        got = iperf(t, t.gw1_ip, 8080, server_port=5201, seconds=3)
        d = delta(counters(a), c0)
        # A long-lived connection through the port map, and one from the
        # "container" out (MASQUERADE): compare the kernel's entries meanwhile.
        echo_in = server(t, "pod2", "tcp-echo", 5201)
        echo_out = server(t, "pod1", "tcp-echo", 7002)
        inbound = talk(t, "pod1", t.gw1_ip, 8080, 3, end="hold:3")
        outbound = talk(t, "pod2", t.pod1_ip, 7002, 3, end="hold:3")
        r_in, r_out = json.loads(inbound.stdout.readline()), json.loads(outbound.stdout.readline())
        time.sleep(0.5)  # delayed ACKs out: with data unacknowledged the kernel's timeout is 300 s
        entries = [e for e in conntrack(t, "-p", "tcp") if e["state"] == "ESTABLISHED"]
        inbound.wait(10), outbound.wait(10)
        t.kill(echo_in), t.kill(echo_out)
        shapes = sorted(shape(e, e["orig"]["sport"]) for e in entries)
        timeouts = [e["timeout"] for e in entries]
        return {"iperf": got > 1_000_000, "in": r_in, "out": r_out, "entries": shapes, "timeouts": timeouts}, d

    (alone, _), (mirrored, d), a = both(t, agent, DOCKER28, scenario)
    for res in (alone, mirrored):
        assert res["iperf"]
        for r in (res["in"], res["out"]):
            assert r["error"] is None and r["echoed"] == r["sent"] > 50
        # Established entries at the established timeout (432000 s by default).
        # (A data segment punted mid-flow, e.g. during a netfilter change hold,
        # can leave the taken-over entry at the 300 s unacknowledged timeout:
        # README, known differences.)
        assert all(to > 431990 for to in res["timeouts"]), (alone["timeouts"], mirrored["timeouts"], d)
    assert len(alone["entries"]) == 2 and mirrored["entries"] == alone["entries"]
    assert all(e[4] == ("ASSURED",) for e in mirrored["entries"])
    assert fast_share(d) > 0.9, d


def test_kube_proxy_service_with_three_endpoints(routed_topology, agent):
    t = routed_topology
    vip, endpoints = "10.96.0.10", ["10.2.0.2", "10.2.0.3", "10.2.0.4"]
    for ep in endpoints[1:]:
        t.run("pod2", ["ip", "addr", "add", f"{ep}/24", "dev", "eth0"])

    def scenario(a):
        who = server(t, "pod2", "whoami", 5201)
        conns = json.loads(t.run("pod1", [PY, FLOWIO, "whoami-client", vip, "80", "30"]).stdout)
        chosen = {e["orig"]["sport"]: e["reply"]["src"] for e in conntrack(t, "-p", "tcp", "-d", vip)}
        t.kill(who)
        c0 = counters(a)
        got = iperf(t, vip, 80, server_port=5201, seconds=3)
        d = delta(counters(a), c0)
        masq = {e["reply"]["dst"] for e in conntrack(t, "-p", "tcp", "-d", vip)}
        return {"reached_chosen": all(chosen.get(str(port)) == ep for port, ep in conns),
                "endpoints_used": sorted({ep for _, ep in conns}), "iperf": got > 1_000_000,
                "masqueraded_to": sorted(masq)}, d

    (alone, _), (mirrored, d), _ = both(t, agent, kube_proxy_rules(vip, endpoints), scenario)
    assert alone == {"reached_chosen": True, "endpoints_used": endpoints, "iperf": True,
                     "masqueraded_to": [t.gw2_ip]}
    assert mirrored == alone
    assert fast_share(d) > 0.9, d


# -- (7) a rule inserted mid-flow drops the very next packet -------------------
def rule_inserted_mid_flow(t, a, rule):
    """UDP pod1 -> pod2:7000 every ms; `rule` (iptables -I arguments) is
    inserted 1.5 s in: which datagrams arrived that were sent after it, and
    the counters just before the insert."""
    sink = t.popen("pod2", [PY, "-u", FLOWIO, "udp-sink", "7000", "5"], stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "ready"
    src = t.popen("pod1", [PY, FLOWIO, "udp-source", t.pod2_ip, "7000", "3", "0.001"],
                  stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    c0 = counters(a)
    t.run("node", ["iptables", "-I", *rule])
    inserted = time.time()
    sent = json.loads(src.communicate(timeout=10)[0])
    got = result(sink)
    t.run("node", ["iptables", "-D", *rule])
    late = [seq for seq, at, _ in got if at > inserted + 0.002]  # sent after the rule was in
    before = [seq for seq, at, _ in got if at <= inserted - 0.5]
    return {"late": late, "before": len(before) > 100, "sent_after": sum(at > inserted for _, at in sent) > 100}, c0


def test_rule_inserted_mid_flow_drops_the_next_packet(routed_topology, agent):
    t = routed_topology

    def scenario(a):
        return rule_inserted_mid_flow(t, a, ["FORWARD", "-s", t.pod1_ip, "-j", "DROP"])

    (alone, _), (mirrored, c0), a = both(t, agent, STATEFUL, scenario)
    assert alone == {"late": [], "before": True, "sent_after": True}
    assert mirrored == alone
    assert c0.get("FORWARDED", 0) > 100  # the flow was on the fast path when the rule came


# -- (6) conntrack -D / -F: the kernel makes a new choice ----------------------
@pytest.mark.parametrize("flush", [["-D", "-p", "udp", "--orig-port-dst", "9000"], ["-F"]], ids=["D", "F"])
def test_conntrack_delete_makes_the_kernel_choose_again(routed_topology, agent, flush):
    t = routed_topology

    def scenario(a):
        sinks = {p: t.popen("pod2", [PY, "-u", FLOWIO, "udp-sink", str(p), "5"], stdout=subprocess.PIPE, text=True)
                 for p in (7000, 7001)}
        for s in sinks.values():
            assert s.stdout.readline().strip() == "ready"
        src = t.popen("pod1", [PY, FLOWIO, "udp-source", t.gw1_ip, "9000", "3", "0.002", "40000"],
                      stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        # New published backend: the existing entry keeps the old one until deleted.
        t.run("node", ["iptables", "-t", "nat", "-R", "DOCKER", "2", "!", "-i", "veth2", "-p", "udp", "-m", "udp",
                       "--dport", "9000", "-j", "DNAT", "--to-destination", "10.2.0.2:7001"])
        time.sleep(0.5)
        c0 = counters(a)
        deleting = time.time()
        t.run("node", ["conntrack", *flush], check=False)
        deleted = time.time()
        src.communicate(timeout=10)
        d = delta(counters(a), c0)
        got = {p: result(s) for p, s in sinks.items()}
        t.run("node", ["iptables", "-t", "nat", "-R", "DOCKER", "2", "!", "-i", "veth2", "-p", "udp", "-m", "udp",
                       "--dport", "9000", "-j", "DNAT", "--to-destination", "10.2.0.2:7000"])
        old_after = [s for s, at, _ in got[7000] if at > deleted + 0.002]
        new_before = [s for s, at, _ in got[7001] if at < deleting - 0.002]
        return {"old_after_delete": old_after, "new_before_delete": new_before,
                "new_after": len(got[7001]) > 100, "old_before": len(got[7000]) > 100}, d

    rules = DOCKER28.replace(
        "-A DOCKER -d 10.2.0.2/32 ! -i veth2 -o veth2 -p tcp -m tcp --dport 5201 -j ACCEPT",
        "-A DOCKER -d 10.2.0.2/32 ! -i veth2 -o veth2 -p tcp -m tcp --dport 5201 -j ACCEPT\n"
        "-A DOCKER -d 10.2.0.2/32 ! -i veth2 -o veth2 -p udp -m udp --dport 7000:7001 -j ACCEPT")
    (alone, _), (mirrored, d), _ = both(t, agent, rules, scenario)
    assert alone == {"old_after_delete": [], "new_before_delete": [], "new_after": True, "old_before": True}
    assert mirrored == alone
    assert d.get("CT_MISS", 0) >= 1 and d.get("FORWARDED", 0) > 100, d


# -- (4) mid-flow punts in a taken-over NAT'd flow ------------------------------
def test_mid_flow_punts_in_a_nat_flow(routed_topology, agent):
    """A published UDP port (DNAT): once the flow is taken over, an over-MTU DF
    datagram punts and the client gets the kernel's NAT'd frag-needed (it
    learns the path MTU), and after the server is gone its ICMP port
    unreachable reaches the client through the kernel's RELATED NAT."""
    t = routed_topology
    t.run("node", ["ip", "link", "set", t.node_if2, "mtu", "1400"])
    t.run("pod2", ["ip", "link", "set", "eth0", "mtu", "1400"])

    def scenario(a):
        # Forget the path MTU the last run learned (exceptions live on the route's next hop).
        t.run("pod1", ["ip", "route", "del", "10.1.0.0/24", "dev", "eth0"])
        t.run("pod1", ["ip", "route", "add", "10.1.0.0/24", "dev", "eth0", "proto", "kernel", "scope", "link",
                       "src", t.pod1_ip])
        sink = t.popen("pod2", [PY, "-u", FLOWIO, "udp-sink", "7000", "30"], stdout=subprocess.PIPE, text=True)
        assert sink.stdout.readline().strip() == "ready"
        c0 = counters(a)
        cli = t.popen("pod1", [PY, "-u", FLOWIO, "udp-midflow", t.gw1_ip, "9000", "1450"],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(cli.stdout.readline()) == {"phase": "mtu"}
        t.kill(sink)
        cli.stdin.write("\n")
        cli.stdin.flush()
        res = result(cli)
        d = delta(counters(a), c0)
        t.run("node", ["conntrack", "-F"], check=False)
        return res, d

    rules = DOCKER28.replace(
        "-A DOCKER -d 10.2.0.2/32 ! -i veth2 -o veth2 -p tcp -m tcp --dport 5201 -j ACCEPT",
        "-A DOCKER -d 10.2.0.2/32 ! -i veth2 -o veth2 -p tcp -m tcp --dport 5201 -j ACCEPT\n"
        "-A DOCKER -d 10.2.0.2/32 ! -i veth2 -o veth2 -p udp -m udp --dport 7000 -j ACCEPT")
    (alone, _), (mirrored, d), _ = both(t, agent, rules, scenario)
    assert alone == {"big_error": "Message too long", "refused": True, "mtu": 1400}
    assert mirrored == alone
    # Taken over; the big datagram punted before any rewrite; the ICMP error too.
    assert d.get("FORWARDED", 0) > 200 and d.get("MTU_EXCEEDED", 0) >= 1 and d.get("CT_PROTO", 0) >= 1, d


# A service address as kube-proxy/Docker publish one: DNAT to pod2's UDP 7000,
# MASQUERADE, FORWARD policy DROP with ESTABLISHED accepted.
VIP = "10.96.0.10"
NAT_SERVICE = f"""*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -d 10.2.0.2/32 -p udp -m udp --dport 7000 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -d {VIP}/32 -p udp -m udp --dport 80 -j DNAT --to-destination 10.2.0.2:7000
-A POSTROUTING -s 10.1.0.0/24 -d 10.2.0.0/24 -j MASQUERADE
COMMIT
"""


def without_id_and_checksum(hex_packet):
    """An IPv4 packet without what each sender's kernel picks freely (the IP
    ID; the header checksum covers it): every other byte must match."""
    b = bytearray(bytes.fromhex(hex_packet))
    b[4:6] = b[10:12] = b"\0\0"
    return b.hex()


def test_ip_options_and_fragments_in_a_taken_over_nat_flow(routed_topology, agent):
    """A taken-over DNAT+MASQUERADE UDP flow, then a record-route datagram and
    datagrams the client sends fragmented (DF off, 3000 and 1600 bytes; the
    node reassembles them for conntrack and fragments them again): the server
    receives the same packets, byte for byte, and the client the same echoes
    as with Linux alone; the kernel's conntrack entry stays the same one."""
    t = routed_topology
    sport = 41000

    def entry():
        out = t.run("node", ["conntrack", "-L", "-p", "udp", "--orig-port-src", str(sport), "-o", "id"],
                    check=False).stdout.strip().splitlines()
        assert len(out) == 1, out
        return shape(parse_ct(out[0])), re.search(r"id=(\d+)", out[0]).group(1)

    def scenario(a):
        echo = server(t, "pod2", "udp-echo", 7000)
        caps = {ns: server(t, ns, "capture", "eth0") for ns in ("pod1", "pod2")}
        c0 = counters(a)
        cli = t.popen("pod1", [PY, "-u", FLOWIO, "udp-nat-probe", VIP, "80", sport],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(cli.stdout.readline()) == {"phase": "warm"}
        c1 = counters(a)
        before = entry()
        carried = a and [f for f in json.loads(t.run("node", ["loxi-mirror", "dump", "conntrack", "--json"]).stdout)
                         if str(sport) in json.dumps(f)]
        cli.stdin.write("\n")
        cli.stdin.flush()
        res = result(cli)
        c2 = counters(a)
        packets = {ns: [without_id_and_checksum(h) for h in result(p)] for ns, p in caps.items()}
        after = entry()
        t.kill(echo)
        t.run("node", ["conntrack", "-F"], check=False)
        return {"echoes": res["echoes"], "packets": packets, "entry": after[0], "same_entry": after == before}, \
            (delta(c1, c0), delta(c2, c1), carried)

    (alone, _), (mirrored, (warm, probes, carried)), _ = both(t, agent, NAT_SERVICE, scenario)
    assert alone["same_entry"] and "ASSURED" in alone["entry"][4], alone
    assert [e[:3] for e in alone["echoes"]] == [[label, f"{VIP}:80", True] for label in (
        "begin", "record-route", "plain", "fragments-3000", "fragments-1600", "stop")], alone["echoes"]
    assert len(alone["packets"]["pod2"]) >= 2 + 3 + 2 + 2  # begin, rr, plain, 3 + 2 fragments, stop
    assert mirrored == alone
    # The flow was the fast path's before the probes; they punted before any rewrite.
    assert carried, "dump conntrack does not list the flow"
    assert fast_share(warm) > 0.5 and warm.get("FORWARDED", 0) > 100, warm
    assert probes.get("IP_OPTIONS", 0) >= 1 and probes.get("IP_FRAGMENT", 0) >= 10, probes


# -- (9) kill -9 mid-flow ----------------------------------------------------
def test_agent_killed_mid_flow_flows_keep_working(routed_topology, agent):
    t = routed_topology

    def scenario(a):
        echo = server(t, "pod2", "tcp-echo", 5201)
        p = talk(t, "pod1", t.pod2_ip, 5201, 4, interval=0.005)
        time.sleep(1.5)
        fast = counters(a).get("FORWARDED", 0) if a else None
        if a:
            a.proc.kill()  # SIGKILL: no cleanup, the heartbeat expires
        r = result(p)
        t.kill(echo)
        return {"error": r["error"], "all_echoed": r["echoed"] == r["sent"] > 200}, fast

    (alone, _), (mirrored, fast), _ = both(t, agent, STATEFUL, scenario)
    assert alone == {"error": None, "all_echoed": True}
    assert mirrored == alone
    assert fast > 100


# -- (5) teardown --------------------------------------------------------------
@pytest.mark.parametrize("end", ["fin", "rst"])
def test_teardown_ends_in_the_kernels_states(routed_topology, agent, end):
    t = routed_topology

    def scenario(a):
        echo = server(t, "pod2", "tcp-echo", 5201)
        c0 = counters(a)
        r = result(talk(t, "pod1", t.pod2_ip, 5201, 1.5, interval=0.002, end=end))
        time.sleep(0.3)
        d = delta(counters(a), c0)
        entries = [(e["state"], e["flags"], e["timeout"]) for e in conntrack(t, "-p", "tcp", "--dport", "5201")]
        t.kill(echo)
        return {"ok": r["error"] is None and r["echoed"] == r["sent"], "entries": entries}, d

    (alone, _), (mirrored, d), _ = both(t, agent, STATEFUL, scenario)
    assert alone["ok"] and mirrored["ok"]
    assert d.get("FORWARDED", 0) > 100, d
    if end == "fin":
        assert [e[:2] for e in alone["entries"]] == [("TIME_WAIT", ["ASSURED"])]
        assert [e[:2] for e in mirrored["entries"]] == [e[:2] for e in alone["entries"]]
        assert abs(mirrored["entries"][0][2] - alone["entries"][0][2]) <= 1
    else:
        # Known difference (README): the kernel checks an RST's sequence number
        # against the last ACK it saw, which a taken-over flow froze at takeover;
        # not an exact match, it keeps ESTABLISHED for a possible challenge ACK,
        # but with the same 10 s close timeout, so the entry ends when Linux's does.
        assert [e[:2] for e in alone["entries"]] == [("CLOSE", ["ASSURED"])]
        assert [e[0] for e in mirrored["entries"]] in (["CLOSE"], ["ESTABLISHED"])
        assert abs(mirrored["entries"][0][2] - alone["entries"][0][2]) <= 1


def test_no_hang_with_invalid_drop_after_much_fast_path_traffic(routed_topology, agent):
    """FORWARD drops INVALID: without BE_LIBERAL the first punted segment after
    fast-pathed data would be out of the kernel's window and the close would hang."""
    t = routed_topology
    load_rules(t, STATEFUL)
    a = agent(t)
    wait_for(lambda: a.status().get("forwarding_punted_because") is None, 10, "agent in stateful mode")
    c0 = counters(a)
    srv = t.popen("pod2", ["iperf3", "-s", "-1", "-p", "5201"], stdout=subprocess.DEVNULL)
    t.wait_listen("pod2", 5201, proc=srv)
    cp = t.run("pod1", ["iperf3", "-c", t.pod2_ip, "-p", "5201", "-n", "1G", "-J"], timeout=120)
    end = json.loads(cp.stdout)["end"]
    assert end["sum_sent"]["bytes"] >= 1 << 30 and end["sum_received"]["bytes"] > 0.99 * (1 << 30)
    srv.wait(timeout=10)  # the server saw the close: no hang
    d = delta(counters(a), c0)
    assert fast_share(d) > 0.9, d
    states = {e["state"] for e in conntrack(t, "-p", "tcp", "--dport", "5201")}
    assert states <= {"TIME_WAIT", "CLOSE"}, states


# -- (8) idle expiry -------------------------------------------------------
def test_idle_flows_expire_when_the_kernel_says(routed_topology, agent):
    t = routed_topology
    for key, value in (("tcp_timeout_established", 4), ("udp_timeout", 3)):
        t.sysctl("node", f"net.netfilter.nf_conntrack_{key}", value)

    def expiry(filters, since):
        wait_for(lambda: not conntrack(t, *filters), 15, f"{filters} expired")
        return time.time() - since

    def scenario(a):
        echo = server(t, "pod2", "tcp-echo", 5201)
        p = talk(t, "pod1", t.pod2_ip, 5201, 1.5, interval=0.005, end="hold:8")
        r = json.loads(p.stdout.readline())
        tcp = expiry(["-p", "tcp", "--dport", "5201"], r["last_at"])
        sent = json.loads(t.run("pod1", [PY, FLOWIO, "udp-source", t.pod2_ip, "7000", "1.5", "0.005"]).stdout)
        udp = expiry(["-p", "udp", "--dport", "7000"], sent[-1][1])
        t.kill(p), t.kill(echo)
        return tcp, udp

    (alone, _), (mirrored, _), _ = both(t, agent, STATEFUL, lambda a: (scenario(a), None))
    assert abs(alone[0] - 4) < 1.5 and abs(alone[1] - 3) < 1.5, alone
    assert abs(mirrored[0] - alone[0]) <= 1 and abs(mirrored[1] - alone[1]) <= 1, (alone, mirrored)
