"""Raw rtnetlink messages: those of a datagram, and dumps, for what the agent
decodes from the bytes itself (routes: netlink.py, for speed; nexthop
objects, which pyroute2 does not decode: nexthop.py)."""

import itertools
import socket
import struct
from typing import Callable, Iterator, Optional, Tuple

NETLINK_ROUTE = 0
NLMSG = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
NLMSG_DONE, NLMSG_ERROR = 3, 2
NLM_F_REQUEST_DUMP = 0x301  # NLM_F_REQUEST | NLM_F_DUMP
RECV_BYTES = 1 << 18  # > any one rtnetlink datagram (iproute2 uses 32 KiB)


def messages(data: bytes) -> Iterator[Tuple[int, int, int]]:
    """(type, flags, offset) of each netlink message in a datagram."""
    pos, end = 0, len(data)
    while pos + NLMSG.size <= end:
        length, kind, flags, _, _ = NLMSG.unpack_from(data, pos)
        if length < NLMSG.size:
            return
        yield kind, flags, pos
        pos += (length + 3) & ~3


def message(data: bytes, offset: int) -> bytes:
    """The message at `offset`, header included."""
    return data[offset:offset + NLMSG.unpack_from(data, offset)[0]]


def split(datagram: bytes) -> Iterator[bytes]:
    """The messages of one datagram, each with its header."""
    for _, _, offset in messages(datagram):
        yield message(datagram, offset)


def dump(request: int, body: bytes, what: str, check: Optional[Callable[[], None]] = None,
         rcvbuf: int = 0) -> Iterator[Tuple[bytes, int, int]]:
    """(datagram, type, offset) of each message answering a dump request,
    read from a socket of its own until NLMSG_DONE; NLMSG_ERROR raises
    OSError.  check() is called before every 64th datagram (it may raise to
    stop the dump)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, 0))
        sock.send(NLMSG.pack(NLMSG.size + len(body), request, NLM_F_REQUEST_DUMP, 1, 0) + body)
        for count in itertools.count():
            if check is not None and count % 64 == 0:
                check()
            data = sock.recv(RECV_BYTES)
            for kind, _, offset in messages(data):
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    raise OSError(-struct.unpack_from("=i", data, offset + NLMSG.size)[0], f"{what} dump failed")
                yield data, kind, offset
    finally:
        sock.close()
