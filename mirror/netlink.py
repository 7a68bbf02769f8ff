"""Netlink watcher: dump, then stream rtnetlink events into a queue.

Parsing (message -> model object) is pure and lives in the parse_* functions;
NetlinkWatcher only owns sockets and the reader thread.  The event socket is
bound before the dump so nothing falls between the two; events queued before
a dump are dropped, and a dump during which routes changed is redone (see
NetlinkWatcher.fresh_dump).  On ENOBUFS (events lost) the watcher asks for a
full resync.
"""

import errno
import logging
import os
import select
import socket
import struct
import threading
from typing import Dict, Optional

from pyroute2 import IPRoute
from pyroute2.netlink import rtnl
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from . import bpfsys, nexthop, nlmsg, tc
from . import model as m

log = logging.getLogger(__name__)

# A burst of 20k routes overruns the default buffer.  LOXI_MIRROR_NETLINK_RCVBUF
# sets another size (tests use a tiny one to exercise the overrun resync).
RCVBUF = int(os.environ.get("LOXI_MIRROR_NETLINK_RCVBUF", 32 << 20))
SO_RCVBUFFORCE = 33
SOL_NETLINK, NETLINK_LISTEN_ALL_NSID = 270, 8
EVENT_NAMES = {v: k for k, v in vars(rtnl).items() if k.startswith("RTM_") and isinstance(v, int)}
EVENT_NAMES.update({nexthop.RTM_NEWNEXTHOP: "RTM_NEWNEXTHOP", nexthop.RTM_DELNEXTHOP: "RTM_DELNEXTHOP"})

GROUPS = (
    rtnl.RTMGRP_LINK
    | rtnl.RTMGRP_IPV4_IFADDR
    | rtnl.RTMGRP_IPV4_ROUTE
    | rtnl.RTMGRP_NEIGH
    | rtnl.RTMGRP_IPV4_RULE
    | rtnl.RTMGRP_TC  # qdiscs and filters: what a redirect may skip
    | (1 << (rtnl.RTNLGRP_IPV4_NETCONF - 1))  # forwarding / rp_filter changes
    | nexthop.GROUP_MASK  # nexthop objects (decoded by mirror/nexthop.py)
)

# Rule attributes that do not select packets or change the lookup.
_RULE_NEUTRAL_ATTRS = {"FRA_PRIORITY", "FRA_TABLE", "FRA_PROTOCOL", "FRA_UNSPEC"}
_RULE_UNSET = 0xFFFFFFFF
RTAX_MTU = 2
# Route attributes whose meaning the translator fully handles.
_ROUTE_ATTRS = {"RTA_TABLE", "RTA_DST", "RTA_PREFSRC", "RTA_OIF", "RTA_GATEWAY", "RTA_PRIORITY",
                "RTA_METRICS", "RTA_MULTIPATH", "RTA_CACHEINFO", "RTA_PREF"}  # FRA_SUPPRESS_PREFIXLEN / _IFGROUP "not set"


def _attrs(nla) -> dict:
    return dict(nla["attrs"]) if nla else {}


def parse_bridge(data: dict) -> m.BridgeInfo:
    """IFLA_INFO_DATA of a bridge (IFLA_BR_*), as a dict."""
    return m.BridgeInfo(
        ageing_time=data.get("IFLA_BR_AGEING_TIME", 30000),
        stp_state=data.get("IFLA_BR_STP_STATE", 0),
        vlan_filtering=bool(data.get("IFLA_BR_VLAN_FILTERING", 0)),
        group_fwd_mask=data.get("IFLA_BR_GROUP_FWD_MASK", 0),
        nf_call_iptables=bool(data.get("IFLA_BR_NF_CALL_IPTABLES", 0)),
        nf_call_ip6tables=bool(data.get("IFLA_BR_NF_CALL_IP6TABLES", 0)),
        nf_call_arptables=bool(data.get("IFLA_BR_NF_CALL_ARPTABLES", 0)),
    )


def parse_port(data: dict) -> m.BridgePort:
    """IFLA_INFO_SLAVE_DATA or IFLA_PROTINFO of a bridge port (IFLA_BRPORT_*)."""
    def flag(name, default):
        return bool(data.get(name, default))

    return m.BridgePort(
        state=data.get("IFLA_BRPORT_STATE", m.BR_STATE_FORWARDING),
        learning=flag("IFLA_BRPORT_LEARNING", 1),
        flood=flag("IFLA_BRPORT_UNICAST_FLOOD", 1),
        mcast_flood=flag("IFLA_BRPORT_MCAST_FLOOD", 1),
        bcast_flood=flag("IFLA_BRPORT_BCAST_FLOOD", 1),
        hairpin=flag("IFLA_BRPORT_MODE", 0),
        isolated=flag("IFLA_BRPORT_ISOLATED", 0),
        neigh_suppress=flag("IFLA_BRPORT_NEIGH_SUPPRESS", 0),
        proxy_arp=flag("IFLA_BRPORT_PROXYARP", 0),
        locked=flag("IFLA_BRPORT_LOCKED", 0),
        mab=flag("IFLA_BRPORT_MAB", 0),
        group_fwd_mask=data.get("IFLA_BRPORT_GROUP_FWD_MASK", 0),
        backup_port=data.get("IFLA_BRPORT_BACKUP_PORT", 0),
    )


def parse_vlan(data: dict) -> m.VlanInfo:
    return m.VlanInfo(vid=data.get("IFLA_VLAN_ID", 0), protocol=data.get("IFLA_VLAN_PROTOCOL", 0x8100))


def parse_link(msg) -> m.Link:
    info = _attrs(msg.get_attr("IFLA_LINKINFO"))
    kind = info.get("IFLA_INFO_KIND") or ""
    data = _attrs(info.get("IFLA_INFO_DATA"))
    slave = _attrs(info.get("IFLA_INFO_SLAVE_DATA")) if info.get("IFLA_INFO_SLAVE_KIND") == "bridge" else None
    return m.Link(
        index=msg["index"],
        name=msg.get_attr("IFLA_IFNAME") or "",
        kind=kind,
        mac=msg.get_attr("IFLA_ADDRESS"),
        mtu=msg.get_attr("IFLA_MTU") or 0,
        flags=msg["flags"],
        link_type=msg["ifi_type"],
        master=msg.get_attr("IFLA_MASTER") or 0,
        peer_in_other_netns=msg.get_attr("IFLA_LINK_NETNSID") is not None,
        link=msg.get_attr("IFLA_LINK") or 0,
        link_netnsid=msg.get_attr("IFLA_LINK_NETNSID"),
        promiscuity=msg.get_attr("IFLA_PROMISCUITY") or 0,
        bridge=parse_bridge(data) if kind == "bridge" else None,
        port=parse_port(slave) if slave is not None else None,
        vlan=parse_vlan(data) if kind == "vlan" else None,
    )


def parse_peer(msg) -> m.Peer:
    xdp = msg.get_attr("IFLA_XDP")
    attached = xdp.get_attr("IFLA_XDP_ATTACHED") if xdp else None
    return m.Peer(mac=msg.get_attr("IFLA_ADDRESS"), xdp=attached not in (None, 0, "none"))


BRIDGE_VLAN_INFO_PVID = 0x2
BRIDGE_VLAN_INFO_UNTAGGED = 0x4
BRIDGE_VLAN_INFO_RANGE_BEGIN = 0x8


def parse_port_vlans(af_spec):
    """IFLA_AF_SPEC of an AF_BRIDGE link message: the port's VLANs (ranges
    of a compressed dump expanded); None when the message has no VLAN list."""
    if not af_spec:
        return None
    out, begin = [], None
    for name, info in af_spec["attrs"]:
        if name != "IFLA_BRIDGE_VLAN_INFO":
            continue
        flags, vid = info["flags"], info["vid"]
        if flags & BRIDGE_VLAN_INFO_RANGE_BEGIN:
            begin = vid
            continue
        first, begin = (begin, None) if begin is not None else (vid, None)
        out += [m.PortVlan(v, bool(flags & BRIDGE_VLAN_INFO_PVID), bool(flags & BRIDGE_VLAN_INFO_UNTAGGED))
                for v in range(first, vid + 1)]
    return out


def parse_bridge_link(msg):
    """AF_BRIDGE RTM_NEWLINK/DELLINK (a port's state, sent by the bridge):
    (ifindex, BridgePort or None when it left, bridge ifindex, VLANs or None)."""
    if msg.get("event") == "RTM_DELLINK":
        return msg["index"], None, 0, None
    protinfo = msg.get_attr("IFLA_PROTINFO")
    port = parse_port(_attrs(protinfo)) if protinfo else None
    return msg["index"], port, msg.get_attr("IFLA_MASTER") or 0, parse_port_vlans(msg.get_attr("IFLA_AF_SPEC"))


NTF_SELF = 0x02
NTF_MASTER = 0x04
NTF_USE = 0x01


def parse_fdb(msg) -> Optional[m.FdbEntry]:
    """A bridge FDB entry from an AF_BRIDGE neighbour message; None for the
    devices' own address lists (NTF_SELF, no NDA_MASTER)."""
    bridge = msg.get_attr("NDA_MASTER")
    mac = msg.get_attr("NDA_LLADDR")
    if not bridge or not mac:
        return None
    return m.FdbEntry(bridge=bridge, mac=mac, port=msg["ifindex"], state=msg["state"],
                      vlan=msg.get_attr("NDA_VLAN") or 0, flags=msg["flags"])


def parse_address(msg) -> m.Address:
    addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
    return m.Address(index=msg["index"], address=addr, prefixlen=msg["prefixlen"])


def parse_route(msg) -> m.Route:
    """A route from a pyroute2-decoded RTM_NEWROUTE/DELROUTE (its wire bytes
    are decoded again: one decoder for events and dumps)."""
    return route_of_message(bytes(msg.data), msg.offset)


# Route attribute types (linux/rtnetlink.h) and their names as pyroute2 gives
# them (types it does not know are "UNKNOWN"), for `unsupported`.
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_METRICS, RTA_MULTIPATH, RTA_TABLE = 1, 4, 5, 6, 8, 9, 15
RTA_NH_ID = 30
RTAX_LOCK = 1
_RTA_NAMES = tuple(name for name, _ in rtmsg.nla_map)
_RTA_SUPPORTED = frozenset(i for i, name in enumerate(_RTA_NAMES) if name in _ROUTE_ATTRS) | {RTA_NH_ID}
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTA = struct.Struct("=HH")
_RTNH = struct.Struct("=HBBi")  # len, flags, hops, ifindex
_U32 = struct.Struct("=I")
_inet_ntoa = socket.inet_ntoa
# Next-hop tuples are shared: a big table has a handful of distinct ones.
_HOPS: dict = {}


def decode_route(buf, offset: int = 0) -> m.Route:
    """The route in the rtnetlink message at `offset` of `buf` (nlmsghdr
    included), decoded with struct rather than a pyroute2 object per message.
    Attributes beyond those the translator handles are listed by name in
    `unsupported`, as is `mtu lock`."""
    length = nlmsg.NLMSG.unpack_from(buf, offset)[0]
    end = offset + length
    _, dst_len, _, tos, table, _, _, rtype, rtm_flags = _RTMSG.unpack_from(buf, offset + 16)
    dst, oif, gateway, priority, mtu, nhid, hops, unsupported = "0.0.0.0", 0, None, 0, 0, 0, None, []
    pos, has_hop = offset + 28, False
    while pos + 4 <= end:
        alen, atype = _RTA.unpack_from(buf, pos)
        if alen < 4:
            break
        atype &= 0x3FFF  # NLA_F_NESTED / NET_BYTEORDER
        body = pos + 4
        if atype == RTA_DST:
            dst = _inet_ntoa(bytes(buf[body:body + 4]))
        elif atype == RTA_TABLE:
            table = _U32.unpack_from(buf, body)[0]
        elif atype == RTA_OIF:
            oif, has_hop = _U32.unpack_from(buf, body)[0], True
        elif atype == RTA_GATEWAY:
            gateway, has_hop = _inet_ntoa(bytes(buf[body:body + 4])), True
        elif atype == RTA_PRIORITY:
            priority = _U32.unpack_from(buf, body)[0]
        elif atype == RTA_NH_ID:
            nhid = _U32.unpack_from(buf, body)[0]
        elif atype == RTA_METRICS:
            mtu, locked = _metrics(buf, body, pos + alen)
            if locked:
                # "mtu lock": the kernel then forwards by learned path MTUs
                # (ip_dst_mtu_maybe_forward), which are not mirrored.
                unsupported.append("RTAX_LOCK mtu")
        elif atype == RTA_MULTIPATH:
            hops = _multipath(buf, body, pos + alen, unsupported)
        elif atype not in _RTA_SUPPORTED:
            # Anything else (lwtunnel encap, RTA_VIA, realms ...) changes
            # forwarding in ways not mirrored.
            unsupported.append(_RTA_NAMES[atype] if atype < len(_RTA_NAMES) else "UNKNOWN")
        pos += (alen + 3) & ~3
    if hops is None:
        hops = _shared_hops(((oif, gateway, rtm_flags & 0xFF, 1),)) if has_hop else ()
    if unsupported:  # each name once, sorted; the MTU lock last
        names = sorted({u for u in unsupported if u != "RTAX_LOCK mtu"})
        unsupported = tuple(names + ["RTAX_LOCK mtu"] * ("RTAX_LOCK mtu" in unsupported))
    return m.Route(table, dst, dst_len, rtype, tos, priority, hops, mtu=mtu, unsupported=tuple(unsupported), nhid=nhid)


# In every IPv4 route the kernel sends (fib_dump_info) RTA_TABLE comes
# first and RTA_DST, if dst_len is not 0, right after it.
_DST_AT = 28 + 8
_DST_HEADER = _RTA.pack(8, RTA_DST)
_BLANKS: Dict[bytes, m.Route] = {}


def decode_route_shared(buf: bytes, offset: int = 0):
    """((dst, dst_len), the route with its prefix blanked) of the message at
    `offset`.  Messages equal but for RTA_DST and dst_len share one route
    object, decoded once: a full table's million messages are a handful of
    distinct ones, each then costs a slice and a dict lookup."""
    dst_len = buf[offset + 17]
    if dst_len and buf[offset + _DST_AT:offset + _DST_AT + 4] == _DST_HEADER:
        end = offset + nlmsg.NLMSG.unpack_from(buf, offset)[0]
        key = buf[offset + 18:offset + _DST_AT + 4] + buf[offset + _DST_AT + 8:end]
        blank = _BLANKS.get(key)
        if blank is None:
            if len(_BLANKS) > 65536:
                _BLANKS.clear()
            blank = _BLANKS[key] = decode_route(buf, offset).at("", 0)
        return (_inet_ntoa(buf[offset + _DST_AT + 4:offset + _DST_AT + 8]), dst_len), blank
    route = decode_route(buf, offset)
    return (route.dst, route.dst_len), route


def route_of_message(buf: bytes, offset: int = 0) -> m.Route:
    """The whole route of a message (events): decode_route_shared's, with
    its prefix put back."""
    prefix, route = decode_route_shared(buf, offset)
    return route.at(*prefix)


def _metrics(buf, pos, end):
    """(RTAX_MTU, whether RTAX_LOCK locks the MTU) of an RTA_METRICS nest."""
    mtu = lock = 0
    while pos + 4 <= end:
        alen, atype = _RTA.unpack_from(buf, pos)
        if alen < 4:
            break
        if atype == RTAX_MTU:
            mtu = _U32.unpack_from(buf, pos + 4)[0]
        elif atype == RTAX_LOCK:
            lock = _U32.unpack_from(buf, pos + 4)[0]
        pos += (alen + 3) & ~3
    return mtu, bool(lock & (1 << RTAX_MTU))


def _multipath(buf, pos, end, unsupported):
    """The struct rtnexthop list of RTA_MULTIPATH, each with its RTA_GATEWAY;
    the names of any other hop attribute are added to `unsupported`."""
    hops = []
    while pos + _RTNH.size <= end:
        nh_len, flags, weight, ifindex = _RTNH.unpack_from(buf, pos)
        if nh_len < _RTNH.size:
            break
        gateway, apos = None, pos + _RTNH.size
        while apos + 4 <= pos + nh_len:
            alen, atype = _RTA.unpack_from(buf, apos)
            if alen < 4:
                break
            if atype == RTA_GATEWAY:
                gateway = _inet_ntoa(bytes(buf[apos + 4:apos + 8]))
            else:  # a hop's own encap, realm, RTA_VIA ...
                unsupported.append(_RTA_NAMES[atype & 0x3FFF] if atype & 0x3FFF < len(_RTA_NAMES) else "UNKNOWN")
            apos += (alen + 3) & ~3
        hops.append((ifindex, gateway, flags, weight + 1))
        pos += (nh_len + 3) & ~3
    return _shared_hops(tuple(hops))


def _shared_hops(spec):
    hops = _HOPS.get(spec)
    if hops is None:
        if len(_HOPS) > 65536:
            _HOPS.clear()
        hops = _HOPS[spec] = tuple(m.Nexthop(oif, gw, flags, weight) for oif, gw, flags, weight in spec)
    return hops


def parse_neighbor(msg) -> Optional[m.Neighbor]:
    dst = msg.get_attr("NDA_DST")
    if dst is None:
        return None
    return m.Neighbor(ifindex=msg["ifindex"], dst=dst, mac=msg.get_attr("NDA_LLADDR"), state=msg["state"])


def parse_rule(msg) -> m.Rule:
    selectors = set()
    for name, value in msg["attrs"]:
        if name in _RULE_NEUTRAL_ATTRS:
            continue
        if name.startswith("FRA_SUPPRESS_") and value == _RULE_UNSET:
            continue
        selectors.add((name, str(value)))
    for hdr in ("src_len", "dst_len", "tos", "flags"):
        if msg[hdr]:
            selectors.add((hdr, msg[hdr]))
    if msg["action"] != 1:  # FR_ACT_TO_TBL
        selectors.add(("action", msg["action"]))
    table = msg.get_attr("FRA_TABLE") or msg["table"]
    return m.Rule(priority=msg.get_attr("FRA_PRIORITY") or 0, table=table,
                  selectors=frozenset(selectors))


# Per-object messages of family AF_INET: event -> (parser, model method).
_OBJECT_EVENTS = {
    "RTM_NEWADDR": (parse_address, m.KernelState.add_address),
    "RTM_DELADDR": (parse_address, m.KernelState.del_address),
    "RTM_NEWNEIGH": (parse_neighbor, m.KernelState.set_neighbor),
    "RTM_DELNEIGH": (parse_neighbor, m.KernelState.del_neighbor),
    "RTM_NEWRULE": (parse_rule, m.KernelState.add_rule),
    "RTM_DELRULE": (parse_rule, m.KernelState.del_rule),
}


NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x100, 0x200, 0x400, 0x800


def route_position(nlmsg_flags: int) -> str:
    """Where fib_table_insert() put the route it announces, from the flags
    it sets on RTM_NEWROUTE: REPLACE took the place of the first route with
    the same key, APPEND went after them, CREATE alone (`ip route prepend`)
    before them; CREATE|EXCL means there was none."""
    if nlmsg_flags & NLM_F_REPLACE:
        return m.REPLACE
    if nlmsg_flags & NLM_F_CREATE and not nlmsg_flags & (NLM_F_APPEND | NLM_F_EXCL):
        return m.PREPEND
    return m.APPEND


def apply(state: m.KernelState, msg) -> bool:
    """Apply one rtnetlink message to the model; True if it may matter.

    RTM_NEWNETCONF and tc messages carry no object of ours: they tell the
    caller to re-read the forwarding / rp_filter sysctls or a link's qdiscs.
    """
    event = msg.get("event")
    raw = nexthop.raw_message(msg)
    if raw is not None and "nsid" not in msg:
        nexthop.apply(state, raw)
    elif "nsid" in msg:  # a link in another namespace: a veth peer
        key = (msg["nsid"], msg["index"])
        state.set_peer(key, parse_peer(msg) if event == "RTM_NEWLINK" else None)
    elif event in ("RTM_NEWLINK", "RTM_DELLINK") and msg.get("family") == m.AF_BRIDGE:
        state.set_port(*parse_bridge_link(msg))
    elif event == "RTM_NEWLINK":
        state.set_link(parse_link(msg))
    elif event == "RTM_DELLINK":
        state.del_link(msg["index"])
    elif event in ("RTM_NEWNEIGH", "RTM_DELNEIGH") and msg.get("family") == m.AF_BRIDGE:
        entry = parse_fdb(msg)
        if entry is None:
            return False
        (state.set_fdb if event == "RTM_NEWNEIGH" else state.del_fdb)(entry)
    elif event in ROUTE_EVENTS:
        if msg.get("family") != socket.AF_INET:
            return False
        route = msg["route"] if "route" in msg else parse_route(msg)
        if event == "RTM_DELROUTE":
            state.del_route(route)
        else:
            state.set_route(route, route_position(msg["header"]["flags"]))
    elif event in _OBJECT_EVENTS:
        if msg.get("family") != socket.AF_INET:
            return False
        parse, update = _OBJECT_EVENTS[event]
        obj = parse(msg)
        if obj is None:
            return False
        update(state, obj)
    elif event not in ("RTM_NEWNETCONF", "RTM_DELNETCONF") and event not in TC_EVENTS:
        return False
    return True


TC_EVENTS = ("RTM_NEWQDISC", "RTM_DELQDISC", "RTM_NEWTFILTER", "RTM_DELTFILTER")
TC_H_ROOT = 0xFFFFFFFF


def read_egress_tc(ipr, indexes):
    """{ifindex: description} for links whose egress path is not empty:
    a root qdisc, clsact egress filters, tcx egress programs, packet captures
    (all skipped by bpf_redirect_peer).

    Re-read on any tc event rather than replaying tc messages: qdisc and
    filter deletion semantics (whole chains, replaced defaults) are subtle,
    and a dump of one link is cheap.  Vanished links are simply absent.
    tcx programs and packet sockets send no event: the agent also re-reads
    this on its poll.
    """
    taps = read_packet_taps()
    out = {}
    for index in indexes:
        try:
            qdiscs = ipr.get_qdiscs(index=index)
            root = [q.get_attr("TCA_KIND") for q in qdiscs if q["parent"] == TC_H_ROOT]
            what = [f"root qdisc {kind}" for kind in root if kind != "noqueue"]
            if any(q.get_attr("TCA_KIND") == "clsact" for q in qdiscs):
                filters = [f for f in ipr.get_filters(index=index, parent=tc.EGRESS_PARENT) if f["handle"]]
                if filters:
                    what.append(f"{len(filters)} egress filter(s)")
            tcx = bpfsys.tcx_prog_count(index, bpfsys.BPF_TCX_EGRESS)
            if tcx:
                what.append(f"{tcx} tcx egress program(s)")
            if 0 in taps or index in taps:
                what.append("packet capture")
        except Exception as e:  # vanished (ENODEV): its RTM_DELLINK follows
            log.debug("tc dump of ifindex %d failed: %s", index, e)
            continue
        if what:
            out[index] = ", ".join(what)
    return out


def read_ingress_tc(ipr, indexes):
    """{ifindex: description} for links with filters on their ingress hook
    (for bridges: frames passed up to them meet these first)."""
    out = {}
    for index in indexes:
        try:
            qdiscs = [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=index)]
            if not {"clsact", "ingress"} & set(qdiscs):
                continue
            filters = [f for f in ipr.get_filters(index=index, parent=tc.INGRESS_PARENT) if f["handle"]]
        except Exception as e:  # vanished: its RTM_DELLINK follows
            log.debug("tc dump of ifindex %d failed: %s", index, e)
            continue
        if filters:
            out[index] = f"{len(filters)} ingress filter(s)"
    return out


def read_bridge_sysctls(root="/proc/sys/net/bridge") -> m.BridgeSysctls:
    """net.bridge.bridge-nf-call-*; absent (no br_netfilter) means 0."""
    def read(name):
        try:
            with open(os.path.join(root, name)) as f:
                return f.read().strip() != "0"
        except OSError:
            return False

    return m.BridgeSysctls(call_iptables=read("bridge-nf-call-iptables"),
                           call_ip6tables=read("bridge-nf-call-ip6tables"),
                           call_arptables=read("bridge-nf-call-arptables"))


ETH_P_ALL = 0x0003


def read_packet_taps(path="/proc/net/packet"):
    """ifindexes (0: every device) with an ETH_P_ALL packet socket, such as
    tcpdump: dev_queue_xmit() shows them what a device transmits, which
    bpf_redirect_peer would skip."""
    taps = set()
    try:
        with open(path) as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) >= 5 and int(fields[3], 16) == ETH_P_ALL:
                    taps.add(int(fields[4]))
    except (OSError, ValueError):
        taps.add(0)  # unknown: assume a capture everywhere
    return taps


def read_ingress_tc_after(ipr, indexes):
    """{ifindex: description} for links with tc ingress filters placed
    after ours: a packet we redirect would skip them."""
    out = {}
    for index in indexes:
        try:
            filters = ipr.get_filters(index=index, parent=tc.INGRESS_PARENT)
        except Exception:  # no ingress qdisc (nothing after us), or vanished
            continue
        later = [f for f in filters if f["handle"] and (f["info"] >> 16) >= tc.FILTER_PRIO and not tc.is_ours(f)]
        if later:
            out[index] = f"{len(later)} ingress filter(s) after ours"
    return out


def read_promiscuity(ipr):
    """{ifindex: IFLA_PROMISCUITY}.  A macvlan's address on a veth raises it
    without any notification (__dev_set_rx_mode), so the agent polls it."""
    return {msg["index"]: msg.get_attr("IFLA_PROMISCUITY") or 0 for msg in ipr.get_links()}


UNKNOWN_PEER = m.Peer(mac=None, xdp=False)  # no MAC to compare with: never redirect_peer


def read_peer(key) -> m.Peer:
    """A veth peer in another namespace, by RTM_GETLINK with
    IFLA_TARGET_NETNSID (pyroute2 calls it IFLA_IF_NETNSID)."""
    nsid, index = key
    req = ifinfmsg()
    req["family"], req["index"] = socket.AF_UNSPEC, index
    req["attrs"] = [("IFLA_IF_NETNSID", nsid)]
    req["header"]["type"], req["header"]["flags"], req["header"]["sequence_number"] = RTM_GETLINK, 1, 1
    req.encode()
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nlmsg.NETLINK_ROUTE)
    try:
        sock.bind((0, 0))
        sock.send(req.data)
        for msg in MarshalRtnl().parse(sock.recv(nlmsg.RECV_BYTES)):
            if msg["header"]["type"] == rtnl.RTM_NEWLINK:
                return parse_peer(msg)
        return UNKNOWN_PEER  # NLMSG_ERROR: no such link (any more), or not ours to see
    except OSError:
        return UNKNOWN_PEER
    finally:
        sock.close()


def read_peers(links):
    """{peer key: Peer} for every veth whose peer is in another namespace."""
    out = {}
    for link in links:
        if link.peer_key is not None:
            out[link.peer_key] = read_peer(link.peer_key)
    return out


def read_sysctls(names, root="/proc/sys/net/ipv4/conf"):
    """Forwarding and effective rp_filter per interface name (this netns)."""

    def read(name, key):
        try:
            with open(os.path.join(root, name, key)) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    rp_all = read("all", "rp_filter") or 0
    vmark_all = read("all", "src_valid_mark") or 0
    out = {}
    for name in names:
        fwd, rpf = read(name, "forwarding"), read(name, "rp_filter")
        if fwd is None or rpf is None:
            continue  # interface vanished meanwhile: next event settles it
        out[name] = m.LinkSysctls(forwarding=bool(fwd), rp_filter=max(rp_all, rpf),
                                  src_valid_mark=bool(vmark_all or read(name, "src_valid_mark")))
    return out


def read_fwd_use_pmtu(path="/proc/sys/net/ipv4/ip_forward_use_pmtu") -> bool:
    """ip_forward_use_pmtu=1: forwarding obeys learned path MTUs (not mirrored)."""
    return read_flag(path, absent=False)


def read_multipath_hash_policy(path="/proc/sys/net/ipv4/fib_multipath_hash_policy") -> int:
    """How the kernel hashes flows onto multipath next hops (0: L3, 1: L4 ...)."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return -1  # unknown: multipath routes punt


def read_fwd_update_priority(path="/proc/sys/net/ipv4/ip_forward_update_priority") -> bool:
    """ip_forward_update_priority (default 1): ip_forward() sets skb->priority from the TOS."""
    return read_flag(path, absent=True)


def read_flag(path, absent: bool) -> bool:
    try:
        with open(path) as f:
            return f.read().strip() != "0"
    except OSError:
        return absent  # no such sysctl: the kernel's behaviour without it


class DumpInterrupted(Exception):
    """Routes changed while they were being dumped: dump again."""


def dump(ipr, abort=None) -> m.KernelState:
    """A complete KernelState from netlink dumps (sysctls not included).
    abort(): polled while routes are read; True raises DumpInterrupted."""
    state = m.KernelState()
    for msg in ipr.get_links():
        state.set_link(parse_link(msg))
    for msg in ipr.get_addr(family=socket.AF_INET):
        state.add_address(parse_address(msg))
    for nh in nexthop.dump():
        state.set_nexthop(nh)
    state.load_routes(dump_routes(abort))  # every table, in the kernel's order
    for msg in ipr.get_neighbours(family=socket.AF_INET):
        neigh = parse_neighbor(msg)
        if neigh is not None:
            state.set_neighbor(neigh)
    for msg in ipr.get_rules(family=socket.AF_INET):
        state.add_rule(parse_rule(msg))
    for msg in ipr.get_neighbours(family=m.AF_BRIDGE):
        entry = parse_fdb(msg)
        if entry is not None:
            state.set_fdb(entry)
    for index, what in read_egress_tc(ipr, list(state.links)).items():
        state.set_egress_tc(index, what)
    bridges = [i for i, l in state.links.items() if l.kind == "bridge"]
    for index, what in read_ingress_tc(ipr, bridges).items():
        state.set_ingress_tc(index, what)
    for index, what in read_ingress_tc_after(ipr, list(state.links)).items():
        state.set_ingress_tc_after(index, what)
    for key, peer in read_peers(state.links.values()).items():
        state.set_peer(key, peer)
    return state


RTM_GETLINK, RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 18, 24, 25, 26


def dump_routes(abort=None):
    """The IPv4 routes of every table as (prefix, route) pairs (see
    decode_route_shared), read datagram by datagram from a socket of its
    own (it can stop as soon as abort() says the result would be stale
    anyway)."""
    def check():  # every 64 datagrams: each question reads the event socket
        if abort is not None and abort():
            raise DumpInterrupted()
    req = _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
    for data, kind, offset in nlmsg.dump(RTM_GETROUTE, req, "route", check=check, rcvbuf=1 << 20):
        if kind == RTM_NEWROUTE and data[offset + 16] == socket.AF_INET:
            yield decode_route_shared(data, offset)


ROUTE_EVENTS = ("RTM_NEWROUTE", "RTM_DELROUTE")
STRICT_DUMP_TRIES = 3  # dumps redone for any route change before some may stay uncertain


def _netnsid(ancillary) -> Optional[int]:
    """The netnsid a datagram came from (NETLINK_LISTEN_ALL_NSID), None for our own."""
    for level, kind, data in ancillary:
        if level == SOL_NETLINK and kind == NETLINK_LISTEN_ALL_NSID and len(data) >= 4:
            return struct.unpack("=i", data[:4])[0]
    return None


class NetlinkWatcher:
    """Reads rtnetlink events in a thread and hands them to `post`.

    post(("netlink", (gen, [msgs]))) for events, post(("resync", gen)) when
    events were lost and the caller must dump again; on_lost() is called
    at once (from the reader thread) so the fast path can stop before the
    re-dump.  `gen` numbers the dumps: events tagged with an older one were
    queued before the last dump and must be dropped, never replayed over it
    (route messages are not upserts: append/prepend/delete-first depend on
    what is already there).  Events come from a plain socket decoded with
    pyroute2's marshal; requests and dumps go through an IPRoute used only
    by the main thread.
    """

    def __init__(self, post, on_lost=lambda: None):
        self.post = post
        self.on_lost = on_lost
        self.events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nlmsg.NETLINK_ROUTE)
        try:
            self.events.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except OSError:
            self.events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        # Link events of the namespaces our veth peers live in (MAC, XDP
        # changes there), each datagram tagged with the netnsid.
        self.events.setsockopt(SOL_NETLINK, NETLINK_LISTEN_ALL_NSID, 1)
        self.events.bind((0, GROUPS))
        self.marshal = MarshalRtnl()
        self.requests = IPRoute()
        # Held while reading the event socket, so a dump can tell exactly
        # which events came before it.
        self.lock = threading.Lock()
        self.gen = 0  # changed by the main thread only (fresh_dump)
        self.lost_gen = -1  # the last generation in which events were lost
        # Since the current generation began: prefixes of route events, and
        # whether events were lost (or changed a covering local prefix).
        self._window, self._window_lost = set(), False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="netlink", daemon=True)

    def fresh_dump(self) -> m.KernelState:
        """A dump no queued event may be replayed over.  Everything queued
        so far is dropped and a new generation begins; events that arrive
        during the dump are handed on with it (upserts of links, neighbours
        ... converge when replayed), but if a route event is among them the
        dump may already contain it or not: dump again.  Routes that never
        stop changing would make that endless, so after a few tries the dump
        is taken with the prefixes changed meanwhile marked uncertain (they
        punt until a later dump is clean).  Lost events always mean again."""
        attempt = 0
        while True:
            attempt += 1
            strict = attempt <= STRICT_DUMP_TRIES
            with self.lock:
                self._discard_queued()
                self.gen += 1
                self._window, self._window_lost = set(), False
            try:
                state = dump(self.requests, abort=lambda: self._news(strict)[0])
            except DumpInterrupted:
                continue
            spoilt, changed = self._news(strict)
            if not spoilt:
                state.uncertain = changed
                return state

    def _news(self, strict=True):
        """(whether the dump under way is no good: events were lost, or,
        strict, routes changed since it began; the prefixes that changed)."""
        with self.lock:
            self._pump()
            return self._window_lost or (strict and bool(self._window)), set(self._window)

    def dump(self) -> m.KernelState:
        return self.fresh_dump()

    def start(self):
        self._thread.start()

    def _run(self):
        while not self._stopping:
            try:
                readable = select.select([self.events], [], [], 0.5)[0]
            except (OSError, ValueError):
                if self._stopping:
                    return
                raise
            if readable:
                with self.lock:
                    self._pump()

    def _pump(self, most=512):
        """Read what is queued on the event socket (the caller holds the
        lock) and post it tagged with the current generation: one hand-off
        per burst, not per message."""
        datagrams, lost = [], None
        while len(datagrams) < most:
            try:
                data, ancillary, _, _ = self.events.recvmsg(nlmsg.RECV_BYTES, socket.CMSG_SPACE(4), socket.MSG_DONTWAIT)
                datagrams.append((data, _netnsid(ancillary)))
            except BlockingIOError:
                break
            except OSError as e:
                if self._stopping:
                    return
                lost = "ENOBUFS" if e.errno == errno.ENOBUFS else str(e)
                break
        try:
            msgs = []
            for data, nsid in datagrams:
                msgs += self._decode(data, nsid)
        except Exception as e:  # undecodable: do not guess, re-dump
            msgs, lost = [], f"decode error {e}"
        for msg in msgs:
            route = msg.get("route")
            if route is not None:
                self._window.add((route.dst, route.dst_len))
                if route.table == m.TABLE_LOCAL and route.dst_len < 32:
                    self._window_lost = True  # it covers other prefixes: no partial trust
        if msgs:
            self.post(("netlink", (self.gen, msgs)))
        if lost:
            log.warning("netlink events lost (%s): full resync", lost)
            self._window_lost = True
            self.lost_gen = self.gen
            self.on_lost()
            self.post(("resync", self.gen))

    def _decode(self, data, nsid):
        """The messages of one datagram: IPv4 routes of this namespace
        decoded by route_of_message (a route event is {"event", "family",
        "header": {"flags"}, "route"}), everything else by pyroute2."""
        out = []
        for kind, flags, offset in nlmsg.messages(data):
            if kind in (RTM_NEWROUTE, RTM_DELROUTE) and nsid is None:
                if data[offset + 16] == socket.AF_INET:
                    out.append({"event": EVENT_NAMES[kind], "family": socket.AF_INET, "header": {"flags": flags},
                                "route": route_of_message(data, offset)})
                continue
            length = nlmsg.NLMSG.unpack_from(data, offset)[0]
            for msg in self.marshal.parse(data[offset:offset + length]):
                msg["event"] = EVENT_NAMES.get(msg["header"]["type"], "")
                if nsid is None:
                    out.append(msg)
                elif msg["event"] in ("RTM_NEWLINK", "RTM_DELLINK"):
                    msg["nsid"] = nsid  # another namespace's link: maybe a veth peer
                    out.append(msg)
        return out

    def _discard_queued(self, most=1 << 20):
        """Drop what the socket holds (older than the coming dump) and
        clear a pending overrun error."""
        for _ in range(most):
            try:
                self.events.recv(nlmsg.RECV_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                continue  # ENOBUFS: cleared by reporting it

    def neighbor_use(self, ifindex: int, dst: str):
        """Tell the kernel the neighbour is in use (NTF_USE), as its own
        forwarding would: a STALE entry then gets re-confirmed by probes."""
        self.requests.neigh("change", ifindex=ifindex, dst=dst, flags=0x01, family=socket.AF_INET)

    def fdb_use(self, port: int, mac: str):
        """Tell the bridge the MAC was seen on the port (NTF_USE): it
        refreshes the entry's age exactly as its own learning would."""
        self.requests.neigh("add", family=m.AF_BRIDGE, ifindex=port, lladdr=mac,
                            flags=NTF_USE | NTF_MASTER, state=m.NUD_REACHABLE)

    def close(self):
        self._stopping = True
        with self.lock:
            for sock in (self.events, self.requests):
                try:
                    sock.close()
                except Exception:
                    pass
