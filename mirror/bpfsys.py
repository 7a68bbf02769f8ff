"""The bpf() syscall pieces BCC does not expose: BPF_PROG_TEST_RUN.

The agent runs lm_heartbeat with it; the packet tests run the datapath
with it.  Linux x86-64 only (syscall number).
"""

import ctypes
import os
from dataclasses import dataclass
from typing import Optional

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

NR_BPF = 321  # x86-64
BPF_PROG_TEST_RUN = 10
BPF_PROG_QUERY = 16
BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47


def _bpf(cmd: int, attr, what: str):
    """bpf(cmd, &attr, sizeof attr); OSError on failure."""
    if _libc.syscall(NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class BpfAttrTest(ctypes.Structure):
    """union bpf_attr, the BPF_PROG_TEST_RUN member."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class SkBuff(ctypes.Structure):
    """struct __sk_buff (uapi/linux/bpf.h).  For SCHED_CLS test runs the
    kernel accepts only mark, priority, ingress_ifindex, ifindex (> 1 selects
    skb->dev in the caller's netns), cb, tstamp, wire_len, gso_segs, gso_size
    and hwtstamp; everything else must be 0."""

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32),
        ("cb", ctypes.c_uint32 * 5),
        ("hash", ctypes.c_uint32),
        ("tc_classid", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("napi_id", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("remote_ip4", ctypes.c_uint32),
        ("local_ip4", ctypes.c_uint32),
        ("remote_ip6", ctypes.c_uint32 * 4),
        ("local_ip6", ctypes.c_uint32 * 4),
        ("remote_port", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("flow_keys", ctypes.c_uint64),
        ("tstamp", ctypes.c_uint64),
        ("wire_len", ctypes.c_uint32),
        ("gso_segs", ctypes.c_uint32),
        ("sk", ctypes.c_uint64),
        ("gso_size", ctypes.c_uint32),
        ("tstamp_type", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 3),
        ("hwtstamp", ctypes.c_uint64),
    ]


assert ctypes.sizeof(SkBuff) == 192 and SkBuff.gso_size.offset == 176 and SkBuff.hwtstamp.offset == 184
assert ctypes.sizeof(BpfAttrTest) == 80


class BpfAttrQuery(ctypes.Structure):
    """union bpf_attr, the BPF_PROG_QUERY member."""

    _fields_ = [
        ("target_ifindex", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_uint64),
        ("prog_cnt", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("prog_attach_flags", ctypes.c_uint64),
        ("link_ids", ctypes.c_uint64),
        ("link_attach_flags", ctypes.c_uint64),
        ("revision", ctypes.c_uint64),
    ]


def tcx_prog_count(ifindex: int, attach_type: int) -> int:
    """How many tcx programs are attached to the device (this netns) at
    BPF_TCX_INGRESS / BPF_TCX_EGRESS; they are invisible to tc dumps."""
    attr = BpfAttrQuery(target_ifindex=ifindex, attach_type=attach_type)
    _bpf(BPF_PROG_QUERY, attr, "BPF_PROG_QUERY")
    return attr.prog_cnt


@dataclass
class RunResult:
    retval: int
    data: bytes
    ctx: SkBuff
    duration_ns: int


def prog_test_run(prog_fd: int, data: bytes, ctx: Optional[SkBuff] = None, repeat: int = 1) -> RunResult:
    """Run a SCHED_CLS program once on @data (an Ethernet frame)."""
    data_in = ctypes.create_string_buffer(bytes(data), len(data))
    out_size = max(len(data) * 2, 4096)
    data_out = ctypes.create_string_buffer(out_size)
    ctx_in = ctx if ctx is not None else SkBuff()
    ctx_out = SkBuff()
    attr = BpfAttrTest(
        prog_fd=prog_fd,
        data_size_in=len(data),
        data_size_out=out_size,
        data_in=ctypes.addressof(data_in),
        data_out=ctypes.addressof(data_out),
        repeat=repeat,
        ctx_size_in=ctypes.sizeof(SkBuff),
        ctx_size_out=ctypes.sizeof(SkBuff),
        ctx_in=ctypes.addressof(ctx_in),
        ctx_out=ctypes.addressof(ctx_out),
    )
    _bpf(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    return RunResult(attr.retval, data_out.raw[: attr.data_size_out], ctx_out, attr.duration)
