"""Synthesized rtnetlink messages: encoded to wire bytes and decoded again
by pyroute2, so the parser sees exactly what a socket would hand it."""

from pyroute2.netlink.rtnl import ifaddrmsg, ifinfmsg, ndmsg, rtmsg
from pyroute2.netlink.rtnl.fibmsg import fibmsg

from mirror import model as m


def wire(cls, event, fields, attrs, nlmsg_flags=0):
    msg = cls()
    msg["header"]["flags"] = nlmsg_flags
    for key, value in fields.items():
        msg[key] = value
    msg["attrs"] = attrs
    msg.encode()
    out = cls(msg.data)
    out.decode()
    out["event"] = event
    return out


def link(index, name, mac="02:00:00:00:00:01", kind="veth", flags=m.IFF_UP | m.IFF_RUNNING | m.IFF_LOWER_UP,
         mtu=1500, netnsid=None, master=None, event="RTM_NEWLINK"):
    attrs = [("IFLA_IFNAME", name), ("IFLA_ADDRESS", mac), ("IFLA_MTU", mtu)]
    if kind:
        attrs.append(("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", kind)]}))
    if netnsid is not None:
        attrs.append(("IFLA_LINK_NETNSID", netnsid))
    if master is not None:
        attrs.append(("IFLA_MASTER", master))
    return wire(ifinfmsg.ifinfmsg, event, dict(family=0, index=index, flags=flags, ifi_type=1), attrs)


def address(index, ip, prefixlen, event="RTM_NEWADDR"):
    return wire(ifaddrmsg.ifaddrmsg, event, dict(family=2, index=index, prefixlen=prefixlen),
                [("IFA_LOCAL", ip), ("IFA_ADDRESS", ip)])


def route(dst, dst_len, oif=None, gateway=None, table=254, rtype=1, priority=None, tos=0, mtu=None,
          multipath=None, extra=(), event="RTM_NEWROUTE", nlmsg_flags=0x600):
    attrs = [("RTA_TABLE", table)]
    if dst_len:
        attrs.append(("RTA_DST", dst))
    if oif is not None:
        attrs.append(("RTA_OIF", oif))
    if gateway:
        attrs.append(("RTA_GATEWAY", gateway))
    if priority is not None:
        attrs.append(("RTA_PRIORITY", priority))
    if mtu:
        attrs.append(("RTA_METRICS", {"attrs": [("RTAX_MTU", mtu)]}))
    if multipath:
        attrs.append(("RTA_MULTIPATH", [{"oif": o, "attrs": [("RTA_GATEWAY", g)]} for o, g in multipath]))
    attrs.extend(extra)
    return wire(rtmsg.rtmsg, event, dict(family=2, dst_len=dst_len, table=min(table, 255), type=rtype, tos=tos),
                attrs, nlmsg_flags)


def neighbor(ifindex, ip, mac, state=m.NUD_REACHABLE, event="RTM_NEWNEIGH"):
    attrs = [("NDA_DST", ip)]
    if mac:
        attrs.append(("NDA_LLADDR", mac))
    return wire(ndmsg.ndmsg, event, dict(family=2, ifindex=ifindex, state=state), attrs)


def rule(priority, table, extra=(), event="RTM_NEWRULE", action=1):
    attrs = [("FRA_TABLE", table), ("FRA_SUPPRESS_PREFIXLEN", 0xFFFFFFFF), ("FRA_PROTOCOL", 2)]
    if priority:
        attrs.append(("FRA_PRIORITY", priority))
    attrs.extend(extra)
    return wire(fibmsg, event, dict(family=2, action=action, table=min(table, 255)), attrs)


def bridge(index, name, mac="02:00:00:00:0b:00", ageing=30000, vlan_filtering=0, nf_call_iptables=0,
           flags=m.IFF_UP | m.IFF_RUNNING | m.IFF_LOWER_UP):
    data = [("IFLA_BR_AGEING_TIME", ageing), ("IFLA_BR_STP_STATE", 0), ("IFLA_BR_VLAN_FILTERING", vlan_filtering),
            ("IFLA_BR_GROUP_FWD_MASK", 0), ("IFLA_BR_NF_CALL_IPTABLES", nf_call_iptables)]
    attrs = [("IFLA_IFNAME", name), ("IFLA_ADDRESS", mac), ("IFLA_MTU", 1500),
             ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "bridge"), ("IFLA_INFO_DATA", {"attrs": data})]})]
    return wire(ifinfmsg.ifinfmsg, "RTM_NEWLINK", dict(family=0, index=index, flags=flags, ifi_type=1), attrs)


def _brport(state, learning, isolated, locked):
    return [("IFLA_BRPORT_STATE", state), ("IFLA_BRPORT_MODE", 0), ("IFLA_BRPORT_LEARNING", learning),
            ("IFLA_BRPORT_UNICAST_FLOOD", 1), ("IFLA_BRPORT_ISOLATED", isolated), ("IFLA_BRPORT_LOCKED", locked)]


def port_link(index, name, master, state=m.BR_STATE_FORWARDING, learning=1, isolated=0, locked=0,
              mac="02:00:00:00:00:01", kind="veth"):
    """An RTM_NEWLINK (AF_UNSPEC) of a bridge port, with IFLA_INFO_SLAVE_DATA."""
    info = [("IFLA_INFO_KIND", kind), ("IFLA_INFO_SLAVE_KIND", "bridge"),
            ("IFLA_INFO_SLAVE_DATA", {"attrs": _brport(state, learning, isolated, locked)})]
    attrs = [("IFLA_IFNAME", name), ("IFLA_ADDRESS", mac), ("IFLA_MTU", 1500), ("IFLA_MASTER", master),
             ("IFLA_LINK_NETNSID", 0), ("IFLA_LINK", index + 100), ("IFLA_LINKINFO", {"attrs": info})]
    return wire(ifinfmsg.ifinfmsg, "RTM_NEWLINK",
                dict(family=0, index=index, flags=m.IFF_UP | m.IFF_RUNNING | m.IFF_LOWER_UP, ifi_type=1), attrs)


def bridge_port_event(index, name, master, state=m.BR_STATE_FORWARDING, learning=1, event="RTM_NEWLINK",
                      vlans=()):
    """The bridge's own AF_BRIDGE notification of a port (IFLA_PROTINFO, no
    IFLA_LINKINFO); vlans: (flags, vid) of IFLA_BRIDGE_VLAN_INFO entries."""
    attrs = [("IFLA_IFNAME", name), ("IFLA_MASTER", master)]
    if event == "RTM_NEWLINK":
        attrs.append(("IFLA_PROTINFO", {"attrs": _brport(state, learning, 0, 0)}))
    if vlans:
        attrs.append(("IFLA_AF_SPEC", {"attrs": [("IFLA_BRIDGE_VLAN_INFO", {"flags": f, "vid": v})
                                                 for f, v in vlans]}))
    return wire(ifinfmsg.ifinfmsg, event,
                dict(family=7, index=index, flags=m.IFF_UP | m.IFF_RUNNING | m.IFF_LOWER_UP, ifi_type=1), attrs)


def vlan_link(index, name, vid, parent, protocol=0x8100):
    info = [("IFLA_INFO_KIND", "vlan"),
            ("IFLA_INFO_DATA", {"attrs": [("IFLA_VLAN_ID", vid), ("IFLA_VLAN_PROTOCOL", protocol)]})]
    attrs = [("IFLA_IFNAME", name), ("IFLA_ADDRESS", "02:00:00:00:0a:0a"), ("IFLA_MTU", 1500),
             ("IFLA_LINK", parent), ("IFLA_LINKINFO", {"attrs": info})]
    return wire(ifinfmsg.ifinfmsg, "RTM_NEWLINK",
                dict(family=0, index=index, flags=m.IFF_UP | m.IFF_RUNNING | m.IFF_LOWER_UP, ifi_type=1), attrs)


def fdb(port, mac, master=None, state=m.NUD_REACHABLE, vlan=None, flags=0, event="RTM_NEWNEIGH"):
    attrs = [("NDA_LLADDR", mac)]
    if master is not None:
        attrs.append(("NDA_MASTER", master))
    if vlan is not None:
        attrs.append(("NDA_VLAN", vlan))
    return wire(ndmsg.ndmsg, event, dict(family=7, ifindex=port, state=state, flags=flags), attrs)
