"""The agent's in-memory picture of the kernel state it mirrors.

Watchers turn kernel messages into these objects and apply them to one
KernelState; the translator reads a KernelState and nothing else.  Every
object carries the full state the kernel reported (netlink messages are
complete upserts), so replaying events over a dump converges.
"""

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional, Set, Tuple

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

# The three rules every namespace starts with: (priority, table).
DEFAULT_RULES = frozenset({(0, TABLE_LOCAL), (32766, TABLE_MAIN), (32767, TABLE_DEFAULT)})


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

    @property
    def admin_up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def oper_up(self) -> bool:
        return self.admin_up and bool(self.flags & IFF_RUNNING)


@dataclass(frozen=True)
class Address:
    index: int
    address: str
    prefixlen: int


@dataclass(frozen=True)
class Nexthop:
    oif: int
    gateway: Optional[str] = None
    flags: int = 0  # RTNH_F_*


@dataclass(frozen=True)
class Route:
    table: int
    dst: str
    dst_len: int
    type: int = RTN_UNICAST
    tos: int = 0
    priority: int = 0
    nexthops: Tuple[Nexthop, ...] = ()
    mtu: int = 0  # RTAX_MTU metric, 0 = none
    # Attributes the fast path does not implement (nexthop objects, lwtunnel
    # encap, IPv6 gateway via RTA_VIA ...): their names, for punting.
    unsupported: Tuple[str, ...] = ()

    @property
    def key(self):
        """What identifies a route to the kernel (RTM_DELROUTE semantics)."""
        return (self.table, self.dst, self.dst_len, self.tos, self.priority)


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


@dataclass
class KernelState:
    """One namespace's networking state as far as the fast path cares."""

    links: Dict[int, Link] = field(default_factory=dict)
    addresses: Set[Address] = field(default_factory=set)
    routes: Dict[tuple, Route] = field(default_factory=dict)
    neighbors: Dict[Tuple[int, str], Neighbor] = field(default_factory=dict)
    rules: Set[Rule] = field(default_factory=set)
    sysctls: Dict[str, LinkSysctls] = field(default_factory=dict)  # by ifname
    # Links whose egress path is not empty (a root qdisc other than noqueue,
    # clsact egress filters): ifindex -> what is there.
    egress_tc: Dict[int, str] = field(default_factory=dict)
    # Why netfilter could affect forwarded traffic; None = it cannot.
    # Starts "unknown" so nothing is fast-pathed before iptables was read.
    netfilter_impact: Optional[str] = "netfilter state not read yet"

    def set_link(self, link: Link):
        old = self.links.get(link.index)
        self.links[link.index] = link
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
        self.links.pop(index, None)
        self.egress_tc.pop(index, None)
        self.addresses = {a for a in self.addresses if a.index != index}
        self._flush_neighbors(index, keep_permanent=False)
        self._flush_routes(index)

    def _flush_routes(self, index: int):
        for key, route in list(self.routes.items()):
            if any(nh.oif == index for nh in route.nexthops):
                del self.routes[key]

    def _flush_neighbors(self, index: int, keep_permanent: bool):
        self.neighbors = {
            k: n for k, n in self.neighbors.items()
            if n.ifindex != index or (keep_permanent and n.state & NUD_PERMANENT)
        }

    def set_route(self, route: Route):
        self.routes[route.key] = route

    def del_route(self, route: Route):
        self.routes.pop(route.key, None)

    def set_neighbor(self, neigh: Neighbor):
        self.neighbors[neigh.key] = neigh

    def del_neighbor(self, neigh: Neighbor):
        self.neighbors.pop(neigh.key, None)
