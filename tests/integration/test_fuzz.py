"""The differential fuzzer (tools/fuzz) in CI, and the case families it found.

test_500_cases...: 500 generated cases (topologies and packet streams, fixed
seed), the kernel alone vs loxi-mirror, must not differ once.  The other
tests replay minimal reproducers on the fuzzer's twin network.
"""

import json
import os
import subprocess
import sys

import pytest

from nstest import skip_unless_root

pytestmark = skip_unless_root

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import fuzz_gen as g  # noqa: E402
import fuzz_net  # noqa: E402


def test_500_cases_same_as_the_kernel(agent_available):
    cp = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "fuzz"), "--cases", "500", "--seed", "1",
                         "--json"], capture_output=True, text=True, timeout=900)
    lines = cp.stdout.strip().splitlines()
    assert lines, cp.stderr[-3000:]
    print(cp.stdout[-6000:])
    assert lines[-1] == "500 cases, 0 mismatches", cp.stdout[-6000:] + cp.stderr[-3000:]
    assert cp.returncode == 0, cp.stderr[-3000:]
    summary = json.loads(_json_block(lines[:-1]))
    # A fuzzer whose packets all punt would prove nothing about the fast path.
    assert summary["agent"]["fast_path_packets"] >= 500, summary["agent"]
    assert summary["packets"] >= 2000


def _json_block(lines):
    start = max(i for i, line in enumerate(lines) if line == "{")
    return "\n".join(lines[start:])


@pytest.fixture
def twin(agent_available):
    with fuzz_net.Twin() as t:
        t.start_agent()
        yield t


def plain_links(*used):
    return tuple(g.Link(i, i in used, 24, 1500, 1, 0, "permanent") for i in range(1, g.PODS + 1))


def test_the_comparison_sees_a_difference(twin):
    """The harness is not blind: B's node routes 10.9.0.0/16 differently
    (a route only the agent's copy has) and the comparison says so."""
    t = g.Topology(plain_links(1, 2), routes=(), ip_forward=1, all_rp_filter=0)
    case = g.Case(t, (g.Packet(sender=1, dst=("addr", "10.9.0.5")),))
    twin.apply(t)
    twin.run("b-node", ["ip", "route", "add", "10.9.0.0/16", "via", t.link(2).pod_ip])
    diffs = fuzz_net.exchange_and_compare(twin, case)
    assert diffs and diffs[0].startswith("packet 0: kernel"), diffs


def test_route_alias_same_as_the_kernel(twin):
    """10.1.0.0/24 is connected on veth1 and appended again via pod1: the
    kernel keeps using the connected route (ARP for 10.1.0.24 fails: ICMP
    host unreachable to the sender), loxi-mirror forwards to pod1."""
    t = g.Topology(plain_links(1, 2), routes=(g.Route("10.1.0.0/24", "via", (1,)),), ip_forward=1,
                   all_rp_filter=0)
    case = g.Case(t, (g.Packet(sender=2, dst=("addr", "10.1.0.24")),))
    assert fuzz_net.differences(twin, case) == []


def test_local_gateway_same_as_the_kernel(twin):
    """10.1.0.0/25 via 10.3.0.2, and `local 10.3.0.2/32` in the local table:
    the kernel answers ICMP host unreachable, loxi-mirror forwards to pod3."""
    links = plain_links(1, 2, 3)
    t = g.Topology(links, routes=(g.Route("10.3.0.2/32", "local", (3,)), g.Route("10.1.0.0/25", "via", (3,),
                                                                                   metric=10)),
                   ip_forward=1, all_rp_filter=0)
    case = g.Case(t, (g.Packet(sender=2, dst=("pod", 1)),))
    assert fuzz_net.differences(twin, case) == []
