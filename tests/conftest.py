"""Shared pytest fixtures for loxi-mirror's tests.

- `require_root` (fixture and `skip_unless_root` marker-style helper): skip with a
  reason when not root or `ip netns` is unusable.
- `unique_name(prefix)`: a namespace-name prefix no existing namespace uses.
- `routed_topology`: a tools/topology.py RoutedTopology (pod1 10.1.0.2 -- node -- pod2
  10.2.0.2), removed at teardown even when the test fails.
- `direct_pair`: the same pods on one veth pair, no node.
- `one_ns`: one empty namespace (role "ns"), e.g. for conntrack tables.
- `agent`: factory `agent(topo, *args, ns="node", timeout=15)` that runs
  `loxi-mirror start ARGS` in the namespace, waits for status "ready", and at teardown
  stops it (SIGTERM by PID, SIGKILL after a timeout); the agent's log is printed
  when the test failed.

tools/ is put on sys.path, so tests can `from topology import RoutedTopology, Agent`
and `import measure`; test modules take `skip_unless_root` and `unique_name` from
tests/nstest.py (conftest modules are not meant to be imported).
"""

import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

import topology  # noqa: E402
from topology import Agent, DirectPair, RoutedTopology  # noqa: E402

from nstest import _ROOT_OK, _ROOT_WHY, unique_name  # noqa: E402


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Lets fixtures see whether the test failed (item.rep_setup / rep_call).
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _failed(request):
    node = request.node
    return any(getattr(getattr(node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))


@pytest.fixture
def require_root():
    if not _ROOT_OK:
        pytest.skip(f"needs root and ip netns: {_ROOT_WHY}")


@pytest.fixture
def routed_topology(require_root, request):
    """A fresh RoutedTopology; namespaces and its processes removed at teardown."""
    # Indirect parametrization: @pytest.mark.parametrize("routed_topology",
    # [{"offload": False}], indirect=True) for MTU-sized packets.
    offload = getattr(request, "param", {}).get("offload", True)
    with RoutedTopology(unique_name("lmt"), unique=False, offload=offload) as topo:
        yield topo


class _OneNs(topology.Netns):
    ROLES = ("ns",)

    def _build(self):
        pass


@pytest.fixture
def one_ns(require_root):
    """One empty namespace (role "ns", lo up, no IPv6), removed at teardown."""
    with _OneNs(unique_name("lm1"), unique=False, ipv6=False) as topo:
        yield topo


@pytest.fixture
def direct_pair(require_root):
    with DirectPair(unique_name("lmd"), unique=False) as topo:
        yield topo


@pytest.fixture
def agent_available():
    if not topology.agent_available():
        pytest.skip("loxi-mirror is not on PATH or its CLI does not load (run tools/setup)")


class _AgentFactory:
    def __init__(self, request, tmp_path):
        self.request = request
        self.tmp_path = tmp_path
        self.agents = []

    def __call__(self, topo, *args, ns="node", timeout=15.0, wait=True):
        """Start `loxi-mirror start *args` in `ns` of `topo`; returns a topology.Agent."""
        log = str(self.tmp_path / f"loxi-mirror-{len(self.agents)}-{topo.nsname(ns)}.log")
        a = Agent(topo, ns=ns, args=args, log_path=log)
        self.agents.append(a)
        if wait:
            a.start(timeout=timeout)
        else:
            logf = open(log, "ab")
            try:
                a.proc = topo.popen(ns, [a.exe, "start", *args], stdout=logf, stderr=subprocess.STDOUT)
            finally:
                logf.close()
        return a

    def teardown(self, grace=10.0):
        for a in reversed(self.agents):
            p = a.proc
            if p is None:
                continue
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
            a.topo.kill(p)  # forget it (already exited)
        if _failed(self.request):
            for a in self.agents:
                sys.stderr.write(f"\n----- loxi-mirror log {a.log_path} "
                                 f"(exit {a.proc.returncode if a.proc else None}) -----\n"
                                 f"{a.log_tail(200)}\n")


@pytest.fixture
def agent(require_root, agent_available, request, tmp_path):
    """Factory: agent(topo, "--include", "veth.*") -> running topology.Agent.

    Request it after the topology fixture so it is torn down first (pytest tears
    down in reverse order), i.e. `def test_x(routed_topology, agent): ...`.
    """
    f = _AgentFactory(request, tmp_path)
    yield f
    f.teardown()
