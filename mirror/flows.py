"""Flow translator: one direction of a kernel conntrack entry -> its `flows` entry.

Pure (no I/O): the offload loop (mirror/offload.py) reads the kernel entry
and the ruleset verdict; this module decides whether the fast path may carry
the flow, describes the flow to the verdict evaluator, and turns the verdict
into the lm_flow entry the datapath checks on every packet.  Anything unsure
punts to the kernel.
"""

from dataclasses import dataclass
from typing import Optional

from . import conntrack as ct
from . import model as m
from .nfverdict import FlowView, HostView, Verdict
from .reasons import BY_NAME as R
from .translate import bridge_calls_iptables

TCP, UDP = 6, 17
# The status bits a verdict may depend on (--ctstatus, --ctstate NEW vs
# ESTABLISHED, whether nat chains could still be traversed); the datapath
# compares them with the entry on every packet (LM_CT_VERDICT_BITS in
# kernel_bpf/common.h).
VERDICT_BITS = ct.IPS["SEEN_REPLY"] | ct.IPS["ASSURED"] | ct.IPS["SRC_NAT_DONE"] | ct.IPS["DST_NAT_DONE"]
# Entries the kernel must handle itself: NAT being set up, sequence
# adjustment (helpers' payload rewrites), expectations, clashes, dying.
KERNEL_ONLY_STATUS = ("DYING", "SEQ_ADJUST", "NAT_CLASH", "TEMPLATE", "HELPER", "EXPECTED")


@dataclass(frozen=True)
class FlowKey:
    """struct lm_flow_key: the wire tuple of one direction and the device it
    arrived on (for frames from a bridge port: the port)."""

    ifindex: int
    saddr: str
    daddr: str
    sport: int
    dport: int
    proto: int
    bridged: bool = False  # switched between two ports of a bridge (br_netfilter)

    @property
    def wire(self) -> ct.Tuple:
        return ct.Tuple(self.saddr, self.daddr, self.sport, self.dport)


@dataclass(frozen=True)
class FlowEntry:
    """struct lm_flow without the counters: what the verdict assumed."""

    gen: int
    action: int  # FORWARDED or NF_DROP
    oif: int
    ct_mark: int
    ct_status: int  # status & VERDICT_BITS
    nat_saddr: str
    nat_daddr: str
    nat_sport: int
    nat_dport: int


@dataclass(frozen=True)
class Devices:
    """The devices the IPv4 hooks see for a packet of the flow.  A frame
    from a bridge port meets them as br_netfilter hands it on: -i (and -o,
    if it is switched) is the bridge, physdev the ports; without
    bridge-nf-call-iptables it carries no bridge information at all."""

    in_iface: str
    out_iface: str
    bridged: bool = False  # switched within the bridge (physdev-is-bridged)
    physdev_in: str = ""
    physdev_out: str = ""


def flow_devices(state: m.KernelState, key: FlowKey, oif: int) -> Optional[Devices]:
    """The devices for the flow of `key` leaving through `oif` (the route's
    egress, or for a bridged frame the egress port); None when the links
    say otherwise than the datapath did (an event is on its way)."""
    in_link, out_link = state.links.get(key.ifindex), state.links.get(oif)
    if in_link is None or out_link is None:
        return None
    bridge = state.links.get(in_link.master) if in_link.port is not None else None
    if bridge is not None and bridge.kind != "bridge":
        return None
    if key.bridged:
        if bridge is None or out_link.master != bridge.index or not bridge_calls_iptables(state, bridge):
            return None
        return Devices(bridge.name, bridge.name, True, in_link.name, out_link.name)
    if bridge is None:
        return Devices(in_link.name, out_link.name)
    # Routed with the bridge as L3 device: br_netfilter's PREROUTING gave
    # the frame its bridge information (physindev), which stays.
    physdev_in = in_link.name if bridge_calls_iptables(state, bridge) else ""
    return Devices(bridge.name, out_link.name, physdev_in=physdev_in)


def kernel_keeps(entry: ct.Entry, direction: Optional[int], bridged: bool = False) -> Optional[str]:
    """Why the fast path must not carry this direction of the entry (the
    kernel tracks a state change, or the entry has what the datapath cannot
    see); None when it may."""
    if direction is None:
        return "the packet's tuple is neither of the entry's"
    if entry.proto not in (TCP, UDP):
        return "neither TCP nor UDP"
    if bridged and (entry.has("SRC_NAT") or entry.has("DST_NAT")):
        return "bridged with NAT (br_netfilter re-routes or rewrites it)"
    if not entry.has("CONFIRMED"):
        return "not confirmed"
    bad = [name for name in KERNEL_ONLY_STATUS if entry.has(name)]
    if bad:
        return "status " + ",".join(bad)
    if entry.helper is not None:
        return f"helper {entry.helper}"
    if entry.zone:
        return f"zone {entry.zone}"
    if entry.proto == TCP:
        if entry.tcp_state != ct.TCP_ESTABLISHED:
            return f"TCP state {entry.tcp_state_name}"
        return None if entry.has("ASSURED") else "TCP not assured yet"
    if entry.has("SEEN_REPLY") or direction == ct.ORIGINAL:
        # Assured; replied and younger than 2 s (the datapath punts the packet
        # that makes it assured, and the new status asks for a new verdict);
        # or one-way (unreplied, ctstate NEW).
        return None
    return "UDP: its first reply changes the entry"


def translation(entry: ct.Entry, direction: int) -> ct.Tuple:
    """The packet's tuple as it leaves (after every NAT the kernel chose):
    the other direction's tuple, reversed."""
    other = entry.reply if direction == ct.ORIGINAL else entry.orig
    return ct.Tuple(other.dst, other.src, other.dport, other.sport)


def flow_view(entry: ct.Entry, direction: int, wire: ct.Tuple, devices: Devices) -> FlowView:
    """The flow as the verdict evaluator needs it (NF_API.md), meeting the
    hooks through `devices` (flow_devices)."""
    x = translation(entry, direction)
    established = entry.has("SEEN_REPLY") or direction == ct.REPLY
    return FlowView(
        proto=entry.proto, in_iface=devices.in_iface, out_iface=devices.out_iface,
        bridged=devices.bridged, physdev_in=devices.physdev_in, physdev_out=devices.physdev_out,
        src=wire.src, dst=wire.dst, sport=wire.sport, dport=wire.dport,
        xsrc=x.src, xdst=x.dst, xsport=x.sport, xdport=x.dport,
        ctstate="ESTABLISHED" if established else "NEW",
        ctdir="ORIGINAL" if direction == ct.ORIGINAL else "REPLY",
        ctstatus=frozenset(n for n in ("EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED") if entry.has(n)),
        nat=frozenset(n for n, bit in (("SNAT", "SRC_NAT"), ("DNAT", "DST_NAT")) if entry.has(bit)),
        ctmark=entry.mark, orig=tuple(entry.orig), reply=tuple(entry.reply))


def flow_entry(verdict: Verdict, gen: int, oif: int, entry: ct.Entry, direction: int) -> FlowEntry:
    """The lm_flow for a verdict: forward or drop where the ruleset proves
    ACCEPT or DROP; otherwise the flow punts (NETFILTER) without asking again
    until something it depends on changes."""
    if verdict.action == "ACCEPT":
        action = R["FORWARDED"]
    elif verdict.action == "DROP":
        action = R["NF_DROP"]  # the datapath drops and counts it, as the ruleset would
    else:
        action = R["NETFILTER"]
    x = translation(entry, direction)
    return FlowEntry(gen=gen, action=action, oif=oif, ct_mark=entry.mark, ct_status=entry.status & VERDICT_BITS,
                     nat_saddr=x.src, nat_daddr=x.dst, nat_sport=x.sport, nat_dport=x.dport)


def host_view(state: m.KernelState) -> HostView:
    """This namespace's own addresses, for addrtype matches."""
    broadcast = frozenset(dst for dst, plen in state.by_prefix.where(
        lambda r: r.table == m.TABLE_LOCAL and r.type == m.RTN_BROADCAST) if plen == 32)
    return HostView(local_addrs=frozenset(a.address for a in state.addresses), broadcast_addrs=broadcast)
