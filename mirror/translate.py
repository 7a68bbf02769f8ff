"""Translator: KernelState -> the contents the BPF maps should have.

Pure: no I/O, no BPF, no clock; unit-tested without root.  Every case it
does not understand becomes a punt with a named reason, never a guess.
"""

import ipaddress
import re
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


@dataclass
class Desired:
    routes: Dict[Tuple[str, int], RouteEntry] = field(default_factory=dict)  # (dst, len)
    neighbors: Dict[Tuple[int, str], str] = field(default_factory=dict)  # (ifindex, ip) -> MAC
    links: Dict[int, LinkEntry] = field(default_factory=dict)
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


def eligible(link: m.Link, selection: Selection) -> bool:
    return (
        link.link_type == m.ARPHRD_ETHER
        and link.kind in SUPPORTED_KINDS
        and link.name != "lo"
        and not link.master  # bridge/bond ports: their traffic is not routed here
        and bool(link.mac)
        and selection.allows(link.name)
    )


def translate(state: m.KernelState, selection: Selection = Selection()) -> Desired:
    out = Desired()
    managed = {i: l for i, l in state.links.items() if eligible(l, selection)}
    out.attach = {i: l.name for i, l in managed.items()}
    out.links = {i: _link_entry(l, state.sysctls.get(l.name), i in state.egress_tc) for i, l in managed.items()}
    out.neighbors = {
        (n.ifindex, n.dst): n.mac
        for n in state.neighbors.values()
        if n.ifindex in managed and n.mac and n.state & m.NUD_VALID
    }
    out.routes = _routes(state)
    out.punt_forward_reason = _punt_forward_reason(state)
    return out


def _link_entry(link: m.Link, sysctls: Optional[m.LinkSysctls], egress_busy: bool) -> LinkEntry:
    flags = 0
    if link.oper_up:
        flags |= LINK_UP
    # bpf_redirect_peer skips this device's egress qdisc and filters (and
    # drops unless the peer lives in another netns): only where there is
    # nothing to skip.  Elsewhere bpf_redirect takes the kernel's egress path.
    if link.kind == "veth" and link.peer_in_other_netns and not egress_busy:
        flags |= LINK_REDIRECT_PEER
    if sysctls is not None:  # unknown sysctls: no FORWARDING flag, so punt
        if sysctls.forwarding:
            flags |= LINK_FORWARDING
        if sysctls.rp_filter == 1:
            flags |= LINK_RPF_STRICT
        elif sysctls.rp_filter >= 2:
            flags |= LINK_RPF_LOOSE
    return LinkEntry(mac=link.mac, flags=flags, mtu=link.mtu)


def _punt_forward_reason(state: m.KernelState) -> int:
    if state.netfilter_impact is not None:
        return R["NETFILTER"]
    if custom_rules(state):
        return R["POLICY_ROUTING"]
    return 0


def custom_rules(state: m.KernelState):
    """Rules beyond local/main/default: the main table alone no longer
    decides, so forwarded traffic punts until policy routing is mirrored."""
    return sorted(
        (r for r in state.rules if r.selectors or (r.priority, r.table) not in m.DEFAULT_RULES),
        key=lambda r: r.priority,
    )


def _routes(state: m.KernelState) -> Dict[Tuple[str, int], RouteEntry]:
    main: Dict[Tuple[str, int], list] = {}
    local: Dict[Tuple[str, int], RouteEntry] = {}
    for route in state.routes.values():
        prefix = (route.dst, route.dst_len)
        if route.table == m.TABLE_MAIN:
            main.setdefault(prefix, []).append(route)
        elif route.table == m.TABLE_LOCAL:
            local[prefix] = RouteEntry(_local_action(route.type))
    # Addresses are in the local table too; keep them even if a local-table
    # event is late, so a packet to this host never gets forwarded.
    for addr in state.addresses:
        local.setdefault((addr.address, 32), RouteEntry(R["LOCAL"]))

    out = {prefix: _main_entry(routes, state.links) for prefix, routes in main.items()}
    # The kernel consults the local table before main: a local-table prefix
    # wins over main routes of the same prefix or inside it.
    out.update(local)
    for (ldst, llen), lentry in local.items():
        if llen == 32:
            continue
        net = ipaddress.IPv4Network(f"{ldst}/{llen}")
        for (dst, dlen) in list(out):
            if dlen > llen and ipaddress.IPv4Address(dst) in net:
                out[(dst, dlen)] = lentry
    return out


def _local_action(rtype: int) -> int:
    if rtype == m.RTN_LOCAL:
        return R["LOCAL"]
    if rtype == m.RTN_BROADCAST:
        return R["IP_MULTICAST"]
    return R["ROUTE_UNSUPPORTED"]


def _main_entry(routes, links) -> RouteEntry:
    """The route the kernel would pick among same-prefix routes, as an entry."""
    if any(r.tos for r in routes):
        return RouteEntry(R["ROUTE_UNSUPPORTED"])  # TOS-dependent choice
    route = min(routes, key=lambda r: r.priority)
    if route.type != m.RTN_UNICAST:
        return RouteEntry(_local_action(route.type) if route.type in (m.RTN_LOCAL, m.RTN_BROADCAST)
                          else R["ROUTE_UNSUPPORTED"])  # blackhole, unreachable, throw, ...
    if route.unsupported or len(route.nexthops) != 1:
        return RouteEntry(R["ROUTE_UNSUPPORTED"])  # multipath, nexthop objects, encap
    nh = route.nexthops[0]
    if not nh.oif or nh.flags & m.RTNH_F_DEAD:
        return RouteEntry(R["ROUTE_UNSUPPORTED"])
    link = links.get(nh.oif)
    mtu = route.mtu or (link.mtu if link else 0)
    return RouteEntry(R["FORWARDED"], oif=nh.oif, gateway=nh.gateway, mtu=mtu)
