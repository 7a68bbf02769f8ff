"""The fuzzer's bridge and nat features, pure parts: what the generator
renders and how the comparison treats NAT'd and kernel-chosen frames."""

import dataclasses
import os
import sys

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))),
                                "tools"))

import fuzz_bridge  # noqa: E402
import fuzz_gen as g  # noqa: E402
import fuzz_nat  # noqa: E402
import fuzz_net  # noqa: E402


def links(used=(1, 2), bridged=()):
    return tuple(g.Link(i, i in used, 24, 1500, 1, 0, "permanent", bridged=i in bridged) for i in range(1, g.PODS + 1))


def test_bridged_pods_share_the_bridge_subnet_and_the_node_address_is_on_br0():
    t = g.Topology(links((1, 2, 3), bridged=(1, 2)), (), 1, 0, features=("bridge",),
                   bridge=fuzz_bridge.Bridge(ports=(fuzz_bridge.Port(1), fuzz_bridge.Port(2))))
    cmds = g.node_commands(t, None)
    assert "link set veth1 master br0" in cmds and "link set veth3 nomaster" in cmds
    assert "addr add 10.100.0.1/24 dev br0" in cmds and "addr add 10.3.0.1/24 dev veth3" in cmds
    assert "neigh replace 10.100.0.11 lladdr 02:00:0b:00:01:02 dev br0 nud permanent" in cmds
    assert t.node_ips() == ["10.100.0.1", "10.3.0.1"]
    assert g.pod_commands(t, 2) == ["addr flush dev eth0", "addr add 10.100.0.12/24 dev eth0"]
    bridge = fuzz_bridge.bridge_commands(t)
    assert bridge[:2] == ["fdb flush dev br0 added_by_user", "fdb flush dev br0 dynamic"]
    assert bridge[2].startswith("link set dev veth1 state 3 learning on flood on")


def test_a_bridged_sender_addresses_the_node_by_the_bridge_mac():
    t = g.Topology(links((1, 2, 3), bridged=(1, 2)), (), 1, 0, features=("bridge",),
                   bridge=fuzz_bridge.Bridge(ports=(fuzz_bridge.Port(1), fuzz_bridge.Port(2))))
    assert g.frame_dst_mac(t, g.Packet(sender=1)) == fuzz_bridge.BRIDGE_MAC
    assert g.frame_dst_mac(t, g.Packet(sender=3)) == g.node_mac(3)
    assert g.frame_dst_mac(t, g.Packet(sender=1, l2="pod", l2_arg=2)) == g.pod_mac(2)
    assert g.frame_dst_mac(t, g.Packet(sender=1, l2="linklocal", l2_arg=0xe)) == "01:80:c2:00:00:0e"


def nat_topology():
    nat = fuzz_nat.Nat(dnat=(fuzz_nat.Dnat("tcp", "10.96.0.10", 80, 2, 8080),),
                       snat=(fuzz_nat.Snat(1, 2, "MASQUERADE"),))
    return g.Topology(links((1, 2, 3)), (), 1, 0, features=("nat",), nat=nat)


def test_the_server_sees_the_service_translated_and_the_client_masqueraded():
    t = nat_topology()
    assert fuzz_nat.server_view(t, 1, "tcp", "10.96.0.10", 80) == (2, "10.2.0.2", 8080, "10.2.0.1")
    assert fuzz_nat.server_view(t, 3, "tcp", "10.96.0.10", 80) == (2, "10.2.0.2", 8080, "10.3.0.2")
    assert fuzz_nat.server_view(t, 1, "udp", "10.96.0.10", 80) == (None, "10.96.0.10", 80, "10.1.0.2")
    text = g.iptables_restore(t, "case-7")
    assert "-A PREROUTING -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.2.0.2:8080" in text
    assert "-A POSTROUTING -s 10.1.0.0/24 -o veth2 -j MASQUERADE" in text
    assert "-A LMF-SYNC -m comment --comment case-7 -j RETURN" in text


def test_a_tcp_flow_numbers_its_segments_exactly_and_waits_after_the_first_data():
    t = nat_topology()
    flow = fuzz_nat.tcp_flow(t, client=1, dst="10.96.0.10", dport=80, data=((0, 100), (1, 40), (0, 1)))
    flags = [p.l4[2] for p in flow]
    assert flags == ["S", "SA", "A", "PA", "PA", "PA", "FA", "FA", "A"]
    syn, synack, ack, d1, d2, d3 = flow[:6]
    assert synack.l4[4] == syn.l4[3] + 1 and ack.l4[3:] == (syn.l4[3] + 1, synack.l4[3] + 1)
    assert d2.l4[4] == d1.l4[3] + 100 and d3.l4[3] == d1.l4[3] + 100 and d3.l4[4] == d2.l4[3] + 40
    assert synack.sender == 2 and synack.dst == ("addr", "10.2.0.1") and synack.l4[:2] == (8080, syn.l4[0])
    assert [p.pause for p in flow[3:6]] == [0.0, fuzz_nat.PAUSE, fuzz_nat.PAUSE]
    assert all(len(f) < 1600 for f in g.Case(t, flow).frames())


def test_a_flow_segment_never_exceeds_the_node_side_mtu_of_its_veth():
    t = nat_topology()
    t = dataclasses.replace(t, links=tuple(dataclasses.replace(l, mtu=576 if l.index == 2 else l.mtu)
                                           for l in t.links))
    flow = fuzz_nat.tcp_flow(t, client=1, dst="10.96.0.10", dport=80, data=((0, 1400), (1, 1400)))
    assert [p.payload for p in flow if p.sender == 2 and p.payload] == [528]  # room for IP options too


def _frame(sport, dport=80, src="10.1.0.2", ident=0x21, proto=UDP):
    return bytes(Ether() / IP(src=src, dst="10.2.0.2", id=ident) / proto(sport=sport, dport=dport) / b"x")


def test_kernel_chosen_ports_are_tolerated_only_one_to_one_and_when_both_copies_changed_them():
    sent = _frame(62000)
    a, b = _frame(1000).hex(), _frame(2000).hex()
    chosen = {}
    assert fuzz_net._kernel_chosen_ports([(2, a)], [(2, b)], chosen, sent)
    assert fuzz_net._kernel_chosen_ports([(2, a)], [(2, b)], chosen, sent)       # the same pairing again
    assert not fuzz_net._kernel_chosen_ports([(2, a)], [(2, _frame(3000).hex())], chosen, sent)
    assert not fuzz_net._kernel_chosen_ports([(2, a)], [(2, sent.hex())], {}, sent)  # B left it as sent
    other = bytes(Ether() / IP(src="10.1.0.2", dst="10.2.0.2", id=0x21, ttl=3) / UDP(sport=2000, dport=80) / b"x")
    assert not fuzz_net._kernel_chosen_ports([(2, a)], [(2, other.hex())], {}, sent)  # more than the port


def test_translated_frames_from_a_node_address_keep_their_id_node_rsts_do_not():
    own = fuzz_net._Own([g.ipaddress.ip_network("10.2.0.1/32")])
    masqueraded = _frame(62000, src="10.2.0.1", ident=(5 << 5) | 3)
    assert not fuzz_net._node_sent(masqueraded, own)
    assert fuzz_net._owner(masqueraded, own, 8, 5) == 3
    rst = bytes(Ether() / IP(src="10.2.0.1", dst="10.1.0.2", id=0) / TCP(sport=22, dport=62000, flags="RA"))
    assert fuzz_net._node_sent(rst, own)
    assert fuzz_net._owner(rst, own, 8, 5) is None


def test_an_icmp_error_is_the_nodes_whatever_its_source_and_belongs_to_the_quoted_packet():
    """NAT rewrites the source of an error about a translated flow (here to
    the service address): still the node's, owned by the quoted packet's id."""
    from scapy.layers.inet import ICMP
    own = fuzz_net._Own([g.ipaddress.ip_network("10.2.0.1/32")])
    quoted = IP(src="10.1.0.2", dst="10.96.0.10", id=(5 << 5) | 4, ttl=1) / UDP(sport=62001, dport=80)
    error = bytes(Ether() / IP(src="10.96.0.10", dst="10.1.0.2", id=4242) / ICMP(type=11, code=0) / quoted)
    assert fuzz_net._node_sent(error, own)
    assert fuzz_net._owner(error, own, 8, 5) == 4
    assert fuzz_net._normalize(error, own)[18:20] == b"\0\0"
