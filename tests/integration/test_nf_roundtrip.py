"""The evaluator reads what the tools print, not the fixture text: each real rule
set is loaded into a fresh namespace with <backend>-restore, read back with
<backend>-save (as the agent does), and must classify and evaluate exactly as
the fixture itself does."""

import subprocess
from pathlib import Path

import pytest

from mirror.iptables import parse_save
from mirror.nfverdict import FlowView, HostView, classify, flow_verdict
from nstest import skip_unless_root, unique_name

pytestmark = skip_unless_root

DATA = Path(__file__).resolve().parents[1] / "data" / "iptables"
KUBE_JUMPS = """*filter
:FORWARD ACCEPT [0:0]
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
COMMIT
"""
# (fixture, text edits so it loads without ipsets / nfacct objects, what to append)
FIXTURES = [
    ("docker18-multibridge-ufw-host.rules", [], ""),
    ("docker28-swarm-ingress-portmap.rules", [], ""),
    ("docker28-usernet-portmap.rules", [], ""),
    ("kube-proxy-test-overall-rules.restore",
     [(" -m nfacct --nfacct-name ct_state_invalid_dropped_pkts", ""),
      (" -m nfacct --nfacct-name localhost_nps_accepted_pkts", "")], KUBE_JUMPS),
]
HOST = HostView(local_addrs=frozenset({"198.51.100.1", "192.0.2.1", "172.17.0.1"}))


def _flow(proto=6, state="ESTABLISHED", i="eth0", o="bridge1", src="203.0.113.5", dst="198.51.100.1",
          xdst="192.0.2.2", dport=8080, xdport=80, nat=("DNAT",), d="ORIGINAL"):
    return FlowView(proto=proto, in_iface=i, out_iface=o, src=src, dst=dst, sport=50000, dport=dport,
                    xsrc=src, xdst=xdst, xsport=50000, xdport=xdport, ctstate=state, ctdir=d,
                    ctstatus=frozenset({"CONFIRMED", "ASSURED", "SEEN_REPLY"}), nat=frozenset(nat), ctmark=0,
                    orig=(src, dst, 50000, dport), reply=(xdst, src, xdport, 50000))


FLOWS = [
    _flow(),
    _flow(proto=17, state="NEW"),
    _flow(i="bridge1", o="eth0", src="192.0.2.2", dst="203.0.113.5", xdst="203.0.113.5", dport=80, xdport=80,
          nat=(), d="REPLY"),
    _flow(i="docker0", o="docker_gwbridge", src="172.17.0.2", dst="10.9.0.1", xdst="10.9.0.1", nat=()),
    _flow(i="cni0", o="cni0", src="10.244.0.5", dst="172.30.0.41", xdst="10.180.0.1", dport=80),
    _flow(proto=6, state="NEW", i="eth0", o="eth1", dst="172.30.0.46", xdst="172.30.0.46", dport=80, nat=()),
]


@pytest.fixture
def netns():
    name = unique_name("lmrt")
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def fixture_text(name, edits, extra):
    text = (DATA / name).read_text()
    for old, new in edits:
        text = text.replace(old, new)
    return text, extra


def round_trip(ns, backend, text, extra):
    for payload, flags in ((text, []), (extra, ["--noflush"])):
        if payload:
            subprocess.run(["ip", "netns", "exec", ns, f"{backend}-restore", *flags], input=payload,
                           text=True, check=True, capture_output=True)
    return subprocess.run(["ip", "netns", "exec", ns, f"{backend}-save"], text=True, check=True,
                          capture_output=True).stdout


@pytest.mark.parametrize("backend", ["iptables-nft", "iptables-legacy"])
@pytest.mark.parametrize("name,edits,extra", FIXTURES)
def test_saved_ruleset_evaluates_like_the_fixture(netns, backend, name, edits, extra):
    text, extra = fixture_text(name, edits, extra)
    original = parse_save(text)
    if extra:
        base = parse_save(extra)
        for cname, chain in base.tables["filter"].chains.items():
            original.tables["filter"].chains.setdefault(cname, chain)
    saved = parse_save(round_trip(netns, backend, text, extra))
    assert not saved.unparsed, saved.unparsed
    assert saved.counts()[2] == original.counts()[2] > 0

    def statuses(rs):
        return {(r.table, r.chain, r.index): r.status for r in classify({backend: rs})
                if r.chain not in ("INPUT", "OUTPUT", "PREROUTING", "POSTROUTING") or r.table != "nat"}
    got, want = statuses(saved), statuses(original)
    # iptables-save lists every built-in chain; the fixture may not: compare the fixture's rules
    assert {k: got.get(k) for k in want} == want
    for f in FLOWS:
        a, b = flow_verdict({backend: saved}, f, HOST), flow_verdict({backend: original}, f, HOST)
        assert (a.action, a.rule) == (b.action, b.rule), (f, a, b)
