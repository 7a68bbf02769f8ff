"""Helpers for the BPF packet tests: BPF_PROG_TEST_RUN (mirror/bpfsys.py),
a throwaway network namespace, and typed writers for the maps of
kernel_bpf/common.h.  Linux x86-64 only (byte order).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import socket
import subprocess
from typing import Dict, Optional, Tuple

from mirror.bpfsys import BpfAttrTest, RunResult, SkBuff, prog_test_run  # noqa: F401 (re-exported)
from mirror.reasons import BY_NAME as REASON_VALUES

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


@contextlib.contextmanager
def in_netns(name: str):
    """Run the block in an existing named netns (e.g. a topology's node):
    BPF_PROG_TEST_RUN resolves ctx.ifindex and the conntrack lookup its
    netns there; subprocesses started in the block inherit it."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)
        yield
    finally:
        _setns(home)
        os.close(home)


# MACs of the test topology's veths (fixed so packets can be built up front).
TOPO_MACS = {
    "in0": "02:00:00:00:00:01",
    "out0": "02:00:00:00:00:02",
    "out1": "02:00:00:00:00:03",
}


# --- kernel conntrack (of the netns the process is in) ----------------------


def conntrack(*args: str) -> str:
    """Run the conntrack CLI (conntrack-tools) in the current netns."""
    return subprocess.run(["conntrack", *args], check=True, capture_output=True, text=True).stdout


def ct_list(*args: str):
    """`conntrack -L`: one (protocol, seconds left, {orig/reply fields, state,
    flags}) per entry."""
    out = []
    for line in conntrack("-L", *args).splitlines():
        words = line.split()
        if len(words) < 3 or not words[2].isdigit():
            continue
        fields, seen = {}, set()
        for w in words[3:]:
            if "=" in w:
                k, v = w.split("=", 1)
                fields[("reply_" if k in seen else "") + k] = v
                seen.add(k)
            elif w.startswith("["):
                fields.setdefault("flags", []).append(w.strip("[]"))
            else:
                fields["state"] = w
        out.append((words[0], int(words[2]), fields))
    return out


def ct_set_tcp_flags(src: str, dst: str, sport: int, dport: int, flags: int, mask: int) -> None:
    """Set seen[0]/seen[1] flags of a TCP entry through ctnetlink (the
    conntrack CLI cannot), e.g. IP_CT_TCP_FLAG_BE_LIBERAL as the agent does."""
    from pyroute2 import NFCTSocket
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    value = {"value": (flags, mask)}
    pi = {"attrs": [["CTA_PROTOINFO_TCP", {"attrs": [["CTA_PROTOINFO_TCP_FLAGS_ORIGINAL", value],
                                                     ["CTA_PROTOINFO_TCP_FLAGS_REPLY", value]]}]]}
    with NFCTSocket() as nfct:
        nfct.entry("set", tuple_orig=NFCTAttrTuple(saddr=src, daddr=dst, proto=6, sport=sport, dport=dport),
                   protoinfo=pi)


def ct_get(src: str, dst: str, sport: int, dport: int, proto: int) -> Dict[str, int]:
    """status and mark of one entry, as ctnetlink reports them."""
    from pyroute2 import NFCTSocket
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    with NFCTSocket() as nfct:
        msgs = nfct.entry("get", tuple_orig=NFCTAttrTuple(saddr=src, daddr=dst, proto=proto, sport=sport, dport=dport))
        [e] = [m for m in msgs if m.get_attr("CTA_STATUS") is not None]
    return {"status": e.get_attr("CTA_STATUS"), "mark": e.get_attr("CTA_MARK")}


def ct_set_synproxy_tsoff(src: str, dst: str, sport: int, dport: int, tsoff: int) -> None:
    """Give a TCP entry a synproxy timestamp offset (the synproxy hook then
    rewrites its established segments)."""
    from pyroute2 import NFCTSocket
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    with NFCTSocket() as nfct:
        nfct.entry("set", tuple_orig=NFCTAttrTuple(saddr=src, daddr=dst, proto=6, sport=sport, dport=dport),
                   synproxy={"attrs": [["CTA_SYNPROXY_ISN", 0], ["CTA_SYNPROXY_ITS", 0],
                                             ["CTA_SYNPROXY_TSOFF", tsoff]]})


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
        self.ports = dp.table("ports")
        self.fdb_t = dp.table("fdb")
        self.counters_t = dp.table("counters")
        self.flows = dp.table("flows")
        self.flow_asked = dp.table("flow_asked")
        self._events = []
        dp.open_flow_events(self._events.append)

    def events(self):
        """Ring-buffer events (mirror.datapath.FlowEvent) since the last call."""
        self.dp.poll_flow_events(0)
        out, self._events[:] = list(self._events), []
        return out

    def flow_key(self, ifindex: int, saddr: str, daddr: str, sport: int, dport: int, proto: int, bridged=0):
        return self.flows.Key(ifindex=ifindex, saddr=ip4(saddr), daddr=ip4(daddr),
                              sport=socket.htons(sport), dport=socket.htons(dport), proto=proto, bridged=bridged)

    def flow(self, key, action: int, oif: int, nat: Tuple[str, str, int, int], gen: int = 0,
             ct_mark: int = 0, ct_status: int = 0):
        """A verdict as the agent writes it; nat = (saddr, daddr, sport, dport) as sent."""
        self.flows[key] = self.flows.Leaf(
            gen=gen, action=action, oif=oif, ct_mark=ct_mark, ct_status=ct_status,
            nat_saddr=ip4(nat[0]), nat_daddr=ip4(nat[1]),
            nat_sport=socket.htons(nat[2]), nat_dport=socket.htons(nat[3]))

    def clear(self) -> None:
        for t in (self.routes, self.neighbors, self.links, self.flows, self.flow_asked, self.ports, self.fdb_t):
            for k in list(t.keys()):
                del t[k]
        self.set_config(0)
        self.events()  # drop what is queued

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

    def link(self, ifindex: int, m, flags: int, mtu: int = 1500, peer_mac="00:00:00:00:00:00", slot: int = 0):
        self.links[self.links.Key(ifindex)] = self.links.Leaf(mac=_mac_arr(m), flags=flags, mtu=mtu,
                                                              peer_mac=_mac_arr(peer_mac), slot=slot)

    def del_link(self, ifindex: int):
        del self.links[self.links.Key(ifindex)]

    def port(self, ifindex: int, bridge: int, flags: int, punt: int = 0, ipv4_punt: int = 0, up_punt: int = 0):
        self.ports[self.ports.Key(ifindex)] = self.ports.Leaf(
            bridge=bridge, flags=flags, punt=punt, ipv4_punt=ipv4_punt, up_punt=up_punt)

    def _fdb_key(self, bridge: int, m):
        k = self.fdb_t.Key()
        k.bridge = bridge
        k.mac = _mac_arr(m)
        return k

    def fdb(self, bridge: int, m, port: int, local: bool = False, used: int = 0):
        self.fdb_t[self._fdb_key(bridge, m)] = self.fdb_t.Leaf(port=port, flags=1 if local else 0, used=used)

    def get_fdb(self, bridge: int, m):
        return self.fdb_t[self._fdb_key(bridge, m)]

    def set_config(self, alive_seconds: float, punt_forward_reason: int = 0, **nf):
        """Fast path alive for that long (0: off), with that global punt
        and the given stateful-netfilter fields (nf_mode=..., to_udp=...)."""
        self.config[self.config.Key(0)] = self.config.Leaf(punt_forward_reason=punt_forward_reason, hz=self.hz, **nf)
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
        """{reason value: (packets, bytes)} summed over CPUs and interfaces."""
        return {REASON_VALUES[name]: c for name, c in self.dp.counters().items()}

    def slot_counters(self, slot: int) -> Dict[int, Tuple[int, int]]:
        """{reason value: (packets, bytes)} of one interface slot."""
        return dict(enumerate(self.dp.counter_rows(slot + 1)[slot]))
