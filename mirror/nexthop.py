"""Nexthop objects (`ip nexthop`): RTM_NEWNEXTHOP / RTM_DELNEXTHOP.

pyroute2 does not decode these messages, so this module does, from the
bytes: struct nhmsg (linux/nexthop.h) and its NHA_* attributes.  Pure
parsing plus the dump request (mirror/nlmsg.py); netlink.py subscribes to RTNLGRP_NEXTHOP and
hands the messages here.  Routes refer to an object by id (RTA_NH_ID); the
translator resolves the id.
"""

import socket
import struct
from typing import Iterator, Optional, Tuple

from . import model as m
from . import nlmsg

RTM_NEWNEXTHOP, RTM_DELNEXTHOP, RTM_GETNEXTHOP = 104, 105, 106
NEXTHOP_EVENTS = (RTM_NEWNEXTHOP, RTM_DELNEXTHOP)
RTNLGRP_NEXTHOP = 32
GROUP_MASK = 1 << (RTNLGRP_NEXTHOP - 1)  # as a bind() group bit (groups 1..32)

NHMSG = struct.Struct("=BBBBI")  # family, scope, protocol, resvd, flags
NLA = struct.Struct("=HH")  # len, type
NEXTHOP_GRP = struct.Struct("=IBBH")  # id, weight, weight_high (6.12+), resvd

(NHA_UNSPEC, NHA_ID, NHA_GROUP, NHA_GROUP_TYPE, NHA_BLACKHOLE, NHA_OIF, NHA_GATEWAY, NHA_ENCAP_TYPE,
 NHA_ENCAP, NHA_GROUPS, NHA_MASTER, NHA_FDB, NHA_RES_GROUP, NHA_RES_BUCKET, NHA_OP_FLAGS,
 NHA_GROUP_STATS, NHA_HW_STATS_ENABLE, NHA_HW_STATS_USED) = range(18)
# Attributes that change nothing a forwarded packet meets.
_NEUTRAL = {NHA_UNSPEC, NHA_ID, NHA_GROUP, NHA_GROUP_TYPE, NHA_BLACKHOLE, NHA_OIF, NHA_GATEWAY, NHA_FDB,
            NHA_RES_GROUP, NHA_OP_FLAGS, NHA_GROUP_STATS, NHA_HW_STATS_ENABLE, NHA_HW_STATS_USED}
_NAMES = {NHA_ENCAP_TYPE: "NHA_ENCAP_TYPE", NHA_ENCAP: "NHA_ENCAP", NHA_MASTER: "NHA_MASTER",
          NHA_GROUPS: "NHA_GROUPS", NHA_RES_BUCKET: "NHA_RES_BUCKET"}
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER


def attributes(data: bytes, offset: int) -> Iterator[Tuple[int, bytes]]:
    """(type, payload) of each netlink attribute from `offset` to the end."""
    while offset + NLA.size <= len(data):
        length, kind = NLA.unpack_from(data, offset)
        if length < NLA.size or offset + length > len(data):
            raise ValueError(f"bad attribute length {length} at {offset}")
        yield kind & NLA_TYPE_MASK, data[offset + NLA.size:offset + length]
        offset += (length + 3) & ~3


def _group(payload: bytes) -> Tuple[Tuple[int, int], ...]:
    """struct nexthop_grp[]: (id, weight); the kernel stores weight - 1 in
    weight and weight_high (the high byte, Linux 6.12+)."""
    return tuple((nh_id, (high << 8 | low) + 1)
                 for nh_id, low, high, _ in NEXTHOP_GRP.iter_unpack(payload[:len(payload) // 8 * 8]))


def parse(message: bytes) -> Tuple[int, m.NexthopObject]:
    """One RTM_NEWNEXTHOP/RTM_DELNEXTHOP message (with its nlmsghdr):
    (message type, the object).  Raises ValueError if malformed."""
    if len(message) < nlmsg.NLMSG.size + NHMSG.size:
        raise ValueError("short nexthop message")
    length, kind = nlmsg.NLMSG.unpack_from(message)[:2]
    family, _scope, _proto, _resvd, flags = NHMSG.unpack_from(message, nlmsg.NLMSG.size)
    fields = dict(family=family, flags=flags)
    unsupported = []
    for attr, payload in attributes(message[:length], nlmsg.NLMSG.size + NHMSG.size):
        if attr == NHA_ID:
            fields["id"] = struct.unpack_from("=I", payload)[0]
        elif attr == NHA_OIF:
            fields["oif"] = struct.unpack_from("=I", payload)[0]
        elif attr == NHA_GATEWAY:
            if len(payload) == 4:
                fields["gateway"] = socket.inet_ntop(socket.AF_INET, payload)
            else:
                unsupported.append("NHA_GATEWAY inet6")
        elif attr == NHA_BLACKHOLE:
            fields["blackhole"] = True
        elif attr == NHA_FDB:
            fields["fdb"] = True
        elif attr == NHA_GROUP:
            fields["group"] = _group(payload)
        elif attr == NHA_GROUP_TYPE:
            fields["group_type"] = struct.unpack_from("=H", payload)[0]
        elif attr not in _NEUTRAL:
            unsupported.append(_NAMES.get(attr, f"NHA_{attr}"))
    if "id" not in fields:
        raise ValueError("nexthop message without NHA_ID")
    return kind, m.NexthopObject(unsupported=tuple(unsupported), **fields)


def apply(state: m.KernelState, message: bytes) -> None:
    kind, nh = parse(message)
    if kind == RTM_NEWNEXTHOP:
        state.set_nexthop(nh)
    else:
        state.del_nexthop(nh.id)


def dump() -> Iterator[m.NexthopObject]:
    """Every nexthop object of this namespace (RTM_GETNEXTHOP dump)."""
    body = NHMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    for data, kind, offset in nlmsg.dump(RTM_GETNEXTHOP, body, "nexthop"):
        if kind == RTM_NEWNEXTHOP:
            yield parse(nlmsg.message(data, offset))[1]


def raw_message(msg) -> Optional[bytes]:
    """The bytes of a message pyroute2's marshal left undecoded (a nexthop
    event), or None if it is not one."""
    header = msg.get("header") or {}
    if header.get("type") not in NEXTHOP_EVENTS:
        return None
    return bytes(msg.data[msg.offset:msg.offset + header["length"]])
