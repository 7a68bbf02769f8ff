"""Real traffic through the attached datapath in stateful mode.

A TCP stream from pod1 to a DNAT'd + MASQUERADEd service on pod2 (the
routed topology's node runs the real rule set, test_ct_oracle.node_rules).
The kernel carries the handshake; then the test does what the agent would
(BE_LIBERAL on the entry, both directions' verdicts in `flows`) and the
stream continues through the fast path attached at the node's TC ingress.
Real sockets on veth send CHECKSUM_PARTIAL (and GSO) skbs, which
BPF_PROG_TEST_RUN never produces: every TCP checksum field that arrives at
pod2 must be what the kernel's NAT leaves (a full checksum, or the partial
pseudo-header sum of the translated addresses), and the data must arrive
intact.
"""

import json
import socket
import struct
import subprocess
import sys

from pyroute2 import IPRoute
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from lm_bpfrun import ct_list, ct_set_tcp_flags, in_netns
from test_ct import BE_LIBERAL, probe  # noqa: F401 (fixture)
from test_ct_oracle import PKTIO, VIP, node_config, node_maps, node_rules, verdict_for
from test_tc_ingress import R

PY = sys.executable
SIZE = 8 << 20

SERVER = r"""
import hashlib, socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80)); s.listen(1); print("ready", flush=True)
c, _ = s.accept()
assert c.recv(5) == b"hello"; c.sendall(b"hi")
h, n = hashlib.sha256(), 0
while True:
    d = c.recv(1 << 16)
    if not d:
        break
    h.update(d); n += len(d)
c.sendall(f"{n} {h.hexdigest()}".encode()); c.close()
"""

CLIENT = r"""
import hashlib, os, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(b"hello"); assert s.recv(2) == b"hi"
print(s.getsockname()[1], flush=True)
sys.stdin.readline()
data = os.urandom(int(sys.argv[3]))
s.sendall(data); s.shutdown(socket.SHUT_WR)
reply = b""
while True:
    d = s.recv(4096)
    if not d:
        break
    reply += d
print(reply.decode(), len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def fold(s):
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def l4_checksum_ok(frame):
    """The TCP/UDP checksum field is complete (sums to 0xffff with the
    pseudo header), the partial pseudo-header sum a CHECKSUM_PARTIAL skb
    carries (tcp_v4_send_check(), udp4_hwcsum()), for the addresses in the
    header, or (UDP) 0: none."""
    ihl = (frame[14] & 0xF) * 4
    tot = struct.unpack(">H", frame[16:18])[0]
    proto = frame[23]
    seg = frame[14 + ihl: 14 + tot]
    pseudo = frame[26:34] + struct.pack(">HH", proto, len(seg))
    words = lambda b: sum(struct.unpack(f">{(len(b) + 1) // 2}H", b + b"\0" * (len(b) % 2)))  # noqa: E731
    field = struct.unpack(">H", seg[16:18] if proto == 6 else seg[6:8])[0]
    return (fold(words(pseudo) + words(seg)) == 0xFFFF or field == fold(words(pseudo))
            or (proto == 17 and field == 0))


def attach(t, datapath, idx):
    with in_netns(t.node), IPRoute() as ipr:
        for dev in ("veth1", "veth2"):
            ipr.tc("add", "clsact", idx[dev])
            ipr.tc("add-filter", "bpf", idx[dev], 1, fd=datapath.fd, name="lm_ct_live", parent=0xFFFFFFF2,
                   prio=1, direct_action=True, classid=1)


def arriving_at_pod2(t, captured, proto):
    frames = [bytes.fromhex(h) for h in json.loads(captured.splitlines()[-1])]
    return [f for f in frames if f[12:14] == b"\x08\x00" and f[23] == proto
            and f[26:30] == socket.inet_aton(t.gw2_ip)]


def counted(maps, before):
    after = maps.counters()
    return {name: after[v][0] - before[v][0] for name, v in R.items()
            if after[v][0] != before[v][0] and name != "IPV6"}  # (neighbour discovery)


def test_tcp_stream_through_nat_is_fast_pathed(routed_topology, datapath, maps, probe):
    t = routed_topology
    node_rules(t)
    idx = node_maps(t, maps)
    maps.set_config(120, **node_config(t))
    attach(t, datapath, idx)

    srv = t.popen("pod2", [PY, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert srv.stdout.readline().strip() == "ready"
    cli = t.popen("pod1", [PY, "-c", CLIENT, VIP, "8080", str(SIZE)], stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE, text=True)
    cport = int(cli.stdout.readline())

    # The agent's part: BE_LIBERAL on the entry, a verdict per direction.
    with in_netns(t.node):
        [(_, _, e)] = ct_list("-p", "tcp")
        assert e["state"] == "ESTABLISHED" and "ASSURED" in e.get("flags", []), e
        ct_set_tcp_flags(t.pod1_ip, VIP, cport, 8080, BE_LIBERAL, BE_LIBERAL)
        mport = int(e["reply_dport"])
        c2s = Ether(dst=t.node_mac1) / IP(src=t.pod1_ip, dst=VIP) / TCP(sport=cport, dport=8080, flags="A")
        s2c = Ether(dst=t.node_mac2) / IP(src=t.pod2_ip, dst=t.gw2_ip) / TCP(sport=80, dport=mport, flags="A")
        verdict_for(maps, probe, t, idx, c2s, "veth1", "veth2")
        verdict_for(maps, probe, t, idx, s2c, "veth2", "veth1")
    before = maps.counters()

    cap = t.popen("pod2", [PY, PKTIO, "capture", "eth0", "4", "400"], stdout=subprocess.PIPE, text=True)
    assert cap.stdout.readline().strip() == "ready"
    cli.stdin.write("go\n")
    cli.stdin.flush()
    out, _ = cli.communicate(timeout=60)
    srv.wait(timeout=10)
    captured, _ = cap.communicate(timeout=20)

    n, digest, sent, sent_digest = out.split()
    assert (int(n), digest) == (int(sent), sent_digest) == (SIZE, sent_digest)
    delta = counted(maps, before)
    assert delta.get("FORWARDED", 0) > 0.9 * sum(delta.values()), delta
    # The FINs and the segments after them (no longer ESTABLISHED) punt.
    assert set(delta) <= {"FORWARDED", "CT_TCP_FLAGS", "CT_NOT_ESTABLISHED"}, delta

    tcp = arriving_at_pod2(t, captured, 6)
    assert len(tcp) > 20
    bad = [f[:60].hex() for f in tcp if not l4_checksum_ok(f)]
    assert not bad, bad[:3]


UDP_RECEIVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 53)); s.settimeout(3)
print("ready", flush=True)
got = set()
try:
    while True:
        d, _ = s.recvfrom(2048)
        i = int(d[:8]); assert d == d[:8] + bytes([i % 251]) * (len(d) - 8); got.add(i)
except socket.timeout:
    pass
print(len(got), flush=True)
"""

UDP_SENDER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 40000))
dst = (sys.argv[1], 5353)
s.sendto(b"%08d" % 0 + b"\0" * 100, dst)
print("first", flush=True)
sys.stdin.readline()
for i in range(1, int(sys.argv[2])):
    s.sendto(b"%08d" % i + bytes([i % 251]) * (100 + i % 900), dst)
    if i % 50 == 0:
        time.sleep(0.002)
"""


def test_one_way_udp_through_nat_is_fast_pathed(routed_topology, datapath, maps, probe):
    """iperf3 -u style: a one-way UDP flow (never replied, ctstate NEW of a
    confirmed entry) is taken over with the unreplied timeout."""
    t = routed_topology
    node_rules(t)
    idx = node_maps(t, maps)
    cfg = node_config(t)
    maps.set_config(120, **cfg)
    attach(t, datapath, idx)
    count = 2000
    rcv = t.popen("pod2", [PY, "-c", UDP_RECEIVER], stdout=subprocess.PIPE, text=True)
    assert rcv.stdout.readline().strip() == "ready"
    snd = t.popen("pod1", [PY, "-c", UDP_SENDER, VIP, str(count)], stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE, text=True)
    assert snd.stdout.readline().strip() == "first"
    with in_netns(t.node):
        assert len(ct_list("-p", "udp")) == 1
        flow = Ether(dst=t.node_mac1) / IP(src=t.pod1_ip, dst=VIP) / UDP(sport=40000, dport=5353)
        verdict_for(maps, probe, t, idx, flow, "veth1", "veth2")
    before = maps.counters()
    cap = t.popen("pod2", [PY, PKTIO, "capture", "eth0", "2", "300"], stdout=subprocess.PIPE, text=True)
    assert cap.stdout.readline().strip() == "ready"
    snd.stdin.write("go\n")
    snd.stdin.flush()
    snd.communicate(timeout=60)
    received = int(rcv.communicate(timeout=30)[0].split()[-1])
    captured, _ = cap.communicate(timeout=20)
    delta = counted(maps, before)
    assert received >= 0.98 * count, received  # intact datagrams (a loaded host may drop a few)
    assert delta.get("FORWARDED", 0) > 0.9 * (count - 1), delta
    assert set(delta) == {"FORWARDED"}, delta
    udp = arriving_at_pod2(t, captured, 17)
    assert len(udp) > 20 and all(l4_checksum_ok(f) for f in udp)
    with in_netns(t.node):
        [(_, left, e)] = ct_list("-p", "udp")
    assert "UNREPLIED" in e.get("flags", []) and cfg["to_udp"] - 5 <= left <= cfg["to_udp"]
