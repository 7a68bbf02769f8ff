"""What an agent leaves behind, for the fault tests and tools/faults.

footprint(topo, pid): the kernel objects one running agent holds (its prog and
map ids from /proc/PID/fdinfo, its fd count, tc filters per interface);
leftovers(topo, before, held): what is still there after it stopped (tc
filters and qdiscs changed, its programs or maps still alive, processes in
the namespace, pinned objects, the state file).
"""

import ctypes
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from mirror.bpfsys import _bpf  # noqa: E402

BPF_PROG_GET_NEXT_ID, BPF_MAP_GET_NEXT_ID = 11, 12
BPF_FS = "/sys/fs/bpf"
RUN_DIR = "/run/loxi-mirror"


class _NextId(ctypes.Structure):
    _fields_ = [("start_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


def live_ids(cmd):
    """Every BPF program (or map) id alive in the kernel now."""
    ids, attr = set(), _NextId()
    while True:
        try:
            _bpf(cmd, attr, "get next id")
        except OSError:  # ENOENT: past the last one
            return ids
        ids.add(attr.next_id)
        attr.start_id = attr.next_id


def steady_fds(pid, samples=5, interval=0.1):
    """The process's fd count without transient ones (pipes of an
    iptables-save it is running ...): the least of a few samples."""
    counts = []
    for _ in range(samples):
        counts.append(len(os.listdir(f"/proc/{pid}/fd")))
        time.sleep(interval)
    return min(counts)


def held_by(pid):
    """{"progs": ids, "maps": ids, "fds": steady count} of a process, from /proc/PID/fdinfo."""
    progs, maps = set(), set()
    base = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(base):
        try:
            text = open(f"{base}/{fd}").read()
        except OSError:
            continue
        for kind, found in (("prog_id", progs), ("map_id", maps)):
            m = re.search(rf"^{kind}:\s*(\d+)", text, re.M)
            if m:
                found.add(int(m.group(1)))
    return {"progs": progs, "maps": maps, "fds": steady_fds(pid)}


def tc_view(topo, ns="node"):
    """{interface: (qdiscs, ingress filters)} of every interface in the namespace."""
    names = [l.split(":")[1].strip().split("@")[0]
             for l in topo.run(ns, ["ip", "-o", "link", "show"]).stdout.splitlines()]
    return {n: (topo.run(ns, ["tc", "qdisc", "show", "dev", n]).stdout,
                topo.run(ns, ["tc", "filter", "show", "dev", n, "ingress"]).stdout) for n in names}


def our_filters(view):
    """{interface: number of loxi_mirror filters} (a duplicate shows as 2)."""
    return {n: filters.count("loxi_mirror") for n, (_, filters) in view.items() if "loxi_mirror" in filters}


def pinned():
    out = set()
    for root, dirs, files in os.walk(BPF_FS):
        out.update(os.path.join(root, f) for f in files + dirs)
    return out


def snapshot(topo, ns="node"):
    """The namespace's state before an agent starts."""
    return {"tc": tc_view(topo, ns), "pinned": pinned(), "run": os.path.exists(state_file(topo, ns))}


def state_file(topo, ns="node"):
    """mirror.tc.state_path() of that namespace (named by its nsfs inode)."""
    st = os.stat(f"/run/netns/{topo.nsname(ns)}")
    return f"{RUN_DIR}/netns-{st.st_dev:x}-{st.st_ino}.json"


def namespace_pids(topo, ns="node"):
    out = subprocess.run(["ip", "netns", "pids", topo.nsname(ns)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def leftovers(topo, before, held, ns="node"):
    """[what is left] after the agent that held `held` stopped (empty: nothing)."""
    out = []
    now = snapshot(topo, ns)
    for name, (qdiscs, filters) in now["tc"].items():
        if before["tc"].get(name) != (qdiscs, filters):
            out.append(f"tc on {name} changed: {qdiscs.strip()} / {filters.strip()}")
    progs = held["progs"] & live_ids(BPF_PROG_GET_NEXT_ID)
    maps = held["maps"] & live_ids(BPF_MAP_GET_NEXT_ID)
    if progs:
        out.append(f"programs still alive: {sorted(progs)}")
    if maps:
        out.append(f"maps still alive: {sorted(maps)}")
    if now["pinned"] != before["pinned"]:
        out.append(f"pinned objects: {sorted(now['pinned'] ^ before['pinned'])}")
    if now["run"] != before["run"]:
        out.append(f"state file {state_file(topo, ns)} {'left' if now['run'] else 'gone'}")
    pids = namespace_pids(topo, ns)
    if pids:
        out.append(f"processes left in the namespace: {sorted(pids)}")
    return out
