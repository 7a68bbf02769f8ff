"""Nexthop objects, ECMP and policy routing, end to end, with the kernel
alone as the oracle.

    pod1 (10.1.0.2) -- veth1 [node, agent] up1..up4 -- 4 "uplink" namespaces

Each uplink namespace (10.100.k.2, behind the node's `upk` at 10.100.k.1)
takes 10.9.0.0/16 as local, so a frame for 10.9.x.y is delivered by
whichever uplink the node chose.  The same crafted frames go out of pod1
with the kernel alone and then with loxi-mirror, in the same node namespace
(same multipath hash seed); every flow must arrive at the same uplink, byte
for byte, and the agent's counters must show the fast path carried them.
"""

import subprocess
import sys
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from nstest import skip_unless_root, unique_name, wait_for
from oracle import HERE, settle
from test_routing import counters, delta

import topology

pytestmark = skip_unless_root

PY = sys.executable
UPLINKS = 4
POD1_MAC, NODE_MAC = "02:00:0a:01:00:02", "02:00:0a:01:00:01"


class UplinkTopology(topology.Netns):
    """pod1 -- node -- up1..up4 (see the module docstring)."""

    ROLES = ("pod1", "node") + tuple(f"up{k}" for k in range(1, UPLINKS + 1))
    pod1_ip, pod1_if, pod1_mac = "10.1.0.2", "eth0", POD1_MAC
    node_if1, node_mac1 = "veth1", NODE_MAC
    node_if2 = "up1"  # settle() puts its marker routes there

    def _build(self):
        self._veth("pod1", "eth0", POD1_MAC, "node", "veth1", NODE_MAC)
        self.sysctl("node", "net.ipv4.ip_forward", 1)
        self._addr_up("node", "veth1", "10.1.0.1/24")
        self._addr_up("pod1", "eth0", "10.1.0.2/24")
        self.run("pod1", ["ip", "route", "add", "default", "via", "10.1.0.1"])
        for k in range(1, UPLINKS + 1):
            up = f"up{k}"
            self._veth("node", up, f"02:00:0a:64:{k:02x}:01", up, "eth0", f"02:00:0a:64:{k:02x}:02")
            self._addr_up("node", up, f"10.100.{k}.1/24")
            self._addr_up(up, "eth0", f"10.100.{k}.2/24")
            self.run(up, ["ip", "route", "add", "local", "10.9.0.0/16", "dev", "lo"])
            self.run(up, ["ip", "route", "add", "default", "via", f"10.100.{k}.1"])
            self.run("node", ["ping", "-c", "1", "-W", "1", f"10.100.{k}.2"])  # resolve the next hop
            # Only what the node forwards counts: no ICMP errors back.
            self.run(up, ["iptables", "-A", "OUTPUT", "-p", "icmp", "-j", "DROP"])
        self.run("pod1", ["ping", "-c", "1", "-W", "1", "10.1.0.1"])


@pytest.fixture
def uplinks(require_root):
    with UplinkTopology(unique_name("lmp"), unique=False, ipv6=False) as topo:
        yield topo


def udp_flow(i, src="10.1.0.2", dst_net=(10, 9)):
    """Flow i: its own destination and source port (policy 0 hashes the
    addresses, policy 1 the ports too)."""
    dst = f"{dst_net[0]}.{dst_net[1]}.{i // 250 % 256}.{i % 250 + 1}"
    pkt = (Ether(src=POD1_MAC, dst=NODE_MAC) / IP(src=src, dst=dst, ttl=64, id=i & 0xFFFF)
           / UDP(sport=20000 + i % 40000, dport=9))
    return bytes(pkt / b"flow")


def deliver(topo, frames, seconds=2.5):
    """Send frames from pod1: {uplink namespace role: sorted frames that arrived there}."""
    caps = {}
    for k in range(1, UPLINKS + 1):
        caps[f"up{k}"] = topo.popen(f"up{k}", [PY, f"{HERE}/pktio.py", "capture", "eth0", str(seconds)],
                                    stdout=subprocess.PIPE, text=True)
    for cap in caps.values():
        assert cap.stdout.readline().strip() == "ready"
    topo.run("pod1", [PY, f"{HERE}/pktio.py", "send", "eth0"] + [f.hex() for f in frames])
    out = {}
    for role, cap in caps.items():
        text, _ = cap.communicate(timeout=seconds + 20)
        import json
        got = [bytes.fromhex(h) for h in json.loads(text.splitlines()[-1])]
        out[role] = sorted(f for f in got if f[12:14] == b"\x08\x00" and f[26:29] == bytes([10, 1, 0]))
    return out


def per_flow(arrived):
    """{(src, dst, sport): uplink} from deliver()'s result."""
    return {(f[26:30], f[30:34], f[34:36]): role for role, frames in arrived.items() for f in frames}


def fast_share(d):
    total = sum(d.values())
    return d.get("FORWARDED", 0) / total if total else 0.0


def set_policy(topo, policy, agent=None):
    topo.sysctl("node", "net.ipv4.fib_multipath_hash_policy", policy)
    if agent is not None:  # polled (no event): wait until the agent has read it
        time.sleep(2.5)
        settle(topo)


def ecmp_routes(topo, width):
    hops = []
    for k in range(1, width + 1):
        hops += ["nexthop", "via", f"10.100.{k}.2", "dev", f"up{k}"]
    topo.run("node", ["ip", "route", "add", "10.9.0.0/16"] + hops)


def tcp_targets(topo, n):
    """n TCP connections from pod1 (its own sockets) to 10.9.0.0/16: which
    uplink answered each (a server per uplink names itself)."""
    code = ("import socket,sys\n"
            "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',7000));"
            "s.listen(64)\nprint('ready',flush=True)\n"
            "while True:\n  c,_=s.accept();c.sendall(sys.argv[1].encode());c.close()\n")
    servers = [topo.popen(f"up{k}", [PY, "-c", code, f"up{k}"], stdout=subprocess.PIPE, text=True)
               for k in range(1, UPLINKS + 1)]
    for srv in servers:
        assert srv.stdout.readline().strip() == "ready"
    client = ("import socket,sys\nout=[]\n"
              "for i in range(%d):\n"
              "  c=socket.create_connection(('10.9.200.%%d'%%(i+1),7000),timeout=5);out.append(c.recv(16).decode());c.close()\n"
              "print(' '.join(out))\n" % n)
    try:
        return topo.run("pod1", [PY, "-c", client], timeout=60).stdout.split()
    finally:
        for srv in servers:
            topo.kill(srv)


@pytest.mark.parametrize("width", [2, 4])
def test_ecmp_same_egress_per_flow_as_the_kernel(uplinks, agent, width):
    """1,000 UDP flows over a 2- and a 4-way multipath route, under hash
    policies 0 and 1: each flow leaves by the uplink the kernel alone
    chooses; more than 90% of the packets take the fast path.  TCP
    connections from pod1's own sockets: same uplinks as the kernel under
    policy 0; under policy 1 they carry the socket's hash (the kernel hashes
    by it, not by the ports) and are left to the kernel (MULTIPATH_HASH)."""
    topo = uplinks
    ecmp_routes(topo, width)
    flows = [udp_flow(i) for i in range(1000)]
    kernel = {}
    for policy in (0, 1):
        set_policy(topo, policy)
        kernel[policy] = deliver(topo, flows)
        assert len(per_flow(kernel[policy])) == 1000
        assert len({r for r in per_flow(kernel[policy]).values()}) == width  # every next hop used
    set_policy(topo, 0)
    kernel_tcp = tcp_targets(topo, 12)
    a = agent(topo)
    for policy in (0, 1):
        set_policy(topo, policy, a)
        c0 = counters(a)
        fast = deliver(topo, flows)
        d = delta(counters(a), c0)
        assert fast == kernel[policy], f"policy {policy}: {sum(1 for k, v in per_flow(fast).items() if per_flow(kernel[policy]).get(k) != v)} flows differ"
        assert fast_share(d) > 0.9, (policy, d)
        print(f"ECMP {width} policy {policy}: fast path {fast_share(d):.1%} of {sum(d.values())} packets")
    set_policy(topo, 0, a)
    c0 = counters(a)
    assert tcp_targets(topo, 12) == kernel_tcp
    d = delta(counters(a), c0)
    assert fast_share(d) > 0.5 and "MULTIPATH_HASH" not in d, d  # handshakes/FINs of the 12 go through the kernel too
    set_policy(topo, 1, a)
    c0 = counters(a)
    assert len(tcp_targets(topo, 4)) == 4
    assert delta(counters(a), c0).get("MULTIPATH_HASH", 0) > 0


def test_nexthop_objects_frr_style(uplinks, agent):
    """Routes as FRR installs them: single nexthop objects and a group of
    them; delivered as with the kernel alone, fast-pathed; a changed group
    and a deleted object are followed."""
    topo = uplinks
    for k in range(1, UPLINKS + 1):
        topo.run("node", ["ip", "nexthop", "add", "id", str(k), "via", f"10.100.{k}.2", "dev", f"up{k}"])
    topo.run("node", ["ip", "nexthop", "add", "id", "100", "group", "1/2/3"])
    topo.run("node", ["ip", "route", "add", "10.9.0.0/17", "nhid", "100", "proto", "bgp"])
    topo.run("node", ["ip", "route", "add", "10.9.128.0/17", "nhid", "4", "proto", "bgp"])
    flows = [udp_flow(i) for i in range(0, 64000, 160)]  # both halves of 10.9/16
    kernel = deliver(topo, flows)
    assert {r for r in per_flow(kernel).values()} == {"up1", "up2", "up3", "up4"}
    a = agent(topo)
    c0 = counters(a)
    assert deliver(topo, flows) == kernel
    d = delta(counters(a), c0)
    assert fast_share(d) > 0.9, d
    print(f"nexthop objects: fast path {fast_share(d):.1%} of {sum(d.values())} packets")
    # The group loses a member; the single object moves: followed.
    topo.run("node", ["ip", "nexthop", "replace", "id", "100", "group", "1/3"])
    topo.run("node", ["ip", "nexthop", "replace", "id", "4", "via", "10.100.2.2", "dev", "up2"])
    settle(topo)
    a.stop()
    kernel = deliver(topo, flows)
    assert {r for r in per_flow(kernel).values()} == {"up1", "up2", "up3"}
    a = agent(topo)
    c0 = counters(a)
    assert deliver(topo, flows) == kernel
    assert fast_share(delta(counters(a), c0)) > 0.9
    # Deleting the object removes its route in the kernel (no RTM_DELROUTE).
    topo.run("node", ["ip", "nexthop", "del", "id", "4"])
    settle(topo)
    routes = topo.run("node", ["loxi-mirror", "dump", "routes", "--json"]).stdout
    assert "10.9.128.0" not in routes


RULES = [
    ["add", "from", "10.1.0.2", "lookup", "100", "pref", "100"],           # by source
    ["add", "iif", "veth1", "from", "10.1.0.3", "lookup", "101", "pref", "110"],  # by ingress
    ["add", "fwmark", "7", "to", "10.9.128.0/17", "lookup", "102", "pref", "90"],  # by mark
]


def test_policy_rules_source_fwmark_iif(uplinks, agent):
    """Rules by source, ingress device and fwmark choose routes in other
    tables; same delivery as the kernel alone, fast-pathed."""
    topo = uplinks
    topo.run("node", ["ip", "route", "add", "10.9.0.0/16", "via", "10.100.4.2"])  # main: up4
    for table, k in ((100, 1), (101, 2), (102, 3)):
        topo.run("node", ["ip", "route", "add", "10.9.0.0/16", "via", f"10.100.{k}.2", "table", str(table)])
    for rule in RULES:
        topo.run("node", ["ip", "rule"] + rule)
    # The mark comes from a tc filter ahead of the agent's on veth1.
    mark_ingress(topo, "veth1", 7)
    flows = ([udp_flow(i) for i in range(0, 64000, 400)] + [udp_flow(i, src="10.1.0.3") for i in range(0, 64000, 400)]
             + [udp_flow(i, src="10.1.0.4") for i in range(0, 64000, 400)])
    kernel = deliver(topo, flows)
    assert {r for r in per_flow(kernel).values()} == {"up1", "up2", "up3", "up4"}
    a = agent(topo)
    assert a.status()["forwarding_punted_because"] is None
    c0 = counters(a)
    fast = deliver(topo, flows)
    d = delta(counters(a), c0)
    assert fast == kernel
    assert fast_share(d) > 0.9, d
    print(f"policy rules: fast path {fast_share(d):.1%} of {sum(d.values())} packets")
    # A rule the kernel lookup cannot reproduce: all forwarding punts.
    topo.run("node", ["ip", "rule", "add", "from", "10.1.0.9", "lookup", "100", "realms", "5", "pref", "80"])
    settle(topo)
    wait_for(lambda: a.status()["forwarding_punted_because"], 5, "POLICY_ROUTING punt")
    c0 = counters(a)
    some = per_flow(deliver(topo, flows[:50]))
    assert len(some) == 50 and all(per_flow(kernel)[k] == role for k, role in some.items())
    assert delta(counters(a), c0).get("POLICY_ROUTING", 0) >= 50


MARK_PROG = """
int set_mark(struct __sk_buff *skb) { skb->mark = MARK; return -1; /* TC_ACT_UNSPEC: next filter */ }
"""


def mark_ingress(topo, dev, mark):
    """A tc ingress filter on the node's `dev`, ahead of the agent's, that
    marks every packet (this kernel has no skbedit action: a BPF one)."""
    from bcc import BPF
    from pyroute2 import IPRoute

    with topology.in_netns(topo.nsname("node")):
        prog = BPF(text=MARK_PROG, cflags=[f"-DMARK={mark}"])
        fn = prog.load_func("set_mark", BPF.SCHED_CLS)
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=dev)[0]
            ipr.tc("add", "clsact", index)
            ipr.tc("add-filter", "bpf", index, ":1", fd=fn.fd, name=fn.name, parent="ffff:fff2", classid=1,
                   direct_action=True, prio=1)
        prog.cleanup()  # the filter holds the program
