"""IPsec (xfrm) state that could change what happens to forwarded packets.

The kernel checks forwarded packets against the security policy database
(direction fwd on input, out on the output route) and, since 5.16, a
per-namespace default that may be "block".  The fast path knows none of
that, so any policy or a blocking default makes forwarded traffic punt.
Read with plain NETLINK_XFRM requests; a multicast group tells of policy
changes (the default has no notification: the agent polls it).
"""

import errno
import logging
import socket
import struct
import threading
from typing import Optional

log = logging.getLogger(__name__)

NETLINK_XFRM = 6
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_GETDEFAULT = 0x28
XFRMNLGRP_POLICY = 4
XFRM_USERPOLICY_BLOCK = 1
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_HDR = struct.Struct("=IHHII")
# struct xfrm_userpolicy_id is the smallest header a GETPOLICY dump accepts.
XFRM_USERPOLICY_ID_LEN = 64


def _request(sock, msg_type, flags, payload=b""):
    sock.send(NLMSG_HDR.pack(NLMSG_HDR.size + len(payload), msg_type, NLM_F_REQUEST | flags, 1, 0) + payload)


def _messages(sock):
    """(type, payload) of the reply until DONE (dump) or the first message."""
    while True:
        data = sock.recv(1 << 16)
        offset = 0
        while offset + NLMSG_HDR.size <= len(data):
            length, msg_type, _, _, _ = NLMSG_HDR.unpack_from(data, offset)
            if length < NLMSG_HDR.size:
                return
            yield msg_type, data[offset + NLMSG_HDR.size: offset + length]
            if msg_type in (NLMSG_DONE, NLMSG_ERROR):
                return
            offset += (length + 3) & ~3


def count_policies(sock) -> int:
    _request(sock, XFRM_MSG_GETPOLICY, NLM_F_DUMP, bytes(XFRM_USERPOLICY_ID_LEN))
    n = 0
    for msg_type, payload in _messages(sock):
        if msg_type == NLMSG_ERROR:
            code = -struct.unpack_from("=i", payload)[0]
            if code:
                raise OSError(code, f"xfrm policy dump: {errno.errorcode.get(code, code)}")
        elif msg_type != NLMSG_DONE:
            n += 1
    return n


def default_blocks(sock) -> bool:
    """Whether the namespace's default policy blocks forwarded or output
    traffic (ip xfrm policy setdefault fwd block)."""
    _request(sock, XFRM_MSG_GETDEFAULT, 0, bytes(4))
    for msg_type, payload in _messages(sock):
        if msg_type == NLMSG_ERROR:
            code = -struct.unpack_from("=i", payload)[0]
            if code in (errno.EOPNOTSUPP, errno.EINVAL):
                return False  # older kernel: no defaults, always accept
            if code:
                raise OSError(code, "xfrm default policy")
        elif len(payload) >= 3:
            # struct xfrm_userpolicy_default: in, fwd, out; `in` only
            # concerns local delivery.
            return XFRM_USERPOLICY_BLOCK in (payload[1], payload[2])
    return False


def forward_impact(sock) -> Optional[str]:
    """None when xfrm cannot affect forwarded traffic, else why it can."""
    try:
        n = count_policies(sock)
        if n:
            return f"{n} xfrm polic{'y' if n == 1 else 'ies'}"
        if default_blocks(sock):
            return "xfrm default policy blocks"
        return None
    except OSError as e:
        if e.errno == errno.EPROTONOSUPPORT:
            return None  # no xfrm in this kernel: nothing can apply
        return f"xfrm state unknown ({e})"


def open_socket(groups: int = 0):
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
    except OSError as e:
        if e.errno == errno.EPROTONOSUPPORT:
            return None
        raise
    sock.bind((0, groups))
    return sock


def read() -> Optional[str]:
    sock = open_socket()
    if sock is None:
        return None
    with sock:
        return forward_impact(sock)


class XfrmWatcher:
    """Posts ("xfrm", impact) whenever an xfrm policy changes."""

    def __init__(self, post):
        self.post = post
        self.events = open_socket(groups=1 << (XFRMNLGRP_POLICY - 1))
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="xfrm", daemon=True)

    def start(self):
        if self.events is not None:
            self._thread.start()

    def _run(self):
        while not self._stopping:
            try:
                self.events.recv(1 << 16)
            except OSError as e:
                if self._stopping:
                    return
                if e.errno != errno.ENOBUFS:  # lost events: just read again
                    log.warning("xfrm events: %s", e)
            self.post(("xfrm", read()))

    def close(self):
        self._stopping = True
        if self.events is not None:
            try:
                self.events.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.events.close()
