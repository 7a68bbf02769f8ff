"""Translator: KernelState -> the contents the BPF maps should have.

Pure: no I/O, no BPF, no clock; unit-tested without root.  Every case it
does not understand becomes a punt with a named reason, never a guess.
"""

import re
import socket
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

from . import model as m
from .reasons import BY_NAME as R

# Link flags, as in kernel_bpf/common.h.
LINK_UP = 1 << 0
LINK_FORWARDING = 1 << 1
LINK_REDIRECT_PEER = 1 << 2
LINK_RPF_STRICT = 1 << 3
LINK_RPF_LOOSE = 1 << 4
LINK_BRIDGE = 1 << 5
LINK_SRC_VMARK = 1 << 6
# Bridge port flags (LM_PORT_*).
PORT_FORWARDING = 1 << 0
PORT_LEARNING = 1 << 1
PORT_ISOLATED = 1 << 2
PORT_NF_IPV4 = 1 << 3

# lm_config.fib_flags and the kernel-lookup route action, as in kernel_bpf/common.h.
FIB_RULES = 1 << 0  # policy rules: every forward asks the kernel's FIB
FIB_MP_L4 = 1 << 1  # fib_multipath_hash_policy 1
FIB_MP_ANY = 1 << 2  # FIB_RULES and some table holds a multipath route or group
FIB_RULE_PORTS = 1 << 3  # a rule selects by ipproto/sport/dport
FIB_MP_PUNT = 1 << 4  # a hash policy the fast path cannot reproduce: multipath punts
ROUTE_KERNEL = 0x100  # LM_ROUTE_KERNEL: the kernel's FIB picks among next hops

# Netfilter modes and conntrack flags of struct lm_config, as in kernel_bpf/common.h.
NF_OFF = 0  # nothing on the forward path: no conntrack stage
NF_STATEFUL = 1  # iptables rules on the forward path: only flows with a kernel entry and a verdict
CT_FLAG_ACCT = 1 << 0  # nf_conntrack_acct=1: the fast path cannot count for the kernel, flows punt
CT_FLAG_TSTAMP = 1 << 1  # nf_conntrack_timestamp=1: likewise

# Link kinds the fast path can receive on and transmit to today, directly
# or as bridge ports.  VXLAN, bonds ... arrive with their own issues; until
# then they are not attached and routes through them punt (EGRESS_UNMANAGED).
SUPPORTED_KINDS = ("veth", "")


@dataclass(frozen=True, slots=True)
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
    # Counters slot (mirror/ifcounters.py): map layout, not a decision of the
    # translator (always 0 here); the reconciler stamps the link's own.
    slot: int = 0


@dataclass(frozen=True)
class PortEntry:
    bridge: int
    flags: int
    punt: int = 0  # every frame arriving on the port punts with this
    ipv4_punt: int = 0  # bridged IPv4 punts with this (br_netfilter)
    up_punt: int = 0  # frames for the bridge's own MAC punt with this
    # (A veth port's peer MAC is its LinkEntry's: one source for both paths.)


@dataclass(frozen=True)
class FdbTarget:
    port: int
    local: bool = False  # the bridge's own address: passed up, not forwarded


@dataclass(frozen=True)
class NfConfig:
    """The netfilter part of struct lm_config (same field names)."""

    nf_mode: int = NF_OFF
    nf_gen: int = 0
    ct_flags: int = 0
    tcp_max_retrans: int = 0
    to_tcp_established: int = 0  # seconds, the kernel's conntrack timeouts
    to_tcp_unack: int = 0
    to_tcp_retrans: int = 0
    to_udp: int = 0
    to_udp_stream: int = 0


@dataclass
class Desired:
    """Map contents.  As a full translation: every entry.  As a delta
    (translate_changes): only the keys that may have changed, where None
    means the entry must not exist."""

    routes: Dict[Tuple[str, int], Optional[RouteEntry]] = field(default_factory=dict)  # (dst, len)
    neighbors: Dict[Tuple[int, str], Optional[str]] = field(default_factory=dict)  # (ifindex, ip) -> MAC
    links: Dict[int, Optional[LinkEntry]] = field(default_factory=dict)
    ports: Dict[int, Optional[PortEntry]] = field(default_factory=dict)
    fdb: Dict[Tuple[int, str], Optional[FdbTarget]] = field(default_factory=dict)  # (bridge, MAC)
    punt_forward_reason: int = 0
    fib_flags: int = 0  # lm_config.fib_flags (FIB_*)
    nf: NfConfig = NfConfig()
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


SELECTION_SKIP = "left out by --include/--exclude"


def eligible(link: m.Link, selection: Selection, stacked_on=frozenset(), tc_after=frozenset()) -> bool:
    """An Ethernet device of a kind the fast path handles, not enslaved."""
    return skip_reason(link, selection, stacked_on, tc_after) is None


def skip_reason(link: m.Link, selection: Selection, stacked_on=frozenset(), tc_after=frozenset()) -> Optional[str]:
    """Why the device is not eligible (None: it is).  Ports of managed
    bridges are managed all the same (managed())."""
    if link.name == "lo" or link.link_type != m.ARPHRD_ETHER:
        return "not an Ethernet interface"
    if link.kind not in SUPPORTED_KINDS + ("bridge",):
        return f"{link.kind} interfaces are not handled yet"
    if link.master:
        return "enslaved to a bond or to a bridge the agent does not manage"
    # A macvlan/ipvlan on it (here, or moved elsewhere: it adds its MAC,
    # which makes a veth promiscuous; so do passthru and tcpdump) takes
    # frames before IP does; a tc filter after ours would be skipped.
    if link.index in stacked_on:
        return "a macvlan/ipvlan is stacked on it"
    if link.promiscuity:
        return "promiscuous (a macvlan elsewhere, passthru or a capture wants frames for other MACs)"
    if link.index in tc_after:
        return "a tc ingress filter runs after the agent's"
    if not link.mac:
        return "no MAC address"
    if not selection.allows(link.name):
        return SELECTION_SKIP
    return None


def _device_facts(state: m.KernelState):
    """(devices something is stacked on, devices with tc filters after ours)."""
    stacked_on = {l.link for l in state.links.values() if l.kind in m.STACKED_KINDS and l.link_netnsid is None}
    return stacked_on, set(state.ingress_tc_after)


def managed_in(state: m.KernelState, selection: Selection):
    """managed() for links of this state, as a predicate (the stacked and
    tc facts are gathered once)."""
    stacked_on, tc_after = _device_facts(state)

    def ok(link: m.Link) -> bool:
        return managed(state, link, lambda l: eligible(l, selection, stacked_on, tc_after))
    return ok


def skipped_devices(state: m.KernelState, selection: Selection) -> Dict[str, str]:
    """{name: why} for the devices the TC program is not attached to (bridges
    aside: their frames arrive on their ports)."""
    facts = _device_facts(state)
    ok = managed_in(state, selection)
    return {l.name: why for l in state.links.values()
            if l.kind != "bridge" and not attachable(l, ok)
            and (why := skip_reason(l, selection, *facts)) is not None}


def managed(state: m.KernelState, link: m.Link, eligible_fn) -> bool:
    """In the links map: eligible devices and bridges, and the ports of
    managed bridges (bond ports and the like stay the kernel's).  A port is
    promiscuous because of its bridge: that is no reason to skip it."""
    if not link.master:
        return eligible_fn(link)
    bridge = state.links.get(link.master)
    return (link.port is not None and bridge is not None and bridge.kind == "bridge"
            and eligible_fn(bridge) and eligible_fn(replace(link, master=0, promiscuity=0))
            and link.kind != "bridge")


def attachable(link: m.Link, ok) -> bool:
    """Where the TC program goes: every managed device but bridges (frames
    for a bridge arrive on its ports, where l2.h hands them on)."""
    return link.kind != "bridge" and ok(link)


def translate(state: m.KernelState, selection: Selection = Selection()) -> Desired:
    """Every map entry the state calls for."""
    changes = m.Changes(prefixes={(a.address, 32) for a in state.addresses} | state.uncertain, all_routes=True,
                        links=set(state.links), neighbors=set(state.neighbors), fdb=set(state.fdb))
    full = translate_changes(state, changes, selection)
    for table in MAP_TABLES:
        entries = getattr(full, table)
        for key in [k for k, v in entries.items() if v is None]:
            del entries[key]
    return full


MAP_TABLES = ("routes", "neighbors", "links", "ports", "fdb")


def translate_changes(state: m.KernelState, changes: m.Changes, selection: Selection = Selection()) -> Desired:
    """The entries for the keys in `changes` (None: must not exist), plus the
    global switch and the attach set, which are cheap to recompute."""
    ok = managed_in(state, selection)
    policy_punt = policy_routing_punt(state)  # scans the tables under custom rules: once
    out = Desired(attach=attachments(state, selection), punt_forward_reason=_punt_forward_reason(state, policy_punt),
                  fib_flags=fib_flags(state, policy_punt), nf=nf_config(state))
    # Bridges and ports are few and depend on global inputs (netfilter,
    # br_netfilter sysctls, the bridge's state): always redone.
    bridged = {i for i, l in state.links.items() if l.kind == "bridge" or l.port is not None}
    out.links = {i: link_entry(state, i, ok) for i in changes.links | bridged}
    out.ports = {i: port_entry(state, i, ok) for i in changes.links | bridged}
    out.fdb = {(b, mac): fdb_entry(state, (b, mac, 0), ok) for b, mac, _ in changes.fdb}
    out.neighbors = {k: neighbor_entry(state, k, ok) for k in changes.neighbors}
    local_ips = {a.address for a in state.addresses}
    covering = _covering_local_prefixes(state)
    entries = {}  # one RouteEntry object per distinct entry: a big table has a few
    if changes.all_routes:
        out.routes = {p: route_entry(state, p, local_ips, covering, entries) for p in state.by_prefix}
    for p in changes.prefixes:
        out.routes[p] = route_entry(state, p, local_ips, covering, entries)
    return out


def attachments(state: m.KernelState, selection: Selection) -> Dict[int, str]:
    ok = managed_in(state, selection)
    return {i: l.name for i, l in state.links.items() if attachable(l, ok)}


def link_entry(state: m.KernelState, index: int, ok) -> Optional[LinkEntry]:
    link = state.links.get(index)
    if link is None or not ok(link):
        return None
    entry = _link_entry(link, state.sysctls.get(link.name), index in state.egress_tc, _peer_of(state, link))
    if link.kind != "bridge":
        return entry
    flags = entry.flags | LINK_BRIDGE
    if bridge_egress_punt(state, link):
        flags &= ~LINK_UP  # routes out of it punt: EGRESS_UNMANAGED
    return replace(entry, flags=flags)


def bridge_egress_punt(state: m.KernelState, bridge: m.Link) -> Optional[str]:
    """Why packets routed out of the bridge must take the kernel's path:
    whatever br_dev_xmit() would meet before it reaches the port."""
    if bridge.index in state.egress_tc:
        return f"egress: {state.egress_tc[bridge.index]}"
    if state.bridge_nf_impact:
        return f"bridge netfilter: {state.bridge_nf_impact}"
    if bridge.bridge is None or bridge.bridge.vlan_filtering:
        return "vlan_filtering"
    return None


def port_entry(state: m.KernelState, index: int, ok) -> Optional[PortEntry]:
    """What the datapath may do with frames arriving on a bridge port."""
    link = state.links.get(index)
    if link is None or link.port is None or not ok(link):
        return None
    bridge, port = state.links[link.master], link.port
    flags = PORT_FORWARDING if port.state == m.BR_STATE_FORWARDING else 0
    flags |= PORT_LEARNING if port.learning else 0
    flags |= PORT_ISOLATED if port.isolated else 0
    info = bridge.bridge or m.BridgeInfo(vlan_filtering=True)  # unknown: punt
    call_iptables = bridge_calls_iptables(state, bridge)
    # br_netfilter validates bridged IPv4 and hands it to the IPv4 hooks:
    # with rules there (stateful mode) it takes the conntrack path as
    # routed IPv4 does; rules the agent cannot evaluate punt it.  (The VLAN
    # sysctls, filter-vlan-tagged and pass-vlan-input-dev, only concern
    # tagged frames, which always punt.)
    flags |= PORT_NF_IPV4 if call_iptables else 0
    return PortEntry(
        bridge=bridge.index, flags=flags, punt=_port_punt(state, bridge, info, port),
        ipv4_punt=R["NETFILTER"] if call_iptables and netfilter_punt(state) is not None else 0,
        up_punt=R["BR_UNSUPPORTED"] if bridge.index in state.ingress_tc else 0)


def bridge_calls_iptables(state: m.KernelState, bridge: m.Link) -> bool:
    """br_nf_pre_routing(): bridge-nf-call-iptables, or the bridge's own
    nf_call_iptables option, hands the bridge's IPv4 frames to iptables."""
    return state.bridge_sysctls.call_iptables or bool(bridge.bridge and bridge.bridge.nf_call_iptables)


def _peer_of(state: m.KernelState, link: m.Link) -> Optional[m.Peer]:
    return state.peers.get(link.peer_key) if link.peer_key else None


def _peer_mac(peer: Optional[m.Peer]) -> Optional[str]:
    """The veth peer's MAC where redirect_peer may hand frames to it: known,
    and no XDP program there that veth_xmit() would run."""
    return peer.mac if peer is not None and not peer.xdp else None


def _port_punt(state: m.KernelState, bridge: m.Link, info: m.BridgeInfo, port: m.BridgePort) -> int:
    if not bridge.admin_up:
        return R["BR_BLOCKED"]  # the kernel disables every port
    if info.vlan_filtering or port.locked or port.mab:
        return R["BR_UNSUPPORTED"]  # per-VLAN FDB, 802.1X-style admission
    if state.bridge_nf_impact:
        return R["NETFILTER"]  # ebtables / nft bridge or netdev chains
    return 0


def fdb_entry(state: m.KernelState, key, ok) -> Optional[FdbTarget]:
    """The datapath's FDB entry for (bridge, MAC, VLAN 0): without
    vlan_filtering the bridge looks up VLAN 0 only."""
    entry = state.fdb.get(key)
    if entry is None:
        return None
    bridge = state.links.get(entry.bridge)
    if bridge is None or bridge.kind != "bridge" or not ok(bridge):
        return None
    if entry.local:
        return FdbTarget(port=entry.port, local=True)
    port = state.links.get(entry.port)
    if port is None or port.master != entry.bridge or not ok(port):
        return None  # behind a port the fast path does not manage: flood/punt
    return FdbTarget(port=entry.port)


def neighbor_entry(state: m.KernelState, key, ok) -> Optional[str]:
    neigh = state.neighbors.get(key)
    link = state.links.get(key[0])
    if neigh is None or link is None or not ok(link):
        return None
    # A next hop the node owns itself (a local-table route, e.g. AnyIP): the
    # kernel does not transmit to it as to a neighbour (found by tools/fuzz:
    # it answers host unreachable); leave such packets to it (NO_NEIGHBOR).
    if _is_local(state, key[1]):
        return None
    return neigh.mac if neigh.mac and neigh.state & m.NUD_VALID else None


def _is_local(state: m.KernelState, ip: str) -> bool:
    """Covered by a local-table route (the kernel's own addresses)."""
    if any(r.table == m.TABLE_LOCAL for r in _routes_of(state, (ip, 32))):
        return True
    n = _ip_int(ip)
    return any(n >> (32 - plen) == _ip_int(dst) >> (32 - plen) and
               any(r.table == m.TABLE_LOCAL for r in _routes_of(state, (dst, plen)))
               for dst, plen in state.local_short)


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
    peer_mac = _peer_mac(peer)
    if link.kind == "veth" and link.peer_in_other_netns and not egress_busy and peer_mac:
        flags |= LINK_REDIRECT_PEER
    if sysctls is not None:  # unknown sysctls: no FORWARDING flag, so punt
        if sysctls.forwarding:
            flags |= LINK_FORWARDING
        if sysctls.rp_filter == 1:
            flags |= LINK_RPF_STRICT
        elif sysctls.rp_filter >= 2:
            flags |= LINK_RPF_LOOSE
        if sysctls.src_valid_mark:
            flags |= LINK_SRC_VMARK
    return LinkEntry(mac=link.mac, flags=flags, mtu=link.mtu,
                     peer_mac=peer_mac if flags & LINK_REDIRECT_PEER else None)


def _punt_forward_reason(state: m.KernelState, policy_punt: Optional[str]) -> int:
    if netfilter_punt(state) is not None:
        return R["NETFILTER"]
    if state.xfrm_impact is not None:
        return R["IPSEC"]
    if state.fwd_use_pmtu:
        return R["ROUTE_UNSUPPORTED"]  # learned PMTU exceptions decide the MTU
    if not state.fwd_update_priority:
        return R["ROUTE_UNSUPPORTED"]  # skb->priority kept, not set from the TOS
    if policy_punt is not None:
        return R["POLICY_ROUTING"]
    return 0


def netfilter_punt(state: m.KernelState) -> Optional[str]:
    """Why netfilter makes all forwarded traffic punt; None when nothing is on
    the forward path or the rules there can be evaluated per flow."""
    if state.netfilter_impact is None:
        return None
    if state.netfilter_unsupported is not None:
        return f"{state.netfilter_impact} ({state.netfilter_unsupported})"
    if state.ct_sysctls is None:
        return f"{state.netfilter_impact} (conntrack sysctls not read)"
    return None


def nf_config(state: m.KernelState) -> NfConfig:
    """Stateful mode when iptables rules are on the forward path and can be
    evaluated per flow; the generation and the conntrack sysctls go along so
    the datapath refreshes the kernel's timeouts as the kernel would."""
    if state.netfilter_impact is None or netfilter_punt(state) is not None:
        return NfConfig()
    ct = state.ct_sysctls
    flags = (CT_FLAG_ACCT if ct.acct else 0) | (CT_FLAG_TSTAMP if ct.timestamp else 0)
    return NfConfig(nf_mode=NF_STATEFUL, nf_gen=state.nf_gen, ct_flags=flags, tcp_max_retrans=ct.tcp_max_retrans,
                    to_tcp_established=ct.tcp_timeout_established, to_tcp_unack=ct.tcp_timeout_unacknowledged,
                    to_tcp_retrans=ct.tcp_timeout_max_retrans, to_udp=ct.udp_timeout,
                    to_udp_stream=ct.udp_timeout_stream)


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


# Rule selectors and actions bpf_fib_lookup evaluates exactly as forwarding
# does (same fib_rules code, same flowi4 fields: ingress ifindex, mark, TOS,
# protocol, ports; uid and tunnel id are those of a forwarded packet).
_RULE_SELECTORS_EXACT = {"FRA_DST", "FRA_SRC", "FRA_IIFNAME", "FRA_OIFNAME", "FRA_FWMARK", "FRA_FWMASK",
                         "FRA_GOTO", "FRA_SUPPRESS_PREFIXLEN", "FRA_SUPPRESS_IFGROUP", "FRA_UID_RANGE",
                         "FRA_IP_PROTO", "FRA_SPORT_RANGE", "FRA_DPORT_RANGE", "FRA_TUN_ID", "FRA_DSCP",
                         "src_len", "dst_len", "tos", "flags"}
_RULE_ACTIONS_EXACT = {"1", "2", "3", "6", "7", "8"}  # to table, goto, nop, blackhole, unreachable, prohibit
_RULE_PORT_SELECTORS = {"FRA_IP_PROTO", "FRA_SPORT_RANGE", "FRA_DPORT_RANGE"}


def policy_routing_punt(state: m.KernelState) -> Optional[str]:
    """Why forwarding under policy rules cannot be left to the kernel
    lookup (bpf_fib_lookup): a rule it cannot evaluate as forwarding does,
    or a route it could return whose forwarding the fast path does not
    reproduce.  None: exact (or no custom rules at all)."""
    if not custom_rules(state):
        return None
    for rule in sorted(state.rules, key=lambda r: r.priority):
        for name, value in rule.selectors:
            if name == "action" and str(value) in _RULE_ACTIONS_EXACT:
                continue
            if name not in _RULE_SELECTORS_EXACT:
                return f"rule pref {rule.priority}: {name} {value} not reproducible by the kernel lookup"
    route = state.by_prefix.first(lambda r: r.type == m.RTN_UNICAST and (r.unsupported or r.mtu))
    if route is None:
        return None
    what = ", ".join(route.unsupported) or f"mtu {route.mtu}"
    return f"route {route.dst}/{route.dst_len} table {route.table}: {what}"


def _rule_selects_ports(rule: m.Rule) -> bool:
    """fib_rule_requires_fldissect(): protocol/port selectors, not on iif lo."""
    names = dict(rule.selectors)
    return bool(_RULE_PORT_SELECTORS & set(names)) and names.get("FRA_IIFNAME") != "lo"


def _is_multipath(state: m.KernelState, route: m.Route) -> bool:
    nh = state.nexthops.get(route.nhid) if route.nhid else None
    return len(route.nexthops) > 1 or bool(nh is not None and nh.group)


def fib_flags(state: m.KernelState, policy_punt: Optional[str]) -> int:
    """lm_config.fib_flags: the hash policy, and with custom rules (when
    they are exact: policy_punt None) the kernel lookup for every forwarded
    packet."""
    policy = state.multipath_hash_policy
    flags = FIB_MP_L4 if policy == 1 else 0 if policy == 0 else FIB_MP_PUNT
    if policy_punt is not None or not custom_rules(state):
        return flags
    flags |= FIB_RULES
    if any(_rule_selects_ports(r) for r in state.rules):
        flags |= FIB_RULE_PORTS
    if state.by_prefix.first(lambda r: _is_multipath(state, r)) is not None:
        flags |= FIB_MP_ANY
    return flags


def route_entry(state: m.KernelState, prefix, local_ips, covering, entries=None) -> Optional[RouteEntry]:
    """The entry for one prefix: the kernel consults the local table before
    main, so a local-table route (or an address, even before its local route
    arrives) wins, and so does a shorter local-table prefix covering it.
    entries: a dict that makes equal entries one object (memory)."""
    if state.uncertain and prefix in state.uncertain:
        return RouteEntry(R["RESYNC"])  # changed during the last dump: not known exactly
    shapes = state.by_prefix.shapes(prefix)
    if shapes is not None and not (prefix[1] == 32 and prefix[0] in local_ips):
        # No local-table route (those are kept listed): the main-table ones
        # decide.  They are stored as shapes shared by the prefixes whose
        # routes are equal but for the prefix (nearly all of a big table),
        # and _main_entry() does not look at the prefix: such prefixes share
        # its answer too.
        if len(shapes) == 1:  # the common case, without building a tuple
            main, key = (shapes if shapes[0].table == m.TABLE_MAIN else ()), id(shapes[0])
        else:
            main = tuple(s for s in shapes if s.table == m.TABLE_MAIN)
            key = tuple(map(id, main))
        if not main:
            return None
        return _covered(prefix, covering) or _shared_entry(state, main, key, entries)
    entry = _listed_entry(state, prefix, local_ips, covering)
    return entry if entries is None or entry is None else entries.setdefault(entry, entry)


def _shared_entry(state: m.KernelState, shapes, key, entries) -> RouteEntry:
    """_main_entry() of main-table shapes, once per key in `entries`."""
    if entries is None:
        return _main_entry(shapes, state.links, state.nexthops)
    entry = entries.get(key)
    if entry is None:
        entry = _main_entry(shapes, state.links, state.nexthops)
        entry = entries[key] = entries.setdefault(entry, entry)
    return entry


def _listed_entry(state: m.KernelState, prefix, local_ips, covering) -> Optional[RouteEntry]:
    routes = _routes_of(state, prefix)
    local = [r for r in routes if r.table == m.TABLE_LOCAL]
    main = [r for r in routes if r.table == m.TABLE_MAIN]
    if local:
        entry = RouteEntry(_local_action(min(local, key=lambda r: r.priority).type))
    elif prefix[1] == 32 and prefix[0] in local_ips:
        entry = RouteEntry(R["LOCAL"])
    elif main:
        entry = _main_entry(main, state.links, state.nexthops)
    else:
        return None
    return _covered(prefix, covering) or entry


def _covered(prefix, covering) -> Optional[RouteEntry]:
    """The entry of a shorter local-table prefix covering this one, if any."""
    ip = None
    for net, plen, text, cover in covering:
        if prefix[1] <= plen:
            continue
        if text is not None:  # on an octet boundary: compare the text
            if prefix[0].startswith(text):
                return cover
            continue
        ip = _ip_int(prefix[0]) if ip is None else ip
        if ip >> (32 - plen) == net:
            return cover
    return None


def overflow_covers(unwritten, present) -> Dict[Tuple[str, int], RouteEntry]:
    """For routes the map has no room for: the entries that must punt so no
    lookup falls through to a less specific route than the kernel's.  For
    each unwritten prefix that is the longest shorter prefix in the map
    (present(prefix)); where there is none, 0.0.0.0/0 (a lookup miss would
    punt NO_ROUTE, but the source check would pass a missing local address)."""
    punt = RouteEntry(R["ROUTE_OVERFLOW"])
    out = {}
    for dst, plen in unwritten:
        n = _ip_int(dst)
        for length in range(plen - 1, 0, -1):
            cover = (_int_ip(n >> (32 - length) << (32 - length)), length)
            if present(cover):
                break
        else:
            cover = ("0.0.0.0", 0)
        out[cover] = punt
    return out


def _int_ip(n: int) -> str:
    return socket.inet_ntoa(n.to_bytes(4, "big"))


def _routes_of(state: m.KernelState, prefix):
    """Every route for the prefix, those sharing a key in the kernel's order
    (so min() by priority picks the first of a key, as fib_table_lookup())."""
    return state.by_prefix.get(prefix, ())


def _covering_local_prefixes(state: m.KernelState):
    """Local-table routes shorter than /32 (127/8, AnyIP ...) as (net, len,
    its text "a.b." where len is a multiple of 8, entry)."""
    out = []
    for dst, plen in state.local_short:
        local = [r for r in _routes_of(state, (dst, plen)) if r.table == m.TABLE_LOCAL]
        entry = RouteEntry(_local_action(min(local, key=lambda r: r.priority).type))
        text = ".".join(dst.split(".")[:plen // 8]) + "." if plen % 8 == 0 and plen else None
        out.append((_ip_int(dst) >> (32 - plen), plen, text, entry))
    return out


def _ip_int(ip: str) -> int:
    return int.from_bytes(socket.inet_aton(ip), "big")


def _local_action(rtype: int) -> int:
    if rtype == m.RTN_LOCAL:
        return R["LOCAL"]
    if rtype == m.RTN_BROADCAST:
        return R["IP_MULTICAST"]
    return R["ROUTE_UNSUPPORTED"]


RTN_NAMES = {4: "anycast", 5: "multicast", 6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw",
             10: "nat", 11: "xresolve"}


def route_punt_why(state: m.KernelState, prefix) -> Optional[str]:
    """Why the prefix's main-table routes make its entry ROUTE_UNSUPPORTED, in
    words (for the agent's one-time log line); None when they do not decide it."""
    routes = _routes_of(state, prefix)
    main = [r for r in routes if r.table == m.TABLE_MAIN]
    if not main or any(r.table == m.TABLE_LOCAL for r in routes):
        return None
    return _main_unsupported(main)


def _main_unsupported(routes) -> Optional[str]:
    """Why the fast path cannot take the route the kernel picks among these
    same-prefix main-table routes (None: it can, or another reason decides:
    local/broadcast, nexthop objects)."""
    if any(r.tos for r in routes):
        return "a route with TOS: the choice depends on the packet's TOS"
    route = min(routes, key=lambda r: r.priority)
    if route.type != m.RTN_UNICAST:
        if route.type in (m.RTN_LOCAL, m.RTN_BROADCAST):
            return None
        return f"{RTN_NAMES.get(route.type, route.type)} route"  # blackhole, throw ...
    if route.unsupported:
        return "attributes not mirrored: " + ", ".join(route.unsupported)  # encap, realms, mtu lock ...
    if route.nhid:
        return None  # NEXTHOP_UNSUPPORTED or compiled (_nexthop_object_entry)
    if len(route.nexthops) > 1:
        return "every next hop is dead" if all(nh.flags & m.RTNH_F_DEAD for nh in route.nexthops) else None
    if not route.nexthops or not route.nexthops[0].oif:
        return "next hop without an output interface"
    if route.nexthops[0].flags & m.RTNH_F_DEAD:
        return "dead next hop"  # the kernel would try the next route
    return None


def _main_entry(routes, links, nexthops=None) -> RouteEntry:
    """The route the kernel would pick among same-prefix routes, as an entry:
    the lowest metric, and of routes sharing that key the first.  If that
    one cannot be used (dead next hop ...) the kernel tries the next: punt.
    Several next hops (multipath, a nexthop group): the kernel's own lookup
    picks one per packet (ROUTE_KERNEL)."""
    if _main_unsupported(routes):
        return RouteEntry(R["ROUTE_UNSUPPORTED"])
    route = min(routes, key=lambda r: r.priority)
    if route.type != m.RTN_UNICAST:
        return RouteEntry(_local_action(route.type))  # local, broadcast
    if route.nhid:
        return _nexthop_object_entry(route, (nexthops or {}).get(route.nhid), nexthops or {}, links)
    if len(route.nexthops) > 1:
        return RouteEntry(ROUTE_KERNEL, mtu=route.mtu)
    nh = route.nexthops[0]
    return _gateway_entry(route, nh.oif, nh.gateway, nh.flags, links)


def _gateway_entry(route: m.Route, oif: int, gateway: Optional[str], flags: int, links) -> RouteEntry:
    if not oif or flags & m.RTNH_F_DEAD:
        return RouteEntry(R["ROUTE_UNSUPPORTED"])
    link = links.get(oif)
    mtu = route.mtu or (link.mtu if link else 0)
    return RouteEntry(R["FORWARDED"], oif=oif, gateway=gateway, mtu=mtu)


def _nexthop_object_entry(route: m.Route, nh: Optional[m.NexthopObject], nexthops, links) -> RouteEntry:
    """A route by nexthop id: one next hop compiles like a gateway route;
    a group goes to the kernel's lookup if every member is a plain next hop."""
    if not _plain_nexthop(nh, group_ok=True):
        return RouteEntry(R["NEXTHOP_UNSUPPORTED"])  # unknown id, blackhole, fdb, encap, IPv6 gateway
    if not nh.group:
        return _gateway_entry(route, nh.oif, nh.gateway, nh.flags, links)
    if not all(_plain_nexthop(nexthops.get(member)) for member, _ in nh.group):
        return RouteEntry(R["NEXTHOP_UNSUPPORTED"])
    return RouteEntry(ROUTE_KERNEL, mtu=route.mtu)


def _plain_nexthop(nh: Optional[m.NexthopObject], group_ok=False) -> bool:
    return (nh is not None and not (nh.blackhole or nh.fdb or nh.unsupported)
            and (group_ok or not nh.group))
