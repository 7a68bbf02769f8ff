"""The kernel's conntrack table through ctnetlink (pyroute2's NFCTSocket).

The kernel's conntrack is the only flow state: the agent reads one entry
when the datapath asks about a flow, sets IP_CT_TCP_FLAG_BE_LIBERAL on a TCP
entry before the fast path takes it over (as the kernel's own flowtable
does: the kernel's window tracking sees no fast-pathed segment), and lists
entries for `loxi-mirror dump conntrack`.  Nothing else is ever written.

    ct = Conntrack()
    e = ct.get(6, "10.1.0.2", "10.2.0.2", 40000, 80)   # either direction's tuple
    ct.take_over(e)
    ct.list()
"""

import errno
import os
import socket
from dataclasses import dataclass, fields
from typing import Iterator, List, NamedTuple, Optional

from pyroute2 import NFCTSocket
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from .model import CtSysctls

# include/uapi/linux/netfilter/nf_conntrack_common.h: enum ip_conntrack_status bits.
IPS_BITS = ("EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED", "SRC_NAT", "DST_NAT", "SEQ_ADJUST",
            "SRC_NAT_DONE", "DST_NAT_DONE", "DYING", "FIXED_TIMEOUT", "TEMPLATE", "NAT_CLASH",
            "HELPER", "OFFLOAD", "HW_OFFLOAD")
IPS = {name: 1 << bit for bit, name in enumerate(IPS_BITS)}

# enum tcp_conntrack
TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK",
              "TIME_WAIT", "CLOSE", "SYN_SENT2")
TCP_ESTABLISHED = TCP_STATES.index("ESTABLISHED")

# include/uapi/linux/netfilter/nf_conntrack_tcp.h
IP_CT_TCP_FLAG_BE_LIBERAL = 0x08
IP_CT_TCP_FLAG_DATA_UNACKNOWLEDGED = 0x10

ORIGINAL, REPLY = 0, 1


def read_sysctls(root: str = "/proc/sys/net/netfilter") -> Optional[CtSysctls]:
    """This netns' nf_conntrack_* sysctls the fast path mirrors; None if one
    cannot be read (the fast path then leaves netfilter'd traffic alone)."""
    values = {}
    for f in fields(CtSysctls):
        try:
            with open(os.path.join(root, f"nf_conntrack_{f.name}")) as fh:
                value = int(fh.read().strip())
        except (OSError, ValueError):
            return None
        values[f.name] = bool(value) if f.type in (bool, "bool") else value
    return CtSysctls(**values)


class Tuple(NamedTuple):
    """One direction's tuple as the kernel stores it."""
    src: str
    dst: str
    sport: int
    dport: int


@dataclass(frozen=True)
class Entry:
    """One conntrack entry, as ctnetlink reports it."""
    proto: int
    orig: Tuple
    reply: Tuple
    status: int
    mark: int = 0
    timeout: int = 0  # seconds left
    id: int = 0
    zone: int = 0
    helper: Optional[str] = None
    tcp_state: Optional[int] = None
    tcp_flags: Optional[tuple] = None  # (original, reply) seen[].flags
    use: int = 0

    def has(self, name: str) -> bool:
        return bool(self.status & IPS[name])

    @property
    def status_names(self) -> List[str]:
        return [n for n in IPS_BITS if self.status & IPS[n]]

    @property
    def tcp_state_name(self) -> Optional[str]:
        if self.tcp_state is None:
            return None
        return TCP_STATES[self.tcp_state] if self.tcp_state < len(TCP_STATES) else str(self.tcp_state)

    @property
    def liberal(self) -> bool:
        """BE_LIBERAL in both directions (what the fast path requires of TCP)."""
        return bool(self.tcp_flags) and all(f & IP_CT_TCP_FLAG_BE_LIBERAL for f in self.tcp_flags)

    @property
    def taken_over(self) -> bool:
        """Liberal, and no unacknowledged-data flag frozen in (see take_over)."""
        return self.liberal and not any(f & IP_CT_TCP_FLAG_DATA_UNACKNOWLEDGED for f in self.tcp_flags)

    def direction(self, wire: Tuple) -> Optional[int]:
        """ORIGINAL or REPLY: which of the entry's tuples `wire` is; None: neither."""
        if wire == self.orig:
            return ORIGINAL
        if wire == self.reply:
            return REPLY
        return None


def parse(msg) -> Entry:
    """An nfct_msg (IPCTNL_MSG_CT_NEW / GET answer) -> Entry."""
    orig, proto = _tuple(msg.get_attr("CTA_TUPLE_ORIG"))
    reply, _ = _tuple(msg.get_attr("CTA_TUPLE_REPLY"))
    tcp_state = tcp_flags = None
    tcp = (msg.get_attr("CTA_PROTOINFO") or _NoAttrs).get_attr("CTA_PROTOINFO_TCP")
    if tcp is not None:
        tcp_state = tcp.get_attr("CTA_PROTOINFO_TCP_STATE")
        flags = [tcp.get_attr(f"CTA_PROTOINFO_TCP_FLAGS_{d}") for d in ("ORIGINAL", "REPLY")]
        if all(f is not None for f in flags):
            tcp_flags = tuple(_flags_value(f) for f in flags)
    return Entry(proto=proto, orig=orig, reply=reply, status=msg.get_attr("CTA_STATUS") or 0,
                 mark=msg.get_attr("CTA_MARK") or 0, timeout=msg.get_attr("CTA_TIMEOUT") or 0,
                 id=msg.get_attr("CTA_ID") or 0, zone=msg.get_attr("CTA_ZONE") or 0,
                 helper=_helper(msg), tcp_state=tcp_state, tcp_flags=tcp_flags,
                 use=msg.get_attr("CTA_USE") or 0)


class _NoAttrs:
    @staticmethod
    def get_attr(_name):
        return None


def _tuple(nla):
    ip = nla.get_attr("CTA_TUPLE_IP")
    l4 = nla.get_attr("CTA_TUPLE_PROTO")
    return (Tuple(ip.get_attr("CTA_IP_V4_SRC"), ip.get_attr("CTA_IP_V4_DST"),
                  l4.get_attr("CTA_PROTO_SRC_PORT") or 0, l4.get_attr("CTA_PROTO_DST_PORT") or 0),
            l4.get_attr("CTA_PROTO_NUM"))


def _flags_value(attr):
    """cta_tcp_flags decodes as (flags, mask) or as {'value': (flags, mask)}."""
    value = attr.get("value", attr) if isinstance(attr, dict) else attr
    return value[0] if isinstance(value, (tuple, list)) else int(value)


def _helper(msg) -> Optional[str]:
    """CTA_HELP is nested (CTA_HELP_NAME); pyroute2 declares it asciiz, so
    only its presence is reliable: any helper means the flow stays with the
    kernel."""
    for name, value in msg.get("attrs", []):
        if name == "CTA_HELP":
            text = value if isinstance(value, str) else ""
            return "".join(c for c in text if c.isprintable()) or "?"
    return None


class Conntrack:
    """A ctnetlink socket of the namespace it is created in.  Not thread-safe:
    one per thread."""

    def __init__(self):
        self.sock = NFCTSocket(nfgen_family=socket.AF_INET)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def get(self, proto: int, src: str, dst: str, sport: int, dport: int) -> Optional[Entry]:
        """The entry one of whose tuples is this one (the kernel looks both
        directions up); None if there is none."""
        t = NFCTAttrTuple(saddr=src, daddr=dst, proto=proto, sport=sport, dport=dport)
        try:
            msgs = self.sock.entry("get", tuple_orig=t)
        except NetlinkError as e:
            if e.code == errno.ENOENT:
                return None
            raise
        entries = [parse(m) for m in msgs if m.get_attr("CTA_TUPLE_ORIG") is not None]
        return entries[0] if entries else None

    def take_over(self, entry: Entry) -> None:
        """Prepare a TCP entry for the fast path, in both directions: set
        IP_CT_TCP_FLAG_BE_LIBERAL (the kernel's window tracking sees no
        fast-pathed segment, so a later punted one must not be INVALID) and
        clear IP_CT_TCP_FLAG_DATA_UNACKNOWLEDGED (no fast-pathed ACK can
        clear it, and while set the kernel, and the fast path with it, keeps
        the entry at the 300 s unacknowledged timeout even once the flow is
        idle with everything acknowledged).  The mask leaves every other flag
        as it is."""
        mask = IP_CT_TCP_FLAG_BE_LIBERAL | IP_CT_TCP_FLAG_DATA_UNACKNOWLEDGED
        flag = {"value": (IP_CT_TCP_FLAG_BE_LIBERAL, mask)}
        protoinfo = {"attrs": [["CTA_PROTOINFO_TCP", {"attrs": [
            ["CTA_PROTOINFO_TCP_FLAGS_ORIGINAL", flag], ["CTA_PROTOINFO_TCP_FLAGS_REPLY", flag]]}]]}
        o = entry.orig
        t = NFCTAttrTuple(saddr=o.src, daddr=o.dst, proto=entry.proto, sport=o.sport, dport=o.dport)
        self.sock.entry("set", tuple_orig=t, protoinfo=protoinfo)

    def list(self) -> Iterator[Entry]:
        """Every IPv4 entry of the namespace."""
        for msg in self.sock.dump():
            if msg.get_attr("CTA_TUPLE_ORIG") is not None:
                yield parse(msg)
