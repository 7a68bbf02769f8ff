"""tools/fuzz --feature nat: iptables nat rules and a stateful FORWARD
ruleset in the node, and short TCP/UDP flows through them, as plain data,
hypothesis strategies and `iptables-restore` text (pure, like fuzz_gen).

Rules: DNAT of a service address (10.96.0.x, port mapped or kept) to a pod,
SNAT/MASQUERADE of a pod subnet (or everything) out of a pod's interface,
REDIRECT to the node itself; FORWARD policy ACCEPT or DROP with
`--ctstate ESTABLISHED,RELATED ACCEPT`, INVALID DROP, allowed ports, DNAT'd
flows, per-interface and per-source rules, REJECT.

Flows are crafted frames, sent by both ends from the pods: the client's
frames to the service (or the server's own address), the server's replies
to what the server sees after the node's NAT, which the generator works out
from the rules (first match of PREROUTING DNAT, then POSTROUTING SNAT).
Every segment reaches the node's conntrack (no frame longer than the
node-side MTU of its veth, no bad IP checksum in TCP): a segment lost before
conntrack, then ACKed by the peer, is the known ct-liberal difference.
TCP: handshake, data both ways with exact sequence and acknowledgement
numbers, then FIN, RST or nothing; UDP: datagrams one way, replies later.
The kernel's conntrack confirms the flow on its first packets; loxi-mirror's
agent takes it over (verdict, for TCP after it set BE_LIBERAL) when a packet
asks for it, so the frame after the first one of each direction waits
PAUSE seconds: the rest of the flow can take the fast path.

Determinism: conntrack is flushed at the start of every case and every flow
of a case has its own source port, so no NAT tuple clashes and MASQUERADE/
SNAT keep the source port; --random/--random-fully are not generated.
Nothing is normalised: the forwarded frames must be equal byte for byte
(the node's own packets, ICMP errors and RSTs, as in the routed base).
"""

import ipaddress
from dataclasses import dataclass, replace
from typing import Optional, Tuple

from hypothesis import strategies as st

import fuzz_gen as g

PAUSE = 0.05            # s before the frame after a direction's first one: the agent's takeover
VIPS = ("10.96.0.10", "10.96.0.11")
SERVER_PORTS = (8080, 80, 53)


@dataclass(frozen=True)
class Dnat:
    proto: str
    vip: str
    vport: int
    server: int                 # pod
    port: int = 0               # 0: the port is kept


@dataclass(frozen=True)
class Snat:
    client: int                 # pod whose subnet is translated; 0: any source
    out: int                    # pod towards which (-o its device)
    kind: str = "MASQUERADE"    # MASQUERADE | SNAT (to the node's address there)


@dataclass(frozen=True)
class Nat:
    dnat: Tuple[Dnat, ...] = ()
    snat: Tuple[Snat, ...] = ()
    redirect: Tuple[Tuple[str, int, int], ...] = ()  # (proto, dport, to-port): to the node itself


def nat_table(t: g.Topology) -> str:
    """The node's whole nat table for `iptables-restore`."""
    rules = []
    for d in t.nat.dnat:
        to = t.link(d.server).pod_ip + (f":{d.port}" if d.port else "")
        rules.append(f"-A PREROUTING -d {d.vip}/32 -p {d.proto} -m {d.proto} --dport {d.vport} "
                     f"-j DNAT --to-destination {to}")
    for proto, port, to in t.nat.redirect:
        rules.append(f"-A PREROUTING -p {proto} -m {proto} --dport {port} -j REDIRECT --to-ports {to}")
    for s in t.nat.snat:
        src = f"-s {t.link(s.client).net} " if s.client else ""
        target = "MASQUERADE" if s.kind == "MASQUERADE" else f"SNAT --to-source {t.link(s.out).node_ip}"
        rules.append(f"-A POSTROUTING {src}-o {t.link(s.out).dev} -j {target}")
    return ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            ":POSTROUTING ACCEPT [0:0]\n" + "".join(r + "\n" for r in rules) + "COMMIT\n")


# -------------------------------------------------------------- strategies --

@st.composite
def nat_topology(draw, t: g.Topology, known=()):
    used = [l.index for l in t.used]
    dnat = draw(st.lists(st.builds(Dnat, proto=st.sampled_from(["tcp", "udp"]), vip=st.sampled_from(VIPS),
                                   vport=st.sampled_from([80, 53]), server=st.sampled_from(used),
                                   port=st.sampled_from([8080, 0, 53])),
                         max_size=2, unique_by=lambda d: (d.proto, d.vip, d.vport)))
    snat = draw(st.lists(st.builds(Snat, client=st.sampled_from([0] + used), out=st.sampled_from(used),
                                   kind=st.sampled_from(["MASQUERADE", "SNAT"])), max_size=2))
    redirect = draw(st.sampled_from([()] * 5 + [(("tcp", 2222, 22),)]))
    established = "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    rule = st.one_of(
        st.just("-m conntrack --ctstate INVALID -j DROP"),
        st.sampled_from(SERVER_PORTS).map(lambda p: f"-p tcp -m tcp --dport {p} -j ACCEPT"),
        st.sampled_from(SERVER_PORTS).map(lambda p: f"-p udp -m udp --dport {p} -j ACCEPT"),
        st.just("-m conntrack --ctstate DNAT -j ACCEPT"),
        st.tuples(st.sampled_from(used), st.sampled_from(used)).map(
            lambda io: f"-i {t.link(io[0]).dev} -o {t.link(io[1]).dev} -j ACCEPT"),
        st.sampled_from(used).map(lambda i: f"-s {t.link(i).net} -j DROP"),
        st.sampled_from(SERVER_PORTS).map(lambda p: f"-p tcp -m tcp --dport {p} -j REJECT --reject-with tcp-reset"),
    )
    rules = draw(st.lists(rule, max_size=3))
    policy = draw(st.sampled_from(["DROP", "ACCEPT"]))
    if policy == "DROP" and draw(st.sampled_from([True] * 3 + [False])):
        # Mostly let the generated flows in: the services' and the servers' ports.
        rules = draw(st.sampled_from([["-m conntrack --ctstate DNAT -j ACCEPT"], []])) + [
            f"-p {proto} -m {proto} --dport {port} -j ACCEPT" for proto in ("tcp", "udp")
            for port in draw(st.lists(st.sampled_from(SERVER_PORTS), min_size=1, max_size=3, unique=True))] + rules
    if draw(st.sampled_from([True] * 4 + [False])):
        rules = [established] + rules
    return replace(t, nat=Nat(tuple(dnat), tuple(snat), redirect),
                   forward_rules=t.forward_rules + tuple(rules),
                   forward_policy=policy if t.forward_policy == "ACCEPT" else t.forward_policy)


def server_view(t: g.Topology, client: int, proto: str, dst: str, dport: int) -> Tuple[Optional[int], str, int, str]:
    """What the node's NAT makes of client -> dst:dport: (the server pod or
    None, the destination it reaches, its port, the source the server sees)."""
    server = next((l.index for l in t.used if l.pod_ip == dst), None)
    for d in t.nat.dnat:
        if (d.proto, d.vip, d.vport) == (proto, dst, dport):
            server, dst, dport = d.server, t.link(d.server).pod_ip, d.port or dport
            break
    src = t.link(client).pod_ip
    if server is not None:
        for s in t.nat.snat:
            if s.out == server and (not s.client or ipaddress.ip_address(src) in t.link(s.client).net):
                src = t.link(server).node_ip
                break
    return server, dst, dport, src


@st.composite
def flows(draw, t: g.Topology, known=()):
    """One flow's frames: a TCP connection or UDP datagrams between a client
    pod and a server pod (through a service address or directly)."""
    used = [l.index for l in t.used]
    proto = draw(st.sampled_from(["tcp", "udp"]))
    client = draw(st.sampled_from(used))
    services = [(d.vip, d.vport) for d in t.nat.dnat if d.proto == proto]
    direct = st.tuples(st.sampled_from([u for u in used if u != client]).map(lambda i: t.link(i).pod_ip),
                       st.sampled_from(SERVER_PORTS + (2222,)))
    dst, dport = draw(st.one_of(st.sampled_from(services), direct) if services else direct)
    k = draw(st.integers(0, 15))   # which flow: its own source port and sequence space
    data = draw(st.lists(st.tuples(st.sampled_from([0, 0, 1]), st.sampled_from([1, 40, 100, 512, 1400])),
                         min_size=1, max_size=6))
    end = draw(st.sampled_from(["fin", "none", "rst", "rst_server"])) if proto == "tcp" else "none"
    deviation = draw(st.one_of(st.none(), st.tuples(st.integers(0, len(data) - 1), _deviations(known, proto))))
    return flow_frames(t, proto, client, dst, dport, data, end, k, deviation, known)


def tcp_flow(t: g.Topology, client: int, dst: str, dport: int, data, end="fin", k=0):
    return flow_frames(t, "tcp", client, dst, dport, data, end, k)


def flow_frames(t: g.Topology, proto, client, dst, dport, data, end="none", k=0, deviation=None, known=()):
    """The frames of one flow from `client` to dst:dport: data is
    [(direction 0 client->server | 1 back, payload bytes)]; end fin, rst
    (client), rst_server or none; deviation (data step, Packet fields)."""
    server, _, sport_s, ssrc = server_view(t, client, proto, dst, dport)
    sport = 62000 + k * 7 + (ord(proto[0]) & 1)  # above the base generator's source ports
    data = list(data)
    data[0] = (0, data[0][1])  # the client speaks first (a reply first would be a flow the other way)

    def frame_of(direction, l4, **kw):
        if direction == 0 or server is None:
            return g.Packet(sender=client, dst=("addr", dst), proto=proto, l4=(sport, dport) + l4, **kw)
        return g.Packet(sender=server, dst=("addr", ssrc), proto=proto, l4=(sport_s, sport) + l4, **kw)

    # Every frame must fit the node's side of its sender's veth: one lost
    # before conntrack saw it, then ACKed by the peer, is the known
    # ct-liberal difference.
    # (40: IP and TCP headers; 8 more for a deviation's IP options).
    room = {0: t.link(client).mtu - 48, 1: t.link(server or client).mtu - 48}
    data = [(d, min(n, room[d])) for d, n in data]
    if (deviation is not None and deviation[1].get("payload", 0) > room[data[deviation[0]][0]]
            and (proto == "tcp" and "ct-liberal" not in known)):
        deviation = None
    steps = []  # (direction, tcp flags, payload)
    if proto == "tcp":
        steps += [(0, "S", 0), (1, "SA", 0), (0, "A", 0)]
    steps += [(d, "PA" if n else "A", n) for d, n in data]
    if end == "fin":
        steps += [(0, "FA", 0), (1, "FA", 0), (0, "A", 0)]
    elif end.startswith("rst"):
        steps.append((1 if end == "rst_server" else 0, "R", 0))
    numbered = _tcp_numbers(steps, k) if proto == "tcp" else [(d, (), n) for d, _, n in steps]
    first_data = 3 if proto == "tcp" else 0
    # The first data-phase frame of each direction asks the agent to take the flow over.
    asking = {next(j for j in range(first_data, len(numbered)) if numbered[j][0] == d)
              for d in {s[0] for s in numbered[first_data:]}}
    pkts = []
    for j, (direction, l4, n) in enumerate(numbered):
        fields = dict(payload=n, df=True, pause=PAUSE if j - 1 in asking else 0.0)
        if deviation is not None and j == first_data + deviation[0]:
            fields.update(deviation[1])
        p = frame_of(direction, l4, **fields)
        pkts.append(p)
    return tuple(pkts)


def _tcp_numbers(steps, k):
    """(direction, (flags, seq, ack), payload) with each side's sequence
    numbers advancing exactly as the segments before it say."""
    nxt = [0x01000000 * (k + 1), 0x80000000 + 0x01000000 * k]
    acked = [0, 0]  # what each side has received up to (its ack field)
    out = []
    for direction, flags, n in steps:
        me, peer = direction, 1 - direction
        out.append((direction, (flags, nxt[me], acked[me] if "A" in flags else 0), n))
        nxt[me] = (nxt[me] + n + (1 if ("S" in flags or "F" in flags) else 0)) & 0xFFFFFFFF
        acked[peer] = nxt[me]
    return out


def _deviations(known, proto):
    """One data frame of the flow may differ: TTL (ICMP time exceeded back
    through the NAT), IP options, TOS, over-MTU with and without DF.  A bad IP
    header checksum (dropped before conntrack sees the segment, so the peer's
    later ACK is beyond what the kernel saw) only for UDP or with --known
    ct-liberal; bad L4 checksums only with --known ct-l4csum."""
    options = [
        st.just({"ttl": 1}), st.just({"ttl": 0}), st.just({"options": "rr"}), st.just({"tos": 0x10}),
        st.just({"payload": 2000, "df": True}), st.just({"payload": 2000, "df": False}),
    ]
    if proto == "udp" or "ct-liberal" in known:
        options.append(st.just({"mangle": ("csum", 0x1234)}))
    if "ct-l4csum" in known:
        options.append(st.just({"mangle": ("l4csum", 1)}))
    return st.one_of(*options)


FEATURE = g.Feature("nat", "iptables DNAT/SNAT/MASQUERADE/REDIRECT and a stateful FORWARD ruleset in the node, "
                           "with TCP/UDP flows through them", nat_topology, flows)
g.FEATURES["nat"] = FEATURE
