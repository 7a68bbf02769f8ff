"""Generation for tools/fuzz: topologies and packet streams as plain data,
hypothesis strategies that draw them, and their rendering as `ip`/`sysctl`
commands and Ethernet frames.  Pure (no namespaces, no I/O): the same spec
renders the same commands and bytes for the kernel-alone copy and the
loxi-mirror copy, and for the printed reproducer.

The node has PODS veths (vethN <-> podN's eth0); a case uses 2..PODS of them
(the others are down), with generated subnets, MTUs, forwarding/rp_filter
sysctls, neighbour entries and main-table routes (on-link, via gateways,
multipath, blackhole/unreachable/prohibit/throw, route MTUs, metrics).

Features (`--feature`): a Feature adds its own strategies and commands to a
case; "routed" is the base, "filter" adds FORWARD rules, "bridge"
(fuzz_bridge.py) a bridge with some pods as ports, "nat" (fuzz_nat.py) nat
and stateful FORWARD rules with TCP/UDP flows through them.
"""

import dataclasses
import ipaddress
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from hypothesis import strategies as st

PODS = 4
POD_MTU = 9000  # pods can send frames up to this; the node side varies
SENTINEL_NET = "198.18.0.0/15"  # benchmark range: the harness's sync marker routes


def node_mac(i: int) -> str:
    return f"02:00:0b:00:{i:02x}:01"


def pod_mac(i: int) -> str:
    return f"02:00:0b:00:{i:02x}:02"


FOREIGN_MAC = "02:00:0b:99:99:99"
BRIDGE = "br0"                 # feature "bridge": the node's bridge (made once per twin)
BRIDGE_NET = "10.100.0.0/24"   # its subnet: the node is .1, bridged pod i is .(10+i)
BRIDGE_IP = "10.100.0.1"


# ---------------------------------------------------------------- topology --

@dataclass(frozen=True)
class Link:
    """One node veth (vethN) and its pod."""
    index: int                  # 1..PODS
    used: bool                  # False: node side down, no addresses
    plen: int                   # subnet prefix length
    mtu: int                    # node side MTU
    forwarding: int
    rp_filter: int
    neigh: str                  # node's entry for the pod: a NUD state, "foreign" (permanent, wrong MAC) or none
    second_net: bool = False    # node also has 10.N.1.1/24 here: a subnet nobody answers in
    bridged: bool = False       # feature "bridge": vethN is a port of br0, the pod is in BRIDGE_NET

    @property
    def net(self) -> ipaddress.IPv4Network:
        if self.bridged:
            return ipaddress.ip_network(BRIDGE_NET)
        return ipaddress.ip_network(f"10.{self.index}.0.0/{self.plen}", strict=False)

    @property
    def node_ip(self) -> str:
        if self.bridged:
            return BRIDGE_IP
        hosts = _hosts(self.net)
        return str(hosts[0])

    @property
    def pod_ip(self) -> str:
        if self.bridged:
            return f"10.100.0.{10 + self.index}"
        hosts = _hosts(self.net)
        return str(hosts[1])

    @property
    def dev(self) -> str:
        """The node's L3 device towards the pod."""
        return BRIDGE if self.bridged else f"veth{self.index}"


def _hosts(net):
    if net.prefixlen >= 31:
        return [net.network_address, net.network_address + 1]
    return [net.network_address + 1, net.network_address + 2]


@dataclass(frozen=True)
class Route:
    prefix: str                 # a.b.c.d/len
    kind: str                   # via|dev|onlink|multipath|blackhole|unreachable|prohibit|throw
    pods: Tuple[int, ...] = ()  # gateway / device pods
    mtu: int = 0
    lock: bool = False
    metric: int = 0


@dataclass(frozen=True)
class Topology:
    links: Tuple[Link, ...]
    routes: Tuple[Route, ...]
    ip_forward: int
    all_rp_filter: int
    features: Tuple[str, ...] = ("routed",)
    forward_policy: str = "ACCEPT"      # feature "filter": the FORWARD chain
    forward_rules: Tuple[str, ...] = ()  # iptables -A FORWARD arguments
    bridge: Optional["fuzz_bridge.Bridge"] = None  # feature "bridge"
    nat: Optional["fuzz_nat.Nat"] = None           # feature "nat"

    def link(self, i: int) -> Link:
        return self.links[i - 1]

    @property
    def used(self) -> List[Link]:
        return [l for l in self.links if l.used]

    def node_ips(self) -> List[str]:
        ips = [l.node_ip for l in self.used] + [f"10.{l.index}.1.1" for l in self.used if l.second_net]
        return sorted(set(ips), key=ips.index)

    def node_nets(self) -> List[ipaddress.IPv4Network]:
        """Where the node's own packets come from: its addresses and local routes."""
        return ([ipaddress.ip_network(f"{ip}/32") for ip in self.node_ips()]
                + [ipaddress.ip_network(r.prefix) for r in self.routes if r.kind == "local"])


def node_commands(t: Topology, sentinel: str) -> List[str]:
    """`ip -batch` lines that take the node from any earlier case to this one.
    The sentinel route comes last: once the agent shows it, it has seen all."""
    cmds = ["route flush table main"]
    for l in t.links:
        cmds += [f"addr flush dev veth{l.index}", f"neigh flush dev veth{l.index} nud all",
                 f"link set veth{l.index} mtu {l.mtu} {'up' if l.used else 'down'}"]
        if "bridge" in t.features:
            cmds.append(f"link set veth{l.index} {'master ' + BRIDGE if l.bridged else 'nomaster'}")
    if t.bridge is not None:
        cmds += fuzz_bridge.node_commands(t)
    for l in t.used:
        if not l.bridged:
            cmds.append(f"addr add {l.node_ip}/{l.plen} dev veth{l.index}")
        if l.second_net and not l.bridged:
            cmds.append(f"addr add 10.{l.index}.1.1/24 dev veth{l.index}")
    for l in t.used:
        if l.neigh == "foreign":
            cmds.append(f"neigh replace {l.pod_ip} lladdr {FOREIGN_MAC} dev {l.dev} nud permanent")
        elif l.neigh != "none":
            cmds.append(f"neigh replace {l.pod_ip} lladdr {pod_mac(l.index)} dev {l.dev} nud {l.neigh}")
    cmds += [route_command(t, r) for r in t.routes]
    if sentinel:
        cmds.append(f"route add blackhole {sentinel}/32")
    return cmds


def route_command(t: Topology, r: Route) -> str:
    tail = (f" metric {r.metric}" if r.metric else "") + (
        f" mtu {'lock ' if r.lock else ''}{r.mtu}" if r.mtu else "")
    if r.kind in ("blackhole", "unreachable", "prohibit", "throw"):
        return f"route append {r.kind} {r.prefix}{tail}"
    dev = t.link(r.pods[0]).dev
    if r.kind == "local":  # AnyIP: the node answers for the whole prefix
        return f"route append local {r.prefix} dev {dev} table local"
    if r.kind == "dev":
        return f"route append {r.prefix} dev {dev}{tail}"
    if r.kind == "onlink":  # a gateway no pod owns: ARP fails
        return f"route append {r.prefix} via 10.{r.pods[0]}.255.254 dev {dev} onlink{tail}"
    if r.kind == "multipath":
        hops = " ".join(f"nexthop via {t.link(p).pod_ip} dev {t.link(p).dev}" for p in r.pods)
        return f"route append {r.prefix}{tail} {hops}"
    return f"route append {r.prefix} via {t.link(r.pods[0]).pod_ip} dev {dev}{tail}"


def node_sysctls(t: Topology) -> List[Tuple[str, int]]:
    """In this order: ip_forward rewrites every device's forwarding."""
    out = [("net.ipv4.ip_forward", t.ip_forward), ("net.ipv4.conf.all.rp_filter", t.all_rp_filter)]
    for l in t.links:
        out += [(f"net.ipv4.conf.veth{l.index}.forwarding", l.forwarding),
                (f"net.ipv4.conf.veth{l.index}.rp_filter", l.rp_filter)]
    if t.bridge is not None:
        out += fuzz_bridge.sysctls(t.bridge)
    return out


def iptables_restore(t: Topology, marker: str = "") -> str:
    """The node's whole filter (and, for feature "nat", nat) table for
    `iptables-restore` (replaces the last case's).  `marker` names the case in
    a chain no packet reaches: the agent's ruleset generation changes with
    every case, which tells when it has read this one."""
    rules = "".join(f"-A FORWARD {r}\n" for r in t.forward_rules)
    sync = f":LMF-SYNC - [0:0]\n-A LMF-SYNC -m comment --comment {marker} -j RETURN\n" if marker else ""
    text = (f"*filter\n:INPUT ACCEPT [0:0]\n:FORWARD {t.forward_policy} [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            f"{sync}{rules}COMMIT\n")
    if t.nat is not None:
        text += fuzz_nat.nat_table(t)
    return text


def affects_forwarding(t: Topology) -> bool:
    return bool(t.forward_rules) or t.forward_policy != "ACCEPT"


def pod_commands(t: Topology, i: int) -> List[str]:
    l = t.link(i)
    cmds = ["addr flush dev eth0"]
    if l.used:
        cmds.append(f"addr add {l.pod_ip}/{l.net.prefixlen} dev eth0")
    return cmds


# Set once per node, not per case: what keeps the kernel's own behaviour
# deterministic and quick enough to compare within a case.
NODE_FIXED_SYSCTLS = [
    ("net.ipv4.icmp_ratelimit", 0),              # every ICMP error is sent
    ("net.ipv4.icmp_msgs_per_sec", 1 << 30),
    ("net.ipv4.icmp_msgs_burst", 1 << 30),
    ("net.ipv4.fib_multipath_hash_seed", 1),     # both copies pick the same path
    # ICMP redirects (for hairpinned packets, which the fast path punts) are
    # rate-limited per source by jiffies since the last one: timing, not packets,
    # decides whether one is sent, so neither copy sends them.
    ("net.ipv4.conf.all.send_redirects", 0),
] + [(f"net.ipv4.conf.veth{i}.send_redirects", 0) for i in range(1, PODS + 1)] + [
    # Unresolvable next hops fail (ICMP host unreachable) within ~30 ms.
    (f"net.ipv4.neigh.{dev}.{k}", v) for dev in [f"veth{i}" for i in range(1, PODS + 1)] + [BRIDGE]
    for k, v in (("retrans_time_ms", 30), ("mcast_solicit", 1), ("ucast_solicit", 1))] + [
    (f"net.ipv4.conf.{BRIDGE}.send_redirects", 0)]  # written only where br0 exists (feature "bridge")


# ----------------------------------------------------------------- packets --

@dataclass(frozen=True)
class Packet:
    sender: int                 # pod index
    l2: str = "node"            # node|bcast|mcast|foreign|other_node; bridge: see dst_mac()
    kind: str = "ipv4"          # ipv4|ipv6|arp|vlan|qinq|lldp
    src: Tuple = ("self",)      # ("self",)|("pod", i)|("node", i)|("addr", a)
    dst: Tuple = ("pod", 2)     # ("pod", i)|("node", i)|("route", k, host)|("bcast", i)|("addr", a)
    proto: str = "udp"          # udp|tcp|icmp|gre|ipip|raw
    ttl: int = 64
    tos: int = 0
    df: bool = True
    frag: str = "none"          # none|first|middle|last
    options: str = "none"       # none|rr|ra|nop
    payload: int = 32
    mangle: Tuple = ("none",)   # see mangle()
    l2_arg: int = 0             # which pod/port/MAC an l2 of "pod", "port", "unknown", "linklocal" means
    l4: Tuple = ()              # flows (feature "nat"): (sport, dport[, tcp flags, seq, ack])
    pause: float = 0.0          # s to wait before sending it (a flow's takeover by the agent)


def resolve_addr(t: Topology, spec: Tuple, sender: int) -> str:
    what = spec[0]
    if what == "self":
        return t.link(sender).pod_ip
    if what == "pod":
        return t.link(spec[1]).pod_ip
    if what == "node":
        return t.link(spec[1]).node_ip
    if what == "bcast":
        return str(t.link(spec[1]).net.broadcast_address)
    if what == "route":
        if not t.routes:
            return t.link(sender).pod_ip
        net = ipaddress.ip_network(t.routes[spec[1] % len(t.routes)].prefix)
        return str(net.network_address + spec[2] % net.num_addresses)
    return spec[1]


def frame(t: Topology, p: Packet, ident: int) -> bytes:
    """The Ethernet frame of packet p; `ident` becomes the IPv4 id (it names
    the packet in captures, fragments and quoted ICMP errors)."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_Router_Alert, IPOption_RR
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
    from scapy.packet import Raw

    src_mac = pod_mac(p.sender)
    dst_mac = frame_dst_mac(t, p)
    src = resolve_addr(t, p.src, p.sender)
    dst = resolve_addr(t, p.dst, p.sender)
    body = bytes((ident + k) & 0xFF for k in range(p.payload))
    if p.kind == "arp":
        return bytes(Ether(src=src_mac, dst=dst_mac) / ARP(op=1, hwsrc=src_mac, psrc=t.link(p.sender).pod_ip,
                                                           pdst=dst))
    if p.kind == "lldp":
        return bytes(Ether(src=src_mac, dst="01:80:c2:00:00:0e", type=0x88CC) / Raw(body or b"\0"))
    if p.kind == "ipv6":
        return bytes(Ether(src=src_mac, dst=dst_mac) / IPv6(src=f"fd00::{p.sender}", dst="fd00::99", hlim=p.ttl)
                     / UDP(sport=1024 + ident % 60000, dport=9) / body)
    options = {"none": [], "rr": [IPOption_RR(routers=["0.0.0.0"])], "ra": [IPOption_Router_Alert()],
               "nop": [IPOption_NOP()] * 4}[p.options]
    flags = ("DF" if p.df else 0)
    frag = 0
    if p.frag in ("first", "middle"):
        flags = "MF" if not p.df else "DF+MF"
    if p.frag in ("middle", "last"):
        frag = 100
    ip = IP(src=src, dst=dst, ttl=p.ttl, tos=p.tos, id=ident, flags=flags, frag=frag, options=options)
    l4 = {
        "udp": lambda: UDP(sport=p.l4[0], dport=p.l4[1]) / body if p.l4 else UDP(sport=1024 + ident % 60000,
                                                                                 dport=9) / body,
        "tcp": lambda: TCP(sport=p.l4[0], dport=p.l4[1], flags=p.l4[2], seq=p.l4[3], ack=p.l4[4],
                           window=65535) / body if p.l4 else TCP(sport=1024 + ident % 60000, dport=80,
                                                                 flags="S", seq=ident) / body,
        "icmp": lambda: ICMP(type=8, id=ident, seq=1) / body,
        "gre": lambda: Raw(b"\x00\x00\x08\x00" + bytes(IP(src="192.0.2.1", dst="192.0.2.2") / body)),
        "ipip": lambda: IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=7, dport=7) / body,
        "raw": lambda: Raw(body),
    }[p.proto]()
    if p.proto == "gre":
        ip.proto = 47
    pkt = ip / l4
    if p.kind == "vlan":
        out = Ether(src=src_mac, dst=dst_mac) / Dot1Q(vlan=10) / pkt
    elif p.kind == "qinq":
        out = Ether(src=src_mac, dst=dst_mac, type=0x88A8) / Dot1AD(vlan=10) / Dot1Q(vlan=20) / pkt
    else:
        out = Ether(src=src_mac, dst=dst_mac) / pkt
    return mangle(bytes(out), p.mangle, 14 if p.kind == "ipv4" else None)


def frame_dst_mac(t: Topology, p: Packet) -> str:
    """The destination MAC: the node (the bridge's MAC for a bridged sender),
    broadcast/multicast, a MAC nobody has, another node port, and for
    bridges a pod's MAC, a port's MAC, a MAC only static FDB entries know
    and the 01:80:c2:00:00:0X link-local group."""
    if p.l2 == "node":
        if t.bridge is not None and t.link(p.sender).bridged:
            return t.bridge.mac
        return node_mac(p.sender)
    if p.l2 == "bridge":
        return t.bridge.mac if t.bridge is not None else FOREIGN_MAC
    if p.l2 == "pod":
        return pod_mac(p.l2_arg)
    if p.l2 == "port":
        return node_mac(p.l2_arg)
    if p.l2 == "unknown":
        return unknown_mac(p.l2_arg)
    if p.l2 == "linklocal":
        return f"01:80:c2:00:00:{p.l2_arg:02x}"
    return {"bcast": "ff:ff:ff:ff:ff:ff", "mcast": "01:00:5e:00:00:05", "foreign": FOREIGN_MAC,
            "other_node": node_mac(p.sender % PODS + 1)}[p.l2]


def unknown_mac(k: int) -> str:
    """MACs no pod has: unknown unicast, or known through a static FDB entry."""
    return f"02:00:0b:77:77:{k:02x}"


def _ip_csum(hdr: bytes) -> int:
    s = sum(int.from_bytes(hdr[i:i + 2], "big") for i in range(0, len(hdr), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def mangle(f: bytes, how: Tuple, l3: Optional[int]) -> bytes:
    """Damage a well-formed frame: ("truncate", n) keeps n bytes; ("pad", n)
    appends n zero bytes (Ethernet padding); the rest edit the IPv4 header
    and, unless the point is a bad checksum, fix its checksum again."""
    what = how[0]
    if what == "none":
        return f
    if what == "truncate":
        return f[:max(1, how[1])]
    if what == "pad":
        return f + b"\0" * how[1]
    if l3 is None or len(f) < l3 + 20:
        return f
    b = bytearray(f)
    ihl = (b[l3] & 0xF) * 4
    if what == "ihl":
        b[l3] = (b[l3] & 0xF0) | how[1]
    elif what == "version":
        b[l3] = (how[1] << 4) | (b[l3] & 0xF)
    elif what == "totlen":
        tot = (int.from_bytes(b[l3 + 2:l3 + 4], "big") + how[1]) & 0xFFFF
        b[l3 + 2:l3 + 4] = tot.to_bytes(2, "big")
    elif what == "l4csum":  # zero or damage the UDP/TCP/ICMP checksum: a router does not look
        off = l3 + ihl + {17: 6, 6: 16, 1: 2}.get(b[l3 + 9], 0)
        if off + 2 <= len(b) and off > l3 + ihl:
            b[off:off + 2] = b"\0\0" if how[1] == 0 else bytes([b[off] ^ 0x5A, b[off + 1]])
        return bytes(b)
    if what == "csum":
        b[l3 + 10:l3 + 12] = how[1].to_bytes(2, "big")
        return bytes(b)
    hdr_len = min(max((b[l3] & 0xF) * 4, 20), len(b) - l3)
    b[l3 + 10:l3 + 12] = b"\0\0"
    b[l3 + 10:l3 + 12] = _ip_csum(bytes(b[l3:l3 + hdr_len])).to_bytes(2, "big")
    return bytes(b)


# -------------------------------------------------------------- strategies --

MTUS = st.sampled_from([1500, 1500, 1500, 1400, 1280, 576, 9000])


@st.composite
def links(draw):
    n_used = draw(st.integers(2, PODS))
    used = set(draw(st.permutations(range(1, PODS + 1)))[:n_used])
    out = []
    for i in range(1, PODS + 1):
        out.append(Link(
            index=i, used=i in used,
            plen=draw(st.sampled_from([24, 24, 16, 28, 30, 31])),
            mtu=draw(MTUS),
            forwarding=draw(st.sampled_from([1] * 9 + [0])),
            rp_filter=draw(st.sampled_from([0, 0, 0, 1, 2])),
            neigh=draw(st.sampled_from(["permanent", "reachable", "reachable", "stale", "none", "noarp", "delay",
                                        "probe", "incomplete", "failed", "foreign"])),
            second_net=draw(st.sampled_from([False, False, False, True])),
        ))
    return tuple(out)


# Case families with a known, reported difference: generated only on request
# (tools/fuzz --known FAMILY), so that CI's "0 mismatches" covers the rest.
KNOWN = {
    "ct-liberal": "TCP flows (feature nat) with a segment the kernel drops before conntrack sees it (bad IP "
                  "checksum), then the peer's ACK of it: the kernel alone marks that ACK INVALID (beyond what it "
                  "saw), loxi-mirror's copy made the flow BE_LIBERAL when it took it over (README, Known differences)",
    "ct-l4csum": "flows (feature nat) with a bad TCP/UDP checksum after takeover: the kernel marks the packet "
                 "INVALID (nf_conntrack_checksum=1), the fast path does not verify payload checksums "
                 "(README, Known differences)",
    "route-alias": "two main-table routes with the same prefix, metric and TOS (`ip route append`): "
                   "the kernel uses the first, loxi-mirror's model keeps only the last one notified "
                   "(routes are keyed by table/prefix/TOS/metric)",
    "local-gateway": "a gateway the node itself owns through a local-table (AnyIP) route: the kernel answers "
                     "ICMP host unreachable, loxi-mirror forwards to the gateway's neighbour entry",
}


@st.composite
def routes(draw, used: List[int], taken=(), known=(), pod_ips=()):
    """Up to six routes; `taken` holds the (prefix, metric) pairs already in
    the main table (connected subnets), which route-alias cases reuse;
    local routes covering a pod (a possible gateway) only for local-gateway."""
    out = []
    taken = set(taken)
    for _ in range(draw(st.integers(0, 6))):
        plen = draw(st.sampled_from([0, 8, 12, 16, 24, 25, 30, 32]))
        base = draw(st.sampled_from(["172.16.0.0", "172.16.5.0", "10.1.0.0", "10.2.0.128", "192.168.7.7",
                                     "10.3.0.2"]))
        prefix = str(ipaddress.ip_network(f"{base}/{plen}", strict=False))
        kind = draw(st.sampled_from(["via"] * 6 + ["dev", "dev", "onlink", "multipath",
                                                    "blackhole", "unreachable", "prohibit", "throw", "local"]))
        pods = tuple(draw(st.lists(st.sampled_from(used), min_size=2 if kind == "multipath" else 1,
                                   max_size=2, unique=True)))
        mtu = draw(st.sampled_from([0, 0, 0, 1300, 1450]))
        metric = draw(st.sampled_from([0, 0, 10]))
        if (prefix, metric) in taken and "route-alias" not in known:
            continue
        if kind == "local" and "local-gateway" not in known and any(
                ipaddress.ip_address(ip) in ipaddress.ip_network(prefix) for ip in pod_ips):
            continue
        taken.add((prefix, metric))
        out.append(Route(prefix, kind, pods, mtu=mtu, lock=bool(mtu) and draw(st.booleans()), metric=metric))
    return tuple(out)


@st.composite
def topologies(draw, features=("routed",), known=()):
    ls = draw(links())
    used = [l.index for l in ls if l.used]
    connected = [(str(l.net), 0) for l in ls if l.used]
    pod_ips = [l.pod_ip for l in ls if l.used]
    t = Topology(links=ls, routes=draw(routes(used, connected, known, pod_ips)),
                 ip_forward=draw(st.sampled_from([1] * 9 + [0])),
                 all_rp_filter=draw(st.sampled_from([0, 0, 0, 1, 2])),
                 features=tuple(features))
    for name in features:
        if FEATURES[name].topology is not None:
            t = draw(FEATURES[name].topology(t, known))
    return t


@st.composite
def forward_filter(draw, t: Topology):
    """FORWARD rules (stateless matches; DROP, REJECT, ACCEPT) and a policy;
    half the cases have none, so both the punted and the fast path run."""
    used = [l.index for l in t.used]
    match = st.one_of(
        st.just("-p udp --dport 9"), st.just("-p tcp --dport 80"), st.just("-p icmp"),
        st.sampled_from(used).map(lambda i: f"-i veth{i}"), st.sampled_from(used).map(lambda i: f"-o veth{i}"),
        st.sampled_from(used).map(lambda i: f"-s {t.link(i).net}"),
        st.sampled_from(["172.16.0.0/12", "10.9.0.0/16"]).map(lambda n: f"-d {n}"),
    )
    rule = st.tuples(match, st.sampled_from(["DROP", "REJECT", "ACCEPT"])).map(lambda mt: f"{mt[0]} -j {mt[1]}")
    rules = draw(st.one_of(st.just(()), st.lists(rule, min_size=1, max_size=4).map(tuple)))
    policy = draw(st.sampled_from(["ACCEPT", "ACCEPT", "ACCEPT", "DROP"])) if rules else "ACCEPT"
    return dataclasses.replace(t, forward_rules=rules, forward_policy=policy)


def addresses(used: List[int]):
    return st.one_of(
        st.tuples(st.just("pod"), st.sampled_from(used)),
        st.tuples(st.just("node"), st.sampled_from(used)),
        st.tuples(st.just("route"), st.integers(0, 5), st.integers(0, 1 << 16)),
        st.tuples(st.just("bcast"), st.sampled_from(used)),
        st.tuples(st.just("addr"), st.sampled_from(
            ["10.9.9.9", "172.16.5.77", "192.168.7.7", "0.0.0.0", "0.1.2.3", "127.0.0.1", "224.0.0.5",
             "239.1.2.3", "255.255.255.255", "240.0.0.1", "169.254.1.1", "198.51.100.1"])),
    )


MANGLES = st.one_of(
    st.tuples(st.just("truncate"), st.integers(1, 80)),
    st.tuples(st.just("pad"), st.sampled_from([1, 2, 6, 18, 46])),
    st.tuples(st.just("ihl"), st.integers(0, 4)),
    st.tuples(st.just("version"), st.sampled_from([0, 5, 6, 15])),
    st.tuples(st.just("totlen"), st.sampled_from([-200, -21, -8, -1, 1, 8, 100, -65535])),
    st.tuples(st.just("csum"), st.sampled_from([0, 0x1234, 0xFFFF])),
    st.tuples(st.just("l4csum"), st.sampled_from([0, 1])),
)


def deviations(used: List[int], sender: int):
    """Per field, how a packet may differ from a plain routed one."""
    return {
        "l2": st.sampled_from(["bcast", "mcast", "foreign", "other_node"]),
        "kind": st.sampled_from(["ipv6", "arp", "vlan", "qinq", "lldp"]),
        "src": st.sampled_from([("pod", u) for u in used] + [("node", sender)]
                               + [("addr", a) for a in ("10.9.9.9", "0.0.0.0", "127.0.0.1", "224.1.1.1",
                                                        "172.16.5.9", "255.255.255.255")]),
        "dst": addresses(used),
        "ttl": st.sampled_from([0, 1, 2, 3, 255]),
        "tos": st.sampled_from([0x10, 0x08, 0xb8, 0x03, 0x1e]),
        "frag": st.sampled_from(["first", "middle", "last"]),
        "options": st.sampled_from(["rr", "ra", "nop"]),
        "payload": st.sampled_from([1372, 1373, 1400, 1422, 1472, 1473, 2000, 8900]),
        "mangle": MANGLES,
    }


@st.composite
def packets(draw, t: Topology):
    """Mostly plain routed packets (to another pod or a routed prefix), each
    with up to two fields deviating (malformed, unusual, or punt shapes)."""
    used = [l.index for l in t.used]
    sender = draw(st.sampled_from(used))
    others = [u for u in used if u != sender]
    fields = dict(
        sender=sender,
        dst=draw(st.one_of(st.tuples(st.just("pod"), st.sampled_from(others)),
                           st.tuples(st.just("route"), st.integers(0, 5), st.integers(0, 1 << 16)))),
        proto=draw(st.sampled_from(["udp", "tcp", "icmp", "gre", "ipip", "raw"])),
        df=draw(st.booleans()),
        payload=draw(st.integers(0, 1500)),
    )
    dev = deviations(used, sender)
    for name in draw(st.lists(st.sampled_from(sorted(dev)), max_size=2, unique=True)):
        fields[name] = draw(dev[name])
    return Packet(**fields)


@dataclass(frozen=True)
class Case:
    topology: Topology
    packets: Tuple[Packet, ...]

    def frames(self, tag: int = 0) -> List[bytes]:
        return [frame(self.topology, p, ident_of(i, tag)) for i, p in enumerate(self.packets)]


MAX_PACKETS = 32  # per case: the low 5 bits of the IP id


def ident_of(i: int, tag: int = 0) -> int:
    """IPv4 id of the i-th packet of a case: the case's tag (so a frame that
    arrives late, during a later case, is recognised) and the index."""
    return (tag % 2048) << 5 | i


def split_ident(ident: int) -> Tuple[int, int]:
    """(tag mod 2048, index) of an IPv4 id made by ident_of()."""
    return ident >> 5, ident & (MAX_PACKETS - 1)


@dataclass
class Feature:
    """What a --feature adds to the base routed case: `topology(t, known)`
    returns a strategy for t with the feature's part filled in (Topology
    fields that fuzz_net applies and the reproducer prints); `stream(t, known)`
    a strategy of packet sequences (one frame, or a whole flow) mixed into the
    case's stream beside the base routed packets; `prelude(t, known)` frames
    that start the case.  VXLAN becomes an entry here."""
    name: str
    doc: str
    topology: Optional[Callable] = None
    stream: Optional[Callable] = None
    prelude: Optional[Callable] = None  # (t, known) -> frames sent first; the frame after waits for the agent


FEATURES: Dict[str, Feature] = {
    "routed": Feature("routed", "veth pods around a routing node: routes, MTUs, sysctls, neighbours"),
    "filter": Feature("filter", "iptables filter FORWARD rules and policy in the node",
                      lambda t, known: forward_filter(t)),
}


@st.composite
def cases(draw, features=("routed",), max_packets=24, known=()):
    t = draw(topologies(features, known))
    count = draw(st.integers(1, min(max_packets, MAX_PACKETS)))  # shrinks towards one packet
    chunks = [packets(t).map(lambda p: (p,))] + [FEATURES[f].stream(t, known) for f in features
                                                  if FEATURES[f].stream is not None]
    pkts = []
    for f in features:
        if FEATURES[f].prelude is not None:
            pkts += draw(FEATURES[f].prelude(t, known))
    start = len(pkts)
    while len(pkts) < start + count:
        pkts += draw(st.one_of(*chunks))
    if start and len(pkts) > start:
        pkts[start] = dataclasses.replace(pkts[start], pause=max(pkts[start].pause, PRELUDE_PAUSE))
    return Case(t, tuple(pkts[:MAX_PACKETS]))


PRELUDE_PAUSE = 0.05  # s: the agent mirrors what the prelude's frames changed (a bridge's FDB)


# The feature modules use the definitions above and add themselves to FEATURES.
import fuzz_bridge  # noqa: E402
import fuzz_nat  # noqa: E402
