#!/usr/bin/env python3
"""Network-namespace topologies for loxi-mirror's tests, demo and bench.

Stdlib only. Everything is created inside namespaces this module creates
(veth ends are created directly in their namespaces, never in the root one);
nothing in the root namespace (interfaces, routes, firewall) is touched, and
all traffic goes to addresses inside these namespaces.

    RoutedTopology(prefix)   pod1 ── node ── pod2   (node routes, ip_forward=1)
        pod1 eth0  10.1.0.2/24 via 10.1.0.1
        node veth1 10.1.0.1/24 | veth2 10.2.0.1/24
        pod2 eth0  10.2.0.2/24 via 10.2.0.1
    DirectPair(prefix)       pod1 ── pod2           (the wire: no node at all)
        same pod addresses, each pod reaching the other's /24 on-link.
    BridgedTopology(prefix, bridges=1|2, pods=4)   pods on Linux bridges in the node
        (one bridge: switched; two bridges: routed by the node between them).
    Agent(topo)              `loxi-mirror start` in the node namespace, by PID.

Usage:
    with RoutedTopology("lm") as t:          # namespaces lm-<6 hex>-{pod1,node,pod2}
        t.run("pod1", ["ping", "-c1", t.pod2_ip])
        with Agent(t) as a:                   # waits for "ready": true
            ...; a.status()["counters"]
    # namespaces and every process started through t are gone here, even on error

CLI (manual debugging):
    tools/topology.py up [--prefix P] [--direct] [--no-offload]   # build, print names, keep
    tools/topology.py down PREFIX                                 # delete P-pod1/-node/-pod2
"""

import atexit
import contextlib
import ctypes
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

__all__ = [
    "CommandError", "Netns", "RoutedTopology", "DirectPair", "BridgedTopology", "Agent", "AgentError",
    "unique_prefix", "netns_exists", "agent_available", "have_root_and_netns",
    "fast_path_fraction", "in_netns",
]

POD1_IP, POD2_IP = "10.1.0.2", "10.2.0.2"
GW1_IP, GW2_IP = "10.1.0.1", "10.2.0.1"
NET1, NET2 = "10.1.0.0/24", "10.2.0.0/24"
# Deterministic, locally administered MACs (02:...), one per interface.
MAC_POD1 = "02:00:0a:01:00:02"
MAC_NODE1 = "02:00:0a:01:00:01"
MAC_NODE2 = "02:00:0a:02:00:01"
MAC_POD2 = "02:00:0a:02:00:02"


class CommandError(subprocess.CalledProcessError):
    """CalledProcessError whose str() includes the namespace and stderr."""

    def __init__(self, ns, cp):
        super().__init__(cp.returncode, cp.args, cp.stdout, cp.stderr)
        self.ns = ns

    def __str__(self):
        cmd = self.cmd if isinstance(self.cmd, str) else shlex.join(map(str, self.cmd))
        err = self.stderr if isinstance(self.stderr, str) else (self.stderr or b"").decode(errors="replace")
        where = f"[netns {self.ns}] " if self.ns else ""
        return f"{where}{cmd!r} exited {self.returncode}: {err.strip()[-2000:]}"


def _argv(cmd):
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _host(cmd, check=True, timeout=30):
    cp = subprocess.run(_argv(cmd), capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise CommandError(None, cp)
    return cp


def netns_exists(name):
    return os.path.exists(os.path.join("/run/netns", name))


def unique_prefix(prefix="lm"):
    """prefix + '-' + 6 random hex digits, not used by any existing namespace."""
    while True:
        p = f"{prefix}-{secrets.token_hex(3)}"
        if not any(n.startswith(p + "-") for n in _list_netns()):
            return p


def _list_netns():
    try:
        return os.listdir("/run/netns")
    except FileNotFoundError:
        return []


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd):
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name):
    """Run the block with this thread in namespace `name` (sockets created
    there stay there; /proc/sys/net is that namespace's), then return."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        fd = os.open(os.path.join("/run/netns", name), os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def have_root_and_netns():
    """(ok, reason): root, `ip` present and `ip netns` usable."""
    if os.geteuid() != 0:
        return False, "needs root"
    if not shutil.which("ip"):
        return False, "needs iproute2 (ip)"
    cp = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if cp.returncode != 0:
        return False, f"`ip netns` unusable: {cp.stderr.strip()}"
    return True, ""


def agent_available():
    """True when `loxi-mirror` is on PATH and its CLI loads."""
    exe = shutil.which("loxi-mirror")
    if not exe:
        return False
    try:
        cp = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return cp.returncode == 0


def _kill_pid(proc, grace=3.0):
    """SIGTERM then SIGKILL one Popen we started (by its PID only)."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    except ProcessLookupError:
        pass


class Netns:
    """A set of namespaces owned by this object. Subclasses define ROLES and _build().

    Roles ("pod1", "node", ...) map to namespace names "<prefix>-<role>".
    run()/popen() accept a role or a full namespace name.
    """

    ROLES = ()

    def __init__(self, prefix="lm", unique=True, offload=True, ipv6=True):
        self.prefix = unique_prefix(prefix) if unique else prefix
        self.offload = offload      # False: pods' TSO/GSO/GRO off (MTU-sized packets)
        self.ipv6 = ipv6            # False: IPv6 disabled in every namespace (less noise)
        self.ns = {r: f"{self.prefix}-{r}" for r in self.ROLES}
        self._created = []
        self._procs = []
        self._up = False

    # ---- lifecycle -------------------------------------------------------
    def up(self):
        if self._up:
            return self
        atexit.register(self.down)
        try:
            for role in self.ROLES:
                name = self.ns[role]
                if netns_exists(name):
                    raise RuntimeError(f"namespace {name} already exists; refusing to reuse it")
                _host(["ip", "netns", "add", name])
                self._created.append(name)
                self.run(role, ["ip", "link", "set", "lo", "up"])
                if not self.ipv6:
                    self.sysctl(role, "net.ipv6.conf.all.disable_ipv6", 1)
                    self.sysctl(role, "net.ipv6.conf.default.disable_ipv6", 1)
            self._build()
            self._up = True
        except BaseException:
            self.down()
            raise
        return self

    def down(self):
        """Kill processes we started, then delete our namespaces. Idempotent."""
        for p in reversed(self._procs):
            _kill_pid(p)
        self._procs.clear()
        for name in reversed(self._created):
            if not netns_exists(name):
                continue
            # Anything still running inside a namespace we created was started
            # by us (e.g. a daemonised server); end it by PID so the namespace
            # really goes away.
            cp = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
            for pid in cp.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._created.clear()
        self._up = False
        try:
            atexit.unregister(self.down)
        except Exception:
            pass

    close = down

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down()
        return False

    # ---- running things --------------------------------------------------
    def nsname(self, ns):
        return self.ns.get(ns, ns)

    def run(self, ns, cmd, check=True, timeout=60, capture=True, **kw):
        """subprocess.run(cmd) inside namespace `ns` (role or name); text mode.

        check=True raises CommandError (with stderr) on a non-zero exit.
        """
        argv = ["ip", "netns", "exec", self.nsname(ns)] + _argv(cmd)
        if capture:
            kw.setdefault("stdout", subprocess.PIPE)
            kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        cp = subprocess.run(argv, timeout=timeout, **kw)
        if check and cp.returncode != 0:
            raise CommandError(self.nsname(ns), cp)
        return cp

    def popen(self, ns, cmd, **kw):
        """Popen(cmd) inside namespace `ns`. `ip netns exec` execs the command,
        so proc.pid is the command itself. Tracked: killed (by PID) in down()."""
        argv = ["ip", "netns", "exec", self.nsname(ns)] + _argv(cmd)
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(argv, **kw)
        self._procs.append(p)
        return p

    def kill(self, proc, grace=3.0):
        """Stop a process from popen() (SIGTERM, then SIGKILL) and forget it."""
        _kill_pid(proc, grace)
        if proc in self._procs:
            self._procs.remove(proc)

    def sysctl(self, ns, key, value):
        self.run(ns, ["sysctl", "-qw", f"{key}={value}"])

    def wait_listen(self, ns, port, proto="tcp", timeout=10.0, proc=None):
        """Wait until something listens on `port` in `ns` (via ss)."""
        flag = "-Hltn" if proto == "tcp" else "-Hlun"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}) before listening on {port}")
            out = self.run(ns, ["ss", flag, f"sport = :{port}"], check=False).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise TimeoutError(f"nothing listening on {proto}/{port} in {self.nsname(ns)} after {timeout}s")

    # ---- helpers for _build ---------------------------------------------
    def _veth(self, ns_a, if_a, mac_a, ns_b, if_b, mac_b):
        """A veth pair created directly inside ns_a/ns_b (never the root netns)."""
        self.run(ns_a, ["ip", "link", "add", if_a, "address", mac_a, "type", "veth",
                        "peer", "name", if_b, "address", mac_b, "netns", self.nsname(ns_b)])

    def _addr_up(self, ns, ifname, cidr):
        self.run(ns, ["ip", "addr", "add", cidr, "dev", ifname])
        self.run(ns, ["ip", "link", "set", ifname, "up"])

    def _no_offload(self, ns, ifname):
        self.run(ns, ["ethtool", "-K", ifname, "tso", "off", "gso", "off", "gro", "off"])

    def _build(self):
        raise NotImplementedError

    def describe(self):
        return {"prefix": self.prefix, "namespaces": dict(self.ns)}

    # Common pod-side properties (both topologies).
    pod1_ip, pod2_ip = POD1_IP, POD2_IP
    pod1_if = pod2_if = "eth0"
    pod1_mac, pod2_mac = MAC_POD1, MAC_POD2

    @property
    def pod1(self):
        return self.ns["pod1"]

    @property
    def pod2(self):
        return self.ns["pod2"]

    @property
    def namespaces(self):
        return [self.ns[r] for r in self.ROLES]


class RoutedTopology(Netns):
    """pod1 ── node ── pod2, the node routing between 10.1.0.0/24 and 10.2.0.0/24.

    Properties: pod1/node/pod2 (namespace names), pod1_ip, pod2_ip, gw1_ip, gw2_ip,
    pod1_if, pod2_if ("eth0"), node_if1 ("veth1", towards pod1), node_if2 ("veth2"),
    *_mac. offload=False turns TSO/GSO/GRO off on the pods' eth0.
    """

    ROLES = ("pod1", "node", "pod2")
    gw1_ip, gw2_ip = GW1_IP, GW2_IP
    node_if1, node_if2 = "veth1", "veth2"
    node_mac1, node_mac2 = MAC_NODE1, MAC_NODE2

    @property
    def node(self):
        return self.ns["node"]

    def _build(self):
        self._veth("pod1", "eth0", MAC_POD1, "node", self.node_if1, MAC_NODE1)
        self._veth("pod2", "eth0", MAC_POD2, "node", self.node_if2, MAC_NODE2)
        self.sysctl("node", "net.ipv4.ip_forward", 1)
        self._addr_up("node", self.node_if1, f"{GW1_IP}/24")
        self._addr_up("node", self.node_if2, f"{GW2_IP}/24")
        self._addr_up("pod1", "eth0", f"{POD1_IP}/24")
        self._addr_up("pod2", "eth0", f"{POD2_IP}/24")
        self.run("pod1", ["ip", "route", "add", "default", "via", GW1_IP, "dev", "eth0"])
        self.run("pod2", ["ip", "route", "add", "default", "via", GW2_IP, "dev", "eth0"])
        if not self.offload:
            self._no_offload("pod1", "eth0")
            self._no_offload("pod2", "eth0")

    def describe(self):
        d = super().describe()
        d.update(pod1=f"{POD1_IP}/24 via {GW1_IP}", node=f"{self.node_if1} {GW1_IP}/24, "
                 f"{self.node_if2} {GW2_IP}/24, ip_forward=1", pod2=f"{POD2_IP}/24 via {GW2_IP}")
        return d


class DirectPair(Netns):
    """pod1 ── pod2 over one veth pair, same pod addresses, no node: the ceiling."""

    ROLES = ("pod1", "pod2")

    def _build(self):
        self._veth("pod1", "eth0", MAC_POD1, "pod2", "eth0", MAC_POD2)
        self._addr_up("pod1", "eth0", f"{POD1_IP}/24")
        self._addr_up("pod2", "eth0", f"{POD2_IP}/24")
        self.run("pod1", ["ip", "route", "add", NET2, "dev", "eth0", "scope", "link"])
        self.run("pod2", ["ip", "route", "add", NET1, "dev", "eth0", "scope", "link"])
        if not self.offload:
            self._no_offload("pod1", "eth0")
            self._no_offload("pod2", "eth0")


class BridgedTopology(Netns):
    """Pods attached by veth to Linux bridges in the node, as docker0/cni0 do.

    bridges=1: pod1..podN all on br1 (10.1.0.0/24, gateway br1 10.1.0.1):
        pod1 -> pod2 is switched by the bridge.
    bridges=2: odd pods on br1 (10.1.0.0/24), even pods on br2 (10.2.0.0/24),
        the node routes between them (ip_forward=1): pod1 -> pod2 is routed.
    Pod k: eth0 = 10.<b>.0.<10+k>/24, MAC 02:00:0a:0<b>:00:<k>, default route
    via its bridge; its node-side veth is "vp<k>" (MAC 02:00:0b:0<b>:00:<k>).
    Bridges get fixed MACs (02:00:0c:0<b>:00:00), as an address-holding
    bridge keeps its MAC whatever ports come and go.
    """

    def __init__(self, prefix="lm", bridges=1, pods=4, **kw):
        self.bridges = bridges
        self.npods = pods
        self.ROLES = ("node",) + tuple(f"pod{k}" for k in range(1, pods + 1))
        super().__init__(prefix, **kw)

    @property
    def node(self):
        return self.ns["node"]

    def bridge_of(self, k):
        return 1 if self.bridges == 1 else 2 - k % 2

    def bridge_name(self, b):
        return f"br{b}"

    def bridge_mac(self, b):
        return f"02:00:0c:0{b}:00:00"

    def gw_ip(self, b):
        return f"10.{b}.0.1"

    def pod_ip(self, k):
        return f"10.{self.bridge_of(k)}.0.{10 + k}"

    def pod_mac(self, k):
        return f"02:00:0a:0{self.bridge_of(k)}:00:{k:02x}"

    def port_name(self, k):
        return f"vp{k}"

    def port_mac(self, k):
        return f"02:00:0b:0{self.bridge_of(k)}:00:{k:02x}"

    # The Netns pod1/pod2 properties the bench and tests share.
    pod1_ip = property(lambda self: self.pod_ip(1))
    pod2_ip = property(lambda self: self.pod_ip(2))
    pod1_mac = property(lambda self: self.pod_mac(1))
    pod2_mac = property(lambda self: self.pod_mac(2))

    def _build(self):
        for b in range(1, self.bridges + 1):
            br = self.bridge_name(b)
            self.run("node", ["ip", "link", "add", br, "address", self.bridge_mac(b), "type", "bridge"])
            self._addr_up("node", br, f"{self.gw_ip(b)}/24")
        if self.bridges > 1:
            self.sysctl("node", "net.ipv4.ip_forward", 1)
        for k in range(1, self.npods + 1):
            pod, b = f"pod{k}", self.bridge_of(k)
            self._veth(pod, "eth0", self.pod_mac(k), "node", self.port_name(k), self.port_mac(k))
            self.run("node", ["ip", "link", "set", self.port_name(k), "master", self.bridge_name(b)])
            self.run("node", ["ip", "link", "set", self.port_name(k), "up"])
            self._addr_up(pod, "eth0", f"{self.pod_ip(k)}/24")
            self.run(pod, ["ip", "route", "add", "default", "via", self.gw_ip(b), "dev", "eth0"])
            if not self.offload:
                self._no_offload(pod, "eth0")

    def describe(self):
        d = super().describe()
        d.update({f"pod{k}": f"{self.pod_ip(k)}/24 on {self.bridge_name(self.bridge_of(k))} via "
                  f"{self.port_name(k)}" for k in range(1, self.npods + 1)})
        return d


class AgentError(RuntimeError):
    pass


class Agent:
    """`ip netns exec NODE loxi-mirror start [args]` in the background, by PID.

    start() waits for status --json "ready": true (AgentError with the log tail
    if it exits or times out). stop(use_cli=True) runs `loxi-mirror stop` in the
    namespace first, then SIGTERM, then SIGKILL on the PID we started.
    The agent's stdout+stderr go to `log_path` (a temp file by default).
    """

    def __init__(self, topo, ns="node", args=(), log_path=None, exe="loxi-mirror"):
        self.topo = topo
        self.ns = ns
        self.args = list(args)
        self.exe = exe
        self._own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="loxi-mirror-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self.proc = None

    def start(self, timeout=15.0):
        logf = open(self.log_path, "ab")
        try:
            self.proc = self.topo.popen(self.ns, [self.exe, "start"] + self.args,
                                        stdout=logf, stderr=subprocess.STDOUT)
        finally:
            logf.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=15.0):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AgentError(f"loxi-mirror start exited with {self.proc.returncode} "
                                 f"before ready; log:\n{self.log_tail()}")
            try:
                last = self.status()
                if last.get("ready"):
                    return last
            except (AgentError, ValueError):
                pass
            time.sleep(0.2)
        raise AgentError(f"loxi-mirror not ready after {timeout}s (last status {last}); "
                         f"log:\n{self.log_tail()}")

    def status(self):
        cp = self.topo.run(self.ns, [self.exe, "status", "--json"], check=False, timeout=30)
        if cp.returncode != 0 and not cp.stdout.strip():
            raise AgentError(f"status --json exited {cp.returncode}: {cp.stderr.strip()}")
        return json.loads(cp.stdout)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=10.0, use_cli=True):
        """Stop the agent; returns its exit code (None if it had to be killed).
        A log file of its own is removed after a clean exit."""
        if self.proc is None:
            return None
        if self.proc.poll() is None and use_cli:
            try:
                self.topo.run(self.ns, [self.exe, "stop"], check=False, timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
                self.topo.kill(self.proc)
                return None
        rc = self.proc.returncode
        self.topo.kill(self.proc)   # forget it
        if rc == 0:
            self.cleanup_log()  # a log of our own is kept only when the agent failed
        return rc

    def log_tail(self, n=60):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def cleanup_log(self):
        if self._own_log:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        if exc[0] is None:
            self.cleanup_log()
        else:
            sys.stderr.write(f"loxi-mirror log ({self.log_path}):\n{self.log_tail()}\n")
        return False


def fast_path_fraction(status):
    """fast_path_packets / (fast_path_packets + all punts), or None if no packets."""
    c = (status or {}).get("counters") or {}
    fp = int(c.get("fast_path_packets") or 0)
    punt = sum(int(v) for v in (c.get("punt") or {}).values())
    return fp / (fp + punt) if fp + punt else None


def _main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="Build/destroy loxi-mirror test topologies.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="build a topology and leave it in place")
    u.add_argument("--prefix", default="lm")
    u.add_argument("--direct", action="store_true", help="DirectPair instead of RoutedTopology")
    u.add_argument("--bridges", type=int, choices=(1, 2), help="BridgedTopology with 1 or 2 bridges")
    u.add_argument("--pods", type=int, default=4, help="pods of a BridgedTopology")
    u.add_argument("--no-offload", action="store_true", help="pods' TSO/GSO/GRO off")
    d = sub.add_parser("down", help="delete the namespaces PREFIX-*")
    d.add_argument("prefix")
    a = ap.parse_args(argv)
    if a.cmd == "up":
        if a.bridges:
            t = BridgedTopology(a.prefix, bridges=a.bridges, pods=a.pods, offload=not a.no_offload).up()
        else:
            cls = DirectPair if a.direct else RoutedTopology
            t = cls(a.prefix, offload=not a.no_offload).up()
        atexit.unregister(t.down)       # keep it
        print(json.dumps(t.describe(), indent=2))
        print(f"remove with: {sys.argv[0]} down {t.prefix}", file=sys.stderr)
    else:
        for name in sorted(n for n in _list_netns() if n.startswith(a.prefix + "-")):
            if netns_exists(name):
                subprocess.run(["ip", "netns", "del", name], check=False)
                print(f"deleted {name}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
