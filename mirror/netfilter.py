"""Netfilter watcher: reads iptables (nft and legacy backends) and nftables state of
the network namespace it runs in, and reports when it changes.

- ``read_state()`` runs ``iptables-nft-save``, ``iptables-legacy-save`` and
  ``nft -j list ruleset`` (in parallel, a few ms each) and parses them with
  mirror.iptables. A missing tool or a failing command makes the state say
  "unknown -> punt" (``forward_impact`` is never None when ``errors`` is not empty).
  Nothing here takes the xtables lock or loads kernel modules: ``iptables-legacy-save``
  without ``-t`` only lists the tables named in /proc/net/ip_tables_names (it prints
  nothing when ip_tables holds no table), ``iptables-nft-save`` and ``nft list`` only
  dump over netlink.
- ``NetfilterWatcher(callback, poll_interval)`` re-reads the state when told that
  something changed and calls ``callback(state)`` with the first state and then each
  time the content (not the counters) differs. Change hints:
    * nfnetlink group NFNLGRP_NFTABLES: the kernel multicasts every nf_tables object
      change and a NEWGEN after each commit (iptables-nft and nft), ~0.1 ms after
      the command; per network namespace.
    * inotify on the directory of /run/xtables.lock: iptables-legacy opens the lock file BEFORE it changes a
      table and closes it (at exit) after; iptables-legacy-save never opens it.
      The file is shared by all namespaces of the mount namespace, so this is only
      a hint.
    * polling every ``poll_interval`` seconds, as the backstop for everything else.
  Bursts are debounced (``debounce`` s of quiet, at most ``max_delay`` s).
- ``on_hint(seq)`` is called on the thread that sees a hint, the moment it
  arrives, before anything is read (the agent stops fast-pathing forwarded traffic
  there).  Every reported state carries ``hint_seq``: the hints it covers (None
  while an iptables-legacy change may still be under way, i.e. the lock file is open).

Run ``python -m mirror.netfilter`` for a one-shot summary, ``--watch`` to print a
JSON line per change.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import logging
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


from mirror import nfswitch
from mirror.iptables import (
    Ruleset,
    forward_impact as iptables_forward_impact,
    nft_bridge_impact,
    nft_forward_impact,
    nft_normalize,
    parse_save,
    BUILTIN_CHAINS,
)

log = logging.getLogger(__name__)

BACKENDS: Tuple[str, ...] = ("iptables-nft", "iptables-legacy")
SAVE_COMMANDS: Dict[str, Tuple[str, ...]] = {
    "iptables-nft": ("iptables-nft-save",),
    "iptables-legacy": ("iptables-legacy-save",),
}
NFT_COMMAND: Tuple[str, ...] = ("nft", "-j", "list", "ruleset")
COMMAND_TIMEOUT = 10.0
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])

# netlink / nfnetlink constants
NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWTABLE = 0
NFT_MSG_GETTABLE = 1
NFT_MSG_NEWGEN = 15
NFTA_TABLE_NAME = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NFPROTO_NAMES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}

# inotify constants
IN_OPEN = 0x020
IN_CLOSE_WRITE = 0x008
IN_CLOSE_NOWRITE = 0x010
IN_CREATE = 0x100
IN_MOVED_TO = 0x080
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
XTABLES_LOCK = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")


@dataclass
class NetfilterState:
    """What the netfilter configuration of this namespace means for the fast path.

    ``rulesets``: parsed ``*-save`` output per backend ("iptables-nft",
    "iptables-legacy"); None when it could not be read.
    ``nft``: ``nft -j list ruleset`` objects without metainfo, handles and counter
    values (None when not read). ``forward_impact``: None only when nothing can
    affect forwarded IPv4 traffic; else why it must punt. ``errors``: what could
    not be read (each one makes forward_impact non-None).
    ``unsupported``: None when everything on the forward path is an iptables
    ruleset that mirror.nfverdict reads; else why all forwarded traffic must punt
    (native nftables tables on forward hooks, read errors, unparsable output).
    Equality compares content only (not the counters, not the timing fields)."""

    rulesets: Dict[str, Optional[Ruleset]] = field(default_factory=dict)
    nft: Optional[List[Any]] = None
    forward_impact: Optional[str] = None
    # Likewise for every bridged frame (nft bridge/netdev families).
    bridge_impact: Optional[str] = None
    errors: List[str] = field(default_factory=list)
    unsupported: Optional[str] = None
    hint_seq: Optional[int] = field(default=None, compare=False)  # change hints this read covers
    read_at: float = field(default=0.0, compare=False)        # time.monotonic()
    read_duration: float = field(default=0.0, compare=False)  # seconds
    outputs: Dict[str, Tuple[Optional[str], Optional[str]]] = field(
        default_factory=dict, compare=False, repr=False)       # raw tool output, error

    @property
    def punt(self) -> bool:
        return self.forward_impact is not None

    def summary(self) -> Dict[str, Any]:
        return {
            "forward_impact": self.forward_impact,
            "unsupported": self.unsupported,
            "errors": list(self.errors),
            "counts": {b: (rs.counts() if rs is not None else None)
                       for b, rs in self.rulesets.items()},
            "nft_objects": None if self.nft is None else len(self.nft),
            "read_ms": round(self.read_duration * 1000, 2),
        }


def _which(name: str) -> Optional[str]:
    return shutil.which(name, path=_SEARCH_PATH)


def _start(argv: Sequence[str]) -> subprocess.Popen:
    exe = _which(argv[0])
    if exe is None:
        raise FileNotFoundError(f"{argv[0]} not found")
    env = dict(os.environ, LC_ALL="C")
    return subprocess.Popen([exe, *argv[1:]], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, close_fds=True)


def _finish(name: str, proc: subprocess.Popen, timeout: float) -> Tuple[Optional[str], Optional[str]]:
    """(stdout, None) on success, (None, error) otherwise."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None, f"{name}: timed out after {timeout:.0f}s"
    if proc.returncode != 0:
        msg = err.decode(errors="replace").strip().splitlines()
        return None, f"{name}: exit status {proc.returncode}" + (f": {msg[-1]}" if msg else "")
    return out.decode(errors="replace"), None


def nft_tables_via_netlink() -> List[Tuple[str, str]]:
    """(family, name) of every nf_tables table in this namespace, by a netlink dump
    (used when the nft tool is not installed). Raises OSError on failure."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        s.bind((0, 0))
        s.settimeout(2.0)
        seq = 1
        hdr = struct.pack("=LHHLL", 16 + 4, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
                          NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
        s.send(hdr + struct.pack("=BBH", 0, 0, 0))
        tables: List[Tuple[str, str]] = []
        while True:
            data = s.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                ln, typ, _flags, _seq, _pid = struct.unpack_from("=LHHLL", data, off)
                if ln < 16:
                    raise OSError(errno.EPROTO, "bad netlink message")
                if typ == NLMSG_DONE:
                    return tables
                if typ == NLMSG_ERROR:
                    code = struct.unpack_from("=i", data, off + 16)[0]
                    if code:
                        raise OSError(-code, os.strerror(-code))
                    return tables
                if typ == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE:
                    fam = data[off + 16]
                    a = off + 20
                    while a + 4 <= off + ln:
                        alen, atype = struct.unpack_from("=HH", data, a)
                        if alen < 4:
                            break
                        if atype & 0x7FFF == NFTA_TABLE_NAME:
                            name = data[a + 4:a + alen].split(b"\0", 1)[0].decode()
                            tables.append((NFPROTO_NAMES.get(fam, str(fam)), name))
                        a += (alen + 3) & ~3
                off += (ln + 3) & ~3
    finally:
        s.close()


SOURCES: Tuple[str, ...] = BACKENDS + ("nft",)

# What one source produced: (text, error). text None + error None: nothing to read
# (nft tool absent and no native table found).
_Output = Tuple[Optional[str], Optional[str]]


def _read_nft_absent() -> _Output:
    """No nft tool: native tables cannot be inspected, but their existence can."""
    try:
        native = [f"{fam} {name}" for fam, name in nft_tables_via_netlink()
                  if fam in ("inet", "netdev") or (fam == "ip" and name not in BUILTIN_CHAINS)]
    except OSError as e:
        return None, f"nft not installed and nf_tables table list failed: {e}"
    if native:
        return None, "nft not installed and native nftables tables present: " + ", ".join(sorted(native))
    return None, None


def read_outputs(keys: Sequence[str] = SOURCES, timeout: float = COMMAND_TIMEOUT,
                 counters: bool = False) -> Dict[str, _Output]:
    """Run the tools for ``keys`` (of SOURCES) in parallel; key -> (stdout, error).
    counters: with each rule's packet/byte counters (``*-save -c``).  Not for
    the watcher: counters change all the time, the content it compares does not."""
    commands: Dict[str, Sequence[str]] = {k: SAVE_COMMANDS[k] + (("-c",) if counters else ())
                                          for k in keys if k in SAVE_COMMANDS}
    result: Dict[str, _Output] = {}
    if "nft" in keys:
        if _which(NFT_COMMAND[0]) is not None:
            commands["nft"] = NFT_COMMAND
        else:
            result["nft"] = _read_nft_absent()
    procs: Dict[str, subprocess.Popen] = {}
    for key, argv in commands.items():
        try:
            procs[key] = _start(argv)
        except OSError as e:
            result[key] = (None, f"{argv[0]}: {e.strerror or e}")
    for key, proc in procs.items():
        result[key] = _finish(commands[key][0], proc, timeout)
    return result


def read_rule_counters(timeout: float = COMMAND_TIMEOUT) -> Dict[Tuple[str, str, str, str], Tuple[int, int]]:
    """{(backend, table, chain, rule text): (packets, bytes)} from ``*-save -c``
    (for ``dump rules``; the text makes a rule changed meanwhile show none)."""
    out: Dict[Tuple[str, str, str, str], Tuple[int, int]] = {}
    for backend, (text, _err) in read_outputs(BACKENDS, timeout, counters=True).items():
        if text is None:
            continue
        for rule in parse_save(text).rules():
            if rule.counters is not None:
                out[(backend, rule.table, rule.chain, rule.raw)] = rule.counters
    return out


def build_state(outputs: Dict[str, _Output]) -> NetfilterState:
    """Parse and classify tool outputs (pure apart from the clock)."""
    errors: List[str] = []
    rulesets: Dict[str, Optional[Ruleset]] = {}
    reasons: List[str] = []
    unsupported: List[str] = []
    for backend in BACKENDS:
        text, err = outputs.get(backend, (None, f"{backend}: not read"))
        if err:
            errors.append(err)
        rs = parse_save(text) if text is not None else None
        rulesets[backend] = rs
        if rs is not None:
            imp = iptables_forward_impact(rs)
            if imp:
                reasons.append(f"{backend}: {imp}")
            if rs.unparsed:
                u = rs.unparsed[0]
                unsupported.append(f"{backend}: {len(rs.unparsed)} line(s) not understood ({u.reason})")
    nft_objs: Optional[List[Any]] = None
    bridge: List[str] = []
    text, err = outputs.get("nft", (None, "nft: not read"))
    if err:
        errors.append(err)
    if text is not None:
        try:
            doc = json.loads(text) if text.strip() else {"nftables": []}
            nft_objs = nft_normalize(doc)
            imp = nft_forward_impact(doc, rulesets.get("iptables-nft"))
            if imp:
                reasons.append(imp)
                unsupported.append(imp)
            imp = nft_bridge_impact(doc)
            if imp:
                bridge.append(imp)
        except ValueError as e:
            errors.append(f"nft: unreadable JSON ({e})")
    reasons.extend(f"unknown ({e})" for e in errors)
    unsupported.extend(f"unknown ({e})" for e in errors)
    bridge.extend(f"unknown ({e})" for e in errors)
    return NetfilterState(rulesets=rulesets, nft=nft_objs,
                          forward_impact="; ".join(reasons) or None,
                          bridge_impact="; ".join(bridge) or None, errors=errors,
                          unsupported="; ".join(unsupported) or None,
                          read_at=time.monotonic(), outputs=dict(outputs))


def read_state(timeout: float = COMMAND_TIMEOUT, only: Optional[Sequence[str]] = None,
               previous: Optional[NetfilterState] = None) -> NetfilterState:
    """Read iptables (both backends) and nftables state of the current namespace.

    With ``only`` (keys of SOURCES) and a ``previous`` state, re-run only those
    tools and reuse the previous outputs of the others (the watcher does this when
    a hint says which backend changed; its polls read everything)."""
    t0 = time.monotonic()
    keys = list(SOURCES)
    reuse: Dict[str, _Output] = {}
    if only is not None and previous is not None:
        reuse = {k: v for k, v in previous.outputs.items() if k not in only}
        keys = [k for k in SOURCES if k not in reuse]
    outputs = dict(reuse)
    outputs.update(read_outputs(keys, timeout))
    if previous is not None and outputs == previous.outputs:
        # Same text as last time (every poll, usually): skip parsing, which would
        # hold the GIL for milliseconds while the hint thread may need it.
        st = dataclasses.replace(previous, outputs=outputs, read_at=time.monotonic())
    else:
        st = build_state(outputs)
    st.read_duration = time.monotonic() - t0
    return st


# --------------------------------------------------------------------------- watcher

class _LockInotify:
    """inotify on iptables-legacy's lock file, counting its opens and closes
    (plus its directory, to notice the file being created).  Hand-written (ctypes,
    one blocked thread): see the README for why not watchdog.  The file itself is
    watched, so readiness of the fd is already the signal: callers hint first and
    read the events after."""

    keys = ("iptables-legacy",)
    STALE_OPEN = 1.0   # s: an unmatched open older than this, with no lock holder, is forgotten

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        directory, name = os.path.split(self.path)
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self.fd = fd
        self._name = os.fsencode(name)
        self._dir_wd = self._add(directory, IN_CREATE | IN_MOVED_TO)
        if self._dir_wd < 0:
            e = ctypes.get_errno()
            os.close(fd)
            raise OSError(e, os.strerror(e))
        self._file_wd = self._add(self.path, IN_OPEN | IN_CLOSE_WRITE | IN_CLOSE_NOWRITE)
        self._lock = threading.Lock()
        self.open_count = 0
        self.opens = 0         # opens seen so far
        self.opened_at = 0.0
        self.unread = False    # events arrived, not counted yet: assume busy

    def _add(self, path: str, mask: int) -> int:
        return self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)

    def drain(self) -> bool:
        """Consume events; True when the last user closed the file (or events were
        lost): the change, if any, is done."""
        closed = lost = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            off = 0
            while off + 16 <= len(data):
                wd, mask, _cookie, ln = struct.unpack_from("=iIII", data, off)
                name = data[off + 16:off + 16 + ln].split(b"\0", 1)[0]
                off += 16 + ln
                if mask & IN_Q_OVERFLOW:
                    lost = True
                elif wd == self._dir_wd and name == self._name:
                    self._file_wd = self._add(self.path, IN_OPEN | IN_CLOSE_WRITE | IN_CLOSE_NOWRITE)
                    self._count(+1)          # created by a user that now has it open
                elif wd == self._file_wd and mask & IN_IGNORED:
                    self._file_wd = -1       # file removed
                elif wd == self._file_wd and mask & IN_OPEN:
                    self._count(+1)
                elif wd == self._file_wd and mask & (IN_CLOSE_WRITE | IN_CLOSE_NOWRITE):
                    self._count(-1)
                    closed = True
        with self._lock:
            self.unread = False
            if lost:
                self.open_count = 0
            return lost or (closed and self.open_count == 0)

    def _count(self, delta: int) -> None:
        with self._lock:
            self.open_count = max(0, self.open_count + delta)
            if delta > 0:
                self.opens += 1
                self.opened_at = time.monotonic()

    def busy(self) -> bool:
        """Whether a legacy change may be under way (the file is open, or events
        about it are not counted yet)."""
        with self._lock:
            if self.unread:
                return True
            if self.open_count and time.monotonic() - self.opened_at > self.STALE_OPEN \
                    and not _flocked(self.path):
                log.warning("%s: %d open(s) without a close and no lock holder: forgotten",
                            self.path, self.open_count)
                self.open_count = 0
            return self.open_count > 0

    def close(self) -> None:
        os.close(self.fd)


def _flocked(path: str) -> bool:
    """Whether anyone holds or waits for a lock on ``path`` (/proc/locks)."""
    try:
        ino = os.stat(path).st_ino
        with open("/proc/locks") as f:
            return any(line.split()[-3].endswith(f":{ino}") for line in f if len(line.split()) >= 8)
    except (OSError, IndexError):
        return True      # cannot tell: assume a change is under way


class _NftMonitor:
    """Raw nfnetlink socket subscribed to NFNLGRP_NFTABLES."""

    def __init__(self, rcvbuf: int = 4 << 20):
        s = socket.socket(socket.AF_NETLINK,
                          socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                          NETLINK_NETFILTER)
        try:
            s.bind((0, 0))
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        except OSError:
            s.close()
            raise
        self.sock = s
        self.fd = s.fileno()
        self.newgens = 0

    keys = ("iptables-nft", "nft")

    def drain(self) -> bool:
        hit = False
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return hit
            except OSError as e:
                if e.errno == errno.ENOBUFS:   # overrun: we lost events, re-read
                    hit = True
                    continue
                raise
            hit = True
            off = 0
            while off + 16 <= len(data):
                ln, typ = struct.unpack_from("=LH", data, off)
                if typ == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
                    self.newgens += 1
                if ln < 16:
                    break
                off += (ln + 3) & ~3

    def close(self) -> None:
        self.sock.close()


HINT_PRIORITY = 1   # SCHED_FIFO priority of the hint thread (any RT priority beats normal tasks)


class NetfilterWatcher:
    """Calls ``callback(state)`` with the first NetfilterState, then whenever the
    content changes or a read answers change hints not answered before.

    Two threads.  The hint thread blocks on the change sources only; the moment
    one fires it calls ``on_hint(seq)`` (the agent stops fast-pathing there) and
    only then consumes the messages.  It runs SCHED_FIFO when allowed, so a busy
    machine does not delay it behind the command that made the change.  The
    watcher thread debounces, re-reads and calls ``callback`` (on its thread).

    ``sources`` lists the change hints in use ("nfnetlink", "inotify:<path>");
    polling every ``poll_interval`` s always runs and re-reads everything; a hint
    re-reads only what it covers (nfnetlink: iptables-nft-save and nft; the lock
    file: iptables-legacy-save, once its last user closed it).
    ``reader(only=keys|None, previous=state|None)`` defaults to read_state."""

    def __init__(self, callback: Callable[[NetfilterState], None], poll_interval: float = 2.0,
                 debounce: float = 0.003, max_delay: float = 0.05,
                 reader: Callable[..., NetfilterState] = read_state,
                 lock_path: str = XTABLES_LOCK,
                 on_hint: Optional[Callable[[int], None]] = None,
                 kernel_switch: Optional[Tuple[int, int, int]] = None):
        self.callback = callback
        self.on_hint = on_hint
        # (config map fd, reason, config value size): see mirror/nfswitch.py, mirror/nfhintd.py
        self._kernel_switch = kernel_switch
        self._switch_fd = -1
        self._hintd: Optional[subprocess.Popen] = None
        self._draining = False
        self.poll_interval = poll_interval
        self.debounce = debounce
        self.max_delay = max_delay
        self._reader = reader
        self._lock_path = lock_path
        self._threads: List[threading.Thread] = []
        self._stop = threading.Event()
        self._wake_r = self._wake_w = -1     # hint thread -> watcher thread
        self._halt_r = self._halt_w = -1     # stop() -> hint thread
        self._nft: Optional[_NftMonitor] = None
        self._legacy: Optional[_LockInotify] = None
        self._hint_lock = threading.Lock()
        self.hint_seq = 0            # hints seen so far
        self._answered_seq = 0       # hints covered by a state already reported
        self._pending: set = set()   # SOURCES keys to re-read (under _hint_lock)
        self.state: Optional[NetfilterState] = None
        self.sources: List[str] = []
        self.realtime = False
        self.stats = {"reads": 0, "hints": 0, "callbacks": 0, "errors": 0}
        # seconds from a hint's arrival in our process to on_hint() done, per source
        self.hint_latency: Dict[str, deque] = {"nfnetlink": deque(maxlen=1000), "xtables.lock": deque(maxlen=1000)}

    def start(self) -> "NetfilterWatcher":
        if self._threads:
            raise RuntimeError("already started")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._halt_r, self._halt_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Subscribe before the first read, so no change can fall in between.
        try:
            self._nft = _NftMonitor()
            self.sources.append("nfnetlink")
        except OSError as e:
            log.warning("nfnetlink NFTABLES group unavailable, polling nft: %s", e)
        if self._nft is not None and self._kernel_switch is not None:
            try:
                self._switch_fd = nfswitch.attach(self._nft.sock, *self._kernel_switch[:2])
                self.sources.append("nfnetlink-switch")
            except OSError as e:
                log.warning("no kernel-side netfilter switch (the hint thread alone stops the fast path): %s", e)
        try:
            self._legacy = _LockInotify(self._lock_path)
            self.sources.append("inotify:" + self._lock_path)
        except OSError as e:
            log.warning("inotify on %s unavailable, polling legacy: %s", self._lock_path, e)
        if self._legacy is not None and self._kernel_switch is not None:
            self._start_hintd()
        self._stop.clear()
        self._threads = [threading.Thread(target=self._run_hints, name="netfilter-hints", daemon=True),
                         threading.Thread(target=self._run, name="netfilter-watch", daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if not self._threads:
            return
        self._stop.set()
        for fd in (self._wake_w, self._halt_w):
            try:
                os.write(fd, b"x")
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout)
        self._threads = []
        for src in (self._nft, self._legacy):
            if src is not None:
                src.close()
        self._nft = self._legacy = None
        if self._switch_fd >= 0:
            os.close(self._switch_fd)
            self._switch_fd = -1
        if self._hintd is not None:
            self._hintd.terminate()
            try:
                self._hintd.wait(5)
            except subprocess.TimeoutExpired:
                self._hintd.kill()
                self._hintd.wait()
            self._hintd = None
        for fd in (self._wake_r, self._wake_w, self._halt_r, self._halt_w):
            os.close(fd)
        self._wake_r = self._wake_w = self._halt_r = self._halt_w = -1
        self.sources = []

    def _start_hintd(self) -> None:
        """The iptables-legacy switch runs in its own process (mirror/nfhintd.py):
        it must not wait for this process's GIL."""
        fd, reason, size = self._kernel_switch
        try:
            self._hintd = subprocess.Popen(
                [sys.executable, "-m", "mirror.nfhintd", self._lock_path, str(fd), str(size), str(reason)],
                pass_fds=(fd,), stdin=subprocess.DEVNULL, close_fds=True)
            self.sources.append("xtables-lock-switch")
        except OSError as e:
            log.warning("no iptables-legacy switch process (the hint thread alone stops the fast path): %s", e)

    def __enter__(self) -> "NetfilterWatcher":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- hint thread

    def _go_realtime(self) -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO | getattr(os, "SCHED_RESET_ON_FORK", 0),
                                  os.sched_param(HINT_PRIORITY))
            self.realtime = True
        except (OSError, AttributeError) as e:
            log.info("netfilter hint thread stays at normal priority: %s", e)

    def _run_hints(self) -> None:
        self._go_realtime()
        fds = [self._halt_r] + [s.fd for s in (self._nft, self._legacy) if s is not None]
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select(fds, [], [])
            except InterruptedError:
                continue
            seen = time.monotonic()
            keys: set = set()
            if self._nft is not None and self._nft.fd in ready:
                self._hint("nfnetlink", seen)      # first stop the fast path, then read
                self._draining = True
                try:
                    self._nft.drain()
                except OSError as e:
                    log.warning("nfnetlink change source failed: %s", e)
                    keys.update(SOURCES)
                # Messages that arrived while draining were consumed with the first:
                # hint again, so no read that started before them answers them.
                self._hint("nfnetlink", None)
                self._draining = False
                keys.update(self._nft.keys)
            if self._legacy is not None and self._legacy.fd in ready:
                self._legacy.unread = True          # no read may answer this hint before the close
                self._hint("xtables.lock", seen)    # an open (or create) of the lock: hint first
                done = self._legacy.drain()
                if done or not self._legacy.busy():
                    keys.update(self._legacy.keys)  # re-read now: that answers the hint
            if keys:
                with self._hint_lock:
                    self._pending |= keys
                try:
                    os.write(self._wake_w, b"x")
                except OSError:
                    pass

    def _hint(self, source: str, seen: Optional[float]) -> None:
        """A change may be under way: tell on_hint before anything else
        (seen: when the hint arrived, for hint_latency; None: do not record)."""
        with self._hint_lock:
            self.hint_seq += 1
            seq = self.hint_seq
            self.stats["hints"] += 1
        if self.on_hint is not None:
            try:
                self.on_hint(seq)
            except Exception:
                self.stats["errors"] += 1
                log.exception("netfilter hint callback failed")
        if seen is not None:
            self.hint_latency[source].append(time.monotonic() - seen)

    def hint_pending(self) -> bool:
        """Whether a change signal has not been handled yet (an nftables message:
        the kernel switch may have set the hold for it; a legacy lock file open or
        its events unread: nfhintd may have): the reconciler then keeps the hold."""
        if self._draining:
            return True
        if self._legacy is not None and self._legacy.busy():
            return True                   # a legacy change may be under way
        fds = [src.fd for src in (self._nft, self._legacy) if src is not None]
        try:
            return bool(fds) and bool(select.select(fds, [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def hint_summary(self) -> Dict[str, Any]:
        """Per source: hints and the time from arrival to on_hint() done (us)."""
        out: Dict[str, Any] = {"realtime": self.realtime, "kernel_switch": self._switch_fd >= 0,
                               "legacy_switch": self._hintd is not None and self._hintd.poll() is None}
        for source, lat in self.hint_latency.items():
            xs = sorted(lat)
            if xs:
                out[source] = {"hints": len(xs), "median_us": round(xs[len(xs) // 2] * 1e6),
                               "p99_us": round(xs[min(len(xs) - 1, len(xs) * 99 // 100)] * 1e6),
                               "max_us": round(xs[-1] * 1e6)}
        return out

    # -- watcher thread

    def _covered_seq(self) -> Optional[int]:
        """The hints a read starting now answers; None while a legacy change may
        still be under way (its lock file is open)."""
        if self._legacy is not None and self._legacy.busy():
            return None
        with self._hint_lock:
            return self.hint_seq

    def _take_pending(self) -> set:
        try:
            while os.read(self._wake_r, 64):
                pass
        except BlockingIOError:
            pass
        with self._hint_lock:
            keys, self._pending = self._pending, set()
        return keys

    def _read_and_report(self, only: Optional[set] = None) -> None:
        covered = self._covered_seq()
        try:
            new = self._reader(only=sorted(only) if only else None, previous=self.state)
        except Exception as e:    # the reader should not raise; never stop watching
            log.exception("netfilter read failed")
            new = NetfilterState(forward_impact=f"unknown (read failed: {e})",
                                 unsupported=f"unknown (read failed: {e})",
                                 bridge_impact=f"unknown (read failed: {e})",
                                 errors=[f"read failed: {e}"], read_at=time.monotonic())
        new.hint_seq = covered
        self.stats["reads"] += 1
        # Unchanged content is reported again only to whoever holds on hints (the
        # agent releases its hold on it); other users see changes only.
        answers = self.on_hint is not None and covered is not None and covered > self._answered_seq
        if self.state is not None and new == self.state and not answers:
            self.state.read_at, self.state.outputs = new.read_at, new.outputs
            return
        self.state = new
        if covered is not None:
            self._answered_seq = max(self._answered_seq, covered)
        self.stats["callbacks"] += 1
        try:
            self.callback(new)
        except Exception:
            self.stats["errors"] += 1
            log.exception("netfilter callback failed")

    def _run(self) -> None:
        self._take_pending()
        self._read_and_report()
        next_poll = time.monotonic() + self.poll_interval
        while not self._stop.is_set():
            timeout = max(0.0, next_poll - time.monotonic())
            try:
                ready, _, _ = select.select([self._wake_r], [], [], timeout)
            except InterruptedError:
                continue
            if self._stop.is_set():
                break
            hinted = self._take_pending() if ready else set()
            polling = time.monotonic() >= next_poll
            if not hinted and not polling:
                continue
            if hinted and not polling:
                # debounce: wait for `debounce` s of quiet, at most `max_delay` s
                deadline = time.monotonic() + self.max_delay
                while not self._stop.is_set():
                    left = min(self.debounce, deadline - time.monotonic())
                    if left <= 0 or not select.select([self._wake_r], [], [], left)[0]:
                        break         # quiet: the burst is over
                    hinted |= self._take_pending()
            if self._stop.is_set():
                break
            if polling:
                self._read_and_report()
                next_poll = time.monotonic() + self.poll_interval
            else:
                self._read_and_report(hinted)


# --------------------------------------------------------------------------- CLI

def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import signal
    import sys

    p = argparse.ArgumentParser(prog="python -m mirror.netfilter", description=__doc__.split("\n")[0])
    p.add_argument("--watch", action="store_true", help="print a JSON line per change")
    p.add_argument("--poll", type=float, default=2.0, help="poll interval (s)")
    args = p.parse_args(argv)
    if not args.watch:
        print(json.dumps(read_state().summary(), indent=2))
        return 0

    done = threading.Event()
    watcher: Optional[NetfilterWatcher] = None

    def emit(state: NetfilterState) -> None:
        line = dict(state.summary(), t=time.monotonic(), read_at=state.read_at,
                    sources=watcher.sources if watcher else [],
                    stats=dict(watcher.stats) if watcher else {})
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    watcher = NetfilterWatcher(emit, poll_interval=args.poll).start()
    try:
        while not done.wait(0.5):
            pass
    finally:
        watcher.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
