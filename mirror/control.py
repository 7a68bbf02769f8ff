"""The agent's control socket: one JSON request, one JSON reply per connection.

An abstract unix socket belongs to the network namespace it is bound in, so
its name doubles as the per-namespace single-instance lock, and it vanishes
by itself when the agent dies, however it dies.
"""

import json
import logging
import socket
import threading

log = logging.getLogger(__name__)

ADDRESS = "\0loxi-mirror/control"
MAX_REQUEST = 65536


class AlreadyRunning(Exception):
    pass


class NotRunning(Exception):
    pass


class Server:
    def __init__(self, handler):
        """handler(request: dict) -> dict, called in the server thread."""
        self.handler = handler
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(ADDRESS)
        except OSError as e:
            self.sock.close()
            raise AlreadyRunning(_owner_hint()) from e
        self.sock.listen(8)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

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
                    request = json.loads(_read_all(conn, MAX_REQUEST))
                    reply = self.handler(request)
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


def _read_all(conn, limit=None) -> bytes:
    chunks, size = [], 0
    while True:
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
