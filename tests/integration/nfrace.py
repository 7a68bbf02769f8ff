"""Race a new FORWARD DROP rule against a packet sent the instant it is in place.

Run inside the agent's (node) namespace:
    nfrace.py IPTABLES POD1_NS POD2_NS POD1_IP POD2_IP ROUNDS

One process holds a UDP socket in pod1 and one in pod2 (created there through
setns, then back in the node), talks to the agent's control socket, and runs
IPTABLES as its own child: the race packet leaves pod1 the moment the command
that inserted `FORWARD -s POD1 -j DROP` has returned.  Per round:
  1. wait until a probe from pod1 is fast-pathed (no rule, no hold), then 20 ms;
  2. insert the rule, send one packet at once;
  3. record whether it reached pod2 and whether the fast-path counter moved;
  4. delete the rule.
Prints one JSON object: rounds, arrived/fast_pathed round numbers, probe waits.
"""

import ctypes
import json
import os
import select
import socket
import subprocess
import sys
import time

from mirror import control

CLONE_NEWNET = 0x40000000
PORT = 40999
QUIET = 0.02  # s between the last control request and the race
_libc = ctypes.CDLL(None, use_errno=True)


def socket_in(ns, bind):
    """A UDP socket living in namespace `ns` (this thread returns to its own)."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(bind)
    finally:
        _libc.setns(home, CLONE_NEWNET)
        os.close(home)
        os.close(target)
    return s


def fast_path_packets():
    return control.request({"cmd": "status"})["counters"]["fast_path_packets"]


def received(sock, want, timeout):
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return False
        if sock.recv(2048) == want:
            return True


def wait_fast(tx, rx, dst, timeout=10.0):
    """Probe until one probe is fast-pathed; (seconds it took, fast-path counter after)."""
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < timeout:
        n += 1
        c0 = fast_path_packets()
        msg = b"probe-%d" % n
        tx.sendto(msg, dst)
        if received(rx, msg, 0.5):
            c1 = fast_path_packets()
            if c1 > c0:
                return time.monotonic() - t0, c1
        time.sleep(0.005)
    raise SystemExit(json.dumps({"error": f"fast path not live after {timeout}s"}))


def main(argv):
    iptables, pod1, pod2, pod1_ip, pod2_ip, rounds = argv[0], argv[1], argv[2], argv[3], argv[4], int(argv[5])
    tx = socket_in(pod1, (pod1_ip, PORT))
    rx = socket_in(pod2, (pod2_ip, PORT))
    dst = (pod2_ip, PORT)
    rule = ["FORWARD", "-s", pod1_ip, "-p", "udp", "-j", "DROP"]
    out = {"rounds": rounds, "arrived": [], "fast_pathed": [], "probe_wait_s": []}
    for i in range(rounds):
        waited, c0 = wait_fast(tx, rx, dst)
        out["probe_wait_s"].append(round(waited, 4))
        # Let the agent finish answering our status requests: the race is between the
        # rule and the packet, not with this test's own control traffic.
        time.sleep(QUIET)
        msg = b"race-%d" % i
        subprocess.run([iptables, "-I"] + rule, check=True)
        tx.sendto(msg, dst)                      # the instant the rule is in
        if received(rx, msg, 0.05):
            out["arrived"].append(i)
        if fast_path_packets() > c0:
            out["fast_pathed"].append(i)
        subprocess.run([iptables, "-D"] + rule, check=True)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
