"""Helpers for the BPF packet tests: BPF_PROG_TEST_RUN through the bpf()
syscall (ctypes), a throwaway network namespace, and typed writers for the
maps of kernel_bpf/common.h.  Linux x86-64 only (syscall number, byte order).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import socket
import subprocess
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

NR_BPF = 321  # x86-64
BPF_PROG_TEST_RUN = 10
CLONE_NEWNET = 0x40000000

TC_ACT_UNSPEC = 0xFFFFFFFF  # -1 as the u32 retval
TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7


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
    rc = _libc.syscall(NR_BPF, BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
    return RunResult(attr.retval, data_out.raw[: attr.data_size_out], ctx_out, attr.duration)


# --- network namespace ----------------------------------------------------


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class TestNetns:
    """A fresh, uniquely named netns (`ip netns add lmtest-<random>`) that the
    calling thread enters; close() returns to the original netns and deletes
    it.  Only ever touches interfaces it created inside that namespace."""

    __test__ = False  # not a pytest test class

    def __init__(self, prefix: str = "lmtest-"):
        self.name = prefix + secrets.token_hex(4)
        self._home = None
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        try:
            self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)
        except BaseException:
            self.close()
            raise

    def ip(self, *args: str) -> str:
        """Run `ip -n <ns> ...` (explicit -n: never the root namespace)."""
        return subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True, text=True).stdout

    def link(self, name: str) -> Tuple[int, bytes]:
        """(ifindex, MAC) of an interface in this namespace."""
        info = json.loads(self.ip("-j", "link", "show", "dev", name))[0]
        return info["ifindex"], bytes.fromhex(info["address"].replace(":", ""))

    def close(self) -> None:
        if self._home is not None:
            _setns(self._home)
            os.close(self._home)
            self._home = None
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


# MACs of the test topology's veths (fixed so packets can be built up front).
TOPO_MACS = {
    "in0": "02:00:00:00:00:01",
    "out0": "02:00:00:00:00:02",
    "out1": "02:00:00:00:00:03",
}


# --- map writers ----------------------------------------------------------


def ip4(addr: str) -> int:
    """Dotted quad -> the u32 whose memory holds it in network order."""
    return int.from_bytes(socket.inet_aton(addr), "little")


def mac(m) -> bytes:
    return m if isinstance(m, bytes) else bytes.fromhex(m.replace(":", ""))


def _mac_arr(m):
    return (ctypes.c_ubyte * 6)(*mac(m))


class Maps:
    """Typed writers for the datapath's maps (the agent's sync code does
    this for real; tests write the state each case needs directly)."""

    def __init__(self, dp):
        self.routes = dp.table("routes")
        self.neighbors = dp.table("neighbors")
        self.links = dp.table("links")
        self.config = dp.table("config")
        self.counters_t = dp.table("counters")

    def clear(self) -> None:
        for t in (self.routes, self.neighbors, self.links):
            for k in list(t.keys()):
                del t[k]
        self.set_config(0, 0)

    def route(self, prefix: str, action: int = 0, oif: int = 0, gateway: Optional[str] = None, mtu: int = 1500):
        addr, _, plen = prefix.partition("/")
        k = self.routes.Key(prefixlen=int(plen or 32), addr=ip4(addr))
        self.routes[k] = self.routes.Leaf(action=action, oif=oif, gateway=ip4(gateway) if gateway else 0, mtu=mtu)

    def del_route(self, prefix: str):
        addr, _, plen = prefix.partition("/")
        del self.routes[self.routes.Key(prefixlen=int(plen or 32), addr=ip4(addr))]

    def neigh(self, ifindex: int, addr: str, m, used_ns: int = 0):
        k = self.neighbors.Key(ifindex=ifindex, addr=ip4(addr))
        self.neighbors[k] = self.neighbors.Leaf(mac=_mac_arr(m), used_ns=used_ns)

    def get_neigh(self, ifindex: int, addr: str):
        return self.neighbors[self.neighbors.Key(ifindex=ifindex, addr=ip4(addr))]

    def link(self, ifindex: int, m, flags: int, mtu: int = 1500):
        self.links[self.links.Key(ifindex)] = self.links.Leaf(mac=_mac_arr(m), flags=flags, mtu=mtu)

    def del_link(self, ifindex: int):
        del self.links[self.links.Key(ifindex)]

    def set_config(self, deadline_ns: int, punt_forward_reason: int = 0):
        self.config[self.config.Key(0)] = self.config.Leaf(
            heartbeat_deadline_ns=deadline_ns, punt_forward_reason=punt_forward_reason
        )

    def counters(self) -> Dict[int, Tuple[int, int]]:
        """{reason value: (packets, bytes)} summed over CPUs."""
        t = self.counters_t
        out = {}
        for i in range(t.max_entries):
            per_cpu = t.getvalue(t.Key(i))
            out[i] = (sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu))
        return out
