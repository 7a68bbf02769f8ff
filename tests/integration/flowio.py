#!/usr/bin/env python3
"""Long-lived flows for the stateful tests, run inside the pods (stdlib only).

    flowio.py udp-sink PORT SECONDS                 -> JSON [[seq, sent_at, "src:port"], ...]
    flowio.py udp-source DST PORT SECONDS INTERVAL [SPORT]
                                                    -> JSON [[seq, sent_at], ...]
    flowio.py tcp-echo PORT                         echo server (threads), until killed
    flowio.py tcp-talk DST PORT SECONDS INTERVAL [END]
                                                    one connection, a line every INTERVAL,
                                                    each echoed -> JSON {"sent", "echoed", "error",
                                                    "last_at"}; END: "fin" (close, default),
                                                    "rst" (SO_LINGER 0), "hold:N" (idle N s, then close)

    flowio.py udp-midflow DST PORT BIG              connected UDP socket with DF: 300 small datagrams
                                                    (takeover), then BIG-byte ones until the path MTU
                                                    is learned; after a line on stdin, datagrams until
                                                    the ICMP port unreachable arrives
                                                    -> JSON {"mtu", "big_error", "refused"}
    flowio.py udp-echo PORT                         echoes every datagram to its sender, until killed
    flowio.py capture IFACE                         records every IPv4 packet arriving on IFACE from
                                                    the first with BEGIN in it to the first with STOP
                                                    -> JSON [hex of the IP packet, ...]
    flowio.py udp-nat-probe DST PORT SPORT          one UDP flow from SPORT, echoed: 2.6 s of small
                                                    datagrams (ASSURED, taken over); after a line on
                                                    stdin BEGIN, a record-route datagram, one of 3000
                                                    bytes without DF (fragments), one of 1600, STOP
                                                    -> JSON {"warm", "echoes": [[label, from, bytes]]}
    flowio.py whoami PORT                           server: answers each connection with the
                                                    address it was reached at, until killed
    flowio.py whoami-client DST PORT N              N connections -> JSON [[client_port, answer], ...]

Sinks and servers print "ready" once bound.  Timestamps are time.time() (one
clock for every namespace of the host).
"""

import errno
import json
import socket
import sys
import threading
import time


def udp_sink(port, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(port)))
    print("ready", flush=True)
    got, end = [], time.time() + float(seconds)
    while time.time() < end:
        s.settimeout(max(0.01, end - time.time()))
        try:
            data, src = s.recvfrom(2048)
        except socket.timeout:
            break
        seq, sent = data.split(b" ")[:2]
        got.append([int(seq), float(sent), f"{src[0]}:{src[1]}"])
    print(json.dumps(got), flush=True)


def udp_source(dst, port, seconds, interval, sport=0):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sport)))
    sent, seq, end = [], 0, time.time() + float(seconds)
    while time.time() < end:
        now = time.time()
        s.sendto(b"%d %.6f " % (seq, now) + b"x" * 64, (dst, int(port)))
        sent.append([seq, now])
        seq += 1
        time.sleep(float(interval))
    print(json.dumps(sent), flush=True)


def listening(port):
    """A TCP server socket on PORT, announced with "ready"."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(port)))
    srv.listen(64)
    print("ready", flush=True)
    return srv


def tcp_echo(port):
    srv = listening(port)

    def serve(c):
        with c:
            while True:
                data = c.recv(65536)
                if not data:
                    return
                c.sendall(data)

    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def tcp_talk(dst, port, seconds, interval, end="fin"):
    out = {"sent": 0, "echoed": 0, "error": None, "last_at": None}
    try:
        c = socket.create_connection((dst, int(port)), timeout=min(5.0, float(seconds) + 1))
        c.settimeout(5)
        stop = time.time() + float(seconds)
        while time.time() < stop:
            line = b"%d\n" % out["sent"]
            c.sendall(line)
            out["sent"] += 1
            buf = b""
            while len(buf) < len(line):
                chunk = c.recv(len(line) - len(buf))
                if not chunk:
                    raise ConnectionError("closed by peer")
                buf += chunk
            out["echoed"] += buf == line
            out["last_at"] = time.time()
            time.sleep(float(interval))
        if end.startswith("hold:"):
            print(json.dumps(out), flush=True)  # the caller reads this while the connection idles
            time.sleep(float(end[5:]))
        elif end == "rst":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.close()
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out), flush=True)


def udp_midflow(dst, port, big):
    IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU = 10, 2, 14
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    s.connect((dst, int(port)))
    for i in range(300):
        s.send(b"%d %.6f small" % (i, time.time()))
        time.sleep(0.002)
    out = {"big_error": None, "refused": False}
    for i in range(20):  # the first goes out and draws frag-needed; then the kernel knows
        try:
            s.send(b"%d %.6f " % (1000 + i, time.time()) + b"x" * (int(big) - 28 - 20))
        except OSError as e:
            out["big_error"] = e.strerror
            break
        time.sleep(0.05)
    out["mtu"] = s.getsockopt(socket.IPPROTO_IP, IP_MTU)
    print(json.dumps({"phase": "mtu"}), flush=True)
    sys.stdin.readline()  # the server is gone now
    s.settimeout(0.05)
    for i in range(100):
        try:
            s.send(b"%d %.6f late" % (2000 + i, time.time()))
            s.recv(100)
        except ConnectionRefusedError:
            out["refused"] = True
            break
        except (socket.timeout, BlockingIOError):
            pass
        except OSError as e:  # a frag-needed still queued on the socket from the big ones
            if e.errno != errno.EMSGSIZE:
                raise
    print(json.dumps(out), flush=True)


BEGIN, STOP = b"zzBEGINzz", b"zzSTOPzz"


def udp_echo(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(port)))
    print("ready", flush=True)
    while True:
        data, src = s.recvfrom(65535)
        s.sendto(data, src)


def capture(iface, timeout=60):
    ETH_P_ALL, PACKET_OUTGOING = 3, 4
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    s.settimeout(float(timeout))
    print("ready", flush=True)
    got, on = [], False
    try:
        while True:
            frame, addr = s.recvfrom(65535)
            if addr[2] == PACKET_OUTGOING or frame[12:14] != b"\x08\x00":
                continue
            on = on or BEGIN in frame
            if on:
                got.append(frame[14:].hex())
            if on and STOP in frame:
                break
    except socket.timeout:
        pass
    print(json.dumps(got), flush=True)


def udp_nat_probe(dst, port, sport):
    IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IP_OPTIONS = 10, 0, 4
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sport)))
    s.connect((dst, int(port)))
    s.settimeout(0.005)
    warm, end = 0, time.time() + 2.6  # the kernel marks a replied UDP flow ASSURED after 2 s
    while time.time() < end:
        s.send(b"warm %d" % warm)
        warm += 1
        try:
            s.recv(100)
        except socket.timeout:
            pass
        time.sleep(0.005)
    s.settimeout(0.5)
    try:
        while True:
            s.recv(100)  # late echoes
    except socket.timeout:
        pass
    print(json.dumps({"phase": "warm"}), flush=True)
    sys.stdin.readline()
    s.settimeout(3)
    s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
    record_route = bytes([7, 11, 4]) + bytes(8) + bytes([0])  # room for 2 addresses, EOL
    probes = [("begin", BEGIN, None), ("record-route", b"rr " + bytes(range(200)), record_route),
              ("plain", b"between", b""), ("fragments-3000", bytes(i % 251 for i in range(3000)), None),
              ("fragments-1600", bytes(i % 241 for i in range(1600)), None), ("stop", STOP, None)]
    echoes = []
    for label, data, opts in probes:
        if opts is not None:
            s.setsockopt(socket.IPPROTO_IP, IP_OPTIONS, opts)
        s.send(data)
        try:
            got, src = s.recvfrom(65535)
            echoes.append([label, "%s:%d" % src, got == data, len(got)])
        except socket.timeout:
            echoes.append([label, None, False, 0])
        if opts:
            s.setsockopt(socket.IPPROTO_IP, IP_OPTIONS, b"")
    print(json.dumps({"warm": warm, "echoes": echoes}), flush=True)


def whoami(port):
    srv = listening(port)
    while True:
        c, _ = srv.accept()
        with c:
            c.sendall(c.getsockname()[0].encode())


def whoami_client(dst, port, n):
    out = []
    for _ in range(int(n)):
        with socket.create_connection((dst, int(port)), timeout=5) as c:
            out.append([c.getsockname()[1], c.recv(64).decode()])
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"udp-sink": udp_sink, "udp-source": udp_source, "tcp-echo": tcp_echo, "tcp-talk": tcp_talk,
     "whoami": whoami, "whoami-client": whoami_client, "udp-midflow": udp_midflow, "udp-echo": udp_echo,
     "capture": capture, "udp-nat-probe": udp_nat_probe}[cmd](*args)
