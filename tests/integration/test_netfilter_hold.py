"""Issue 5 item 7: a new netfilter rule is obeyed by the very next packet.

pod1 -- node [agent] -- pod2, no rules at first, so pod1 -> pod2 UDP is
fast-pathed.  nfrace.py (in the node) inserts `FORWARD -s pod1 -p udp -j DROP`
and sends a packet from pod1 the instant the command returns, 100 rounds per
backend.  The kernel alone drops every such packet; with the agent none may be
fast-pathed past the rule nor reach pod2: the first change hint (nfnetlink for
iptables-nft, the xtables lock opened by iptables-legacy before it changes
anything) must stop the fast path before the packet comes.
"""

import json
import os
import shutil
import sys

import pytest

from nstest import skip_unless_root

pytestmark = skip_unless_root

HERE = os.path.dirname(os.path.abspath(__file__))
ROUNDS = 100


def race(topo, iptables, rounds):
    cp = topo.run("node", [sys.executable, f"{HERE}/nfrace.py", iptables, topo.ns["pod1"], topo.ns["pod2"],
                           topo.pod1_ip, topo.pod2_ip, str(rounds)], timeout=600)
    return json.loads(cp.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("iptables", ["iptables-nft", "iptables-legacy"])
def test_new_rule_is_obeyed_by_the_next_packet(routed_topology, agent, iptables):
    if shutil.which(iptables) is None:
        pytest.skip(f"{iptables} not installed")
    topo = routed_topology
    a = agent(topo)
    res = race(topo, iptables, ROUNDS)
    hints = a.status().get("netfilter_hints")
    print(f"\n{iptables}: {ROUNDS} rounds, arrived {res['arrived']}, fast-pathed {res['fast_pathed']}, "
          f"hint -> hold written {hints}")
    assert res["arrived"] == [] and res["fast_pathed"] == [], res
