"""The agent's flow offload step (mirror/offload.py) against the kernel's real
conntrack table in a namespace: entries made with `conntrack -I`, verdicts from
the real evaluator, BE_LIBERAL set on a real TCP connection.  The map writes
go to a recorder (the datapath side has its own tests)."""

import json
import shutil
import subprocess
import sys

import pytest

from nstest import skip_unless_root

pytestmark = [skip_unless_root,
              pytest.mark.skipif(not shutil.which("conntrack"), reason="conntrack CLI missing (tools/setup)")]

RULES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -s 10.9.9.9/32 -j DROP
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -p udp -m udp --dport 53 -j LOG
COMMIT
"""

CHILD = """
import json, sys
from mirror import model as m, offload
from mirror.conntrack import Conntrack
from mirror.flows import FlowKey
from mirror.iptables import parse_save
from mirror.reasons import REASONS

class Recorder:
    def __init__(self): self.flows = {}
    def write_flow(self, key, entry): self.flows[key] = entry

st = m.KernelState(netfilter_impact="filter FORWARD", netfilter_unsupported=None, ct_sysctls=m.CtSysctls())
st.set_link(m.Link(2, "veth1", "veth", "02:00:00:00:00:01", 1500, 0x10041))
st.set_link(m.Link(3, "veth2", "veth", "02:00:00:00:00:02", 1500, 0x10041))
st.set_netfilter("filter FORWARD", None, {"iptables-nft": parse_save(sys.stdin.read()), "iptables-legacy": parse_save("")})
rec = Recorder()
off = offload.Offloader(rec)
events = []
for ifindex, oif, t in json.loads(sys.argv[1]):
    events.append(offload.FlowEvent(FlowKey(ifindex, *t), oif, 0, "FLOW_PENDING"))
off.handle(events + events, st)  # duplicates are handled once
names = {r.value: r.name for r in REASONS}
out = {"stats": off.stats, "gen": st.nf_gen,
       "flows": [[list(k.wire), dict(e.__dict__, action=names[e.action])]
                 for k, e in rec.flows.items()]}
print(json.dumps(out))
"""


def offload_events(one_ns, events):
    cp = one_ns.run("ns", [sys.executable, "-c", CHILD, json.dumps(events)], input=RULES)
    return json.loads(cp.stdout)


def test_events_become_flow_entries_with_the_verdict_of_the_rules(one_ns):
    # A DNAT'd established TCP flow, a flow the ruleset drops, a one-way UDP flow
    # that reaches a LOG rule (the evaluator cannot decide: no entry), a flow
    # with no kernel entry and one in a state the kernel must handle.
    one_ns.run("ns", "conntrack -I -p tcp -s 10.1.0.2 -d 10.1.0.1 --sport 40000 --dport 8080 -r 10.2.0.2 "
                 "-q 10.1.0.2 --reply-port-src 80 --reply-port-dst 40000 --state ESTABLISHED "
                 "-u SEEN_REPLY,ASSURED,DST_NAT -t 300")
    one_ns.run("ns", "conntrack -I -p tcp -s 10.9.9.9 -d 10.2.0.2 --sport 40001 --dport 80 --state ESTABLISHED "
                 "-u SEEN_REPLY,ASSURED -t 300")
    one_ns.run("ns", "conntrack -I -p udp -s 10.1.0.2 -d 10.2.0.2 --sport 5000 --dport 53 -t 30")
    one_ns.run("ns", "conntrack -I -p tcp -s 10.1.0.2 -d 10.2.0.2 --sport 40002 --dport 80 --state FIN_WAIT "
                 "-u SEEN_REPLY,ASSURED -t 30")
    got = offload_events(one_ns, [
        [2, 3, ["10.1.0.2", "10.1.0.1", 40000, 8080, 6]],   # original direction, pre-DNAT
        [3, 2, ["10.2.0.2", "10.1.0.2", 80, 40000, 6]],     # its reply
        [2, 3, ["10.9.9.9", "10.2.0.2", 40001, 80, 6]],
        [2, 3, ["10.1.0.2", "10.2.0.2", 5000, 53, 17]],
        [2, 3, ["10.1.0.2", "10.2.0.2", 40003, 80, 6]],
        [2, 3, ["10.1.0.2", "10.2.0.2", 40002, 80, 6]],
    ])
    flows = {tuple(w): e for w, e in got["flows"]}
    fwd = flows[("10.1.0.2", "10.1.0.1", 40000, 8080)]
    assert fwd["action"] == "FORWARDED" and fwd["gen"] == got["gen"] and fwd["oif"] == 3
    assert (fwd["nat_saddr"], fwd["nat_daddr"], fwd["nat_sport"], fwd["nat_dport"]) == ("10.1.0.2", "10.2.0.2", 40000, 80)
    back = flows[("10.2.0.2", "10.1.0.2", 80, 40000)]
    assert back["action"] == "FORWARDED"
    assert (back["nat_saddr"], back["nat_daddr"], back["nat_sport"], back["nat_dport"]) == ("10.1.0.1", "10.1.0.2", 8080, 40000)
    assert flows[("10.9.9.9", "10.2.0.2", 40001, 80)]["action"] == "NF_DROP"
    assert flows[("10.1.0.2", "10.2.0.2", 5000, 53)]["action"] == "NETFILTER"  # LOG: the kernel keeps it
    assert ("10.1.0.2", "10.2.0.2", 40003, 80) not in flows and ("10.1.0.2", "10.2.0.2", 40002, 80) not in flows
    assert got["stats"]["events"] == 6 and got["stats"]["no_entry"] == 1 and got["stats"]["kernel_keeps"] == 1
    assert got["stats"]["errors"] == 0
