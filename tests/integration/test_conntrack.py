"""mirror/conntrack.py against the kernel's real conntrack table, in a namespace:
entries made with `conntrack -I` (exact tuples, status, mark, timeout, zone) and a
real TCP connection over lo (window tracking on, so BE_LIBERAL starts unset)."""

import shutil
import socket
import subprocess

import pytest

from nstest import skip_unless_root

pytestmark = [skip_unless_root,
              pytest.mark.skipif(not shutil.which("conntrack"), reason="conntrack CLI missing (tools/setup)")]

CHILD = """
import json, sys
from mirror.conntrack import Conntrack, Tuple, ORIGINAL, REPLY
ct = Conntrack()
out = {}
for name, args in json.loads(sys.argv[1]).items():
    if name == "list":
        out[name] = [e.orig for e in ct.list()]
        continue
    e = ct.get(*args)
    if name.startswith("liberal"):
        before = e.liberal
        ct.take_over(e)
        e2 = ct.get(*args)
        out[name] = [before, e2.taken_over, e.tcp_flags, e2.tcp_flags]
        continue
    out[name] = None if e is None else dict(
        orig=e.orig, reply=e.reply, status=e.status_names, mark=e.mark, timeout=e.timeout,
        zone=e.zone, helper=e.helper, tcp_state=e.tcp_state_name,
        dir=e.direction(Tuple(*args[1:])))
print(json.dumps(out))
"""


def ask(one_ns, queries):
    import json
    import sys
    cp = one_ns.run("ns", [sys.executable, "-c", CHILD, json.dumps(queries)])
    return json.loads(cp.stdout)


def test_get_reads_tuples_status_mark_timeout_of_inserted_entries(one_ns):
    one_ns.run("ns", "conntrack -I -p tcp -s 10.1.0.2 -d 10.9.0.1 --sport 40000 --dport 80 -r 10.2.0.2 "
                 "-q 10.2.0.1 --reply-port-src 8080 --reply-port-dst 40000 --state ESTABLISHED "
                 "-u SEEN_REPLY,ASSURED -t 300 -m 7")
    one_ns.run("ns", "conntrack -I -p udp -s 10.1.0.2 -d 10.2.0.2 --sport 5000 --dport 53 -t 30 --zone 5")
    got = ask(one_ns, {"orig": [6, "10.1.0.2", "10.9.0.1", 40000, 80],
                   "reply": [6, "10.2.0.2", "10.2.0.1", 8080, 40000],
                   "absent": [6, "10.1.0.2", "10.9.0.1", 40001, 80],
                   "list": None})
    assert got["orig"]["orig"] == ["10.1.0.2", "10.9.0.1", 40000, 80]
    assert got["orig"]["reply"] == ["10.2.0.2", "10.2.0.1", 8080, 40000]
    assert got["orig"]["status"] == ["SEEN_REPLY", "ASSURED", "CONFIRMED"]
    assert got["orig"]["mark"] == 7 and got["orig"]["tcp_state"] == "ESTABLISHED"
    assert 295 <= got["orig"]["timeout"] <= 300
    assert got["orig"]["dir"] == 0 and got["reply"]["dir"] == 1
    assert got["reply"]["orig"] == got["orig"]["orig"]
    assert got["absent"] is None
    # The zone-5 UDP entry is listed, but a default-zone get does not find it.
    assert ["10.1.0.2", "10.2.0.2", 5000, 53] in got["list"] and len(got["list"]) == 2


def test_take_over_a_real_connection(one_ns):
    """A connection over lo is tracked with window checks (flags without
    BE_LIBERAL); after take_over both directions carry it, without the
    unacknowledged-data flag, and the connection still works."""
    # A namespace tracks connections once a rule needs conntrack.
    one_ns.run("ns", "iptables -A INPUT -m conntrack --ctstate ESTABLISHED -j ACCEPT")
    srv = one_ns.popen("ns", ["python3", "-c", """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 7777)); s.listen(1)
c, _ = s.accept()
while True:
    d = c.recv(100)
    if not d: break
    c.sendall(d)
"""])
    one_ns.wait_listen("ns", 7777, proc=srv)
    cli = one_ns.popen("ns", ["python3", "-u", "-c", """
import socket, sys
s = socket.create_connection(("127.0.0.1", 7777)); print(s.getsockname()[1], flush=True)
s.sendall(b"one"); assert s.recv(10) == b"one"
sys.stdin.readline()
s.sendall(b"two"); print(s.recv(10).decode(), flush=True)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(cli.stdout.readline())
    got = ask(one_ns, {"liberal": [6, "127.0.0.1", "127.0.0.1", port, 7777]})["liberal"]
    before, after, flags_before, flags_after = got
    assert not before and after
    # BE_LIBERAL added, DATA_UNACKNOWLEDGED cleared, nothing else touched.
    assert flags_after == [(f | 0x08) & ~0x10 for f in flags_before]
    cli.stdin.write("\n")
    cli.stdin.flush()
    assert cli.stdout.readline().strip() == "two"
