"""The bpf() syscall pieces BCC does not expose: BPF_PROG_TEST_RUN, loading
a program from raw instructions, creating maps (the route trie) and writing
them element by element or in batches without BCC's per-call overhead.

The agent runs lm_heartbeat with it and loads the netfilter change switch
(mirror/nfswitch.py); the packet tests run the datapath with it.  Linux
x86-64 only (syscall number).
"""

import ctypes
import errno
import os
from dataclasses import dataclass
from typing import Optional

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

NR_BPF = 321  # x86-64
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_MAP_UPDATE_BATCH, BPF_MAP_DELETE_BATCH = 26, 27
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_F_NO_PREALLOC = 1
BPF_PROG_LOAD = 5
BPF_PROG_TEST_RUN = 10
BPF_PROG_QUERY = 16
BPF_MAP_LOOKUP_BATCH = 24
BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47


def _bpf(cmd: int, attr, what: str):
    """bpf(cmd, &attr, sizeof attr); OSError on failure."""
    if _libc.syscall(NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


BPF_PROG_TYPE_SOCKET_FILTER = 1


class BpfAttrLoad(ctypes.Structure):
    """union bpf_attr, the start of the BPF_PROG_LOAD member."""

    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
    ]


class BpfAttrElem(ctypes.Structure):
    """union bpf_attr, the BPF_MAP_*_ELEM member."""

    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


_ELEM_NAMES = {BPF_MAP_LOOKUP_ELEM: "BPF_MAP_LOOKUP_ELEM", BPF_MAP_UPDATE_ELEM: "BPF_MAP_UPDATE_ELEM",
               BPF_MAP_DELETE_ELEM: "BPF_MAP_DELETE_ELEM", BPF_MAP_GET_NEXT_KEY: "BPF_MAP_GET_NEXT_KEY"}


def _elem(cmd: int, map_fd: int, key: bytes, value) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    attr = BpfAttrElem(map_fd=map_fd, key=ctypes.addressof(k), value=ctypes.addressof(value) if value is not None else 0)
    _bpf(cmd, attr, _ELEM_NAMES[cmd])


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytearray:
    value = ctypes.create_string_buffer(value_size)
    _elem(BPF_MAP_LOOKUP_ELEM, map_fd, key, value)
    return bytearray(value.raw)


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    _elem(BPF_MAP_UPDATE_ELEM, map_fd, key, ctypes.create_string_buffer(bytes(value), len(value)))


def map_delete(map_fd: int, key: bytes) -> None:
    """OSError ENOENT when the key is absent."""
    _elem(BPF_MAP_DELETE_ELEM, map_fd, key, None)


def map_keys(map_fd: int, key_size: int):
    """Every key of the map, as bytes (BPF_MAP_GET_NEXT_KEY from no key)."""
    out, cur = [], None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        k = ctypes.create_string_buffer(cur, key_size) if cur is not None else None
        attr = BpfAttrElem(map_fd=map_fd, key=ctypes.addressof(k) if k is not None else 0,
                           value=ctypes.addressof(nxt))
        if _libc.syscall(NR_BPF, BPF_MAP_GET_NEXT_KEY, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
            err = ctypes.get_errno()
            if err == errno.ENOENT:
                return out
            raise OSError(err, f"BPF_MAP_GET_NEXT_KEY: {os.strerror(err)}")
        cur = nxt.raw
        out.append(cur)


class BpfAttrCreate(ctypes.Structure):
    """union bpf_attr, the start of the BPF_MAP_CREATE member."""

    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16)]


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0,
               name: bytes = b"") -> int:
    """A new map; returns its fd (the caller closes it)."""
    attr = BpfAttrCreate(map_type=map_type, key_size=key_size, value_size=value_size, max_entries=max_entries,
                         map_flags=flags, map_name=name[:15])
    fd = _libc.syscall(NR_BPF, BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_MAP_CREATE: {os.strerror(err)}")
    return fd


class BpfAttrBatch(ctypes.Structure):
    """union bpf_attr, the BPF_MAP_*_BATCH member."""

    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64), ("keys", ctypes.c_uint64),
                ("values", ctypes.c_uint64), ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def array_lookup_batch(map_fd: int, count: int, value_size: int, start: int = 0) -> bytes:
    """The values of keys start..start+count-1 of an array map (per-CPU:
    value_size is the per-CPU size rounded up to 8 times the possible CPUs),
    in one syscall instead of one per key."""
    keys = (ctypes.c_uint32 * count)()
    values = ctypes.create_string_buffer(count * value_size)
    # The kernel resumes after in_batch (the previous call's last key): none for key 0.
    in_batch, out_batch = ctypes.c_uint32(max(start - 1, 0)), ctypes.c_uint32()
    attr = BpfAttrBatch(in_batch=ctypes.addressof(in_batch) if start else 0, out_batch=ctypes.addressof(out_batch),
                        keys=ctypes.addressof(keys), values=ctypes.addressof(values), count=count, map_fd=map_fd)
    if _libc.syscall(NR_BPF, BPF_MAP_LOOKUP_BATCH, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        if err != errno.ENOENT or attr.count != count:  # ENOENT: the map's end reached
            raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
    return values.raw


def map_update_batch(map_fd: int, keys: bytes, values: bytes, count: int) -> int:
    """Write `count` packed keys and values in one call.  Returns how many
    were written; on a failure part-way the OSError carries `.done`."""
    return _batch(BPF_MAP_UPDATE_BATCH, map_fd, keys, values, count)


def map_delete_batch(map_fd: int, keys: bytes, count: int) -> int:
    """Delete `count` packed keys (every one must exist: ENOENT stops it)."""
    return _batch(BPF_MAP_DELETE_BATCH, map_fd, keys, None, count)


def _batch(cmd: int, map_fd: int, keys: bytes, values, count: int) -> int:
    if not count:
        return 0
    kbuf = ctypes.create_string_buffer(keys, len(keys))
    vbuf = ctypes.create_string_buffer(values, len(values)) if values is not None else None
    attr = BpfAttrBatch(keys=ctypes.addressof(kbuf), values=ctypes.addressof(vbuf) if vbuf is not None else 0,
                        count=count, map_fd=map_fd)
    if _libc.syscall(NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        e = OSError(err, f"{'BPF_MAP_UPDATE_BATCH' if values is not None else 'BPF_MAP_DELETE_BATCH'}: "
                         f"{os.strerror(err)}")
        e.done = attr.count
        raise e
    return attr.count


def prog_load(prog_type: int, insns: bytes, license: bytes = b"GPL") -> int:
    """Load a program given as raw struct bpf_insn bytes; returns its fd
    (OSError with the verifier's log on refusal)."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license)
    log = ctypes.create_string_buffer(1 << 16)
    attr = BpfAttrLoad(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=ctypes.addressof(code),
                       license=ctypes.addressof(lic), log_level=1, log_size=len(log),
                       log_buf=ctypes.addressof(log))
    fd = _libc.syscall(NR_BPF, BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_LOAD: {os.strerror(err)}: {log.value.decode(errors='replace')[-500:]}")
    return fd


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


BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15


class _BpfAttrInfo(ctypes.Structure):
    """union bpf_attr, the BPF_OBJ_GET_INFO_BY_FD member."""

    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _BpfProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info (the kernel fills what fits)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
    ]


def _prog_info(prog_fd: int, info: _BpfProgInfo) -> None:
    attr = _BpfAttrInfo(bpf_fd=prog_fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "BPF_OBJ_GET_INFO_BY_FD")


def prog_xlated_insns(prog_fd: int) -> bytes:
    """The loaded program as the verifier left it (8-byte instructions)."""
    info = _BpfProgInfo()
    _prog_info(prog_fd, info)
    buf = ctypes.create_string_buffer(info.xlated_prog_len)
    info = _BpfProgInfo(xlated_prog_len=len(buf), xlated_prog_insns=ctypes.addressof(buf))
    _prog_info(prog_fd, info)
    return buf.raw[: info.xlated_prog_len]


class _BpfMapInfo(ctypes.Structure):
    """The head of struct bpf_map_info."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16)]


def map_id(map_fd: int) -> int:
    """The kernel's id of a map (tools can open it with map_fd_by_id)."""
    info = _BpfMapInfo()
    attr = _BpfAttrInfo(bpf_fd=map_fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "BPF_OBJ_GET_INFO_BY_FD")
    return info.id


class _BpfAttrGetId(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


def map_fd_by_id(ident: int) -> int:
    attr = _BpfAttrGetId(id=ident)
    fd = _libc.syscall(NR_BPF, BPF_MAP_GET_FD_BY_ID, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_MAP_GET_FD_BY_ID: {os.strerror(err)}")
    return fd
