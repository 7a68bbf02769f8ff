"""Change storms under load (issue 8): how long the old state still decides.

route_storm(): probes flow pod1 -> 10.250.0.5 (via a route to pod2) while
20,000 route changes (10,000 /32 adds, then their deletes) run; amid them the
route to 10.250.0.0/16 is deleted.  A watcher reads the agent's own maps (by
id, from /proc/PID/fdinfo) every 0.2 ms: the route decides while its entry
forwards and the config slot punts nothing.  window = from the kernel's
deletion to the moment the agent's maps stopped deciding for good; probes
that arrived in it are stale forwards (the kernel alone would have dropped
them); probes arriving after it would be wrong forwards (must be 0).

nf_storm(): probes flow pod1 -> pod2 while `iptables-restore` loads 5,000
rules ending in one that drops them; nothing may arrive after the restore
returned (its commit).  Reports the restore time and when the agent's
config slot began to punt, relative to the restore's start and end.
"""

import ctypes
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from faults_check import held_by  # noqa: E402
from mirror.bpfsys import NR_BPF, _bpf, _libc, map_lookup  # noqa: E402
from mirror.reasons import FORWARDED  # noqa: E402

PROBES = os.path.join(os.path.dirname(HERE), "tests", "integration", "probes.py")
BPF_MAP_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 14, 15
PROBE_NET, PROBE_DST = "10.250.0.0/16", "10.250.0.5"


class _IdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


def agent_maps(pid):
    """{map name: fd} of the maps process `pid` holds (opened by their ids)."""
    out = {}
    for map_id in held_by(pid)["maps"]:
        attr = _IdAttr(id=map_id)
        fd = _libc.syscall(NR_BPF, BPF_MAP_GET_FD_BY_ID, ctypes.byref(attr), ctypes.sizeof(attr))
        if fd < 0:
            continue  # gone meanwhile
        info = ctypes.create_string_buffer(80)  # struct bpf_map_info: name[16] at offset 24
        _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=80, info=ctypes.addressof(info)), "map info")
        out[info.raw[24:40].split(b"\0")[0].decode()] = fd
    return out


class DecisionWatch(threading.Thread):
    """Samples, every `interval` s, whether the agent's maps let the route to
    `dst` forward (entry FORWARDED and no global punt); keeps transitions."""

    def __init__(self, pid, dst=PROBE_DST, interval=0.0002):
        super().__init__(daemon=True)
        maps = agent_maps(pid)
        # The route trie the agent created behind the `routes` slot (mirror/routemap.py).
        self.routes, self.config = maps.pop("lm_routes"), maps.pop("config")
        for fd in maps.values():
            os.close(fd)  # held, they would keep the agent's maps alive after it exits
        self.key = struct.pack("=I4s", 32, socket.inet_aton(dst))
        self.interval = interval
        self.changes = []  # (CLOCK_REALTIME ns, deciding)
        self.halt = threading.Event()

    def deciding(self):
        if struct.unpack_from("=I", map_lookup(self.config, b"\0\0\0\0", 64))[0]:
            return False  # punt_forward_reason: everything punts
        try:
            return struct.unpack_from("=I", map_lookup(self.routes, self.key, 16))[0] == FORWARDED
        except OSError:
            return False

    def run(self):
        last = None
        while not self.halt.is_set():
            now = self.deciding()
            if now != last:
                self.changes.append((time.time_ns(), now))
                last = now
            time.sleep(self.interval)

    def stop(self):
        if self.is_alive():
            self.halt.set()
            self.join()
        os.close(self.routes)
        os.close(self.config)

    def stopped_for_good(self):
        """When it last went from deciding to not (None: still decides)."""
        if not self.changes or self.changes[-1][1]:
            return None
        return self.changes[-1][0]

    def first(self, deciding, after):
        return next((t for t, d in self.changes if d == deciding and t >= after), None)


def _arrivals(topo, ns, seconds):
    p = topo.popen(ns, [sys.executable, PROBES, "arrivals", str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def _sender(topo, dst, seconds):
    return topo.popen("pod1", [sys.executable, PROBES, "send", topo.pod1_if, topo.pod1_mac, topo.node_mac1,
                               topo.pod1_ip, dst, str(seconds)], stdout=subprocess.PIPE, text=True)


def _collect(proc):
    proc.terminate()
    return json.loads(proc.communicate(timeout=60)[0].splitlines()[-1])


def _settle(watch, quiet=1.0, timeout=60):
    """Wait until the maps have stopped deciding and stayed so for `quiet` s
    (probes keep flowing meanwhile: a late wrong forward would show)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stopped = watch.stopped_for_good()
        if stopped is not None and time.time_ns() - stopped > quiet * 1e9:
            return
        time.sleep(0.05)


def _wait(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.01)


def route_storm(topo, pid, changes=20000, tmp="/tmp"):
    topo.run("node", ["ip", "route", "replace", PROBE_NET, "via", topo.pod2_ip])
    topo.run("pod1", ["ping", "-c", "1", "-W", "1", topo.pod2_ip], check=False)  # neighbours resolved
    watch = DecisionWatch(pid)
    half = changes // 2
    names = [f"10.100.{i >> 8}.{i & 255}/32" for i in range(half)]
    adds, dels = os.path.join(tmp, f"storm-add-{os.getpid()}"), os.path.join(tmp, f"storm-del-{os.getpid()}")
    with open(adds, "w") as f:
        f.writelines(f"route add {n} via {topo.pod2_ip}\n" for n in names)
    with open(dels, "w") as f:
        f.writelines(f"route del {n}\n" for n in names)
    arrivals = _arrivals(topo, "pod2", 300)
    sender = _sender(topo, PROBE_DST, 300)
    watch.start()
    try:
        _wait(watch.deciding, 10)
        time.sleep(0.5)  # probes fast-pathed before the storm
        storm = topo.popen("node", ["ip", "-batch", adds], stdout=subprocess.DEVNULL)
        time.sleep(0.15)  # amid the adds:
        t_kernel = time.time_ns()
        topo.run("node", ["ip", "route", "del", PROBE_NET])
        t_kernel_done = time.time_ns()
        storm.wait(timeout=120)
        topo.run("node", ["ip", "-batch", dels], timeout=120)
        t_storm_end = time.time_ns()
        _settle(watch)
        _collect(sender)
        got = _collect(arrivals)
    finally:
        watch.stop()
        for path in (adds, dels):
            os.unlink(path)
    applied = watch.stopped_for_good()
    arrived = sorted(t for _, _, t, _ in got)
    return {
        "changes": changes + 1, "probes_arrived": len(arrived),
        "storm_s": round((t_storm_end - t_kernel) / 1e9, 2),
        "window_ms": None if applied is None else round((applied - t_kernel_done) / 1e6, 1),
        "stale_forwards": sum(1 for t in arrived if t > t_kernel_done and (applied is None or t <= applied)),
        # Sent after the watcher saw the maps stop deciding: the kernel alone
        # drops them (no route), so any arrival is a wrong forward.  A probe
        # sent before but received after was decided in flight (counted apart).
        "after_applied": None if applied is None else sum(1 for _, _, _, sent in got if sent > applied),
        "in_flight_at_apply": None if applied is None else sum(1 for _, _, t, sent in got
                                                               if t > applied >= sent),
        "arrived_before_delete": sum(1 for t in arrived if t < t_kernel),
        "decides_ms": [(round((t - t_kernel_done) / 1e6, 1), d) for t, d in watch.changes],
    }


def nf_storm(topo, pid, rules=5000, tmp="/tmp"):
    """Probes pod1 -> pod2 UDP/9; the restored ruleset's last rule drops them."""
    topo.run("pod1", ["ping", "-c", "1", "-W", "1", topo.pod2_ip], check=False)
    watch = DecisionWatch(pid, dst=topo.pod2_ip)
    path = os.path.join(tmp, f"storm-rules-{os.getpid()}")
    with open(path, "w") as f:
        f.write("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n")
        f.writelines(f"-A FORWARD -s 192.0.{i >> 8}.{i & 255}/32 -p tcp --dport {1000 + i % 50000} -j DROP\n"
                     for i in range(rules - 1))
        f.write("-A FORWARD -p udp --dport 9 -j DROP\nCOMMIT\n")
    arrivals = _arrivals(topo, "pod2", 300)
    sender = _sender(topo, topo.pod2_ip, 300)
    watch.start()
    try:
        _wait(watch.deciding, 10)
        time.sleep(0.5)
        t0 = time.time_ns()
        with open(path) as f:
            topo.run("node", ["iptables-restore"], stdin=f)
        t1 = time.time_ns()
        time.sleep(1.0)  # probes keep flowing: none may pass the committed DROP
        _collect(sender)
        got = _collect(arrivals)
    finally:
        watch.stop()
        os.unlink(path)
        topo.run("node", ["iptables", "-F", "FORWARD"])
    hold = watch.first(False, t0)
    arrived = [t for _, _, t, _ in got]
    return {
        "rules": rules, "restore_ms": round((t1 - t0) / 1e6, 1),
        "punting_from_ms": None if hold is None else round((hold - t0) / 1e6, 1),
        "arrived_during_restore": sum(1 for t in arrived if t0 <= t <= t1),
        # Sent after the restore returned (its commit): the DROP applies to them.
        "after_commit": sum(1 for _, _, _, sent in got if sent > t1),
        "probes_arrived": len(arrived),
    }
