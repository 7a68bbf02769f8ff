"""Helpers for the BPF packet tests: BPF_PROG_TEST_RUN (mirror/bpfsys.py),
a throwaway network namespace, and typed writers for the maps of
kernel_bpf/common.h.  Linux x86-64 only (byte order).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import socket
import subprocess
from typing import Dict, Optional, Tuple

from mirror.bpfsys import BpfAttrTest, RunResult, SkBuff, prog_test_run  # noqa: F401 (re-exported)

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNET = 0x40000000

TC_ACT_UNSPEC = 0xFFFFFFFF  # -1 as the u32 retval
TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7


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
        self.dp = dp
        self.hz = dp.measure_hz(0.05)
        self.heartbeat = dp.table("heartbeat")
        self.routes = dp.table("routes")
        self.neighbors = dp.table("neighbors")
        self.links = dp.table("links")
        self.config = dp.table("config")
        self.counters_t = dp.table("counters")

    def clear(self) -> None:
        for t in (self.routes, self.neighbors, self.links):
            for k in list(t.keys()):
                del t[k]
        self.set_config(0)

    def route(self, prefix: str, action: int = 0, oif: int = 0, gateway: Optional[str] = None, mtu: int = 1500):
        addr, _, plen = prefix.partition("/")
        k = self.routes.Key(prefixlen=int(plen or 32), addr=ip4(addr))
        self.routes[k] = self.routes.Leaf(action=action, oif=oif, gateway=ip4(gateway) if gateway else 0, mtu=mtu)

    def del_route(self, prefix: str):
        addr, _, plen = prefix.partition("/")
        del self.routes[self.routes.Key(prefixlen=int(plen or 32), addr=ip4(addr))]

    def neigh(self, ifindex: int, addr: str, m, used: int = 0):
        k = self.neighbors.Key(ifindex=ifindex, addr=ip4(addr))
        self.neighbors[k] = self.neighbors.Leaf(mac=_mac_arr(m), used=used)

    def get_neigh(self, ifindex: int, addr: str):
        return self.neighbors[self.neighbors.Key(ifindex=ifindex, addr=ip4(addr))]

    def link(self, ifindex: int, m, flags: int, mtu: int = 1500, peer_mac="00:00:00:00:00:00"):
        self.links[self.links.Key(ifindex)] = self.links.Leaf(mac=_mac_arr(m), flags=flags, mtu=mtu,
                                                              peer_mac=_mac_arr(peer_mac))

    def del_link(self, ifindex: int):
        del self.links[self.links.Key(ifindex)]

    def set_config(self, alive_seconds: float, punt_forward_reason: int = 0):
        """Fast path alive for that long (0: off), with that global punt."""
        self.config[self.config.Key(0)] = self.config.Leaf(punt_forward_reason=punt_forward_reason, hz=self.hz)
        self.dp.beat(round(alive_seconds * self.hz))

    def expire(self):
        """The deadline is now: as if the agent died a second ago."""
        hb = self.heartbeat[self.heartbeat.Key(0)]
        hb.deadline = self.now_jiffies()
        self.heartbeat[self.heartbeat.Key(0)] = hb

    def now_jiffies(self) -> int:
        """The kernel's jiffies (sampled by a beat; the deadline is kept)."""
        deadline = self.heartbeat[self.heartbeat.Key(0)].deadline
        now, _ = self.dp.beat(0)
        hb = self.heartbeat[self.heartbeat.Key(0)]
        hb.deadline = deadline
        self.heartbeat[self.heartbeat.Key(0)] = hb
        return now

    def counters(self) -> Dict[int, Tuple[int, int]]:
        """{reason value: (packets, bytes)} summed over CPUs."""
        t = self.counters_t
        out = {}
        for i in range(t.max_entries):
            per_cpu = t.getvalue(t.Key(i))
            out[i] = (sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu))
        return out
