"""tools/fuzz --feature bridge: a Linux bridge (br0) in the node with 2..4
of the pods as ports, as plain data, its hypothesis strategies and its
rendering as `ip`/`bridge` commands (pure, like fuzz_gen).

Per case: which veths are ports (the others stay routed), each port's STP
state, learning, flood/mcast_flood/bcast_flood, hairpin, isolated and
locked flags, the bridge's MAC, up/down, ageing time, br_netfilter
(`bridge-nf-call-iptables`), its forwarding/rp_filter sysctls, and static,
permanent (local) and user-added dynamic FDB entries.  Frames: bridged
unicast to a pod's MAC (learned or not yet), unknown unicast, broadcast and
multicast, 01:80:c2:00:00:0X, the bridge's and the ports' own MACs (routed),
plus every deviation of the routed generator (VLAN tags, malformed ...).

Learning changes the kernel's FDB as frames pass; both copies see the same
frames in the same order, so they learn alike.  What must not make them
diverge: the FDB is flushed (learned and user-added entries) at the start of
every case, and the ageing time is at least 10 s (a case lasts well under a
second): with ageing 0 the kernel itself keeps an expired entry until its
garbage collector runs (10 ms or more later), so whether a frame floods or
not would depend on timing, not on the frames.  Static FDB entries name a
pod's MAC only on that pod's own port: an entry on another port moves when
the pod sends (learning), a change the agent mirrors milliseconds later
(README, "Safety"), which would measure that window, not transparency.
"""

import dataclasses
from dataclasses import dataclass
from typing import List, Tuple

from hypothesis import strategies as st

import fuzz_gen as g

BRIDGE_MAC = "02:00:0b:00:64:01"
STATES = {"disabled": 0, "listening": 1, "learning": 2, "forwarding": 3, "blocking": 4}


@dataclass(frozen=True)
class Port:
    index: int                  # the pod (vethN)
    state: str = "forwarding"   # STATES
    learning: bool = True
    flood: bool = True
    mcast_flood: bool = True
    bcast_flood: bool = True
    hairpin: bool = False
    isolated: bool = False
    locked: bool = False


@dataclass(frozen=True)
class Bridge:
    ports: Tuple[Port, ...]
    mac: str = BRIDGE_MAC
    up: bool = True
    ageing: int = 30000                  # centiseconds
    nf_call_iptables: int = 1            # net.bridge.bridge-nf-call-iptables
    forwarding: int = 1
    rp_filter: int = 0
    fdb: Tuple[Tuple[str, int, str], ...] = ()  # (MAC, port, static|permanent|dynamic)


def node_commands(t: g.Topology) -> List[str]:
    """`ip -batch` lines for br0 (it exists; the ports are enslaved before)."""
    b = t.bridge
    cmds = [f"addr flush dev {g.BRIDGE}", f"neigh flush dev {g.BRIDGE} nud all",
            f"link set {g.BRIDGE} type bridge ageing_time {b.ageing} stp_state 0",
            f"link set {g.BRIDGE} address {b.mac} {'up' if b.up else 'down'}"]
    if any(l.bridged for l in t.used):
        cmds.append(f"addr add {g.BRIDGE_IP}/24 dev {g.BRIDGE}")
    return cmds


def bridge_commands(t: g.Topology) -> List[str]:
    """`bridge -batch` lines: forget what earlier cases learned or added,
    then this case's port flags and FDB entries."""
    cmds = [f"fdb flush dev {g.BRIDGE} added_by_user", f"fdb flush dev {g.BRIDGE} dynamic"]
    if t.bridge is None:
        return cmds
    onoff = lambda v: "on" if v else "off"  # noqa: E731
    for p in t.bridge.ports:
        cmds.append(f"link set dev veth{p.index} state {STATES[p.state]} learning {onoff(p.learning)} "
                    f"flood {onoff(p.flood)} mcast_flood {onoff(p.mcast_flood)} "
                    f"bcast_flood {onoff(p.bcast_flood)} hairpin {onoff(p.hairpin)} "
                    f"isolated {onoff(p.isolated)} locked {onoff(p.locked)}")
    cmds += [f"fdb add {mac} dev veth{port} master {kind}" for mac, port, kind in t.bridge.fdb]
    return cmds


def sysctls(b: Bridge) -> List[Tuple[str, int]]:
    return [("net.bridge.bridge-nf-call-iptables", b.nf_call_iptables),
            (f"net.ipv4.conf.{g.BRIDGE}.forwarding", b.forwarding),
            (f"net.ipv4.conf.{g.BRIDGE}.rp_filter", b.rp_filter)]


# -------------------------------------------------------------- strategies --

def _rare(value, usual):
    """`usual` nine times in ten."""
    return st.sampled_from([usual] * 9 + [value])


@st.composite
def ports(draw, index):
    return Port(index=index,
                state=draw(st.sampled_from(["forwarding"] * 36 + ["learning", "listening", "blocking",
                                                                   "disabled"])),
                learning=draw(_rare(False, True)), flood=draw(_rare(False, True)),
                mcast_flood=draw(_rare(False, True)), bcast_flood=draw(_rare(False, True)),
                hairpin=draw(_rare(True, False)), isolated=draw(st.sampled_from([False] * 6 + [True])),
                locked=draw(st.sampled_from([False] * 19 + [True])))


@st.composite
def bridge_topology(draw, t: g.Topology, known=()):
    used = [l.index for l in t.used]
    n = draw(st.integers(2, len(used)))
    members = sorted(draw(st.permutations(used))[:n])
    links = tuple(dataclasses.replace(l, bridged=l.index in members) for l in t.links)
    own_port = st.sampled_from(members).map(lambda i: (g.pod_mac(i), i, "static"))  # the pod's own port only
    unknown = st.tuples(st.integers(1, 3).map(g.unknown_mac), st.sampled_from(members),
                        st.sampled_from(["static", "static", "permanent", "dynamic"]))
    # Rarer: a pod's own MAC as a local entry (the bridge then warns about every
    # frame the pod sends, and passes frames to it up to itself).
    local_pod = st.sampled_from(members).map(lambda i: (g.pod_mac(i), i, "permanent"))
    fdb_entry = st.one_of(own_port, own_port, unknown, unknown, local_pod)
    fdb = draw(st.lists(fdb_entry, max_size=3, unique_by=lambda e: e[0]))
    b = Bridge(ports=tuple([draw(ports(i)) for i in members]),
               mac=draw(st.sampled_from([BRIDGE_MAC, BRIDGE_MAC, g.node_mac(members[0])])),
               up=draw(_rare(False, True)),
               ageing=draw(st.sampled_from([30000, 1000, 100000])),
               nf_call_iptables=draw(st.sampled_from([1, 1, 0])),
               forwarding=draw(_rare(0, 1)), rp_filter=draw(st.sampled_from([0, 0, 0, 1, 2])),
               fdb=tuple(fdb))
    return dataclasses.replace(t, links=links, bridge=b)





def warm_up(t: g.Topology, known=()):
    """Mostly, before the case's frames: an LLDP frame (01:80:c2:00:00:0e,
    which the bridge consumes but learns from) from every port's pod, so that
    the frames after it find their MACs learned (else they punt BR_LEARN or
    flood until the agent has mirrored the entry); the next frame waits
    LEARN_PAUSE."""
    warm = tuple(g.Packet(sender=p.index, kind="lldp") for p in t.bridge.ports)
    return st.sampled_from([warm, warm, warm, ()])


def bridged_stream(t: g.Topology, known=()):
    """Two in three frames of a case from here, the rest from the routed base."""
    return st.one_of(bridged_packet(t), bridged_packet(t))


@st.composite
def bridged_packet(draw, t: g.Topology):
    """One frame from a bridge port: mostly to another pod's MAC (switched),
    else any of the L2 destinations a bridge treats differently; plus up to
    one deviation of the routed generator."""
    members = [p.index for p in t.bridge.ports]
    used = [l.index for l in t.used]
    sender = draw(st.sampled_from(members))
    target = draw(st.sampled_from([u for u in used if u != sender]))
    fields = dict(sender=sender, l2="pod", l2_arg=target, dst=("pod", target),
                  proto=draw(st.sampled_from(["udp", "tcp", "icmp", "raw"])),
                  df=draw(st.booleans()), payload=draw(st.integers(0, 1500)))
    l2 = draw(st.one_of(
        st.just(("pod", target)), st.just(("pod", target)), st.just(("pod", target)),
        st.tuples(st.just("pod"), st.sampled_from([sender] + members)),      # hairpin / another member
        st.tuples(st.just("node"), st.just(0)),                              # the bridge's MAC: routed
        st.tuples(st.just("port"), st.sampled_from(members)),                # a port's own (local) MAC
        st.tuples(st.just("unknown"), st.integers(1, 3)),                    # unknown, or a static entry
        st.tuples(st.sampled_from(["bcast", "mcast", "foreign"]), st.just(0)),
        st.tuples(st.just("linklocal"), st.sampled_from([0, 2, 3, 0xe])),
    ))
    fields["l2"], fields["l2_arg"] = l2
    dev = g.deviations(used, sender)
    for name in draw(st.sampled_from([[]] * 2 + [[k] for k in sorted(set(dev) - {"l2"})])):
        fields[name] = draw(dev[name])
    return (g.Packet(**fields),)


FEATURE = g.Feature("bridge", "pods on a Linux bridge in the node: port states and flags, FDB, bridged and "
                              "routed frames", bridge_topology, bridged_stream, warm_up)
g.FEATURES["bridge"] = FEATURE
