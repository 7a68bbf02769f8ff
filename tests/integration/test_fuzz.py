"""The differential fuzzer in CI: 500 generated cases (topologies and packet
streams, fixed seed), the kernel alone vs loxi-mirror, must not differ once.
tools/fuzz itself builds and removes its namespaces and agent."""

import json
import os
import subprocess
import sys

from nstest import skip_unless_root

pytestmark = skip_unless_root

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


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
    start = max(i for i, l in enumerate(lines) if l == "{")
    return "\n".join(lines[start:])
