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
    """struct lm_flow_key: the wire tuple of one direction and its ingress."""

    ifindex: int
    saddr: str
    daddr: str
    sport: int
    dport: int
    proto: int

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


def kernel_keeps(entry: ct.Entry, direction: Optional[int]) -> Optional[str]:
    """Why the fast path must not carry this direction of the entry (the
    kernel tracks a state change, or the entry has what the datapath cannot
    see); None when it may."""
    if direction is None:
        return "the packet's tuple is neither of the entry's"
    if entry.proto not in (TCP, UDP):
        return "neither TCP nor UDP"
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


def flow_view(entry: ct.Entry, direction: int, wire: ct.Tuple, in_iface: str, out_iface: str) -> FlowView:
    """The flow as the verdict evaluator needs it (NF_API.md)."""
    x = translation(entry, direction)
    established = entry.has("SEEN_REPLY") or direction == ct.REPLY
    return FlowView(
        proto=entry.proto, in_iface=in_iface, out_iface=out_iface,
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
    broadcast = frozenset(r.dst for aliases in state.routes.values() for r in aliases
                          if r.table == m.TABLE_LOCAL and r.type == m.RTN_BROADCAST and r.dst_len == 32)
    return HostView(local_addrs=frozenset(a.address for a in state.addresses), broadcast_addrs=broadcast)
