"""Raw frame I/O for integration tests, run inside a namespace:

    pktio.py send IFACE HEX [HEX ...]         send frames as they are
    pktio.py capture IFACE SECONDS [MAX]      print received frames as JSON hex list

Uses AF_PACKET directly so the test controls every byte that goes in and
sees every byte that comes out (outgoing frames are ignored on capture).
"""

import json
import select
import socket
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def send(iface, frames):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    for frame in frames:
        s.send(bytes.fromhex(frame))
        time.sleep(0.001)


def capture(iface, seconds, limit):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    print("ready", flush=True)
    out, deadline = [], time.monotonic() + seconds
    while len(out) < limit:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            break
        data, addr = s.recvfrom(65535)
        if addr[2] != PACKET_OUTGOING:
            out.append(data.hex())
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    cmd, iface = sys.argv[1], sys.argv[2]
    if cmd == "send":
        send(iface, sys.argv[3:])
    else:
        capture(iface, float(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 1 << 30)
