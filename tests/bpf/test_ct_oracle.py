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

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from lm_bpfrun import SkBuff, TC_ACT_REDIRECT, ct_list, ct_set_tcp_flags, in_netns, prog_test_run
from mirror.datapath import BPF_DIR
from test_ct import BE_LIBERAL, GEN, VERDICT_BITS, nf_config, nf_sysctls, probe, probe_read  # noqa: F401
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


@pytest.fixture
def nat_node(routed_topology, maps):
    t = routed_topology
    for rule in (["-t", "nat", "-A", "PREROUTING", "-i", "veth1", "-d", VIP, "-p", "udp", "--dport", "5353",
                  "-j", "DNAT", "--to-destination", f"{t.pod2_ip}:53"],
                 ["-t", "nat", "-A", "PREROUTING", "-i", "veth1", "-d", VIP, "-p", "tcp", "--dport", "8080",
                  "-j", "DNAT", "--to-destination", f"{t.pod2_ip}:80"],
                 ["-t", "nat", "-A", "POSTROUTING", "-o", "veth2", "-j", "MASQUERADE"]):
        t.run("node", ["iptables", *rule])
    t.run("pod1", ["iptables", "-A", "INPUT", "-j", "DROP"])
    t.run("pod2", ["iptables", "-A", "INPUT", "-j", "DROP"])
    for ip, mac, dev in ((t.pod1_ip, t.pod1_mac, "veth1"), (t.pod2_ip, t.pod2_mac, "veth2")):
        t.run("node", ["ip", "neigh", "replace", ip, "lladdr", mac, "dev", dev, "nud", "permanent"])
    idx = {dev: json.loads(t.run("node", ["ip", "-j", "link", "show", "dev", dev]).stdout)[0]["ifindex"]
           for dev in ("veth1", "veth2")}
    # The node's routing state, as the agent would mirror it.
    maps.clear()
    maps.link(idx["veth1"], t.node_mac1, UP | FWD)
    maps.link(idx["veth2"], t.node_mac2, UP | FWD)
    maps.route("10.1.0.0/24", oif=idx["veth1"])
    maps.route("10.2.0.0/24", oif=idx["veth2"])
    maps.route(f"{t.gw1_ip}/32", action=R["LOCAL"])
    maps.route(f"{t.gw2_ip}/32", action=R["LOCAL"])
    maps.neigh(idx["veth1"], t.pod1_ip, t.pod1_mac)
    maps.neigh(idx["veth2"], t.pod2_ip, t.pod2_mac)
    return t, idx


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
def test_udp_dnat_masquerade_like_the_kernel(nat_node, datapath, maps, probe, nf_sysctls, chksum):
    t, idx = nat_node
    with in_netns(t.node):
        maps.set_config(60, **nf_config(nf_sysctls))
    # First packet: the kernel makes the entry and the NAT choice.
    assert len(kernel_output(t, "pod1", "eth0", "pod2", "eth0", udp_frame(t, b"first", chksum))) == 1
    frame = udp_frame(t, b"second packet of the flow", chksum)
    [kernel] = kernel_output(t, "pod1", "eth0", "pod2", "eth0", frame)
    with in_netns(t.node):
        verdict_for(maps, probe, t, idx, frame, "veth1", "veth2")
        ours = fast_path_output(datapath, maps, frame, idx["veth1"])
    assert Ether(kernel)[IP].src == t.gw2_ip and Ether(kernel)[UDP].dport == 53  # NAT'd by the kernel
    assert ours == kernel, f"\n ours   {Ether(ours)!r}\n kernel {Ether(kernel)!r}"


def test_tcp_dnat_masquerade_both_directions_like_the_kernel(nat_node, datapath, maps, probe, nf_sysctls):
    t, idx = nat_node
    with in_netns(t.node):
        maps.set_config(60, **nf_config(nf_sysctls))
    syn = (Ether(src=t.pod1_mac, dst=t.node_mac1) / IP(src=t.pod1_ip, dst=VIP, ttl=64, id=1, flags="DF")
           / TCP(sport=40000, dport=8080, flags="S", seq=1000, window=64240))
    [nat_syn] = kernel_output(t, "pod1", "eth0", "pod2", "eth0", syn)
    masq_port = Ether(nat_syn)[TCP].sport
    # The handshake, as the kernel would track it: pod2's SYN-ACK, pod1's ACK.
    synack = (Ether(src=t.pod2_mac, dst=t.node_mac2) / IP(src=t.pod2_ip, dst=t.gw2_ip, ttl=64, id=2, flags="DF")
              / TCP(sport=80, dport=masq_port, flags="SA", seq=5000, ack=1001, window=65160))
    assert len(kernel_output(t, "pod2", "eth0", "pod1", "eth0", synack)) == 1
    ack = (Ether(src=t.pod1_mac, dst=t.node_mac1) / IP(src=t.pod1_ip, dst=VIP, ttl=64, id=3, flags="DF")
           / TCP(sport=40000, dport=8080, flags="A", seq=1001, ack=5001, window=502))
    assert len(kernel_output(t, "pod1", "eth0", "pod2", "eth0", ack)) == 1
    with in_netns(t.node):
        [(_, _, e)] = ct_list("-p", "tcp")
        assert e["state"] == "ESTABLISHED" and "ASSURED" in e.get("flags", []), e
        ct_set_tcp_flags(t.pod1_ip, VIP, 40000, 8080, BE_LIBERAL, BE_LIBERAL)  # as the agent does

    data = (Ether(src=t.pod1_mac, dst=t.node_mac1) / IP(src=t.pod1_ip, dst=VIP, ttl=64, id=4, flags="DF")
            / TCP(sport=40000, dport=8080, flags="PA", seq=1001, ack=5001, window=502) / (b"d" * 100))
    reply = (Ether(src=t.pod2_mac, dst=t.node_mac2) / IP(src=t.pod2_ip, dst=t.gw2_ip, ttl=64, id=5, flags="DF")
             / TCP(sport=80, dport=masq_port, flags="PA", seq=5001, ack=1101, window=509) / (b"r" * 60))
    for frame, src, dst, in_if, out_if in ((data, "pod1", "pod2", "veth1", "veth2"),
                                           (reply, "pod2", "pod1", "veth2", "veth1")):
        [kernel] = kernel_output(t, src, "eth0", dst, "eth0", frame)
        with in_netns(t.node):
            verdict_for(maps, probe, t, idx, frame, in_if, out_if)
            ours = fast_path_output(datapath, maps, frame, idx[in_if])
        assert ours == kernel, f"\n ours   {Ether(ours)!r}\n kernel {Ether(kernel)!r}"
