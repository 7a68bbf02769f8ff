"""The kernel-side netfilter change switch: a socket filter on the nfnetlink
NFTABLES group socket that turns forwarding off synchronously.

The kernel runs a socket's filter when it delivers a multicast message to it,
in the context of the sender: for an nftables / iptables-nft commit that is
inside the commit, before the command gets its acknowledgement.  The filter
(a dozen hand-assembled instructions, so no compiler is involved) sets
config.punt_forward_reason to NETFILTER_CHANGING when it is 0 and keeps the
message; the agent's hint thread then takes over (Reconciler.hold_forward),
and the reconcile after the re-read releases it.  With it no packet is
fast-pathed past a committed nft change, however late the agent's threads run.

It writes exactly what Reconciler.hold_forward would write, on the reconciler's
behalf; the reconciler re-checks after each config write (hint_pending) so it
never clears a hold the switch set for a change not yet read.
"""

import os
import socket
import struct

from .bpfsys import BPF_PROG_TYPE_SOCKET_FILTER, prog_load

SO_ATTACH_BPF = 50
BPF_PSEUDO_MAP_FD = 1
BPF_FUNC_map_lookup_elem = 1


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def program(config_fd: int, reason: int) -> bytes:
    """if (cfg = config[0]) && !cfg->punt_forward_reason: cfg->punt_forward_reason = reason;
    return skb->len (deliver the message unchanged).  punt_forward_reason is the
    first u32 of struct lm_config."""
    return b"".join([
        _insn(0xbf, 6, 1),                      # r6 = ctx
        _insn(0x62, 10, 0, -4, 0),              # *(u32 *)(fp - 4) = 0      key
        _insn(0xbf, 2, 10),                     # r2 = fp
        _insn(0x07, 2, 0, 0, -4),               # r2 += -4
        _insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, config_fd), _insn(0),   # r1 = &config
        _insn(0x85, imm=BPF_FUNC_map_lookup_elem),  # r0 = lookup(r1, r2)
        _insn(0x15, 0, 0, 3, 0),                # if r0 == 0 goto out
        _insn(0x61, 1, 0, 0),                   # r1 = cfg->punt_forward_reason
        _insn(0x55, 1, 0, 1, 0),                # if r1 != 0 goto out   (already punting)
        _insn(0x62, 0, 0, 0, reason),           # cfg->punt_forward_reason = reason
        _insn(0x61, 0, 6, 0),                   # out: r0 = skb->len
        _insn(0x95),                            # exit
    ])


def attach(sock: socket.socket, config_fd: int, reason: int) -> int:
    """Load the switch and attach it to `sock`; returns the program fd (the
    socket keeps its own reference)."""
    fd = prog_load(BPF_PROG_TYPE_SOCKET_FILTER, program(config_fd, reason))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, fd)
    except OSError:
        os.close(fd)
        raise
    return fd
