"""Sequence-numbered probes and where they arrived, for the fault tests:

    probes.py send IFACE SRC_MAC DST_MAC SRC_IP DST_IP SECONDS [INTERVAL]
    probes.py arrivals SECONDS      (any interface of this namespace; SIGTERM ends it early)

`send` sends UDP probes to DST_IP:9 whose payload is b"lmprobe" + an 8-byte
sequence number + the 8-byte CLOCK_REALTIME ns just before it was sent, every
INTERVAL s (default 0.001), and prints how many (SIGTERM ends it early).
`arrivals` prints {"ready"} at once, then a JSON list of [interface name,
sequence, kernel receive time in CLOCK_REALTIME ns, send time] for every probe
received.
"""

import json
import select
import signal
import socket
import struct
import sys
import time

MAGIC = b"lmprobe"
SO_TIMESTAMPNS = 35


def _checksum(data):
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF


def frame(src_mac, dst_mac, src_ip, dst_ip, seq, sent_ns=0):
    payload = MAGIC + struct.pack("!QQ", seq, sent_ns)
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), seq & 0xFFFF, 0, 64, 17, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    mac = lambda m: bytes.fromhex(m.replace(":", ""))
    return mac(dst_mac) + mac(src_mac) + b"\x08\x00" + ip + udp


def send(iface, src_mac, dst_mac, src_ip, dst_ip, seconds, interval=0.001):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    done = []
    signal.signal(signal.SIGTERM, lambda *_: done.append(True))
    seq, end = 0, time.monotonic() + seconds
    while time.monotonic() < end and not done:
        s.send(frame(src_mac, dst_mac, src_ip, dst_ip, seq, time.time_ns()))
        seq += 1
        time.sleep(interval)
    print(seq, flush=True)


def arrivals(seconds):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    done = []
    signal.signal(signal.SIGTERM, lambda *_: done.append(True))
    print("ready", flush=True)
    out, end = [], time.monotonic() + seconds
    while not done:
        left = end - time.monotonic()
        if left <= 0:
            break
        if not select.select([s], [], [], min(left, 0.05))[0]:
            continue
        data, anc, _, addr = s.recvmsg(2048, 64)
        at = data.find(MAGIC)
        if addr[2] == 4 or at < 0:  # outgoing, or not a probe
            continue
        sec, nsec = struct.unpack("qq", anc[0][2][:16]) if anc else (0, 0)
        seq, sent = struct.unpack("!QQ", data[at + 7:at + 23])
        out.append([addr[0], seq, sec * 10**9 + nsec, sent])
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(*sys.argv[2:7], float(sys.argv[7]), *(float(x) for x in sys.argv[8:9]))
    else:
        arrivals(float(sys.argv[2]))
