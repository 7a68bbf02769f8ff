"""Pure parts of `loxi-mirror explain` (mirror/explain.py): the frame
builder (checked against scapy's own checksums), stage naming from the
datapath source, the pcap reader (against scapy's writer), the notes and
the text/--json rendering."""

import json

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from mirror import explain as ex
from mirror.datapath import source_text
from mirror.translate import LINK_REDIRECT_PEER, LinkEntry, RouteEntry

NODE_MAC = "02:00:0a:01:00:01"


@pytest.mark.parametrize("proto,layer", [("tcp", TCP), ("udp", UDP), ("icmp", ICMP)])
@pytest.mark.parametrize("length", [None, 28 + 20, 1500])
def test_frame_checksums_and_fields_match_scapy(proto, layer, length):
    spec = ex.PacketSpec("10.1.0.2", "10.2.0.2", proto=proto, sport=1234, dport=443, ttl=7, length=length)
    frame = ex.build_frame(spec, NODE_MAC)
    pkt = Ether(frame)
    assert pkt.dst == NODE_MAC and pkt[IP].src == "10.1.0.2" and pkt[IP].dst == "10.2.0.2"
    assert pkt[IP].ttl == 7 and pkt[IP].len == (length or spec.header_len() + 32) == len(frame) - 14
    # Recomputed by scapy from scratch: the same bytes.
    again = Ether(frame)
    del again[IP].chksum
    del again[layer].chksum
    assert bytes(again) == frame
    if proto != "icmp":
        assert (pkt[layer].sport, pkt[layer].dport) == (1234, 443)
    if proto == "tcp":
        assert pkt[TCP].flags == "A"


def test_frame_tcp_flags_and_bad_lengths():
    syn = ex.build_frame(ex.PacketSpec("10.0.0.1", "10.0.0.2", proto="tcp", tcp_flags="S"), NODE_MAC)
    assert Ether(syn)[TCP].flags == "S"
    with pytest.raises(ValueError):
        ex.build_frame(ex.PacketSpec("10.0.0.1", "10.0.0.2", proto="tcp", length=30), NODE_MAC)


def test_stages_are_named_from_the_datapath_source_in_order():
    sites = ex.stage_sites(source_text())
    names = [sites[i] for i in sorted(sites)]
    assert names[0] == "gate" and names.index("parse_eth") < names.index("parse_ipv4") < names.index("fib_route")
    assert names.index("fib_route") < names.index("fib_neigh") < names.index("rewrite") < names.index("xmit")
    # Every stage has a title for people: a new stage must add one here.
    assert set(names) <= set(ex.STAGE_TITLES), set(names) - set(ex.STAGE_TITLES)


def test_stage_sites_refuses_a_stray_counter():
    text = "enum { LM_STAGE_ID_BASE = __COUNTER__ };\nint x = __COUNTER__;\nLM_STAGE(reason, lm_gate(skb, &p));\n"
    with pytest.raises(ValueError):
        ex.stage_sites(text)
    ok = "enum { LM_STAGE_ID_BASE = __COUNTER__ };\n\tLM_STAGE(reason, lm_gate(skb, &p));\n" \
         "#define LM_STAGE(reason, call) x\n\tLM_STAGE(reason, lm_fib_route(skb, &p));\n"
    assert ex.stage_sites(ok) == {0: "gate", 1: "fib_route"}


def test_magic_comes_from_common_h():
    assert ex.explain_magic("#define LM_EXPLAIN_MAGIC 0x4c4d5845 /* x */") == 0x4C4D5845


def test_read_pcap_matches_scapy(tmp_path):
    frames = [ex.build_frame(ex.PacketSpec("10.0.0.1", f"10.0.0.{i}"), NODE_MAC) for i in range(2, 6)]
    path = tmp_path / "f.pcap"
    wrpcap(str(path), [Ether(f) for f in frames])
    assert ex.read_pcap(path.read_bytes()) == frames
    with pytest.raises(ValueError, match="not a pcap"):
        ex.read_pcap(b"\x0a\x0d\x0d\x0a" + bytes(40))


def _result(verdict="NO_NEIGHBOR"):
    steps = [{"stage": s, "verdict": "FORWARDED"} for s in
             ("gate", "parse_eth", "parse_ipv4", "fib_route", "fib_source", "fib_egress", "fwd_checks", "fib_neigh")]
    steps[-1]["verdict"] = verdict
    frame = ex.build_frame(ex.PacketSpec("10.1.0.2", "10.2.0.9"), NODE_MAC)
    return {"verdict": verdict, "action": ex.outcome(verdict), "why": "no resolved neighbour for the next hop",
            "retval": 0xFFFFFFFF, "steps": steps, "packet": ex.frame_summary(frame),
            "route": {"daddr": "10.2.0.9", "oif": 3, "gateway": None, "mtu": 1500}}


def test_notes_name_route_and_neighbour():
    r = _result()
    r["steps"].insert(7, {"stage": "rewrite", "verdict": "FORWARDED"})  # (not where it runs: a note test)
    r["steps"].insert(8, {"stage": "xmit", "verdict": "FORWARDED"})
    ctx = {"names": {2: "veth1", 3: "veth2"}, "ingress": "veth1",
           "links": {3: LinkEntry(mac=NODE_MAC, flags=LINK_REDIRECT_PEER, mtu=1500)},
           "routes": {("10.2.0.0", 24): RouteEntry(action=0, oif=3, mtu=1500), ("0.0.0.0", 0): RouteEntry(18)},
           "neighbors": {}, "kernel_neighbors": {(3, "10.2.0.9"): "INCOMPLETE"}}
    ex.stage_notes(r, ctx)
    notes = {s["stage"]: s.get("note") for s in r["steps"]}
    assert notes["gate"] == "veth1 is managed"
    assert notes["fib_route"] == "route 10.2.0.0/24 dev veth2 mtu 1500"
    assert notes["fib_neigh"] == "10.2.0.9 dev veth2: kernel entry INCOMPLETE"
    assert notes["fib_egress"] == "veth2 is up and managed"
    assert notes["xmit"] == "bpf_redirect_peer: into the peer of veth2"
    assert notes["rewrite"] is None


def test_longest_prefix():
    routes = {("10.0.0.0", 8): "a", ("10.2.0.0", 16): "b", ("10.2.3.4", 32): "c", ("0.0.0.0", 0): "d"}
    assert ex.longest_prefix(routes, "10.2.3.4") == ("10.2.3.4/32", "c")
    assert ex.longest_prefix(routes, "10.2.9.9") == ("10.2.0.0/16", "b")
    assert ex.longest_prefix(routes, "192.168.1.1") == ("0.0.0.0/0", "d")
    assert ex.longest_prefix({}, "1.2.3.4") is None


def test_render_text_and_json():
    r = _result()
    r["steps"][-1]["note"] = "10.2.0.9 dev veth2: no kernel entry"
    text = ex.render_text(r, "veth1")
    lines = text.splitlines()
    assert lines[0] == "packet: udp 10.1.0.2:40000 -> 10.2.0.9:80 ttl 64 len 60 in veth1"
    assert lines[1].split()[:3] == ["1.", "interface", "ok"]
    assert "neighbour" in lines[8] and "NO_NEIGHBOR" in lines[8] and lines[8].endswith("no kernel entry")
    assert lines[-1] == "verdict: punt NO_NEIGHBOR: no resolved neighbour for the next hop"
    assert json.loads(json.dumps(r)) == r  # what --json prints is plain JSON
    assert ex.outcome("NF_DROP") == "drop" and ex.outcome("FORWARDED") == "forward"
