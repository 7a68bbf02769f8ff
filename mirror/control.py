"""The agent's control socket: one JSON request, one JSON reply per connection.

An abstract unix socket belongs to the network namespace it is bound in, so
its name doubles as the per-namespace single-instance lock, and it vanishes
by itself when the agent dies, however it dies.

It has no file permissions: every process in the namespace can connect.  So
the server checks each peer's credentials (SO_PEERCRED): requests other than
READ_ONLY ones (stop, and any request added later) need uid 0 or
CAP_NET_ADMIN in the agent's user namespace.  The read-only requests answer
everyone: they show routes, neighbours, links and sysctl-derived flags that
any local user can already read through rtnetlink (`ip route`, `ip neigh`),
plus the fast path's own counters and the agent's pid.
"""

import json
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

ADDRESS = "\0loxi-mirror/control"
MAX_REQUEST = 65536


READ_ONLY = frozenset({"ping", "status", "dump"})
CAP_NET_ADMIN = 12


class AlreadyRunning(Exception):
    pass


class NotRunning(Exception):
    pass


@dataclass(frozen=True)
class Peer:
    """The connecting process, as the kernel saw it at connect()."""

    pid: int
    uid: int
    gid: int

    def may_change(self) -> bool:
        """Root, or CAP_NET_ADMIN (effective) in our user namespace."""
        return self.uid == 0 or (_same_user_ns(self.pid) and _has_cap(self.pid, CAP_NET_ADMIN))


def peer_of(conn: socket.socket) -> Peer:
    ucred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", ucred))


def _same_user_ns(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/user").st_ino == os.stat("/proc/self/ns/user").st_ino
    except OSError:
        return False


def _has_cap(pid: int, cap: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return cap_effective(f.read()) >> cap & 1 == 1
    except OSError:
        return False  # gone already: no privilege to lend


def cap_effective(status_text: str) -> int:
    """CapEff of a /proc/PID/status text, as a bit mask (0 if absent)."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def authorize(request: dict, peer: Peer):
    """None if the peer may make this request, else the error reply."""
    cmd = request.get("cmd")
    if cmd in READ_ONLY or peer.may_change():
        return None
    return {"error": f"permission denied: {cmd!r} needs root or CAP_NET_ADMIN "
                     f"(you are uid {peer.uid}, pid {peer.pid})", "denied": True}


class Server:
    def __init__(self, handler):
        """handler(request: dict) -> dict, called in the server thread for
        requests the peer is allowed to make (see authorize())."""
        self.handler = handler
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(ADDRESS)
        except OSError as e:
            self.sock.close()
            raise AlreadyRunning(_owner_hint()) from e
        self.sock.listen(8)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._refused_uids = set()

    def start(self):
        self._thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.settimeout(5)
                    peer = peer_of(conn)
                    # One deadline for the whole request: a client trickling
                    # bytes must not hold the (single) server thread.
                    request = json.loads(_read_all(conn, MAX_REQUEST, deadline=time.monotonic() + 5))
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    reply = authorize(request, peer)
                    if reply is None:
                        reply = self.handler(request)
                    elif peer.uid not in self._refused_uids:
                        self._refused_uids.add(peer.uid)  # once per uid: no log flooding
                        log.warning("refused %r from uid %d (pid %d)", request.get("cmd"), peer.uid, peer.pid)
                except Exception as e:  # never let a bad client kill the agent
                    log.warning("control request failed: %s", e)
                    reply = {"error": str(e)}
                try:
                    conn.sendall(json.dumps(reply).encode())
                except OSError:
                    pass

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _read_all(conn, limit=None, deadline=None) -> bytes:
    chunks, size = [], 0
    while True:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request not complete in time")
            conn.settimeout(left)
        chunk = conn.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if limit and size > limit:
            raise ValueError("request too large")


def _owner_hint() -> str:
    try:
        reply = request({"cmd": "ping"}, timeout=2)
        return f"pid {reply.get('pid')}"
    except Exception:
        return "pid unknown"


def request(req: dict, timeout: float = 10) -> dict:
    """Send one request to this namespace's agent; NotRunning if none."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(ADDRESS)
        except (ConnectionRefusedError, FileNotFoundError) as e:
            raise NotRunning() from e
        sock.sendall(json.dumps(req).encode())
        sock.shutdown(socket.SHUT_WR)
        return json.loads(_read_all(sock) or b"{}")
    finally:
        sock.close()


def running() -> bool:
    try:
        request({"cmd": "ping"}, timeout=2)
        return True
    except NotRunning:
        return False
    except (OSError, ValueError):
        return True  # bound but not answering (yet, or any more): still there
