"""Integration tests for mirror.netfilter: the watcher runs inside a fresh network
namespace (``ip netns exec NS python -m mirror.netfilter --watch``) and the test
changes that namespace's firewall with iptables-nft, iptables-legacy and nft,
measuring the time from the command returning to the watcher's callback.

Needs root and ``ip netns``; never touches the root namespace's firewall.
Run with ``-s`` to see the measured latencies.
"""

import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid

import pytest

from mirror.netfilter import NetfilterState, NetfilterWatcher

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
PY = sys.executable
POLL = 1.0                 # watcher poll interval in these tests
NFT_TARGET = 0.100         # s: end-to-end target for nft-backend changes
ROUNDS = 5

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 (creates a network namespace)")


def _tool(name):
    return pytest.mark.skipif(shutil.which(name) is None, reason=f"{name} not installed")


@pytest.fixture
def netns():
    name = "lmnf-" + uuid.uuid4().hex[:10]
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        r = _runners.pop(name, None)
        if r is not None:
            r.stdin.close()
            try:
                r.wait(5)
            except subprocess.TimeoutExpired:
                r.kill()
                r.wait()
        subprocess.run(["ip", "netns", "del", name], check=False)


# A small process inside the namespace that runs commands and reports
# time.monotonic() (system-wide, same clock as the watcher's) right after each
# returned, so the measured latency does not include `ip netns exec` overhead.
_RUNNER = r"""
import json, subprocess, sys, time
for line in sys.stdin:
    p = subprocess.run(json.loads(line), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t = time.monotonic()
    print(json.dumps([p.returncode, p.stderr, t]), flush=True)
"""
_runners = {}


def ns_run(ns, *cmd):
    """Run a command in the namespace; return time.monotonic() right after it returned."""
    r = _runners.get(ns)
    if r is None or r.poll() is not None:
        r = _runners[ns] = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-u", "-c", _RUNNER],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    r.stdin.write(json.dumps(list(cmd)) + "\n")
    r.stdin.flush()
    rc, err, t = json.loads(r.stdout.readline())
    if rc != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({rc}): {err}")
    return t


class WatchProc:
    """``python -m mirror.netfilter --watch`` in a namespace; one JSON event per change."""

    def __init__(self, ns, poll=POLL):
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PY, "-m", "mirror.netfilter", "--watch", "--poll", str(poll)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events = queue.Queue()
        self.all = []
        self.stderr = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True).start()

    def _pump(self, f, is_out):
        for line in f:
            if is_out:
                ev = json.loads(line)
                self.all.append(ev)
                self.events.put(ev)
            else:
                self.stderr.append(line)

    def wait(self, pred, timeout, what=""):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no event {what} within {timeout}s; events: {self.all[-5:]}; "
                                     f"stderr: {''.join(self.stderr)[-2000:]}")
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if pred(ev):
                return ev

    def drain(self):
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def watch(netns):
    w = WatchProc(netns)
    try:
        first = w.wait(lambda e: True, 15, "initial state")
        w.first = first
        yield w
    finally:
        w.close()


def _flip(watch, ns, add, delete, expect, timeout):
    """Run add/delete ROUNDS times; return (on-latencies, off-latencies)."""
    on, off = [], []
    for _ in range(ROUNDS):
        t = ns_run(ns, *add)
        ev = watch.wait(lambda e: e["forward_impact"] and expect in e["forward_impact"], timeout,
                        f"with {expect!r} after {' '.join(add)}")
        on.append(ev["t"] - t)
        t = ns_run(ns, *delete)
        ev = watch.wait(lambda e: e["forward_impact"] is None, timeout, f"clean after {' '.join(delete)}")
        off.append(ev["t"] - t)
    return on, off


def _fmt(name, xs):
    ms = sorted(x * 1000 for x in xs)
    return (f"{name}: min {ms[0]:.1f} ms, median {statistics.median(ms):.1f} ms, "
            f"max {ms[-1]:.1f} ms over {len(ms)}")


@needs_root
def test_initial_state_is_clean(watch):
    assert watch.first["forward_impact"] is None, watch.first
    assert watch.first["errors"] == []
    assert "nfnetlink" in watch.first["sources"]
    assert any(s.startswith("inotify:") for s in watch.first["sources"])


@needs_root
@_tool("iptables-nft")
def test_iptables_nft_forward_rule_flips_fast(watch, netns):
    on, off = _flip(watch, netns,
                    ["iptables-nft", "-A", "FORWARD", "-s", "10.9.0.0/16", "-j", "DROP"],
                    ["iptables-nft", "-D", "FORWARD", "-s", "10.9.0.0/16", "-j", "DROP"],
                    "iptables-nft: filter FORWARD: 1 rule", timeout=POLL * 3)
    print("\n" + _fmt("iptables-nft add->callback", on) + "\n" + _fmt("iptables-nft del->callback", off))
    lat = on + off
    assert statistics.median(lat) < NFT_TARGET, lat
    assert max(lat) < POLL / 2, lat     # never fell back to the poll
    # the table left behind by iptables-nft (empty chains, ACCEPT) is clean
    ns_run(netns, "iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j", "MASQUERADE")
    watch.wait(lambda e: e["forward_impact"] and "nat POSTROUTING: 1 rule" in e["forward_impact"],
               POLL * 3, "nat POSTROUTING")
    ns_run(netns, "iptables-nft", "-t", "nat", "-F", "POSTROUTING")
    watch.wait(lambda e: e["forward_impact"] is None, POLL * 3, "clean after nat flush")
    ns_run(netns, "iptables-nft", "-P", "FORWARD", "DROP")
    watch.wait(lambda e: e["forward_impact"] and "filter FORWARD: policy DROP" in e["forward_impact"],
               POLL * 3, "policy DROP")


@needs_root
@_tool("iptables-legacy")
def test_iptables_legacy_forward_rule_flips(watch, netns):
    on, off = _flip(watch, netns,
                    ["iptables-legacy", "-A", "FORWARD", "-d", "10.9.9.9", "-j", "ACCEPT"],
                    ["iptables-legacy", "-D", "FORWARD", "-d", "10.9.9.9", "-j", "ACCEPT"],
                    "iptables-legacy: filter FORWARD: 1 rule", timeout=POLL + 1.0)
    print("\n" + _fmt("iptables-legacy add->callback", on) + "\n" + _fmt("iptables-legacy del->callback", off))
    assert max(on + off) < POLL + 0.5


@needs_root
@_tool("nft")
def test_native_nft_forward_chain_flips(watch, netns):
    ns_run(netns, "nft", "add", "table", "inet", "x")
    ns_run(netns, "nft", "add", "chain", "inet", "x", "fw",
           "{ type filter hook forward priority 0; policy accept; }")
    t = ns_run(netns, "nft", "add", "rule", "inet", "x", "fw", "ip", "daddr", "10.9.9.9", "drop")
    ev = watch.wait(lambda e: e["forward_impact"] and "nft inet x fw (hook forward): 1 rule"
                    in e["forward_impact"], POLL * 3, "native nft forward rule")
    lat_on = ev["t"] - t
    t = ns_run(netns, "nft", "delete", "table", "inet", "x")
    ev = watch.wait(lambda e: e["forward_impact"] is None, POLL * 3, "clean after delete table")
    print(f"\nnative nft add rule->callback {lat_on * 1000:.1f} ms, "
          f"delete table->callback {(ev['t'] - t) * 1000:.1f} ms")
    assert max(lat_on, ev["t"] - t) < POLL / 2
    # input-only native chain: no impact; bridge forward chain: no impact
    ns_run(netns, "nft", "add table inet y; add chain inet y inp { type filter hook input priority 0; policy drop; };"
           " add rule inet y inp tcp dport 22 accept;"
           " add table bridge b; add chain bridge b f { type filter hook forward priority 0; };"
           " add rule bridge b f drop")
    ev = watch.wait(lambda e: e["nft_objects"] and e["nft_objects"] >= 6, POLL * 3, "input-only tables")
    assert ev["forward_impact"] is None, ev


@needs_root
@_tool("nft")
def test_iptables_nft_table_made_incompatible_by_nft_punts(watch, netns):
    ns_run(netns, "iptables-nft", "-A", "INPUT", "-j", "ACCEPT")
    watch.wait(lambda e: e["counts"]["iptables-nft"][2] == 1, POLL * 3, "INPUT rule")
    # a native base chain in iptables-nft's table: iptables-nft-save can no longer show it
    ns_run(netns, "nft", "add", "chain", "ip", "filter", "POSTROUTING",
           "{ type filter hook postrouting priority 0; policy drop; }")
    ev = watch.wait(lambda e: e["forward_impact"] is not None, POLL * 3, "incompatible table")
    assert "incompatible" in ev["forward_impact"]
    assert "nft ip filter POSTROUTING (hook postrouting): policy drop" in ev["forward_impact"]


@needs_root
def test_no_callbacks_while_idle_and_counters_ignored(watch, netns):
    ns_run(netns, "iptables-nft", "-A", "INPUT", "-j", "ACCEPT")
    ns_run(netns, "iptables-legacy", "-A", "INPUT", "-j", "ACCEPT")
    watch.wait(lambda e: e["counts"]["iptables-legacy"] and e["counts"]["iptables-legacy"][2] == 1,
               POLL * 3, "both INPUT rules")
    time.sleep(0.2)
    watch.drain()
    # traffic moves the INPUT counters; polls and our own reads must not report anything
    ns_run(netns, "ip", "link", "set", "lo", "up")
    ns_run(netns, "ping", "-c", "3", "-i", "0.2", "-q", "127.0.0.1")
    time.sleep(POLL * 2.5)
    assert watch.drain() == []


@needs_root
def test_missing_or_failing_tool_means_unknown(netns):
    code = (
        "import json, mirror.netfilter as n\n"
        "n.SAVE_COMMANDS['iptables-legacy'] = ('iptables-legacy-save-does-not-exist',)\n"
        "s = n.read_state(); print(json.dumps([s.forward_impact, s.errors]))\n"
        "n.SAVE_COMMANDS['iptables-legacy'] = ('false',)\n"
        "s = n.read_state(); print(json.dumps([s.forward_impact, s.errors]))\n"
    )
    out = subprocess.run(["ip", "netns", "exec", netns, PY, "-c", code], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    missing, failing = (json.loads(l) for l in out)
    assert missing[0] and "unknown" in missing[0] and "not found" in missing[1][0], missing
    assert failing[0] and "exit status 1" in failing[1][0], failing


@needs_root
@_tool("iptables-legacy")
def test_watcher_never_blocks_legacy_commands(netns):
    """Polling every 10 ms, the watcher must not hold the xtables lock: legacy
    commands without -w (which fail at once if the lock is held) all succeed."""
    w = WatchProc(netns, poll=0.01)
    try:
        w.wait(lambda e: True, 15, "initial state")
        for i in range(30):
            ns_run(netns, "iptables-legacy", "-A", "INPUT", "-s", f"10.0.0.{i}", "-j", "ACCEPT")
        w.wait(lambda e: e["counts"]["iptables-legacy"][2] == 30, 5, "30 legacy rules")
    finally:
        w.close()


# --------------------------------------------------------------------------- watcher logic
# (no root needed: fake reader)

def test_watcher_calls_back_only_on_content_change():
    from mirror.iptables import parse_save

    def state(text, impact=None):
        return NetfilterState(rulesets={"iptables-nft": parse_save(text)}, forward_impact=impact)

    base = "*filter\n:INPUT ACCEPT [%d:0]\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"
    seq = [state(base % 1), state(base % 2), state(base % 3),          # counters only
           state(base % 3 + "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"),  # content
           state(base % 4 + "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n")]
    calls = []
    idx = {"i": 0}

    def reader(**kw):
        i = min(idx["i"], len(seq) - 1)
        idx["i"] += 1
        return seq[i]

    w = NetfilterWatcher(calls.append, poll_interval=0.01, reader=reader, lock_path="/nonexistent/x.lock")
    with w:
        deadline = time.monotonic() + 5
        while idx["i"] < len(seq) + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [len(c.rulesets["iptables-nft"].tables) for c in calls] == [1, 2]
    assert w.stats["reads"] >= len(seq)


def test_watcher_survives_reader_and_callback_errors():
    n = {"reads": 0}

    def reader(**kw):
        n["reads"] += 1
        if n["reads"] == 2:
            raise RuntimeError("boom")
        return NetfilterState()

    got = []

    def cb(s):
        got.append(s)
        raise ValueError("callback bug")

    with NetfilterWatcher(cb, poll_interval=0.01, reader=reader, lock_path="/nonexistent/x.lock"):
        deadline = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert got[0].forward_impact is None
    assert got[1].forward_impact.startswith("unknown (read failed: boom")   # failure -> punt
    assert got[2].forward_impact is None


@needs_root
@_tool("nft")
def test_table_list_fallback_matches_nft(netns):
    """Without the nft tool, read_state lists nf_tables tables over netlink itself."""
    ns_run(netns, "nft", "add table inet x; add table netdev d; add table bridge b")
    ns_run(netns, "iptables-nft", "-A", "FORWARD", "-j", "ACCEPT")
    code = (
        "import json, mirror.netfilter as n\n"
        "print(json.dumps(sorted(n.nft_tables_via_netlink())))\n"
        "n._which = lambda name, _w=n._which: None if name == 'nft' else _w(name)\n"
        "s = n.read_state(); print(json.dumps([s.forward_impact, s.errors, s.nft]))\n"
    )
    out = subprocess.run(["ip", "netns", "exec", netns, PY, "-c", code], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert json.loads(out[0]) == [["bridge", "b"], ["inet", "x"], ["ip", "filter"], ["netdev", "d"]]
    impact, errors, nft = json.loads(out[1])
    assert errors == ["nft not installed and native nftables tables present: inet x, netdev d"]
    assert "iptables-nft: filter FORWARD: 1 rule" in impact and "unknown (nft not installed" in impact
    assert nft is None
