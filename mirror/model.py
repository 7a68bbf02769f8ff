"""The agent's in-memory picture of the kernel state it mirrors.

Watchers turn kernel messages into these objects and apply them to one
KernelState; the translator reads a KernelState and nothing else.  Every
object carries the full state the kernel reported (netlink messages are
complete upserts), so replaying events over a dump converges.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Dict, FrozenSet, Optional, Set, Tuple

from .routestore import RouteStore

# rtnetlink constants used across the agent (linux/rtnetlink.h, neighbour.h).
AF_INET = 2
ARPHRD_ETHER = 1
IFF_UP = 0x1
IFF_RUNNING = 0x40
IFF_LOWER_UP = 0x10000

TABLE_DEFAULT = 253
TABLE_MAIN = 254
TABLE_LOCAL = 255

RTN_UNICAST = 1
RTN_LOCAL = 2
RTN_BROADCAST = 3

RTNH_F_DEAD = 0x1
RTNH_F_LINKDOWN = 0x10

NUD_INCOMPLETE = 0x01
NUD_REACHABLE = 0x02
NUD_STALE = 0x04
NUD_DELAY = 0x08
NUD_PROBE = 0x10
NUD_FAILED = 0x20
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
# States in which the kernel itself would transmit to the cached MAC.
NUD_VALID = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_NOARP | NUD_PERMANENT

AF_BRIDGE = 7
# Bridge port STP states (linux/if_bridge.h BR_STATE_*).
BR_STATE_DISABLED, BR_STATE_LISTENING, BR_STATE_LEARNING, BR_STATE_FORWARDING, BR_STATE_BLOCKING = range(5)
BR_STATE_NAMES = ("disabled", "listening", "learning", "forwarding", "blocking")
# Where set_route() puts a route among those sharing its key.
APPEND, PREPEND, REPLACE = "append", "prepend", "replace"

# The three rules every namespace starts with: (priority, table).
DEFAULT_RULES = frozenset({(0, TABLE_LOCAL), (32766, TABLE_MAIN), (32767, TABLE_DEFAULT)})


@dataclass(frozen=True)
class BridgeInfo:
    """A bridge's own settings (IFLA_INFO_DATA of kind "bridge")."""

    ageing_time: int = 30000  # centiseconds
    stp_state: int = 0
    vlan_filtering: bool = False
    group_fwd_mask: int = 0
    nf_call_iptables: bool = False  # per-bridge override of the br_netfilter sysctls
    nf_call_ip6tables: bool = False
    nf_call_arptables: bool = False


@dataclass(frozen=True)
class BridgePort:
    """A bridge port's state and flags (IFLA_BRPORT_*)."""

    state: int = BR_STATE_FORWARDING
    learning: bool = True
    flood: bool = True
    mcast_flood: bool = True
    bcast_flood: bool = True
    hairpin: bool = False
    isolated: bool = False
    neigh_suppress: bool = False
    proxy_arp: bool = False
    locked: bool = False
    mab: bool = False
    group_fwd_mask: int = 0
    backup_port: int = 0


@dataclass(frozen=True)
class VlanInfo:
    """An 802.1Q/802.1ad sub-interface (kind "vlan"): id and protocol."""

    vid: int
    protocol: int = 0x8100


@dataclass(frozen=True)
class PortVlan:
    """A VLAN a bridge port is a member of (IFLA_BRIDGE_VLAN_INFO): only
    used by vlan_filtering bridges, which the datapath punts."""

    vid: int
    pvid: bool = False  # untagged ingress frames get this VLAN
    untagged: bool = False  # egress frames of this VLAN leave untagged


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str  # IFLA_INFO_KIND: "veth", "bridge", ... ; "" for physical NICs
    mac: Optional[str]
    mtu: int
    flags: int  # IFF_*
    link_type: int = ARPHRD_ETHER  # ifi_type (ARPHRD_*)
    master: int = 0  # ifindex of the bridge/bond this is enslaved to
    peer_in_other_netns: bool = False  # IFLA_LINK_NETNSID present (veth)
    bridge: Optional[BridgeInfo] = None  # kind "bridge"
    port: Optional[BridgePort] = None  # enslaved to a bridge
    vlan: Optional[VlanInfo] = None  # kind "vlan"
    link: int = 0  # IFLA_LINK: a veth's peer, a macvlan's lower device (ifindex)
    link_netnsid: Optional[int] = None  # IFLA_LINK_NETNSID: `link` is in that netns
    promiscuity: int = 0  # IFLA_PROMISCUITY: something wants frames for other MACs

    @property
    def peer_key(self):
        """(netnsid, ifindex) of a peer in another namespace, else None."""
        return (self.link_netnsid, self.link) if self.link_netnsid is not None and self.link else None

    @property
    def admin_up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def oper_up(self) -> bool:
        return self.admin_up and bool(self.flags & IFF_RUNNING)


# Devices stacked on a lower device that take frames from it before IP
# (their rx_handler) or deliver to it: a lower device with one is not managed.
STACKED_KINDS = ("macvlan", "macvtap", "ipvlan", "ipvtap")


@dataclass(frozen=True)
class Peer:
    """A veth's other end, in another namespace (RTM_GETLINK there)."""

    mac: Optional[str]
    xdp: bool  # an XDP program is attached: veth_xmit() would run it


@dataclass(frozen=True)
class Address:
    index: int
    address: str
    prefixlen: int


@dataclass(frozen=True, slots=True)
class Nexthop:
    oif: int
    gateway: Optional[str] = None
    flags: int = 0  # RTNH_F_*
    weight: int = 1  # multipath weight (rtnh_hops + 1)


NHG_MPATH, NHG_RES = 0, 1  # NHA_GROUP_TYPE: hash-threshold, resilient


@dataclass(frozen=True)
class NexthopObject:
    """A nexthop object (`ip nexthop`, RTM_NEWNEXTHOP; mirror/nexthop.py)
    that routes reference by id (RTA_NH_ID): one next hop, or a group."""

    id: int
    family: int = AF_INET
    flags: int = 0  # RTNH_F_* (DEAD, LINKDOWN ...)
    oif: int = 0
    gateway: Optional[str] = None
    blackhole: bool = False
    fdb: bool = False  # for the bridge/VXLAN FDB only: routes cannot use it
    group: Tuple[Tuple[int, int], ...] = ()  # (member id, weight)
    group_type: int = NHG_MPATH
    # Attributes the fast path does not implement (encap, IPv6 gateway ...).
    unsupported: Tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    table: int
    dst: str
    dst_len: int
    type: int = RTN_UNICAST
    tos: int = 0
    priority: int = 0
    nexthops: Tuple[Nexthop, ...] = ()
    mtu: int = 0  # RTAX_MTU metric, 0 = none
    nhid: int = 0  # RTA_NH_ID: the route uses nexthop object `nhid` (0: none)
    # Attributes the fast path does not implement (lwtunnel
    # encap, IPv6 gateway via RTA_VIA ...): their names, for punting.
    unsupported: Tuple[str, ...] = ()

    @property
    def key(self):
        """Where the kernel files a route: routes with the same key are
        kept in one ordered list (fib aliases)."""
        return (self.table, self.dst, self.dst_len, self.tos, self.priority)

    def at(self, dst: str, dst_len: int) -> "Route":
        """The same route for another prefix (mirror/routestore.py)."""
        return Route(self.table, dst, dst_len, self.type, self.tos, self.priority, self.nexthops, self.mtu,
                     self.nhid, self.unsupported)

    def same_route(self, other: "Route") -> bool:
        """Equal but for next-hop flags (DEAD/LINKDOWN change silently)."""
        def strip(r):
            return replace(r, nexthops=tuple(replace(nh, flags=0) for nh in r.nexthops))
        return strip(self) == strip(other)


@dataclass(frozen=True)
class Neighbor:
    ifindex: int
    dst: str
    mac: Optional[str]
    state: int  # NUD_*

    @property
    def key(self):
        return (self.ifindex, self.dst)


@dataclass(frozen=True)
class FdbEntry:
    """A bridge FDB entry (AF_BRIDGE neighbour with NDA_MASTER)."""

    bridge: int
    mac: str
    port: int  # ifindex the MAC sits behind; the bridge itself for its own address
    state: int  # NUD_PERMANENT: local, NUD_NOARP: static, else learned/dynamic
    vlan: int = 0
    flags: int = 0  # NTF_*

    @property
    def key(self):
        return (self.bridge, self.mac, self.vlan)

    @property
    def local(self) -> bool:
        return bool(self.state & NUD_PERMANENT)

    @property
    def static(self) -> bool:
        return bool(self.state & NUD_NOARP) and not self.local


@dataclass(frozen=True)
class BridgeSysctls:
    """net.bridge.bridge-nf-call-* of this namespace (br_netfilter)."""

    call_iptables: bool = True
    call_ip6tables: bool = True
    call_arptables: bool = True


@dataclass(frozen=True)
class Rule:
    priority: int
    table: int
    # Anything besides priority and table (selectors, actions): if set the
    # rule is not one of the defaults even at a default priority.
    selectors: FrozenSet[Tuple[str, object]] = frozenset()


@dataclass(frozen=True)
class LinkSysctls:
    forwarding: bool
    rp_filter: int  # effective: max(conf/all, conf/<dev>)
    src_valid_mark: bool = False  # conf/all or conf/<dev>: the source check routes by the mark


@dataclass(frozen=True)
class CtSysctls:
    """net.netfilter.nf_conntrack_* values the fast path needs to refresh a
    kernel conntrack entry's timeout exactly as the kernel would (seconds),
    and the accounting switches it cannot honour (flows then punt)."""

    tcp_timeout_established: int = 432000
    tcp_timeout_unacknowledged: int = 300
    tcp_timeout_max_retrans: int = 300
    tcp_max_retrans: int = 3
    udp_timeout: int = 30
    udp_timeout_stream: int = 120
    acct: bool = False
    timestamp: bool = False


@dataclass
class Changes:
    """What changed since the translator last looked: keys to re-translate."""

    prefixes: Set[Tuple[str, int]] = field(default_factory=set)  # route table keys
    links: Set[int] = field(default_factory=set)
    neighbors: Set[Tuple[int, str]] = field(default_factory=set)
    fdb: Set[Tuple[int, str, int]] = field(default_factory=set)  # (bridge, MAC, vlan)
    all_routes: bool = False  # a covering local-table prefix changed


@dataclass
class KernelState:
    """One namespace's networking state as far as the fast path cares.

    Mutate it through the methods: they keep the indexes and record what
    changed, so the translator can redo just that.
    """

    links: Dict[int, Link] = field(default_factory=dict)
    addresses: Set[Address] = field(default_factory=set)
    neighbors: Dict[Tuple[int, str], Neighbor] = field(default_factory=dict)
    rules: Set[Rule] = field(default_factory=set)
    sysctls: Dict[str, LinkSysctls] = field(default_factory=dict)  # by ifname
    # Links whose egress path is not empty (a root qdisc other than noqueue,
    # clsact egress filters): ifindex -> what is there.
    egress_tc: Dict[int, str] = field(default_factory=dict)
    # Links with tc ingress filters after ours (they never run for packets
    # we redirect): ifindex -> what is there.
    ingress_tc_after: Dict[int, str] = field(default_factory=dict)
    # veth peers in other namespaces: (netnsid, ifindex) -> Peer.
    peers: Dict[Tuple[int, int], Peer] = field(default_factory=dict)
    # Why netfilter could affect forwarded traffic; None = it cannot.
    # Starts "unknown" so nothing is fast-pathed before iptables was read.
    netfilter_impact: Optional[str] = "netfilter state not read yet"
    # Why the rules on the forward path cannot be evaluated per flow (native
    # nft tables, read errors ...): then all forwarded traffic punts.  None:
    # the flow-verdict evaluator reads every table on the path.
    netfilter_unsupported: Optional[str] = "netfilter state not read yet"
    # The parsed rulesets per backend (NetfilterState.rulesets) and their
    # generation: it changes with every content change, so flow verdicts
    # computed for an older ruleset stop applying at once.
    nf_rulesets: Dict[str, object] = field(default_factory=dict)
    nf_gen: int = 1
    # Conntrack sysctls of this netns; None = not read (stateful mode punts).
    ct_sysctls: Optional[CtSysctls] = None
    # net.ipv4.ip_forward_use_pmtu: forwarding then obeys learned path MTUs.
    fwd_use_pmtu: bool = False
    # net.ipv4.ip_forward_update_priority=0: forwarding keeps skb->priority
    # (the fast path sets it from the TOS, as the default 1 does).
    fwd_update_priority: bool = True
    # net.ipv4.fib_multipath_hash_policy (0: L3, 1: L4, 2/3: inner/custom).
    multipath_hash_policy: int = 0
    # Nexthop objects by id (mirror/nexthop.py).
    nexthops: Dict[int, "NexthopObject"] = field(default_factory=dict)
    # Likewise for IPsec policies (mirror/xfrm.py).
    xfrm_impact: Optional[str] = "xfrm state not read yet"
    # Bridges: FDB, br_netfilter sysctls, netfilter chains every bridged
    # frame meets (nft bridge/netdev families; None = none), bridges with
    # something on their own ingress hook (ifindex -> what).
    fdb: Dict[Tuple[int, str, int], FdbEntry] = field(default_factory=dict)
    bridge_sysctls: BridgeSysctls = BridgeSysctls()
    bridge_nf_impact: Optional[str] = "netfilter state not read yet"
    ingress_tc: Dict[int, str] = field(default_factory=dict)
    # VLAN membership of bridge ports (from the bridge's AF_BRIDGE messages).
    port_vlans: Dict[int, Tuple[PortVlan, ...]] = field(default_factory=dict)
    # The routes: (dst, len) -> every route for that prefix (any table,
    # TOS, metric); those sharing a key (`ip route append/prepend` make
    # several; the kernel uses the first that works) in the kernel's order.
    # A full Internet table has a million of them (mirror/routestore.py).
    # Local-table routes stay listed: the model tells them apart by identity.
    by_prefix: RouteStore = field(default_factory=lambda: RouteStore(keep_listed=lambda r: r.table == TABLE_LOCAL))
    # ifindex -> how many route next hops use it (the routes themselves are
    # found by a scan, when such a link goes down or changes its MTU);
    # ifindex -> its neighbours' keys.
    by_oif: Dict[int, int] = field(default_factory=dict)
    neighbors_by_link: Dict[int, Set[Tuple[int, str]]] = field(default_factory=dict)
    fdb_by_link: Dict[int, Set[Tuple[int, str, int]]] = field(default_factory=dict)  # bridge and port
    local_short: Set[Tuple[str, int]] = field(default_factory=set)  # local-table prefixes < /32
    # Prefixes whose routes changed while they were dumped: the model may be
    # off for them until a clean dump (they punt meanwhile).
    uncertain: Set[Tuple[str, int]] = field(default_factory=set)
    changes: Changes = field(default_factory=Changes)

    @property
    def routes(self) -> "RoutesView":
        """route key -> the routes sharing it, in the kernel's order (a view)."""
        return RoutesView(self.by_prefix)

    def take_changes(self) -> Changes:
        changes, self.changes = self.changes, Changes()
        return changes

    # -- links -------------------------------------------------------------
    def set_link(self, link: Link):
        old = self.links.get(link.index)
        self.links[link.index] = link
        if old == link:
            return
        self._link_changed(link.index, routes=old is None or old.mtu != link.mtu)
        if link.kind == "bridge" or (old is not None and old.kind == "bridge"):
            self._ports_changed(link.index)
        if old is not None and old.master and old.master != link.master:
            self._flush_fdb(link.index)  # left the bridge: br_fdb_delete_by_port()
        if old is None or (old.master, old.port, old.bridge) != (link.master, link.port, link.bridge):
            self.changes.fdb |= self.fdb_by_link.get(link.index, set())  # eligibility
        for stacked in (old, link):
            if stacked is not None and stacked.kind in STACKED_KINDS and stacked.link_netnsid is None:
                self._link_changed(stacked.link, routes=False)  # its lower device
        if old is None:
            return
        # The kernel flushes these without sending messages for them.
        if old.admin_up and not link.admin_up:
            self._flush_routes(link.index)  # fib_disable_ip() on NETDEV_DOWN
            self._flush_neighbors(link.index, keep_permanent=False)
        elif old.oper_up and not link.oper_up:
            self._flush_neighbors(link.index, keep_permanent=True)  # neigh_carrier_down()

    def del_link(self, index: int):
        """A link is gone: its addresses, routes and neighbours go with it."""
        self._link_changed(index, routes=False)
        if getattr(self.links.get(index), "kind", "") == "bridge":
            self._ports_changed(index)
        old = self.links.pop(index, None)
        if old is not None and old.kind in STACKED_KINDS:
            self._link_changed(old.link, routes=False)
        self.egress_tc.pop(index, None)
        self.ingress_tc_after.pop(index, None)
        for addr in [a for a in self.addresses if a.index == index]:
            self.del_address(addr)
        self._flush_neighbors(index, keep_permanent=False)
        self._flush_routes(index)
        self._flush_fdb(index)
        self.ingress_tc.pop(index, None)
        self.port_vlans.pop(index, None)

    def set_port(self, index: int, port: Optional[BridgePort], master: int, vlans=None):
        """AF_BRIDGE RTM_NEWLINK/DELLINK: only the port state of a link changed
        (these messages lack the link's kind, so they must not replace it)."""
        link = self.links.get(index)
        if link is None:
            return
        if port is None:
            self.port_vlans.pop(index, None)
        elif vlans is not None:
            self.port_vlans[index] = tuple(vlans)
        self.set_link(replace(link, port=port, master=master if port else 0))

    def ports_of(self, bridge: int):
        return [i for i, l in self.links.items() if l.master == bridge and l.port is not None]

    def _ports_changed(self, bridge: int):
        """Whether a port is managed, and its entry, depend on its bridge."""
        for index in [i for i, l in self.links.items() if l.master == bridge]:
            self._link_changed(index, routes=False)

    def _link_changed(self, index: int, routes: bool):
        """The link's entry, its neighbours (eligibility) and, if its MTU
        may have changed, the routes through it need another look."""
        self.changes.links.add(index)
        self.changes.neighbors |= self.neighbors_by_link.get(index, set())
        if routes and self.by_oif.get(index):
            self.changes.prefixes.update(self.by_prefix.where(lambda r: any(nh.oif == index for nh in r.nexthops)))

    def set_sysctls(self, sysctls: Dict[str, LinkSysctls]):
        changed = {n for n in set(sysctls) | set(self.sysctls) if sysctls.get(n) != self.sysctls.get(n)}
        self.sysctls = sysctls
        self.changes.links |= {i for i, l in self.links.items() if l.name in changed}

    def set_netfilter(self, impact: Optional[str], unsupported: Optional[str], rulesets: Dict[str, object]):
        """A new netfilter reading; any change of the rules starts a new generation."""
        if rulesets != self.nf_rulesets or impact != self.netfilter_impact:
            self.new_nf_generation()
        self.netfilter_impact, self.netfilter_unsupported, self.nf_rulesets = impact, unsupported, rulesets

    def new_nf_generation(self):
        self.nf_gen = self.nf_gen % 0xFFFFFFFF + 1  # u32, never 0 (an unset entry)

    def set_egress_tc(self, index: int, what: Optional[str]):
        self._set_tc(self.egress_tc, index, what)

    def set_ingress_tc_after(self, index: int, what: Optional[str]):
        self._set_tc(self.ingress_tc_after, index, what)

    def _set_tc(self, table, index: int, what: Optional[str]):
        if _put(table, index, what):
            self._link_changed(index, routes=False)

    def set_peer(self, key: Tuple[int, int], peer: Optional[Peer]):
        """A veth peer's state (None: gone); its local veth needs another look."""
        if _put(self.peers, key, peer):
            self.changes.links |= {i for i, link in self.links.items() if link.peer_key == key}

    # -- addresses and routes ---------------------------------------------
    def add_address(self, addr: Address):
        self.addresses.add(addr)
        self.changes.prefixes.add((addr.address, 32))

    def del_address(self, addr: Address):
        self.addresses.discard(addr)
        self.changes.prefixes.add((addr.address, 32))

    def set_route(self, route: Route, where: str = APPEND):
        """Add a route the way fib_table_insert() placed it among the routes
        sharing its key: after them (APPEND: `ip route append`, dumps, a new
        key), before them (PREPEND: `ip route prepend`), or in place of the
        first of them (REPLACE)."""
        prefix = (route.dst, route.dst_len)
        routes = self.by_prefix.get(prefix)
        if routes is None:
            self.by_prefix.add_new(prefix, route)
        else:
            key = route.key
            same = [i for i, r in enumerate(routes) if r.key == key]
            if where == REPLACE and same:
                self._unindex(routes[same[0]])
                routes[same[0]] = route
            elif where == PREPEND and same:
                routes.insert(same[0], route)
            elif same:
                routes.insert(same[-1] + 1, route)
            else:
                routes.append(route)
            self.by_prefix[prefix] = routes
        self._index(route)
        self._route_changed(route)

    def load_routes(self, pairs):
        """set_route(APPEND) for every (prefix, route) of a dump, in the
        kernel's order (the route's own prefix is not looked at: see
        RouteStore.load), without recording changes one by one (a dumped
        state is translated in full)."""
        stored = self.by_prefix.load(pairs, other=lambda prefix, route: self.set_route(route.at(*prefix)))
        for route, count in stored:
            for nh in route.nexthops:
                self.by_oif[nh.oif] = self.by_oif.get(nh.oif, 0) + count
        self.changes.all_routes = True

    def del_route(self, route: Route):
        """Remove the route RTM_DELROUTE describes: the first of its key
        that is the same route (nexthop flags such as LINKDOWN change
        without notification, so they do not count)."""
        prefix, key = (route.dst, route.dst_len), route.key
        routes = self.by_prefix.get(prefix)
        same = [i for i, r in enumerate(routes or ()) if r.key == key]
        if not same:
            return
        for i in same:
            if routes[i].same_route(route):
                self._unindex(routes.pop(i))
                break
        else:
            # Not one we know: the model is off for this key.  Punt it
            # (an unsupported route first in line) until the next dump.
            unknown = Route(route.table, route.dst, route.dst_len, tos=route.tos, priority=route.priority,
                            unsupported=("RTM_DELROUTE of an unknown route",))
            for i in reversed(same):
                self._unindex(routes.pop(i))
            routes.insert(same[0], unknown)
            self._index(unknown)
        if routes:
            self.by_prefix[prefix] = routes
        else:
            del self.by_prefix[prefix]
        self._route_changed(route)

    def _index(self, route: Route):
        for nh in route.nexthops:
            self.by_oif[nh.oif] = self.by_oif.get(nh.oif, 0) + 1
        if route.table == TABLE_LOCAL and route.dst_len < 32:
            self.local_short.add((route.dst, route.dst_len))

    def _unindex(self, route: Route):
        """Drop what the indexes hold for this route (call before or after
        it left by_prefix)."""
        prefix = (route.dst, route.dst_len)
        for nh in route.nexthops:
            left = self.by_oif.get(nh.oif, 0) - 1
            if left > 0:
                self.by_oif[nh.oif] = left
            else:
                self.by_oif.pop(nh.oif, None)
        if route.table == TABLE_LOCAL and not any(r.table == TABLE_LOCAL and r is not route
                                                  for r in self.by_prefix.get(prefix, ())):
            self.local_short.discard(prefix)

    def _route_changed(self, route: Route):
        self.changes.prefixes.add((route.dst, route.dst_len))
        if route.table != TABLE_LOCAL:
            return
        if route.dst_len < 32:
            self.changes.all_routes = True  # it covers main-table prefixes
            self.changes.neighbors |= set(self.neighbors)  # and maybe next hops
        else:  # a next hop the node now owns (or no longer does)
            self.changes.neighbors |= {k for k in self.neighbors if k[1] == route.dst}

    def _flush_routes(self, index: int):
        """What fib_sync_down_dev() + fib_flush() do when the link goes
        down or away: routes all of whose next hops use it are removed,
        multipath routes keep the others and mark these dead."""
        if not self.by_oif.get(index):
            return
        def uses(r):
            return any(nh.oif == index for nh in r.nexthops)
        using = [r for p in self.by_prefix.where(uses) for r in self.by_prefix[p] if uses(r)]
        for route in using:
            if all(nh.oif == index for nh in route.nexthops):
                self.del_route(route)
            else:
                dead = tuple(replace(nh, flags=nh.flags | RTNH_F_DEAD) if nh.oif == index else nh
                             for nh in route.nexthops)
                self._replace_alias(route, replace(route, nexthops=dead))

    def _replace_alias(self, old: Route, new: Route):
        prefix = (old.dst, old.dst_len)
        routes = self.by_prefix[prefix]
        routes[routes.index(old)] = new  # equal, if not the same object (a stored shape)
        self.by_prefix[prefix] = routes
        self._unindex(old)
        self._index(new)
        self._route_changed(new)

    # -- nexthop objects ---------------------------------------------------
    def set_nexthop(self, nh: NexthopObject):
        if self.nexthops.get(nh.id) != nh:
            self.nexthops[nh.id] = nh
            self.changes.all_routes = True  # routes resolve ids at translation

    def del_nexthop(self, nh_id: int):
        """A nexthop object is gone: the kernel drops the routes using it
        without a message per route (fib_flush); so does the model."""
        if self.nexthops.pop(nh_id, None) is None:
            return
        for route in [r for p in self.by_prefix.where(lambda r: r.nhid == nh_id) for r in self.by_prefix[p]
                      if r.nhid == nh_id]:
            self.del_route(route)
        self.changes.all_routes = True

    # -- rules (they only switch forwarding as a whole: nothing to record) --
    def add_rule(self, rule: Rule):
        self.rules.add(rule)

    def del_rule(self, rule: Rule):
        self.rules.discard(rule)

    # -- neighbours --------------------------------------------------------
    def set_neighbor(self, neigh: Neighbor):
        self.neighbors[neigh.key] = neigh
        self.neighbors_by_link.setdefault(neigh.ifindex, set()).add(neigh.key)
        self.changes.neighbors.add(neigh.key)

    def del_neighbor(self, neigh: Neighbor):
        if self.neighbors.pop(neigh.key, None) is not None:
            keys = self.neighbors_by_link[neigh.ifindex]
            keys.discard(neigh.key)
            if not keys:
                del self.neighbors_by_link[neigh.ifindex]
        self.changes.neighbors.add(neigh.key)

    # -- bridge FDB ---------------------------------------------------------
    def set_fdb(self, entry: FdbEntry):
        old = self.fdb.get(entry.key)
        if old is not None:
            self._unindex_fdb(old)
        self.fdb[entry.key] = entry
        for index in {entry.bridge, entry.port}:
            self.fdb_by_link.setdefault(index, set()).add(entry.key)
        self.changes.fdb.add(entry.key)

    def del_fdb(self, entry: FdbEntry):
        old = self.fdb.pop(entry.key, None)
        if old is not None:
            self._unindex_fdb(old)
        self.changes.fdb.add(entry.key)

    def _unindex_fdb(self, entry: FdbEntry):
        for index in {entry.bridge, entry.port}:
            keys = self.fdb_by_link.get(index)
            if keys is not None:
                keys.discard(entry.key)
                if not keys:
                    del self.fdb_by_link[index]

    def _flush_fdb(self, index: int):
        """Entries of a bridge or port that is gone (the kernel deletes them too)."""
        for key in list(self.fdb_by_link.get(index, ())):
            self.del_fdb(self.fdb[key])

    def set_ingress_tc(self, index: int, what: Optional[str]):
        if _put(self.ingress_tc, index, what):
            self.changes.links |= set(self.ports_of(index))

    def _flush_neighbors(self, index: int, keep_permanent: bool):
        for key in list(self.neighbors_by_link.get(index, ())):
            neigh = self.neighbors[key]
            if not (keep_permanent and neigh.state & NUD_PERMANENT):
                self.del_neighbor(neigh)


def _put(table: dict, key, value) -> bool:
    """table[key] = value (None: no entry); True if that changed anything."""
    if table.get(key) == value:
        return False
    if value is None:
        table.pop(key, None)
    else:
        table[key] = value
    return True


class RoutesView(Mapping):
    """route key -> [routes sharing it, in the kernel's order], read from
    KernelState.by_prefix (the one store of routes)."""

    def __init__(self, by_prefix):
        self._by_prefix = by_prefix

    def __getitem__(self, key):
        found = [r for r in self._by_prefix.get((key[1], key[2]), ()) if r.key == key]
        if not found:
            raise KeyError(key)
        return found

    def __iter__(self):
        for routes in self._by_prefix.values():
            yield from dict.fromkeys(r.key for r in routes)

    def __len__(self):
        return sum(len({r.key for r in routes}) for routes in self._by_prefix.values())
