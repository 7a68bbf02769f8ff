"""Compile and load loxi-mirror's eBPF datapath with BCC.

Only compiling and loading live here; attaching the program to interfaces is
mirror/tc.py's job.  Usage::

    from mirror.datapath import Datapath, source_text
    dp = Datapath()                 # compiles kernel_bpf/tc_ingress.c, loads it
    fd = dp.fd                      # SCHED_CLS program fd, for tc/tcx attach
    routes = dp.table("routes")     # bcc table (Key/Leaf ctypes from common.h)
    dp.close()
    print(source_text())            # the exact C that is compiled (--ebpf)

BCC only rewrites map calls (``routes.lookup(&k)``) written in the main source
buffer, not in included headers, so the entry file is compiled as one text
with the project's own ``#include "x.h"`` lines expanded in place (``#line``
markers keep compiler messages pointing at the real files).  That flattened
text is what source_text() returns.

source_text() needs neither root nor BCC.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from .bpfsys import SkBuff, prog_test_run
from .reasons import REASONS

BPF_DIR = Path(__file__).resolve().parent.parent / "kernel_bpf"
ENTRY = "tc_ingress.c"
PROG_NAME = "lm_tc_ingress"
ETH_ZLEN = 60  # BPF_PROG_TEST_RUN wants at least an Ethernet frame
COMMON_H = BPF_DIR / "common.h"

# Table-size macros of common.h that the loader may override.
SIZE_MACROS = ("LM_MAX_ROUTES", "LM_MAX_NEIGHBORS", "LM_MAX_LINKS", "LM_MAX_FLOWS")

_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
_REASON_RE = re.compile(r'X\(\s*([A-Z0-9_]+)\s*,\s*(\d+)\s*,\s*"((?:[^"\\]|\\.)*)"\s*\)')


class DatapathError(RuntimeError):
    """The datapath could not be compiled or loaded; the message says why."""


def _flatten(path: Path, seen: set, out: List[str]) -> None:
    out.append(f'#line 1 "{path}"')
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        m = _INCLUDE_RE.match(line)
        if not m:
            out.append(line)
            continue
        inc = (path.parent / m.group(1)).resolve()
        if not inc.is_file():
            inc = (BPF_DIR / m.group(1)).resolve()
        if not inc.is_file():
            raise DatapathError(f"{path}:{lineno}: included file {m.group(1)!r} not found")
        if inc in seen:  # every header has include guards: once is enough
            out.append("")
            continue
        seen.add(inc)
        _flatten(inc, seen, out)
        out.append(f'#line {lineno + 1} "{path}"')


def source_text(entry: os.PathLike | str = BPF_DIR / ENTRY) -> str:
    """The C text handed to BCC: the entry file with the project's own
    quoted includes expanded once each, in place.  System includes (<...>)
    stay for BCC to resolve against the kernel headers."""
    out: List[str] = []
    entry = Path(entry).resolve()
    _flatten(entry, {entry}, out)
    return "\n".join(out) + "\n"


def _size_cflags(sizes: Optional[Mapping[str, int]]) -> List[str]:
    flags = []
    for name, value in (sizes or {}).items():
        if name not in SIZE_MACROS:
            raise DatapathError(f"unknown table size {name!r}; known: {', '.join(SIZE_MACROS)}")
        if int(value) <= 0:
            raise DatapathError(f"table size {name} must be positive, got {value!r}")
        flags.append(f"-D{name}={int(value)}")
    return flags


def _captured(call):
    """Run call() with fd 2 (where libbcc/clang print compile errors and the
    verifier log) collected; returns (result, None) or (None, (exc, text)).
    On success whatever was written (warnings, other threads' output) is
    passed on to the real stderr."""
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            result, failure = call(), None
        except Exception as e:
            result, failure = None, e
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    if failure is not None:
        return None, (failure, text)
    if text:
        os.write(2, text.encode())
    return result, None


def _tail(text: str, lines: int = 25) -> str:
    text = text.strip()
    if not text:
        return ""
    return "\n" + "\n".join(text.splitlines()[-lines:])


def _headers_hint() -> str:
    build = Path("/lib/modules") / os.uname().release / "build"
    if os.environ.get("BCC_KERNEL_SOURCE") or build.exists():
        return ""
    return (f" (no kernel headers at {build}: run tools/setup, or set BCC_KERNEL_SOURCE)")


class Datapath:
    """The compiled and loaded TC-ingress program plus its maps.

    Datapath(cflags=(), sizes=None): compile kernel_bpf/tc_ingress.c with BCC
    (extra cflags appended; sizes like {"LM_MAX_ROUTES": 1024} become -D
    overrides) and load lm_tc_ingress as BPF_PROG_TYPE_SCHED_CLS.
    Raises DatapathError with the compiler/verifier/kernel cause.
    """

    def __init__(self, cflags: Iterable[str] = (), sizes: Optional[Mapping[str, int]] = None):
        try:
            from bcc import BPF  # Debian's python3-bpfcc, via the venv shim
        except ImportError as e:  # pragma: no cover - depends on the host
            raise DatapathError(f"BCC is not importable ({e}); run tools/setup") from e
        self._BPF = BPF
        self.cflags: List[str] = [f"-I{BPF_DIR}", *_size_cflags(sizes), *cflags]
        self.text = source_text()
        self._bpf, failed = _captured(lambda: BPF(text=self.text.encode(), cflags=self.cflags))
        if failed:
            exc, text = failed
            raise DatapathError(f"compiling {BPF_DIR / ENTRY} failed: {exc}{_headers_hint()}{_tail(text)}") from exc
        self._fn, failed = _captured(lambda: self._bpf.load_func(PROG_NAME.encode(), BPF.SCHED_CLS))
        if not failed:
            self._heartbeat, failed = _captured(lambda: self._bpf.load_func(b"lm_heartbeat", BPF.SCHED_CLS))
        if failed:
            exc, text = failed
            self._bpf.cleanup()
            self._bpf = None
            hint = " (not root: loading BPF needs CAP_BPF and CAP_NET_ADMIN)" if os.geteuid() != 0 else ""
            raise DatapathError(f"loading {PROG_NAME} failed: {exc}{hint}{_tail(text, 40)}") from exc

    def beat(self, ttl_jiffies: int) -> Tuple[int, int]:
        """Run lm_heartbeat: the fast path works for ttl_jiffies more (0:
        off from now).  Returns the (jiffies, ktime ns) it sampled."""
        ctx = SkBuff()
        ctx.cb[0] = ttl_jiffies
        prog_test_run(self._heartbeat.fd, bytes(ETH_ZLEN), ctx)
        hb = self.table("heartbeat")[self.table("heartbeat").Key(0)]
        return hb.jiffies, hb.ktime_ns

    def measure_hz(self, interval: float = 0.1) -> int:
        """The kernel's HZ, from two clock samples (it is not exported)."""
        j0, t0 = self.beat(0)
        time.sleep(interval)
        j1, t1 = self.beat(0)
        hz = (j1 - j0) * 1e9 / (t1 - t0)
        return min((100, 250, 300, 1000), key=lambda h: abs(h - hz))

    @property
    def fd(self) -> int:
        """File descriptor of the loaded lm_tc_ingress program."""
        if self._fn is None:
            raise DatapathError("datapath is closed")
        return self._fn.fd

    @property
    def name(self) -> str:
        return PROG_NAME

    def table(self, name: str):
        """The bcc table object for a map of common.h (routes, neighbors,
        links, config, counters); .Key/.Leaf are its ctypes types."""
        if self._bpf is None:
            raise DatapathError("datapath is closed")
        try:
            return self._bpf.get_table(name.encode() if isinstance(name, str) else name)
        except KeyError as e:
            raise DatapathError(f"no map named {name!r}") from e

    def counters(self) -> Dict[str, Tuple[int, int]]:
        """{reason NAME: (packets, bytes)} summed over CPUs."""
        t = self.table("counters")
        out = {}
        for r in REASONS:
            per_cpu = t.getvalue(t.Key(r.value))
            out[r.name] = (sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu))
        return out

    def close(self) -> None:
        """Release the program and maps (an attached program stays alive in
        the kernel until detached)."""
        if self._bpf is not None:
            self._bpf.cleanup()
        self._bpf = None
        self._fn = None

    def __enter__(self) -> "Datapath":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
