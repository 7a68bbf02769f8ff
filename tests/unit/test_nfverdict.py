"""Unit tests for mirror.nfverdict / mirror.nfmatch: the verdict of parsed iptables
rule sets for one direction of a confirmed flow. Pure: no root, no tools."""

from pathlib import Path

import pytest

from mirror.iptables import parse_save
from mirror.nfverdict import FlowView, HostView, classify, flow_verdict

DATA = Path(__file__).resolve().parents[1] / "data" / "iptables"
HOST = HostView(local_addrs=frozenset({"10.0.1.1", "10.0.2.1", "198.51.100.1"}),
                broadcast_addrs=frozenset({"10.0.1.255"}))


def flow(**kw):
    """A plain routed TCP flow 10.0.1.2:40000 -> 10.0.2.2:80, original direction."""
    base = dict(proto=6, in_iface="veth1", out_iface="veth2",
                src="10.0.1.2", dst="10.0.2.2", sport=40000, dport=80,
                xsrc="10.0.1.2", xdst="10.0.2.2", xsport=40000, xdport=80,
                ctstate="ESTABLISHED", ctdir="ORIGINAL",
                ctstatus=frozenset({"CONFIRMED", "ASSURED", "SEEN_REPLY"}), nat=frozenset(), ctmark=0,
                orig=("10.0.1.2", "10.0.2.2", 40000, 80), reply=("10.0.2.2", "10.0.1.2", 80, 40000))
    base.update(kw)
    return FlowView(**base)


def reply_of(f):
    """The other direction of flow f (wire = the reply tuple, leaves as the original source)."""
    return FlowView(proto=f.proto, in_iface=f.out_iface, out_iface=f.in_iface,
                    src=f.reply[0], dst=f.reply[1], sport=f.reply[2], dport=f.reply[3],
                    xsrc=f.orig[1], xdst=f.orig[0], xsport=f.orig[3], xdport=f.orig[2],
                    ctstate="ESTABLISHED", ctdir="REPLY", ctstatus=f.ctstatus, nat=f.nat, ctmark=f.ctmark,
                    orig=f.orig, reply=f.reply, bridged=f.bridged,
                    physdev_in=f.physdev_out, physdev_out=f.physdev_in)


def forward_rules(*rules, policy="DROP", table="filter", chain="FORWARD", extra=""):
    body = "\n".join(f"-A {chain} {r}" for r in rules)
    chains = {"filter": ["INPUT", "FORWARD", "OUTPUT"], "raw": ["PREROUTING", "OUTPUT"],
              "mangle": ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
              "security": ["INPUT", "FORWARD", "OUTPUT"]}[table]
    heads = "\n".join(f":{c} {policy if c == chain else 'ACCEPT'} [0:0]" for c in chains)
    return parse_save(f"*{table}\n{heads}\n{extra}{body}\nCOMMIT\n")


def verdict(rs, f=None, backend="iptables-nft"):
    return flow_verdict({backend: rs}, f or flow(), HOST)


# --------------------------------------------------------------------------- single matches

# (rule before a DROP policy, expected action for the default flow)
MATCH_CASES = [
    ("-j ACCEPT", "ACCEPT"),
    ("-s 10.0.1.0/24 -j ACCEPT", "ACCEPT"),
    ("-s 10.0.1.2 -j ACCEPT", "ACCEPT"),
    ("-s 10.0.3.0/24 -j ACCEPT", "DROP"),
    ("! -s 10.0.3.0/24 -j ACCEPT", "ACCEPT"),
    ("! -s 10.0.1.0/24 -j ACCEPT", "DROP"),
    ("-s 10.0.1.0/255.255.255.0 -j ACCEPT", "ACCEPT"),
    ("-d 10.0.2.2/32 -j ACCEPT", "ACCEPT"),
    ("-d 10.0.0.0/8 ! -d 10.0.2.0/24 -j ACCEPT", "DROP"),
    ("-s 10.9.9.9,10.0.1.2 -j ACCEPT", "ACCEPT"),
    ("-i veth1 -j ACCEPT", "ACCEPT"),
    ("-i veth+ -j ACCEPT", "ACCEPT"),
    ("-i eth+ -j ACCEPT", "DROP"),
    ("! -i veth1 -j ACCEPT", "DROP"),
    ("-o veth2 -j ACCEPT", "ACCEPT"),
    ("! -o veth2 -j ACCEPT", "DROP"),
    ("-o + -j ACCEPT", "ACCEPT"),
    ("-p tcp -j ACCEPT", "ACCEPT"),
    ("-p 6 -j ACCEPT", "ACCEPT"),
    ("-p udp -j ACCEPT", "DROP"),
    ("! -p udp -j ACCEPT", "ACCEPT"),
    ("-p all -j ACCEPT", "ACCEPT"),
    ("-f -j ACCEPT", "DROP"),
    ("! -f -j ACCEPT", "ACCEPT"),
    ("-p tcp -m tcp --dport 80 -j ACCEPT", "ACCEPT"),
    ("-p tcp --dport 80 -j ACCEPT", "ACCEPT"),
    ("-p tcp -m tcp --dport 81 -j ACCEPT", "DROP"),
    ("-p tcp -m tcp ! --dport 81 -j ACCEPT", "ACCEPT"),
    ("-p tcp -m tcp --dport 70:90 -j ACCEPT", "ACCEPT"),
    ("-p tcp -m tcp --dport 81: -j ACCEPT", "DROP"),
    ("-p tcp -m tcp --sport 32768:60999 -j ACCEPT", "ACCEPT"),
    ("-p tcp -m tcp --sport :1023 -j ACCEPT", "DROP"),
    ("-p udp -m udp --dport 80 -j ACCEPT", "DROP"),
    ("-p tcp -m multiport --dports 22,80,443 -j ACCEPT", "ACCEPT"),
    ("-p tcp -m multiport --dports 22,8000:8100 -j ACCEPT", "DROP"),
    ("-p tcp -m multiport ! --dports 22,443 -j ACCEPT", "ACCEPT"),
    ("-p tcp -m multiport --sports 40000:40010 -j ACCEPT", "ACCEPT"),
    ("-p tcp -m multiport --ports 80 -j ACCEPT", "ACCEPT"),
    ("-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT", "ACCEPT"),
    ("-m conntrack --ctstate NEW -j ACCEPT", "DROP"),
    ("-m conntrack ! --ctstate INVALID -j ACCEPT", "ACCEPT"),
    ("-m conntrack --ctstate DNAT -j ACCEPT", "DROP"),
    ("-m conntrack --ctstatus ASSURED -j ACCEPT", "ACCEPT"),
    ("-m conntrack --ctstatus EXPECTED -j ACCEPT", "DROP"),
    ("-m conntrack ! --ctstatus EXPECTED -j ACCEPT", "ACCEPT"),
    ("-m conntrack --ctdir ORIGINAL -j ACCEPT", "ACCEPT"),
    ("-m conntrack --ctdir REPLY -j ACCEPT", "DROP"),
    ("-m conntrack --ctorigsrc 10.0.1.0/24 --ctorigdstport 80 -j ACCEPT", "ACCEPT"),
    ("-m conntrack --ctreplsrc 10.0.2.2 -j ACCEPT", "ACCEPT"),
    ("-m conntrack --ctrepldst 10.0.9.0/24 -j ACCEPT", "DROP"),
    ("-m conntrack --ctproto udp -j ACCEPT", "DROP"),
    ("-m state --state ESTABLISHED -j ACCEPT", "ACCEPT"),
    ("-m state --state NEW,INVALID -j ACCEPT", "DROP"),
    ("-m state ! --state NEW -j ACCEPT", "ACCEPT"),
    ("-m mark --mark 0x0 -j ACCEPT", "ACCEPT"),
    ("-m mark --mark 0x4000/0x4000 -j ACCEPT", "DROP"),
    ("-m mark ! --mark 0x4000/0x4000 -j ACCEPT", "ACCEPT"),
    ("-m connmark --mark 0x0/0xff -j ACCEPT", "ACCEPT"),
    ("-m connmark --mark 0x1 -j ACCEPT", "DROP"),
    ("-m comment --comment \"hello world\" -j ACCEPT", "ACCEPT"),
    ("-m addrtype --dst-type LOCAL -j ACCEPT", "DROP"),
    ("-m addrtype ! --dst-type LOCAL -j ACCEPT", "ACCEPT"),
    ("-m addrtype --dst-type BROADCAST,MULTICAST -j ACCEPT", "DROP"),
    ("-m addrtype --src-type LOCAL -j ACCEPT", "DROP"),
    ("-p icmp -m icmp --icmp-type 8 -j ACCEPT", "DROP"),
    ("-p tcp -m tcp --syn -j ACCEPT", "DROP"),
    ("-p tcp -m tcp ! --syn -j ACCEPT", "ACCEPT"),
    ("-p tcp -m tcp --tcp-flags SYN,RST SYN -j ACCEPT", "DROP"),
    ("-p tcp -m tcp --tcp-flags FIN,SYN,RST NONE -j ACCEPT", "ACCEPT"),
    ("-m iprange --src-range 10.0.1.1-10.0.1.9 -j ACCEPT", "ACCEPT"),
    ("-m iprange --dst-range 10.0.3.1-10.0.3.9 -j ACCEPT", "DROP"),
    ("-m pkttype --pkt-type unicast -j ACCEPT", "ACCEPT"),
    ("-m pkttype --pkt-type broadcast -j ACCEPT", "DROP"),
    ("-m physdev --physdev-in veth1 -j ACCEPT", "DROP"),                 # routed: no bridge info
    ("-m physdev ! --physdev-is-bridged -j ACCEPT", "ACCEPT"),
    ("-s 10.0.1.2 -j DROP", "DROP"),
    ("-s 10.0.3.2 -j DROP", "DROP"),          # skipped; the policy drops
]


@pytest.mark.parametrize("rule,expected", MATCH_CASES)
def test_single_match(rule, expected):
    v = verdict(forward_rules(rule))
    assert v.action == expected, v


# Rules that could match this flow and that the evaluator cannot decide, or targets it does not model.
PUNT_CASES = [
    "-m length --length 0:500 -j ACCEPT",
    "-p tcp -m tcp --tcp-flags ACK ACK -j ACCEPT",
    "-p tcp -m tcp --tcp-option 2 -j ACCEPT",
    "-m limit --limit 3/min -j ACCEPT",
    "-m set --match-set foo src -j ACCEPT",
    "-m addrtype --dst-type UNICAST -j ACCEPT",
    "-m addrtype ! --dst-type LOCAL --limit-iface-out -j ACCEPT",
    "-m conntrack --ctexpire 1:100 -j ACCEPT",
    "-j LOG --log-prefix x",
    "-j NFLOG",
    "-j REJECT",
    "-j MARK --set-xmark 0x1/0x1",
    "-j CONNMARK --restore-mark",
    "-j TCPMSS --clamp-mss-to-pmtu",
    "-s 10.0.1.2 -j LOG",
    "-m statistic --mode random --probability 0.5 -j ACCEPT",
]


@pytest.mark.parametrize("rule", PUNT_CASES)
def test_undecidable_rule_punts_and_names_it(rule):
    v = verdict(forward_rules(rule))
    assert v.action == "PUNT", v
    assert v.rule == "iptables-nft filter FORWARD #1"
    assert "FORWARD #1" in v.reason


@pytest.mark.parametrize("rule", [
    "-s 10.0.3.0/24 -m length --length 0:500 -j LOG",       # a decided false match skips it
    "-m length --length 0:500 -p udp -j ACCEPT",             # also when the unknown comes first
    "-s 10.9.0.0/16 -j REJECT",
    "-m conntrack --ctstate INVALID -m nfacct --nfacct-name x -j DROP",   # kube-proxy's KUBE-FORWARD
])
def test_rule_decided_false_is_skipped_despite_unknown_parts(rule):
    assert verdict(forward_rules(rule, "-j ACCEPT")).action == "ACCEPT"


def test_stateful_match_before_a_false_match_punts():
    # The kernel charges the limit bucket before the ctstate match fails: skipping it would differ.
    assert verdict(forward_rules("-m limit --limit 1/s -m conntrack --ctstate NEW -j ACCEPT",
                                 "-j ACCEPT")).action == "PUNT"
    assert verdict(forward_rules("-m conntrack --ctstate NEW -m limit --limit 1/s -j ACCEPT",
                                 "-j ACCEPT")).action == "ACCEPT"
    # built-in criteria (-s -d -i -o -p) are checked before any match module
    assert verdict(forward_rules("-m limit --limit 1/s -p udp -j ACCEPT", "-j ACCEPT")).action == "ACCEPT"


def test_udp_one_way_flow_is_ctstate_new():
    f = flow(proto=17, ctstate="NEW", ctstatus=frozenset({"CONFIRMED"}))
    rs = forward_rules("-m conntrack --ctstate ESTABLISHED -j ACCEPT", "-p udp -m udp --dport 80 -j ACCEPT")
    v = verdict(rs, f)
    assert v.action == "ACCEPT" and "#2" in v.rule
    assert verdict(forward_rules("-m conntrack --ctstate ESTABLISHED -j ACCEPT"), f).action == "DROP"


# --------------------------------------------------------------------------- chains and targets

def test_user_chains_return_and_policy():
    extra = ":A - [0:0]\n:B - [0:0]\n-A A -s 10.0.1.2 -j RETURN\n-A A -j DROP\n-A B -j ACCEPT\n"
    rs = forward_rules("-j A", "-j B", extra=extra)
    v = verdict(rs)
    assert v.action == "ACCEPT" and v.rule == "iptables-nft filter B #1"
    # from another source the RETURN is not taken and A drops
    assert verdict(rs, flow(src="10.0.7.7")).rule == "iptables-nft filter A #2"


def test_goto_returns_to_the_caller_of_the_caller():
    extra = ":A - [0:0]\n:B - [0:0]\n-A A -g B\n-A A -j DROP\n-A B -j RETURN\n"
    # FORWARD -j A; A -g B; B returns -> back to FORWARD (not to A's DROP) -> rule 2 accepts
    rs = forward_rules("-j A", "-j ACCEPT", extra=extra)
    assert verdict(rs).rule == "iptables-nft filter FORWARD #2"


def test_return_in_builtin_chain_applies_the_policy():
    assert verdict(forward_rules("-j RETURN", "-j ACCEPT", policy="DROP")).action == "DROP"


def test_rule_without_target_only_counts():
    assert verdict(forward_rules("-s 10.0.1.2", "-j ACCEPT")).action == "ACCEPT"


def test_jump_to_missing_chain_punts():
    rs = forward_rules("-j NOWHERE")
    assert verdict(rs).action == "PUNT"


def test_chain_loop_punts():
    rs = forward_rules("-j A", extra=":A - [0:0]\n-A A -j A\n")
    assert verdict(rs).action == "PUNT"


def test_unparsed_line_punts_everything():
    rs = parse_save("*filter\n:FORWARD ACCEPT [0:0]\nbogus line\nCOMMIT\n")
    assert verdict(rs).action == "PUNT"


def test_unread_backend_punts():
    assert flow_verdict({"iptables-nft": forward_rules("-j ACCEPT"), "iptables-legacy": None},
                        flow(), HOST).action == "PUNT"


def test_every_backend_must_accept():
    accept, drop = forward_rules("-j ACCEPT"), forward_rules("-s 10.0.1.2 -j DROP", policy="ACCEPT")
    assert flow_verdict({"iptables-nft": accept, "iptables-legacy": accept}, flow(), HOST).action == "ACCEPT"
    v = flow_verdict({"iptables-nft": accept, "iptables-legacy": drop}, flow(), HOST)
    assert v.action == "DROP" and v.rule == "iptables-legacy filter FORWARD #1"


def test_drop_at_an_earlier_hook_wins_over_a_later_punt():
    raw = forward_rules("-s 10.0.1.2 -j DROP", table="raw", chain="PREROUTING", policy="ACCEPT")
    log = forward_rules("-j LOG")
    v = flow_verdict({"iptables-legacy": raw, "iptables-nft": log}, flow(), HOST)
    assert v.action == "DROP" and "raw PREROUTING" in v.rule


def test_punt_at_the_same_hook_wins_over_a_drop():
    drop = forward_rules("-j DROP", policy="ACCEPT")
    log = forward_rules("-j LOG", policy="ACCEPT")
    assert flow_verdict({"iptables-legacy": drop, "iptables-nft": log}, flow(), HOST).action == "PUNT"


def test_empty_rulesets_accept():
    assert flow_verdict({"iptables-nft": parse_save(""), "iptables-legacy": parse_save("")},
                        flow(), HOST).action == "ACCEPT"


def test_only_tcp_and_udp():
    assert verdict(forward_rules("-j ACCEPT"), flow(proto=1)).action == "PUNT"


def test_nat_and_input_chains_are_not_walked():
    rs = parse_save("*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
                    "-A PREROUTING -j LOG\n-A POSTROUTING -j MASQUERADE\nCOMMIT\n"
                    "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n-A INPUT -j LOG\nCOMMIT\n")
    assert verdict(rs).action == "ACCEPT"


# --------------------------------------------------------------------------- per-hook packet view

DNAT_FLOW = flow(in_iface="eth0", out_iface="bridge1",
                 src="203.0.113.5", dst="198.51.100.1", sport=50000, dport=8080,
                 xsrc="203.0.113.5", xdst="192.0.2.2", xsport=50000, xdport=80, nat=frozenset({"DNAT"}),
                 orig=("203.0.113.5", "198.51.100.1", 50000, 8080), reply=("192.0.2.2", "203.0.113.5", 80, 50000))


def test_prerouting_sees_the_wire_destination_forward_the_translated_one():
    pre = forward_rules("-d 198.51.100.1 -p tcp --dport 8080 -j DROP", table="mangle", chain="PREROUTING",
                        policy="ACCEPT")
    assert verdict(pre, DNAT_FLOW).action == "DROP"
    fwd = forward_rules("-d 192.0.2.2 -p tcp --dport 80 -j DROP", policy="ACCEPT")
    assert verdict(fwd, DNAT_FLOW).action == "DROP"
    fwd_wire = forward_rules("-d 198.51.100.1 -j DROP", policy="ACCEPT")
    assert verdict(fwd_wire, DNAT_FLOW).action == "ACCEPT"


def test_postrouting_sees_untranslated_source_and_both_devices():
    snat = flow(xsrc="10.0.2.1", xsport=1024, nat=frozenset({"SNAT"}),
                reply=("10.0.2.2", "10.0.2.1", 80, 1024))
    post = forward_rules("-s 10.0.1.2 -i veth1 -o veth2 -j DROP", table="mangle", chain="POSTROUTING",
                         policy="ACCEPT")
    assert verdict(post, snat).action == "DROP"


def test_no_output_device_in_prerouting():
    pre = forward_rules("-o veth2 -j DROP", table="mangle", chain="PREROUTING", policy="ACCEPT")
    assert verdict(pre).action == "ACCEPT"


def test_raw_prerouting_has_no_conntrack_entry_yet():
    def raw(rule):
        return forward_rules(rule, table="raw", chain="PREROUTING", policy="ACCEPT")
    assert verdict(raw("-m conntrack --ctstate INVALID -j DROP")).action == "DROP"
    assert verdict(raw("-m conntrack --ctstate ESTABLISHED -j DROP")).action == "ACCEPT"
    assert verdict(raw("-m conntrack ! --ctstatus ASSURED -j DROP")).action == "ACCEPT"   # no entry: fails
    assert verdict(raw("-m connmark ! --mark 0x1 -j DROP")).action == "ACCEPT"
    assert verdict(raw("-m state --state INVALID -j DROP")).action == "DROP"
    mangle = forward_rules("-m conntrack --ctstate INVALID -j DROP", table="mangle", chain="PREROUTING",
                           policy="ACCEPT")
    assert verdict(mangle).action == "ACCEPT"


def test_ctstate_dnat_virtual_state():
    rs = forward_rules("-m conntrack --ctstate DNAT -j ACCEPT")
    assert verdict(rs, DNAT_FLOW).action == "ACCEPT"
    assert verdict(rs, reply_of(DNAT_FLOW)).action == "ACCEPT"    # a status bit of the entry: both directions
    assert verdict(rs).action == "DROP"


def test_physdev_for_bridged_traffic():
    bridged = flow(in_iface="br0", out_iface="br0", bridged=True, physdev_in="vethA", physdev_out="vethB")
    rs = forward_rules("-m physdev --physdev-in vethA --physdev-out veth+ -j ACCEPT")
    assert verdict(rs, bridged).action == "ACCEPT"
    assert verdict(forward_rules("-m physdev --physdev-is-bridged -j ACCEPT"), bridged).action == "ACCEPT"
    assert verdict(forward_rules("-m physdev --physdev-in vethB -j ACCEPT"), bridged).action == "DROP"
    assert verdict(rs).action == "DROP"      # routed
    # from a bridge port, routed out (no output port): --physdev-out fails even negated,
    # --physdev-in is only tested when there is an input port
    from_port = flow(in_iface="br0", physdev_in="vethA")
    assert verdict(forward_rules("-m physdev ! --physdev-out vethB -j ACCEPT"), from_port).action == "DROP"
    assert verdict(forward_rules("-m physdev --physdev-in vethA -j ACCEPT"), from_port).action == "ACCEPT"
    assert verdict(forward_rules("-m physdev ! --physdev-is-bridged -j ACCEPT"), from_port).action == "ACCEPT"
    to_port = flow(out_iface="br0", physdev_out="vethB")
    assert verdict(forward_rules("-m physdev --physdev-in vethX --physdev-out vethB -j ACCEPT"),
                   to_port).action == "ACCEPT"


BRIDGED = flow(in_iface="br0", out_iface="br0", bridged=True, physdev_in="vethA", physdev_out="vethB")


@pytest.mark.parametrize("table,chain,rule,action", [
    # br_nf_pre_routing(): -i is the bridge, the output port is not known yet
    ("raw", "PREROUTING", "-i br0 -j DROP", "DROP"),
    ("raw", "PREROUTING", "-i vethA -j DROP", "ACCEPT"),
    ("mangle", "PREROUTING", "-m physdev --physdev-in vethA -j DROP", "DROP"),
    ("mangle", "PREROUTING", "-m physdev --physdev-is-bridged -j DROP", "ACCEPT"),
    ("mangle", "PREROUTING", "-m physdev --physdev-out vethB -j DROP", "ACCEPT"),
    ("mangle", "PREROUTING", "-m physdev --physdev-is-in -j DROP", "DROP"),
    # br_nf_forward_ip(): -i and -o the bridge, physdev both ports
    ("filter", "FORWARD", "-i br0 -o br0 -m physdev --physdev-is-bridged -j DROP", "DROP"),
    ("filter", "FORWARD", "-o vethB -j DROP", "ACCEPT"),
    ("mangle", "FORWARD", "-m physdev --physdev-out vethB -j DROP", "DROP"),
    # br_nf_post_routing(): no input device, -o the bridge
    ("mangle", "POSTROUTING", "-i br0 -j DROP", "ACCEPT"),
    ("mangle", "POSTROUTING", "! -i br0 -o br0 -m physdev --physdev-is-out -j DROP", "DROP"),
])
def test_bridged_frames_meet_the_hooks_as_br_netfilter_hands_them_on(table, chain, rule, action):
    rs = forward_rules(rule, policy="ACCEPT", table=table, chain=chain)
    assert verdict(rs, BRIDGED).action == action


def test_routed_postrouting_keeps_the_input_device():
    rs = forward_rules("-i veth1 -j DROP", policy="ACCEPT", table="mangle", chain="POSTROUTING")
    assert verdict(rs).action == "DROP"


def test_docker28_pod_to_pod_on_the_bridge_is_accepted_by_docker_ct():
    """Docker 28's chains, pods on bridge1: established traffic between two
    of its ports is -i bridge1 -o bridge1 and DOCKER-CT accepts it; the
    user's DOCKER-USER or a physdev rule decides before it."""
    rs = load("docker28-usernet-portmap.rules")
    pods = flow(in_iface="bridge1", out_iface="bridge1", bridged=True, physdev_in="veth1", physdev_out="veth2",
                src="192.0.2.2", dst="192.0.2.3", xsrc="192.0.2.2", xdst="192.0.2.3",
                orig=("192.0.2.2", "192.0.2.3", 40000, 80), reply=("192.0.2.3", "192.0.2.2", 80, 40000))
    v = verdict(rs, pods)
    assert (v.action, v.rule) == ("ACCEPT", "iptables-nft filter DOCKER-CT #2")
    assert verdict(rs, reply_of(pods)).action == "ACCEPT"
    text = (DATA / "docker28-usernet-portmap.rules").read_text()
    user = parse_save(text.replace("-A FORWARD -j DOCKER-FORWARD\n", "-A FORWARD -j DOCKER-FORWARD\n"
                                   "-A DOCKER-USER -m physdev --physdev-in veth1 -j DROP\n"))
    assert verdict(user, pods).action == "DROP" and verdict(user, reply_of(pods)).action == "ACCEPT"


def test_addrtype_local():
    local_dst = flow(dst="198.51.100.1", xdst="198.51.100.1")
    assert verdict(forward_rules("-m addrtype --dst-type LOCAL -j ACCEPT"), local_dst).action == "ACCEPT"
    bcast = flow(dst="10.0.1.255", xdst="10.0.1.255")
    assert verdict(forward_rules("-m addrtype --dst-type BROADCAST -j ACCEPT"), bcast).action == "ACCEPT"


# --------------------------------------------------------------------------- real rule sets

def load(name, extra_filter=""):
    text = (DATA / name).read_text()
    if extra_filter:
        text = text.replace("*filter\n", "*filter\n", 1)
        text += extra_filter
    return parse_save(text)


# Docker 28 bridge network "bridge1" (192.0.2.0/24), container 192.0.2.2:80 published as host :8080.
DOCKER_HOST = HostView(local_addrs=frozenset({"198.51.100.1", "192.0.2.1", "172.17.0.1"}))
DOCKER_IN = flow(in_iface="eth0", out_iface="bridge1",
                 src="203.0.113.5", dst="198.51.100.1", sport=50000, dport=8080,
                 xsrc="203.0.113.5", xdst="192.0.2.2", xsport=50000, xdport=80, nat=frozenset({"DNAT"}),
                 orig=("203.0.113.5", "198.51.100.1", 50000, 8080), reply=("192.0.2.2", "203.0.113.5", 80, 50000))


def docker(f, rs=None):
    return flow_verdict({"iptables-nft": rs or load("docker28-usernet-portmap.rules")}, f, DOCKER_HOST)


def test_docker28_published_port_established_both_directions_accept():
    v = docker(DOCKER_IN)
    assert v.action == "ACCEPT" and "DOCKER-CT #2" in v.rule
    v = docker(reply_of(DOCKER_IN))
    assert v.action == "ACCEPT" and "DOCKER-FORWARD #5" in v.rule     # -i bridge1 -j ACCEPT


def test_docker28_one_way_udp_to_published_port_accepted_by_docker_chain():
    f = flow(proto=17, ctstate="NEW", ctstatus=frozenset({"CONFIRMED"}), in_iface="eth0", out_iface="bridge1",
             src="203.0.113.5", dst="198.51.100.1", sport=50000, dport=8080,
             xsrc="203.0.113.5", xdst="192.0.2.2", xsport=50000, xdport=80, nat=frozenset({"DNAT"}),
             orig=("203.0.113.5", "198.51.100.1", 50000, 8080), reply=("192.0.2.2", "203.0.113.5", 80, 50000))
    # the published port is TCP only: UDP falls through DOCKER to "! -i bridge1 -o bridge1 -j DROP"
    v = docker(f)
    assert v.action == "DROP" and v.rule == "iptables-nft filter DOCKER #3"


def test_docker28_raw_direct_access_drop():
    # Straight to the container address from outside: raw PREROUTING drops it.
    direct = flow(in_iface="eth0", out_iface="bridge1", src="203.0.113.5", dst="192.0.2.2", dport=80,
                  xsrc="203.0.113.5", xdst="192.0.2.2", xdport=80,
                  orig=("203.0.113.5", "192.0.2.2", 40000, 80), reply=("192.0.2.2", "203.0.113.5", 80, 40000))
    v = docker(direct)
    assert v.action == "DROP" and v.rule == "iptables-nft raw PREROUTING #1"


def test_docker28_isolation_drop_between_networks():
    # swarm fixture: docker_gwbridge -> docker_gwbridge is dropped by DOCKER-FORWARD
    rs = load("docker28-swarm-ingress-portmap.rules")
    f = flow(in_iface="docker_gwbridge", out_iface="docker_gwbridge", dport=9999, xdport=9999,
             orig=("10.0.1.2", "10.0.2.2", 40000, 9999), reply=("10.0.2.2", "10.0.1.2", 9999, 40000))
    # RELATED,ESTABLISHED -o docker_gwbridge in DOCKER-CT accepts established traffic first
    assert docker(f, rs).action == "ACCEPT"
    one_way = flow(proto=17, ctstate="NEW", ctstatus=frozenset({"CONFIRMED"}), in_iface="docker_gwbridge",
                   out_iface="docker_gwbridge", dport=9999, xdport=9999)
    v = docker(one_way, rs)
    assert v.action == "DROP" and v.rule in ("iptables-nft filter DOCKER #2", "iptables-nft filter DOCKER-FORWARD #6")


def test_docker28_user_rule_in_docker_user_drops_established():
    rs = load("docker28-usernet-portmap.rules")
    rs = parse_save((DATA / "docker28-usernet-portmap.rules").read_text().replace(
        "-A FORWARD -j DOCKER-USER", "-A FORWARD -j DOCKER-USER\n-A DOCKER-USER -s 203.0.113.5 -j DROP"))
    v = docker(DOCKER_IN, rs)
    assert v.action == "DROP" and v.rule == "iptables-nft filter DOCKER-USER #1"


def test_docker18_ufw_host_established_accept_and_log_punt():
    rs = load("docker18-multibridge-ufw-host.rules")
    host = HostView(local_addrs=frozenset({"198.51.100.1", "172.17.0.1"}))
    est = flow(in_iface="eth0", out_iface="docker0", src="203.0.113.5", dst="198.51.100.1", dport=9000,
               xsrc="203.0.113.5", xdst="172.17.0.2", xdport=9000, nat=frozenset({"DNAT"}))
    v = flow_verdict({"iptables-legacy": rs}, est, host)
    assert v.action == "ACCEPT" and v.rule == "iptables-legacy filter FORWARD #3"
    # One-way UDP between two hosts outside docker: ufw's logging chain (limit + LOG) is reached.
    new = flow(proto=17, ctstate="NEW", ctstatus=frozenset({"CONFIRMED"}), in_iface="eth0", out_iface="eth1")
    v = flow_verdict({"iptables-legacy": rs}, new, host)
    assert v.action == "PUNT" and "ufw-after-logging-forward #1" in v.reason


KUBE_JUMPS = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
COMMIT
"""


def kube_ruleset():
    """kube-proxy's restore payload plus the jumps it installs in the built-in chains
    (kube-proxy writes those separately with iptables -I)."""
    payload = (DATA / "kube-proxy-test-overall-rules.restore").read_text()
    base = parse_save(KUBE_JUMPS)
    rs = parse_save(payload)
    for name, chain in base.tables["filter"].chains.items():
        rs.tables["filter"].chains.setdefault(name, chain)
    return rs


KUBE_FLOW = flow(in_iface="cni0", out_iface="cni0", src="10.244.0.5", dst="172.30.0.41", dport=80,
                 xsrc="10.244.0.5", xdst="10.180.0.1", xdport=80, nat=frozenset({"DNAT"}),
                 orig=("10.244.0.5", "172.30.0.41", 40000, 80), reply=("10.180.0.1", "10.244.0.5", 80, 40000))
KUBE_HOST = HostView(local_addrs=frozenset({"192.168.99.1", "10.244.0.1"}))


def test_kube_proxy_service_established_flow_accepted_by_kube_forward():
    rs = kube_ruleset()
    for f in (KUBE_FLOW, reply_of(KUBE_FLOW)):
        v = flow_verdict({"iptables-nft": rs}, f, KUBE_HOST)
        assert v.action == "ACCEPT" and v.rule == "iptables-nft filter KUBE-FORWARD #3", v


def test_kube_proxy_masq_mark_accepts_and_one_way_udp_hits_service_reject():
    rs = kube_ruleset()
    marked = flow(mark=0x4000, ctstate="NEW", proto=17, ctstatus=frozenset({"CONFIRMED"}))
    assert flow_verdict({"iptables-nft": rs}, marked, KUBE_HOST).rule == "iptables-nft filter KUBE-FORWARD #2"
    # A one-way (ctstate NEW) flow to a service without endpoints reaches KUBE-SERVICES' REJECT.
    no_ep = flow(proto=6, ctstate="NEW", dst="172.30.0.46", xdst="172.30.0.46", dport=80, xdport=80)
    v = flow_verdict({"iptables-nft": rs}, no_ep, KUBE_HOST)
    assert v.action == "PUNT" and "KUBE-SERVICES #1" in v.reason and "REJECT" in v.reason


def test_kube_proxy_firewall_drop_for_new_flow_to_external_ip():
    rs = kube_ruleset()
    f = flow(proto=17, ctstate="NEW", ctstatus=frozenset({"CONFIRMED"}), dst="5.6.7.8", xdst="5.6.7.8")
    # -p tcp rule: UDP passes; TCP ctstate NEW to 192.168.99.22:80 hits KUBE-EXTERNAL-SERVICES DROP
    assert flow_verdict({"iptables-nft": rs}, f, KUBE_HOST).action == "ACCEPT"
    t = flow(ctstate="NEW", dst="192.168.99.22", xdst="192.168.99.22")
    v = flow_verdict({"iptables-nft": rs}, t, KUBE_HOST)
    assert v.action == "DROP" and v.rule == "iptables-nft filter KUBE-EXTERNAL-SERVICES #1"


FIXTURES = sorted(p.name for p in DATA.glob("*") if p.suffix in (".rules", ".restore"))


@pytest.mark.parametrize("name", FIXTURES)
def test_every_fixture_rule_is_classified(name):
    rs = parse_save((DATA / name).read_text())
    rows = classify({"iptables-nft": rs})
    assert len(rows) == sum(1 for _ in rs.rules()) + len(rs.unparsed)
    for row in rows:
        assert row.status in ("compiled", "punt", "unused")
        assert (row.reason is None) == (row.status == "compiled"), row
    # and the evaluator does not crash on any of them, for a few flows
    for f in (flow(), reply_of(DNAT_FLOW), flow(proto=17, ctstate="NEW")):
        assert flow_verdict({"iptables-nft": rs}, f, HOST).action in ("ACCEPT", "DROP", "PUNT")


def test_classify_docker18_reasons():
    rows = {(r.table, r.chain, r.index): r for r in
            classify({"iptables-legacy": load("docker18-multibridge-ufw-host.rules")})}
    assert rows[("filter", "FORWARD", 3)].status == "compiled"
    assert rows[("filter", "ufw-after-logging-forward", 1)].status == "punt"
    assert "limit" in rows[("filter", "ufw-after-logging-forward", 1)].reason
    assert rows[("nat", "DOCKER", 5)].status == "unused"
    assert rows[("filter", "ufw-before-input", 1)].status == "unused"       # INPUT only


def test_never_raises_on_shuffled_real_tokens():
    # Rules made of real tokens in random order: the parser, classify and the
    # evaluator must say punt or decide, never crash (acceptance 10 of issue 6).
    import random
    tokens = []
    for p in DATA.glob("*.r*"):
        for line in p.read_text().splitlines():
            if line.startswith("-A "):
                tokens.extend(line.split()[2:])
    rng = random.Random(6)
    lines = [f"-A FORWARD {' '.join(rng.choice(tokens) for _ in range(rng.randint(1, 12)))}" for _ in range(400)]
    rs = parse_save("*filter\n:FORWARD DROP [0:0]\n" + "\n".join(lines) + "\nCOMMIT\n")
    assert len(classify({"iptables-nft": rs})) == sum(1 for _ in rs.rules()) + len(rs.unparsed)
    for f in (flow(), reply_of(DNAT_FLOW), flow(proto=17, ctstate="NEW")):
        assert flow_verdict({"iptables-nft": rs}, f, HOST).action in ("ACCEPT", "DROP", "PUNT")
