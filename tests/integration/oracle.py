"""The kernel as the oracle, in both directions: send frames from pod1 and
record what reaches pod2 (forwarded) and what comes back to pod1 (the
kernel's ICMP errors), so a test can compare the kernel alone with
loxi-mirror on the same frames.  Also a barrier that returns once the agent
has processed every kernel change made before it.
"""

import itertools
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
ETH_IP = 0x0800
_marks = itertools.count(1)


def _capture(topo, ns, iface, seconds):
    cap = topo.popen(ns, [PY, f"{HERE}/pktio.py", "capture", iface, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert cap.stdout.readline().strip() == "ready"
    return cap


def _frames(cap, seconds):
    out, _ = cap.communicate(timeout=seconds + 10)
    return [bytes.fromhex(h) for h in json.loads(out.splitlines()[-1])]


def _ipv4(frames, src=None, dst=None):
    """IPv4 frames whose source starts with `src` and destination with `dst`."""
    return [f for f in frames if int.from_bytes(f[12:14], "big") == ETH_IP
            and (src is None or f[26:26 + len(src)] == src) and (dst is None or f[30:30 + len(dst)] == dst)]


def exchange(topo, frames, seconds=1.0, sources=None):
    """Send frames from pod1: (IPv4 frames from pod1's subnet, or whose
    source starts with the bytes `sources`, arriving at pod2; IPv4 frames the
    node sent back to pod1), both byte for byte."""
    pod1 = bytes(map(int, topo.pod1_ip.split(".")))
    at_pod2 = _capture(topo, "pod2", topo.pod2_if, seconds)
    at_pod1 = _capture(topo, "pod1", topo.pod1_if, seconds)
    topo.run("pod1", [PY, f"{HERE}/pktio.py", "send", topo.pod1_if] + [f.hex() for f in frames])
    back = [_without_ip_id(f) for f in _ipv4(_frames(at_pod1, seconds), dst=pod1)]
    return _ipv4(_frames(at_pod2, seconds), src=pod1[:3] if sources is None else sources), back


def _without_ip_id(frame):
    """The node's own packets (ICMP errors) with IP id and header checksum
    zeroed: the kernel numbers them per destination, run after run."""
    return frame[:18] + b"\0\0" + frame[20:24] + b"\0\0" + frame[26:]


def udp_received(topo, port, frames, seconds=1.0):
    """Send frames from pod1; the payloads a UDP socket in pod2 received
    (what the pod's IP stack accepted, not merely what its NIC saw)."""
    code = ("import socket,sys,time\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('0.0.0.0',%d));s.settimeout(0.05)\n"
            "print('ready',flush=True);out=[];end=time.monotonic()+%f\n"
            "while time.monotonic()<end:\n"
            "  try: out.append(s.recv(65535).hex())\n"
            "  except socket.timeout: pass\n"
            "print(' '.join(out),flush=True)\n" % (port, seconds))
    rx = topo.popen("pod2", [PY, "-c", code], stdout=subprocess.PIPE, text=True)
    assert rx.stdout.readline().strip() == "ready"
    topo.run("pod1", [PY, f"{HERE}/pktio.py", "send", topo.pod1_if] + [f.hex() for f in frames])
    out, _ = rx.communicate(timeout=seconds + 10)
    return [bytes.fromhex(h) for h in out.split()]


def settle(topo, timeout=5.0, marker="route"):
    """Return once the agent has mirrored every change made before the
    call: it handles kernel events in order, so a marker route showing up
    in its map means all earlier events were handled.  marker="neigh" uses
    a neighbour entry instead (for a route map that is full on purpose)."""
    ip = f"10.254.{next(_marks) % 256}.{os.getpid() % 256}"
    if marker == "neigh":
        table, match = "neighbors", {"interface": topo.node_if2, "ip": ip}
        cmd = ["ip", "neigh", "replace", ip, "lladdr", "02:00:00:fe:00:01", "dev", topo.node_if2, "nud", "permanent"]
    else:
        table, match = "routes", {"prefix": f"{ip}/32"}
        cmd = ["ip", "route", "replace", f"{ip}/32", "dev", topo.node_if2]
    out = topo.run("node", [PY, f"{HERE}/reaction.py", table, json.dumps(match), "present",
                            str(timeout), "--"] + cmd).stdout
    assert json.loads(out)["ms"] is not None, "agent did not catch up"
