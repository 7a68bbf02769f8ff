"""Netlink watcher: dump, then stream rtnetlink events into a queue.

Parsing (message -> model object) is pure and lives in the parse_* functions;
NetlinkWatcher only owns sockets and the reader thread.  The event socket is
bound before the dump so nothing falls between the two; replaying the queued
events over the dump converges because every message is a full upsert.  On
ENOBUFS (events lost) the watcher asks for a full resync.
"""

import errno
import logging
import os
import socket
import struct
import threading
from typing import Dict, Optional

from pyroute2 import IPRoute
from pyroute2.netlink import rtnl
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from . import model as m
from . import tc

log = logging.getLogger(__name__)

# A burst of 20k routes overruns the default buffer.  LOXI_MIRROR_NETLINK_RCVBUF
# sets another size (tests use a tiny one to exercise the overrun resync).
RCVBUF = int(os.environ.get("LOXI_MIRROR_NETLINK_RCVBUF", 32 << 20))
SO_RCVBUFFORCE = 33
NETLINK_ROUTE = 0
RECV_BYTES = 1 << 18  # > any one rtnetlink datagram (iproute2 uses 32 KiB)
EVENT_NAMES = {v: k for k, v in vars(rtnl).items() if k.startswith("RTM_") and isinstance(v, int)}

GROUPS = (
    rtnl.RTMGRP_LINK
    | rtnl.RTMGRP_IPV4_IFADDR
    | rtnl.RTMGRP_IPV4_ROUTE
    | rtnl.RTMGRP_NEIGH
    | rtnl.RTMGRP_IPV4_RULE
    | rtnl.RTMGRP_TC  # qdiscs and filters: what a redirect may skip
    | (1 << (rtnl.RTNLGRP_IPV4_NETCONF - 1))  # forwarding / rp_filter changes
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
        peer_netnsid=msg.get_attr("IFLA_LINK_NETNSID"),
        peer_index=msg.get_attr("IFLA_LINK") or 0,
        bridge=parse_bridge(data) if kind == "bridge" else None,
        port=parse_port(slave) if slave is not None else None,
        vlan=parse_vlan(data) if kind == "vlan" else None,
    )


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
    attrs = dict(msg["attrs"])  # one pass: get_attr() rescans the list each time
    # Anything else (nexthop objects arrive as UNKNOWN RTA_NH_ID, lwtunnel
    # encap, RTA_VIA, realms ...) changes forwarding in ways not mirrored.
    unsupported = sorted(name for name in attrs if name not in _ROUTE_ATTRS)
    multipath = attrs.get("RTA_MULTIPATH")
    if multipath:
        hops = tuple(
            m.Nexthop(oif=nh["oif"], gateway=nh.get_attr("RTA_GATEWAY"), flags=nh["flags"])
            for nh in multipath
        )
    elif "RTA_OIF" in attrs or "RTA_GATEWAY" in attrs:
        hops = (m.Nexthop(oif=attrs.get("RTA_OIF") or 0, gateway=attrs.get("RTA_GATEWAY"),
                          flags=msg["flags"] & 0xFF),)
    else:
        hops = ()
    mtu = 0
    metrics = attrs.get("RTA_METRICS")
    if metrics:
        metrics = dict(metrics["attrs"])
        mtu = metrics.get("RTAX_MTU") or 0
        if metrics.get("RTAX_LOCK", 0) & (1 << RTAX_MTU):
            # "mtu lock": the kernel then forwards by learned path MTUs
            # (ip_dst_mtu_maybe_forward), which are not mirrored.
            unsupported.append("RTAX_LOCK mtu")
    return m.Route(
        table=attrs.get("RTA_TABLE") or msg["table"],
        dst=attrs.get("RTA_DST") or "0.0.0.0",
        dst_len=msg["dst_len"],
        type=msg["type"],
        tos=msg["tos"],
        priority=attrs.get("RTA_PRIORITY") or 0,
        nexthops=hops,
        mtu=mtu,
        unsupported=tuple(unsupported),
    )


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
    "RTM_NEWROUTE": (parse_route, m.KernelState.set_route),
    "RTM_DELROUTE": (parse_route, m.KernelState.del_route),
    "RTM_NEWNEIGH": (parse_neighbor, m.KernelState.set_neighbor),
    "RTM_DELNEIGH": (parse_neighbor, m.KernelState.del_neighbor),
    "RTM_NEWRULE": (parse_rule, m.KernelState.add_rule),
    "RTM_DELRULE": (parse_rule, m.KernelState.del_rule),
}


def apply(state: m.KernelState, msg) -> bool:
    """Apply one rtnetlink message to the model; True if it may matter.

    RTM_NEWNETCONF and tc messages carry no object of ours: they tell the
    caller to re-read the forwarding / rp_filter sysctls or a link's qdiscs.
    """
    event = msg.get("event")
    if event in ("RTM_NEWLINK", "RTM_DELLINK") and msg.get("family") == m.AF_BRIDGE:
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
    """{ifindex: description} for links whose egress path is not empty.

    Re-read on any tc event rather than replaying tc messages: qdisc and
    filter deletion semantics (whole chains, replaced defaults) are subtle,
    and a dump of one link is cheap.  Vanished links are simply absent.
    """
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


RTM_GETLINK = 18
NLM_F_REQUEST = 0x1
IFLA_TARGET_NETNSID = 46


def read_peer_mac(link: m.Link) -> Optional[str]:
    """The MAC of a veth's peer in another netns (RTM_GETLINK with
    IFLA_TARGET_NETNSID; pyroute2's link() does not pass that attribute)."""
    if link.peer_netnsid is None or not link.peer_index:
        return None
    body = struct.pack("=BxHiII", 0, 0, link.peer_index, 0, 0) + struct.pack("=HHi", 8, IFLA_TARGET_NETNSID,
                                                                              link.peer_netnsid)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as s:
        s.bind((0, 0))
        s.settimeout(1.0)
        s.send(struct.pack("=IHHII", 16 + len(body), RTM_GETLINK, NLM_F_REQUEST, 1, 0) + body)
        data = s.recv(RECV_BYTES)
    for msg in MarshalRtnl().parse(data):
        if msg["header"]["type"] == rtnl.RTM_NEWLINK and msg["index"] == link.peer_index:
            return msg.get_attr("IFLA_ADDRESS")
    return None  # gone or not allowed: the datapath then does not redirect into it


def read_peer_macs(links) -> Dict[int, str]:
    out = {}
    for link in links:
        try:
            mac = read_peer_mac(link)
        except OSError as e:
            log.debug("peer of %s unreadable: %s", link.name, e)
            continue
        if mac:
            out[link.index] = mac
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


def read_sysctls(names, root="/proc/sys/net/ipv4/conf"):
    """Forwarding and effective rp_filter per interface name (this netns)."""

    def read(name, key):
        try:
            with open(os.path.join(root, name, key)) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    rp_all = read("all", "rp_filter") or 0
    out = {}
    for name in names:
        fwd, rpf = read(name, "forwarding"), read(name, "rp_filter")
        if fwd is None or rpf is None:
            continue  # interface vanished meanwhile: next event settles it
        out[name] = m.LinkSysctls(forwarding=bool(fwd), rp_filter=max(rp_all, rpf))
    return out


def read_fwd_use_pmtu(path="/proc/sys/net/ipv4/ip_forward_use_pmtu") -> bool:
    """ip_forward_use_pmtu=1: forwarding obeys learned path MTUs (not mirrored)."""
    try:
        with open(path) as f:
            return f.read().strip() != "0"
    except OSError:
        return False  # no such sysctl: the kernel forwards by device/route MTU


def dump(ipr) -> m.KernelState:
    """A complete KernelState from netlink dumps (sysctls not included)."""
    state = m.KernelState()
    for msg in ipr.get_links():
        state.set_link(parse_link(msg))
    for msg in ipr.get_addr(family=socket.AF_INET):
        state.add_address(parse_address(msg))
    for msg in ipr.get_routes(family=socket.AF_INET):  # every table
        state.set_route(parse_route(msg))
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
    return state


class NetlinkWatcher:
    """Reads rtnetlink events in a thread and hands them to `post`.

    post(("netlink", [msgs])) for events, post(("resync", reason)) when
    events were lost and the caller must dump again.  Events come from a
    plain socket decoded with pyroute2's marshal (pyroute2's own sockets are
    bound to the asyncio loop of the thread that made them); requests and
    dumps go through an IPRoute used only by the main thread.
    """

    def __init__(self, post):
        self.post = post
        self.events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            self.events.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except OSError:
            self.events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self.events.bind((0, GROUPS))
        self.marshal = MarshalRtnl()
        self.requests = IPRoute()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="netlink", daemon=True)

    def dump(self) -> m.KernelState:
        return dump(self.requests)

    def start(self):
        self._thread.start()

    def _run(self):
        while not self._stopping:
            try:
                datagrams = self._receive()
            except OSError as e:
                if self._stopping:
                    return
                reason = "ENOBUFS" if e.errno == errno.ENOBUFS else str(e)
                log.warning("netlink events lost (%s): full resync", reason)
                self.post(("resync", reason))
                continue
            try:
                msgs = [msg for data in datagrams for msg in self.marshal.parse(data)]
                for msg in msgs:
                    msg["event"] = EVENT_NAMES.get(msg["header"]["type"], "")
            except Exception as e:  # undecodable: do not guess, re-dump
                log.warning("netlink decode error (%s): full resync", e)
                self.post(("resync", "decode error"))
                continue
            if msgs:
                self.post(("netlink", msgs))

    def _receive(self, most=512):
        """Block for one datagram, then take what else is already queued:
        one hand-off per burst, not per message."""
        datagrams = [self.events.recv(RECV_BYTES)]
        while len(datagrams) < most:
            try:
                datagrams.append(self.events.recv(RECV_BYTES, socket.MSG_DONTWAIT))
            except BlockingIOError:
                break
        return datagrams

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
        try:
            self.events.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for sock in (self.events, self.requests):
            try:
                sock.close()
            except Exception:
                pass
