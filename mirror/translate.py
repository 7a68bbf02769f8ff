"""Translator: KernelState -> the contents the BPF maps should have.

Pure: no I/O, no BPF, no clock; unit-tested without root.  Every case it
does not understand becomes a punt with a named reason, never a guess.
"""

import re
import socket
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from . import model as m
from .reasons import BY_NAME as R

# Link flags, as in kernel_bpf/common.h.
LINK_UP = 1 << 0
LINK_FORWARDING = 1 << 1
LINK_REDIRECT_PEER = 1 << 2
LINK_RPF_STRICT = 1 << 3
LINK_RPF_LOOSE = 1 << 4

# Link kinds the fast path can receive on and transmit to today.  Bridges,
# VXLAN, bonds ... arrive with their own issues; until then they are not
# attached and routes through them punt (EGRESS_UNMANAGED).
SUPPORTED_KINDS = ("veth", "")


@dataclass(frozen=True)
class RouteEntry:
    action: int
    oif: int = 0
    gateway: Optional[str] = None
    mtu: int = 0


@dataclass(frozen=True)
class LinkEntry:
    mac: str
    flags: int
    mtu: int
    # A veth peer's own MAC: only frames to it may skip the peer's receive
    # classification (redirect_peer); others take veth_xmit (bpf_redirect).
    peer_mac: Optional[str] = None


@dataclass
class Desired:
    """Map contents.  As a full translation: every entry.  As a delta
    (translate_changes): only the keys that may have changed, where None
    means the entry must not exist."""

    routes: Dict[Tuple[str, int], Optional[RouteEntry]] = field(default_factory=dict)  # (dst, len)
    neighbors: Dict[Tuple[int, str], Optional[str]] = field(default_factory=dict)  # (ifindex, ip) -> MAC
    links: Dict[int, Optional[LinkEntry]] = field(default_factory=dict)
    punt_forward_reason: int = 0
    attach: Dict[int, str] = field(default_factory=dict)  # ifindex -> name to attach TC to


@dataclass(frozen=True)
class Selection:
    """Which interfaces the user lets the agent manage (--include/--exclude)."""

    include: Optional[str] = None
    exclude: Optional[str] = None

    def allows(self, name: str) -> bool:
        if self.include and not re.fullmatch(self.include, name):
            return False
        return not (self.exclude and re.fullmatch(self.exclude, name))


def eligible(link: m.Link, selection: Selection, stacked_on=frozenset(), tc_after=frozenset()) -> bool:
    return (
        link.link_type == m.ARPHRD_ETHER
        and link.kind in SUPPORTED_KINDS
        and link.name != "lo"
        and not link.master  # bridge/bond ports: their traffic is not routed here
        # A macvlan/ipvlan on it (here, or moved elsewhere: it adds its MAC,
        # which makes a veth promiscuous; so do passthru and tcpdump) takes
        # frames before IP does; a tc filter after ours would be skipped.
        and link.index not in stacked_on
        and not link.promiscuity
        and link.index not in tc_after
        and bool(link.mac)
        and selection.allows(link.name)
    )


def _eligible_in(state: m.KernelState, selection: Selection):
    """eligible() for links of this state."""
    stacked_on = {l.link for l in state.links.values() if l.kind in m.STACKED_KINDS and l.link_netnsid is None}
    tc_after = set(state.ingress_tc_after)
    return lambda link: eligible(link, selection, stacked_on, tc_after)


def translate(state: m.KernelState, selection: Selection = Selection()) -> Desired:
    """Every map entry the state calls for."""
    changes = m.Changes(prefixes=set(state.by_prefix) | {(a.address, 32) for a in state.addresses} | state.uncertain,
                        links=set(state.links), neighbors=set(state.neighbors))
    full = translate_changes(state, changes, selection)
    full.routes = {k: v for k, v in full.routes.items() if v is not None}
    full.links = {k: v for k, v in full.links.items() if v is not None}
    full.neighbors = {k: v for k, v in full.neighbors.items() if v is not None}
    return full


def translate_changes(state: m.KernelState, changes: m.Changes, selection: Selection = Selection()) -> Desired:
    """The entries for the keys in `changes` (None: must not exist), plus the
    global switch and the attach set, which are cheap to recompute."""
    ok = _eligible_in(state, selection)
    out = Desired(attach=attachments(state, selection), punt_forward_reason=_punt_forward_reason(state))
    out.links = {i: link_entry(state, i, ok) for i in changes.links}
    out.neighbors = {k: neighbor_entry(state, k, ok) for k in changes.neighbors}
    prefixes = changes.prefixes | (set(state.by_prefix) if changes.all_routes else set())
    local_ips = {a.address for a in state.addresses}
    covering = _covering_local_prefixes(state)
    out.routes = {p: route_entry(state, p, local_ips, covering) for p in prefixes}
    return out


def attachments(state: m.KernelState, selection: Selection) -> Dict[int, str]:
    ok = _eligible_in(state, selection)
    return {i: l.name for i, l in state.links.items() if ok(l)}


def link_entry(state: m.KernelState, index: int, ok) -> Optional[LinkEntry]:
    link = state.links.get(index)
    if link is None or not ok(link):
        return None
    peer = state.peers.get(link.peer_key) if link.peer_key else None
    return _link_entry(link, state.sysctls.get(link.name), index in state.egress_tc, peer)


def neighbor_entry(state: m.KernelState, key, ok) -> Optional[str]:
    neigh = state.neighbors.get(key)
    link = state.links.get(key[0])
    if neigh is None or link is None or not ok(link):
        return None
    return neigh.mac if neigh.mac and neigh.state & m.NUD_VALID else None


def _link_entry(link: m.Link, sysctls: Optional[m.LinkSysctls], egress_busy: bool,
                peer: Optional[m.Peer]) -> LinkEntry:
    flags = 0
    if link.oper_up:
        flags |= LINK_UP
    # bpf_redirect_peer skips this device's egress (qdisc, clsact and tcx
    # programs) and, on the peer, the XDP program and eth_type_trans() that
    # veth_xmit() would run (and it drops unless the peer lives in another
    # netns): only where none of that matters.  Elsewhere bpf_redirect takes
    # the kernel's own path through veth_xmit().
    peer_mac = peer.mac if peer is not None and not peer.xdp else None
    if link.kind == "veth" and link.peer_in_other_netns and not egress_busy and peer_mac:
        flags |= LINK_REDIRECT_PEER
    if sysctls is not None:  # unknown sysctls: no FORWARDING flag, so punt
        if sysctls.forwarding:
            flags |= LINK_FORWARDING
        if sysctls.rp_filter == 1:
            flags |= LINK_RPF_STRICT
        elif sysctls.rp_filter >= 2:
            flags |= LINK_RPF_LOOSE
    return LinkEntry(mac=link.mac, flags=flags, mtu=link.mtu,
                     peer_mac=peer_mac if flags & LINK_REDIRECT_PEER else None)


def _punt_forward_reason(state: m.KernelState) -> int:
    if state.netfilter_impact is not None:
        return R["NETFILTER"]
    if state.xfrm_impact is not None:
        return R["IPSEC"]
    if state.fwd_use_pmtu:
        return R["ROUTE_UNSUPPORTED"]  # learned PMTU exceptions decide the MTU
    if not state.fwd_update_priority:
        return R["ROUTE_UNSUPPORTED"]  # skb->priority kept, not set from the TOS
    if custom_rules(state):
        return R["POLICY_ROUTING"]
    return 0


def custom_rules(state: m.KernelState):
    """How the rules differ from local/main/default: extra rules, and
    default rules that are missing (without `pref 32766 table main` the
    kernel stops forwarding by the main table).  Non-empty: forwarded
    traffic punts until policy routing is mirrored."""
    extra = sorted((r for r in state.rules if r.selectors or (r.priority, r.table) not in m.DEFAULT_RULES),
                   key=lambda r: r.priority)
    present = {(r.priority, r.table) for r in state.rules if not r.selectors}
    missing = [m.Rule(prio, table) for prio, table in sorted(m.DEFAULT_RULES - present)]
    return [("extra", r) for r in extra] + [("missing", r) for r in missing]


def route_entry(state: m.KernelState, prefix, local_ips, covering) -> Optional[RouteEntry]:
    """The entry for one prefix: the kernel consults the local table before
    main, so a local-table route (or an address, even before its local route
    arrives) wins, and so does a shorter local-table prefix covering it."""
    routes = _routes_of(state, prefix)
    if prefix in state.uncertain:
        return RouteEntry(R["RESYNC"])  # changed during the last dump: not known exactly
    local = [r for r in routes if r.table == m.TABLE_LOCAL]
    main = [r for r in routes if r.table == m.TABLE_MAIN]
    if local:
        entry = RouteEntry(_local_action(min(local, key=lambda r: r.priority).type))
    elif prefix[1] == 32 and prefix[0] in local_ips:
        entry = RouteEntry(R["LOCAL"])
    elif main:
        entry = _main_entry(main, state.links)
    else:
        return None
    if covering:
        ip = _ip_int(prefix[0])
        for net, plen, cover in covering:
            if prefix[1] > plen and ip >> (32 - plen) == net:
                return cover
    return entry


def _routes_of(state: m.KernelState, prefix):
    """Every route for the prefix, those sharing a key in the kernel's order
    (so min() by priority picks the first of a key, as fib_table_lookup())."""
    return [r for aliases in state.by_prefix.get(prefix, {}).values() for r in aliases]


def _covering_local_prefixes(state: m.KernelState):
    """Local-table routes shorter than /32 (127/8, AnyIP ...) as (net, len, entry)."""
    out = []
    for dst, plen in state.local_short:
        local = [r for r in _routes_of(state, (dst, plen)) if r.table == m.TABLE_LOCAL]
        entry = RouteEntry(_local_action(min(local, key=lambda r: r.priority).type))
        out.append((_ip_int(dst) >> (32 - plen), plen, entry))
    return out


def _ip_int(ip: str) -> int:
    return int.from_bytes(socket.inet_aton(ip), "big")


def _local_action(rtype: int) -> int:
    if rtype == m.RTN_LOCAL:
        return R["LOCAL"]
    if rtype == m.RTN_BROADCAST:
        return R["IP_MULTICAST"]
    return R["ROUTE_UNSUPPORTED"]


def _main_entry(routes, links) -> RouteEntry:
    """The route the kernel would pick among same-prefix routes, as an entry:
    the lowest metric, and of routes sharing that key the first.  If that
    one cannot be used (dead next hop ...) the kernel tries the next: punt."""
    if any(r.tos for r in routes):
        return RouteEntry(R["ROUTE_UNSUPPORTED"])  # TOS-dependent choice
    route = min(routes, key=lambda r: r.priority)
    if route.type != m.RTN_UNICAST:
        return RouteEntry(_local_action(route.type))  # local, broadcast; blackhole, throw ... unsupported
    if route.unsupported or len(route.nexthops) != 1:
        return RouteEntry(R["ROUTE_UNSUPPORTED"])  # multipath, nexthop objects, encap
    nh = route.nexthops[0]
    if not nh.oif or nh.flags & m.RTNH_F_DEAD:
        return RouteEntry(R["ROUTE_UNSUPPORTED"])
    link = links.get(nh.oif)
    mtu = route.mtu or (link.mtu if link else 0)
    return RouteEntry(R["FORWARDED"], oif=nh.oif, gateway=nh.gateway, mtu=mtu)
