"""The NAT rewrite against the kernel's own output.

Routed topology pod1 (10.1.0.2) -- node -- pod2 (10.2.0.2); the node has a
real rule set: DNAT 10.1.0.1:5353/udp and :8080/tcp to pod2 (:53, :80) and
MASQUERADE out of veth2.  Frames crafted byte for byte go from pod1 (or pod2)
through the kernel alone and are captured on the other side; the same frame
then runs through the datapath (BPF_PROG_TEST_RUN in the node's netns) on the
conntrack entry the kernel itself created, and must come out identical.
The pods drop what reaches their stacks, so no RST or ICMP disturbs the entry.
"""

import json
import subprocess
import sys
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from lm_bpfrun import SkBuff, TC_ACT_REDIRECT, ct_list, ct_set_tcp_flags, in_netns, prog_test_run
from mirror.datapath import BPF_DIR
from test_ct import SYSCTLS, BE_LIBERAL, GEN, VERDICT_BITS, nf_config, probe, probe_read, sysctl_path  # noqa: F401
from test_tc_ingress import FWD, R, UP

PKTIO = str(BPF_DIR.parent / "tests" / "integration" / "pktio.py")
VIP = "10.1.0.1"


def kernel_output(t, src_role, src_if, dst_role, dst_if, frame, seconds=1.0):
    """Send one frame from src_role, return the IPv4 frames captured at dst_role."""
    cap = t.popen(dst_role, [sys.executable, PKTIO, "capture", dst_if, str(seconds)],
                  stdout=subprocess.PIPE, text=True)
    assert cap.stdout.readline().strip() == "ready"
    t.run(src_role, [sys.executable, PKTIO, "send", src_if, bytes(frame).hex()])
    out, _ = cap.communicate(timeout=seconds + 10)
    frames = [bytes.fromhex(h) for h in json.loads(out.splitlines()[-1])]
    return [f for f in frames if f[12:14] == b"\x08\x00"]


def node_rules(t):
    for rule in (["-t", "nat", "-A", "PREROUTING", "-i", "veth1", "-d", VIP, "-p", "udp", "--dport", "5353",
                  "-j", "DNAT", "--to-destination", f"{t.pod2_ip}:53"],
                 ["-t", "nat", "-A", "PREROUTING", "-i", "veth1", "-d", VIP, "-p", "tcp", "--dport", "8080",
                  "-j", "DNAT", "--to-destination", f"{t.pod2_ip}:80"],
                 ["-t", "nat", "-A", "POSTROUTING", "-o", "veth2", "-j", "MASQUERADE"]):
        t.run("node", ["iptables", *rule])


def node_maps(t, maps):
    """The node's routing state, as the agent would mirror it; {dev: ifindex}."""
    idx = {dev: json.loads(t.run("node", ["ip", "-j", "link", "show", "dev", dev]).stdout)[0]["ifindex"]
           for dev in ("veth1", "veth2")}
    maps.clear()
    maps.link(idx["veth1"], t.node_mac1, UP | FWD)
    maps.link(idx["veth2"], t.node_mac2, UP | FWD)
    maps.route("10.1.0.0/24", oif=idx["veth1"])
    maps.route("10.2.0.0/24", oif=idx["veth2"])
    maps.route(f"{t.gw1_ip}/32", action=R["LOCAL"])
    maps.route(f"{t.gw2_ip}/32", action=R["LOCAL"])
    maps.neigh(idx["veth1"], t.pod1_ip, t.pod1_mac)
    maps.neigh(idx["veth2"], t.pod2_ip, t.pod2_mac)
    return idx


@pytest.fixture
def nat_node(routed_topology, maps):
    """The node's NAT rules; the pods' stacks drop what reaches them, and
    the node knows their MACs (no ARP), so crafted frames alone decide."""
    t = routed_topology
    node_rules(t)
    t.run("pod1", ["iptables", "-A", "INPUT", "-j", "DROP"])
    t.run("pod2", ["iptables", "-A", "INPUT", "-j", "DROP"])
    for ip, mac, dev in ((t.pod1_ip, t.pod1_mac, "veth1"), (t.pod2_ip, t.pod2_mac, "veth2")):
        t.run("node", ["ip", "neigh", "replace", ip, "lladdr", mac, "dev", dev, "nud", "permanent"])
    return t, node_maps(t, maps)


def node_config(t):
    """The node's own conntrack sysctls (defaults), mirrored as the agent would."""
    with in_netns(t.node):
        return nf_config({name: int(open(sysctl_path(name)).read()) for name in SYSCTLS})


def timeout_left(t, proto):
    with in_netns(t.node):
        [(_, left, _)] = ct_list("-p", proto)
    return left


def verdict_for(maps, probe, t, idx, frame, in_if, out_if):
    """Write the flow verdict the agent would: ACCEPT, with the entry's
    translation, mark and status (read from the kernel's entry)."""
    ip = Ether(bytes(frame))[IP]
    l4 = ip[TCP] if TCP in ip else ip[UDP]
    p = probe_read(probe, frame, idx[in_if])
    assert p.found == 1
    [(_, _, e)] = ct_list("-p", "tcp" if TCP in ip else "udp")
    if p.dir == 0:
        nat = (e["reply_dst"], e["reply_src"], int(e["reply_dport"]), int(e["reply_sport"]))
    else:
        nat = (e["dst"], e["src"], int(e["dport"]), int(e["sport"]))
    key = maps.flow_key(idx[in_if], ip.src, ip.dst, l4.sport, l4.dport, ip.proto)
    maps.flow(key, action=0, oif=idx[out_if], nat=nat, gen=GEN, ct_mark=p.mark, ct_status=p.status & VERDICT_BITS)


def fast_path_output(datapath, maps, frame, ifindex):
    before = maps.counters()[R["FORWARDED"]][0]
    res = prog_test_run(datapath.fd, bytes(frame), SkBuff(ifindex=ifindex))
    assert res.retval == TC_ACT_REDIRECT, maps.counters()
    assert maps.counters()[R["FORWARDED"]][0] == before + 1
    return res.data


def udp_frame(t, payload, chksum=None):
    f = (Ether(src=t.pod1_mac, dst=t.node_mac1) / IP(src=t.pod1_ip, dst=VIP, ttl=64, id=0x4242)
         / UDP(sport=40000, dport=5353) / payload)
    if chksum is not None:
        f[UDP].chksum = chksum
    return bytes(f)


@pytest.mark.parametrize("chksum", [None, 0], ids=["udp", "udp-no-checksum"])
def test_udp_dnat_masquerade_like_the_kernel(nat_node, datapath, maps, probe, chksum):
    t, idx = nat_node
    maps.set_config(60, **node_config(t))
    # First packet: the kernel makes the entry and the NAT choice.
    assert len(kernel_output(t, "pod1", "eth0", "pod2", "eth0", udp_frame(t, b"first", chksum))) == 1
    frame = udp_frame(t, b"second packet of the flow", chksum)
    [kernel] = kernel_output(t, "pod1", "eth0", "pod2", "eth0", frame)
    kernel_timeout = timeout_left(t, "udp")
    with in_netns(t.node):
        verdict_for(maps, probe, t, idx, frame, "veth1", "veth2")
        ours = fast_path_output(datapath, maps, frame, idx["veth1"])
    assert Ether(kernel)[IP].src == t.gw2_ip and Ether(kernel)[UDP].dport == 53  # NAT'd by the kernel
    assert ours == kernel, f"\n ours   {Ether(ours)!r}\n kernel {Ether(kernel)!r}"
    assert abs(timeout_left(t, "udp") - kernel_timeout) <= 1  # refreshed as udp_packet() does


def handshake(t, dst, dport):
    """pod1:40000 -> dst:dport through the node's kernel: SYN, SYN-ACK, ACK
    crafted from both pods.  Returns the port the server side sees."""
    syn = (Ether(src=t.pod1_mac, dst=t.node_mac1) / IP(src=t.pod1_ip, dst=dst, ttl=64, id=1, flags="DF")
           / TCP(sport=40000, dport=dport, flags="S", seq=1000, window=64240))
    [nat_syn] = kernel_output(t, "pod1", "eth0", "pod2", "eth0", syn)
    masq_port, server_port = Ether(nat_syn)[TCP].sport, Ether(nat_syn)[TCP].dport
    synack = (Ether(src=t.pod2_mac, dst=t.node_mac2) / IP(src=t.pod2_ip, dst=t.gw2_ip, ttl=64, id=2, flags="DF")
              / TCP(sport=server_port, dport=masq_port, flags="SA", seq=5000, ack=1001, window=65160))
    assert len(kernel_output(t, "pod2", "eth0", "pod1", "eth0", synack)) == 1
    ack = (Ether(src=t.pod1_mac, dst=t.node_mac1) / IP(src=t.pod1_ip, dst=dst, ttl=64, id=3, flags="DF")
           / TCP(sport=40000, dport=dport, flags="A", seq=1001, ack=5001, window=502))
    assert len(kernel_output(t, "pod1", "eth0", "pod2", "eth0", ack)) == 1
    with in_netns(t.node):
        [(_, _, e)] = ct_list("-p", "tcp")
        assert e["state"] == "ESTABLISHED" and "ASSURED" in e.get("flags", []), e
        ct_set_tcp_flags(t.pod1_ip, dst, 40000, dport, BE_LIBERAL, BE_LIBERAL)  # as the agent does
    return masq_port


def test_tcp_dnat_masquerade_both_directions_like_the_kernel(nat_node, datapath, maps, probe):
    t, idx = nat_node
    maps.set_config(60, **node_config(t))
    masq_port = handshake(t, VIP, 8080)

    data = (Ether(src=t.pod1_mac, dst=t.node_mac1) / IP(src=t.pod1_ip, dst=VIP, ttl=64, id=4, flags="DF")
            / TCP(sport=40000, dport=8080, flags="PA", seq=1001, ack=5001, window=502) / (b"d" * 100))
    reply = (Ether(src=t.pod2_mac, dst=t.node_mac2) / IP(src=t.pod2_ip, dst=t.gw2_ip, ttl=64, id=5, flags="DF")
             / TCP(sport=80, dport=masq_port, flags="PA", seq=5001, ack=1101, window=509) / (b"r" * 60))
    for frame, src, dst, in_if, out_if in ((data, "pod1", "pod2", "veth1", "veth2"),
                                           (reply, "pod2", "pod1", "veth2", "veth1")):
        [kernel] = kernel_output(t, src, "eth0", dst, "eth0", frame)
        kernel_timeout = timeout_left(t, "tcp")
        with in_netns(t.node):
            verdict_for(maps, probe, t, idx, frame, in_if, out_if)
            ours = fast_path_output(datapath, maps, frame, idx[in_if])
        assert ours == kernel, f"\n ours   {Ether(ours)!r}\n kernel {Ether(kernel)!r}"
        # The same packet again: the timeout tcp_packet() chose for it.
        assert abs(timeout_left(t, "tcp") - kernel_timeout) <= 1


def test_flow_with_a_helper_punts(nat_node, datapath, maps, probe):
    """An FTP control connection (helper assigned by a raw CT rule): the
    helper must see every segment, so none is fast-pathed."""
    t, idx = nat_node
    maps.set_config(60, **node_config(t))
    t.run("node", ["iptables", "-t", "raw", "-A", "PREROUTING", "-p", "tcp", "--dport", "21",
                   "-j", "CT", "--helper", "ftp"])
    handshake(t, t.pod2_ip, 21)
    data = (Ether(src=t.pod1_mac, dst=t.node_mac1) / IP(src=t.pod1_ip, dst=t.pod2_ip, ttl=64, id=4, flags="DF")
            / TCP(sport=40000, dport=21, flags="PA", seq=1001, ack=5001, window=502) / b"USER x\r\n")
    with in_netns(t.node):
        verdict_for(maps, probe, t, idx, data, "veth1", "veth2")
        before = maps.counters()
        res = prog_test_run(datapath.fd, bytes(data), SkBuff(ifindex=idx["veth1"]))
        after = maps.counters()
    punted = {r for r in after if after[r] != before[r]}
    assert res.retval == 0xFFFFFFFF and res.data == bytes(data)
    assert punted == {R["CT_STATUS"]}, punted  # IPS_HELPER (and the helper extension)


def test_tcp_in_retransmission_state_punts(nat_node, datapath, maps, probe):
    """The same segment again and again through the kernel: once the entry
    has counted tcp_max_retrans - 1 retransmissions, the next segment's
    timeout depends on whether it is one more; the kernel decides."""
    t, idx = nat_node
    maps.set_config(60, **node_config(t))
    handshake(t, VIP, 8080)
    seg = (Ether(src=t.pod1_mac, dst=t.node_mac1) / IP(src=t.pod1_ip, dst=VIP, ttl=64, id=4, flags="DF")
           / TCP(sport=40000, dport=8080, flags="PA", seq=1001, ack=5001, window=502) / (b"d" * 100))
    with in_netns(t.node):
        verdict_for(maps, probe, t, idx, seg, "veth1", "veth2")
    # Through the kernel: first sighting (retrans 0), then retrans 1, 2; the limit is 3.
    for sent, want in ((1, "FORWARDED"), (2, "FORWARDED"), (3, "CT_TCP_RETRANS")):
        assert len(kernel_output(t, "pod1", "eth0", "pod2", "eth0", seg, seconds=0.5)) == 1
        with in_netns(t.node):
            before = maps.counters()
            res = prog_test_run(datapath.fd, bytes(seg), SkBuff(ifindex=idx["veth1"]))
            after = maps.counters()
        assert {r for r in after if after[r] != before[r]} == {R[want]}, (sent, want)
    assert res.retval == 0xFFFFFFFF and res.data == bytes(seg)


def test_udp_replied_flow_before_and_after_two_seconds(nat_node, datapath, maps, probe):
    """udp_packet(): a replied flow younger than 2 s keeps the unreplied
    timeout and is fast-pathed; the first packet past 2 s would make the
    kernel set ASSURED, so it punts."""
    t, idx = nat_node
    maps.set_config(60, **node_config(t))
    started = time.monotonic()
    first = udp_frame(t, b"request")
    [nat_req] = kernel_output(t, "pod1", "eth0", "pod2", "eth0", first, seconds=0.3)
    reply = bytes(Ether(src=t.pod2_mac, dst=t.node_mac2) / IP(src=t.pod2_ip, dst=t.gw2_ip, ttl=64, id=7)
                  / UDP(sport=53, dport=Ether(nat_req)[UDP].sport) / b"answer")
    assert len(kernel_output(t, "pod2", "eth0", "pod1", "eth0", reply, seconds=0.3)) == 1
    frame = udp_frame(t, b"next request")
    with in_netns(t.node):
        verdict_for(maps, probe, t, idx, frame, "veth1", "veth2")
        young = time.monotonic() - started < 1.8
        res = prog_test_run(datapath.fd, frame, SkBuff(ifindex=idx["veth1"]))
        [(_, left, e)] = ct_list("-p", "udp")
    if young:  # (a loaded machine may take longer: then only the second half applies)
        assert res.retval == TC_ACT_REDIRECT and "ASSURED" not in e.get("flags", [])
        assert left == node_config(t)["to_udp"] or left == node_config(t)["to_udp"] - 1
    time.sleep(max(0.0, started + 2.3 - time.monotonic()))
    with in_netns(t.node):
        before = maps.counters()
        res = prog_test_run(datapath.fd, frame, SkBuff(ifindex=idx["veth1"]))
        after = maps.counters()
    assert {r for r in after if after[r] != before[r]} == {R["CT_NOT_ESTABLISHED"]}
