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

import ctypes
import os
import re
import struct
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from . import ifcounters
from .bpfsys import SkBuff, prog_test_run
from .btf import STRUCT, VMLINUX, Btf, BtfError
from .reasons import REASONS
from .routemap import DEFAULT_CAPACITY, RouteTable

BPF_DIR = Path(__file__).resolve().parent.parent / "kernel_bpf"
ENTRY = "tc_ingress.c"
PROG_NAME = "lm_tc_ingress"
ETH_ZLEN = 60  # BPF_PROG_TEST_RUN wants at least an Ethernet frame
COMMON_H = BPF_DIR / "common.h"

# Table-size macros of common.h that the loader may override.
SIZE_MACROS = ("LM_MAX_ROUTES", "LM_MAX_NEIGHBORS", "LM_MAX_LINKS", "LM_MAX_FLOWS", "LM_MAX_FDB", "LM_MAX_IFACE_SLOTS")

# The conntrack kfuncs ct.h calls, each through a placeholder helper number
# (macro, value) that patch_kfunc_calls() turns into a kfunc call.
KFUNCS = {
    "bpf_skb_ct_lookup": ("LM_KF_SKB_CT_LOOKUP", 0x7FF00001),
    "bpf_ct_release": ("LM_KF_CT_RELEASE", 0x7FF00002),
    "bpf_ct_change_timeout": ("LM_KF_CT_CHANGE_TIMEOUT", 0x7FF00003),
}

# What ct.h reads, and where: (macro, struct, member path, size in bytes).
NFCT_LAYOUT = (
    ("LM_NFCT_STATUS", "nf_conn", "status", 8),
    ("LM_NFCT_MARK", "nf_conn", "mark", 4),
    ("LM_NFCT_EXT", "nf_conn", "ext", 8),
    ("LM_NFCT_O_SRC_IP", "nf_conn", "tuplehash[0].tuple.src.u3.ip", 4),
    ("LM_NFCT_O_SRC_PORT", "nf_conn", "tuplehash[0].tuple.src.u.all", 2),
    ("LM_NFCT_O_DST_IP", "nf_conn", "tuplehash[0].tuple.dst.u3.ip", 4),
    ("LM_NFCT_O_DST_PORT", "nf_conn", "tuplehash[0].tuple.dst.u.all", 2),
    ("LM_NFCT_R_SRC_IP", "nf_conn", "tuplehash[1].tuple.src.u3.ip", 4),
    ("LM_NFCT_R_SRC_PORT", "nf_conn", "tuplehash[1].tuple.src.u.all", 2),
    ("LM_NFCT_R_DST_IP", "nf_conn", "tuplehash[1].tuple.dst.u3.ip", 4),
    ("LM_NFCT_R_DST_PORT", "nf_conn", "tuplehash[1].tuple.dst.u.all", 2),
    ("LM_NFCT_TCP_STATE", "nf_conn", "proto.tcp.state", 1),
    ("LM_NFCT_TCP_FLAGS0", "nf_conn", "proto.tcp.seen[0].flags", 1),
    ("LM_NFCT_TCP_FLAGS1", "nf_conn", "proto.tcp.seen[1].flags", 1),
    ("LM_NFCT_TCP_RETRANS", "nf_conn", "proto.tcp.retrans", 1),
    ("LM_NFCT_UDP_STREAM_TS", "nf_conn", "proto.udp.stream_ts", 8),
    ("LM_CT_EXT_OFFSET", "nf_ct_ext", "offset[0]", 1),
)
# struct lm_ct_opts in ct.h must match the kernel's struct bpf_ct_opts.
CT_OPTS_LAYOUT = (("netns_id", 0, 4), ("error", 4, 4), ("l4proto", 8, 1), ("dir", 9, 1))
CT_OPTS_MAX = 16  # sizeof(struct lm_ct_opts)
# Conntrack extensions whose presence makes a flow punt (enum nf_ct_ext_id;
# a kernel built without one cannot have it, so a missing value is skipped).
CT_EXT_PUNT = ("HELPER", "ACCT", "TIMEOUT", "SYNPROXY")
NF_CONNTRACK_MODULE_BTF = VMLINUX.parent / "nf_conntrack"

BPF_CALL = 0x85  # BPF_JMP | BPF_CALL
BPF_PSEUDO_KFUNC_CALL = 2

_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
_REASON_RE = re.compile(r'X\(\s*([A-Z0-9_]+)\s*,\s*(\d+)\s*,\s*"((?:[^"\\]|\\.)*)"\s*\)')


class FlowKey(ctypes.Structure):
    """struct lm_flow_key (common.h): addresses and ports in network order."""

    _fields_ = [("ifindex", ctypes.c_uint32), ("saddr", ctypes.c_uint32), ("daddr", ctypes.c_uint32),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("bridged", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 2)]


class FlowEvent(ctypes.Structure):
    """struct lm_flow_event (common.h): why = LM_FLOW_PENDING or LM_CT_NOT_LIBERAL."""

    _fields_ = [("key", FlowKey), ("oif", ctypes.c_uint32), ("dir", ctypes.c_uint8),
                ("why", ctypes.c_uint8), ("pad", ctypes.c_uint16)]


class DatapathError(RuntimeError):
    """The datapath could not be compiled or loaded; the message says why in
    one line, `detail` holds the compiler's or verifier's own output."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


# Verifier log lines that are statistics, not the cause.
_VERIFIER_STATS = ("processed ", "verification time", "stack depth", "max_states_per_insn", "mark_precise")


def _first_error(text: str) -> str:
    """The line that says what went wrong: the compiler's first error, or
    the verifier's last complaint before its statistics."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for line in lines:
        if "error:" in line:
            return line.rsplit("/", 1)[-1]  # file:line:col: error: ..., without the directory
    complaints = [l for l in lines if not l.startswith(_VERIFIER_STATS) and not l.startswith("HINT")]
    return complaints[-1] if complaints else ""


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


def kernel_cflags(btf: Optional[Btf] = None) -> Tuple[List[str], Dict[int, int]]:
    """The -D macros ct.h needs, from the running kernel's BTF, and the map
    placeholder -> kfunc BTF id for patch_kfunc_calls().  Raises
    DatapathError when the kernel lacks something ct.h relies on."""
    if NF_CONNTRACK_MODULE_BTF.exists():
        raise DatapathError(
            f"nf_conntrack is a kernel module here ({NF_CONNTRACK_MODULE_BTF} exists): its kfuncs "
            "would need a module BTF fd in the program's fd_array, which this loader does not pass; "
            "the stateful fast path needs nf_conntrack built into the kernel")
    try:
        btf = btf or Btf.load()
        ids = {value: btf.func_id(name) for name, (_, value) in KFUNCS.items()}
        flags = [f"-D{macro}={value:#x}" for macro, value in KFUNCS.values()]
        for macro, struct_name, path, size in NFCT_LAYOUT:
            offset, got = btf.member(struct_name, path)
            if got != size:
                raise DatapathError(f"struct {struct_name}.{path} is {got} bytes in this kernel, "
                                    f"the datapath reads {size}")
            flags.append(f"-D{macro}={offset}")
        for name, offset, size in CT_OPTS_LAYOUT:
            if btf.member("bpf_ct_opts", name) != (offset, size):
                raise DatapathError(f"struct bpf_ct_opts.{name} moved in this kernel")
        opts_size = btf.sizeof(btf.type_id(STRUCT, "bpf_ct_opts"))
        if opts_size > CT_OPTS_MAX:
            raise DatapathError(f"struct bpf_ct_opts is {opts_size} bytes here, ct.h knows {CT_OPTS_MAX}")
        flags.append(f"-DLM_CT_OPTS_SIZE={opts_size}")
        for ext in CT_EXT_PUNT:
            try:
                flags.append(f"-DLM_CT_EXT_{ext}={btf.enum_value('nf_ct_ext_id', 'NF_CT_EXT_' + ext)}")
            except BtfError as e:
                if "has no value" not in str(e):
                    raise
                continue
            if ext == "SYNPROXY":
                offset, size = btf.member("nf_conn_synproxy", "tsoff")
                if size != 4:
                    raise DatapathError(f"struct nf_conn_synproxy.tsoff is {size} bytes here, the datapath reads 4")
                flags.append(f"-DLM_SYNPROXY_TSOFF={offset}")
    except (BtfError, OSError) as e:
        raise DatapathError(f"the kernel's BTF lacks what the conntrack stage needs: {e}") from e
    return flags, ids


def patch_kfunc_calls(insns, ids: Mapping[int, int]) -> Dict[int, int]:
    """Turn every `call <placeholder>` in the instruction buffer (writable,
    8-byte BPF instructions) into a kfunc call: src_reg
    BPF_PSEUDO_KFUNC_CALL, imm the function's BTF id.  Returns
    {placeholder: calls patched}.  A placeholder left anywhere else (e.g.
    materialised into a register) raises DatapathError: the kernel would
    reject or, worse, misread it."""
    counts = {p: 0 for p in ids}
    view = memoryview(insns).cast("B")
    for off in range(0, len(view) - 7, 8):
        code, regs, _off16, imm = struct.unpack_from("<BBhI", view, off)
        if imm not in ids:
            continue
        if code != BPF_CALL or regs != 0:
            raise DatapathError(f"kfunc placeholder {imm:#x} in a non-call instruction {off // 8} "
                                f"(code {code:#x}): cannot patch it")
        struct.pack_into("<BBhi", view, off, BPF_CALL, BPF_PSEUDO_KFUNC_CALL << 4, 0, ids[imm])
        counts[imm] += 1
    return counts


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

    def __init__(self, cflags: Iterable[str] = (), sizes: Optional[Mapping[str, int]] = None,
                 entry: os.PathLike | str = BPF_DIR / ENTRY, prog: str = PROG_NAME):
        try:
            from bcc import BPF  # Debian's python3-bpfcc, via the venv shim
        except ImportError as e:  # pragma: no cover - depends on the host
            raise DatapathError(f"BCC is not importable ({e}); run tools/setup") from e
        self._BPF = BPF
        kflags, self._kfunc_ids = kernel_cflags()
        self.cflags: List[str] = [f"-I{BPF_DIR}", *kflags, *_size_cflags(sizes), *cflags]
        self._prog = prog
        self.text = source_text(entry)
        self._bpf, failed = _captured(lambda: BPF(text=self.text.encode(), cflags=self.cflags))
        if failed:
            exc, text = failed
            raise DatapathError(f"compiling {Path(entry).name} failed{_headers_hint()}: {_first_error(text) or exc}",
                                detail=_tail(text)) from exc
        self._fn = self._heartbeat = None
        #: {kfunc name: call instructions patched} in the program
        self.kfunc_calls = self._patch(prog)
        self._fn, failed = _captured(lambda: self._bpf.load_func(prog.encode(), BPF.SCHED_CLS))
        if not failed and "int lm_heartbeat(" in self.text:
            self._patch("lm_heartbeat")
            self._heartbeat, failed = _captured(lambda: self._bpf.load_func(b"lm_heartbeat", BPF.SCHED_CLS))
        if failed:
            exc, text = failed
            self._bpf.cleanup()
            self._bpf = None
            hint = " (not root: loading BPF needs CAP_BPF and CAP_NET_ADMIN)" if os.geteuid() != 0 else ""
            raise DatapathError(f"loading {prog} failed: {exc}{hint}: {_first_error(text)}",
                                detail=_tail(text, int(os.environ.get('LM_VERIFIER_LINES', 40)))) from exc
        #: the route trie behind the `routes` slot (mirror/routemap.py)
        self.routes = RouteTable(self._bpf.get_table(b"routes").map_fd,
                                 int((sizes or {}).get("LM_MAX_ROUTES", DEFAULT_CAPACITY)))

    def _patch(self, func: str) -> Dict[str, int]:
        """Patch the kfunc placeholders of one compiled function in BCC's
        instruction buffer, before load_func() hands it to the kernel."""
        from bcc import libbcc

        lib, name = libbcc.lib, func.encode()
        start, size = lib.bpf_function_start(self._bpf.module, name), lib.bpf_function_size(self._bpf.module, name)
        if not start:
            raise DatapathError(f"no compiled function {func!r}")
        counts = patch_kfunc_calls((ctypes.c_uint8 * size).from_address(start), self._kfunc_ids)
        return {kf: counts[value] for kf, (_, value) in KFUNCS.items()}

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
        return self._prog

    def table(self, name: str):
        """The bcc table object for a map of common.h (neighbors, links,
        config, counters; for routes the RouteTable behind the slot);
        .Key/.Leaf are its ctypes types."""
        if self._bpf is None:
            raise DatapathError("datapath is closed")
        if name == "routes":
            return self.routes
        try:
            return self._bpf.get_table(name.encode() if isinstance(name, str) else name)
        except KeyError as e:
            raise DatapathError(f"no map named {name!r}") from e

    def open_flow_events(self, callback: Callable[[FlowEvent], None]) -> None:
        """Deliver every struct lm_flow_event the datapath sends (stateful
        mode: flows waiting for a verdict or for BE_LIBERAL) to
        callback(FlowEvent), from poll_flow_events()."""
        def on_event(_ctx, data, size):
            callback(FlowEvent.from_buffer_copy(ctypes.string_at(data, min(size, ctypes.sizeof(FlowEvent)))))
            return 0

        # libbcc calls back through the table object: it must stay alive.
        self._flow_events = self.table("flow_events")
        self._flow_events.open_ring_buffer(on_event)

    def poll_flow_events(self, timeout_ms: int = 0) -> None:
        """Run the callback for queued events, waiting up to timeout_ms
        (-1: until one arrives; 0: only what is queued)."""
        if self._bpf is None:
            raise DatapathError("datapath is closed")
        self._bpf.ring_buffer_poll(timeout_ms)

    @property
    def counter_slots(self) -> int:
        """Per-interface slots of the counters map (LM_MAX_IFACE_SLOTS)."""
        return self.table("counters").max_entries // len(REASONS)

    def counter_rows(self, nslots: Optional[int] = None) -> ifcounters.Rows:
        """[slot][reason value] -> (packets, bytes) summed over CPUs, for
        slots 0..nslots-1 (default: all), in one syscall."""
        nslots = min(nslots or self.counter_slots, self.counter_slots)
        return ifcounters.read_rows(self.table("counters"), 0, nslots)

    def counters(self) -> Dict[str, Tuple[int, int]]:
        """{reason NAME: (packets, bytes)} summed over CPUs and interfaces."""
        return ifcounters.totals(self.counter_rows())

    def close(self) -> None:
        """Release the program and maps (an attached program stays alive in
        the kernel until detached)."""
        if self._bpf is not None:
            self.routes.close()
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
