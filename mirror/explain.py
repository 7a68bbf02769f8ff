"""`loxi-mirror explain`: what the fast path does with one packet, and why.

The answer is never computed here: the agent runs the frame through the
LOADED program with BPF_PROG_TEST_RUN as an explain run (kernel_bpf/
explain.h: no side effect on datapath state) and reads back the stages the
program ran and what each said.  This module builds the frame, does the run,
names the stages (from the compiled source: the line of each LM_STAGE call),
adds what the agent knows about the culprit (route, neighbour, flow entry,
ruleset) and renders the result.  Frame building and rendering are pure.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import socket
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional

from .bpfsys import SkBuff, prog_test_run
from .reasons import BY_NAME, REASONS
from .translate import LINK_REDIRECT_PEER, ROUTE_KERNEL

COMMON_H_DEFINE = re.compile(r"#define\s+(LM_EXPLAIN_MAGIC)\s+(0x[0-9a-fA-F]+|\d+)")
_ANCHOR = "LM_STAGE_ID_BASE = __COUNTER__"
_STAGE_CALL = re.compile(r"\bLM_STAGE\(\s*\w+\s*,\s*lm_(\w+)\s*\(")

REASON_BY_VALUE = {r.value: r for r in REASONS}
PROTOS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "icmp": socket.IPPROTO_ICMP}
TCP_FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20}
CLIENT_MAC = "02:00:5e:00:00:01"  # the frame's source MAC: the datapath does not look at it
TC_ACT_SHOT, TC_ACT_REDIRECT = 2, 7
MAX_STAGES = 32  # bits of lm_pkt.ran (LM_STAGE_BIT)

# What each stage function is about, for people.  The stages themselves come
# from the compiled source (stage_sites); a stage missing here shows by its
# function name, and tests/unit/test_explain_pure.py fails until it is added.
STAGE_TITLES = {
    "gate": "interface", "parse_eth": "parse Ethernet", "parse_ipv4": "parse IPv4", "ct": "conntrack",
    "fib_route": "route", "fib_source": "source check", "fib_egress": "egress", "fwd_checks": "TTL/MTU",
    "verdict": "ruleset verdict", "fib_neigh": "neighbour", "rewrite": "rewrite", "xmit": "xmit",
    "nat": "NAT rewrite",
    "l2_ingress": "bridge port/FDB", "l2_egress": "bridge egress", "l2_forward": "bridge forward",  # l2.h
}


def explain_magic(common_h_text: str) -> int:
    m = COMMON_H_DEFINE.search(common_h_text)
    if not m:
        raise ValueError("common.h has no LM_EXPLAIN_MAGIC")
    return int(m.group(2), 0)


def stage_sites(text: str) -> Dict[int, str]:
    """{LM_STAGE_ID: stage name} of the compiled text (datapath.text): the
    LM_STAGE calls after explain.h's counter anchor, numbered in order, as
    __COUNTER__ numbers them."""
    anchor = text.find(_ANCHOR)
    if anchor < 0:
        raise ValueError("the datapath source has no LM_STAGE_ID_BASE anchor (explain.h)")
    body = text[anchor + len(_ANCHOR):]
    stray = [ln for ln in body.splitlines() if "__COUNTER__" in ln and not ln.lstrip().startswith("#define")]
    if stray or "__COUNTER__" in text[:anchor].replace("#define LM_STAGE_ID (__COUNTER__", ""):
        raise ValueError("__COUNTER__ used outside LM_STAGE_ID: explain would misname the stages")
    calls = [m.group(1) for ln in body.splitlines() if not ln.lstrip().startswith("#define")
             for m in [_STAGE_CALL.search(ln)] if m]
    if len(calls) > MAX_STAGES:
        raise ValueError(f"{len(calls)} LM_STAGE calls: p.ran has bits for {MAX_STAGES}")
    return dict(enumerate(calls))


# --- the frame ------------------------------------------------------------------


@dataclass(frozen=True)
class PacketSpec:
    src: str
    dst: str
    proto: str = "udp"
    sport: int = 40000
    dport: int = 80
    ttl: int = 64
    length: Optional[int] = None  # IPv4 total length; None: headers + 32 bytes
    tcp_flags: str = "A"

    def header_len(self) -> int:
        return 20 + {"tcp": 20, "udp": 8, "icmp": 8}[self.proto]


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _mac(m: str) -> bytes:
    return bytes.fromhex(m.replace(":", ""))


def build_frame(spec: PacketSpec, dst_mac: str, src_mac: str = CLIENT_MAC) -> bytes:
    """An Ethernet + IPv4 + TCP/UDP/ICMP echo frame with valid checksums
    (DF set, as TCP stacks send), total length spec.length."""
    hdr = spec.header_len()
    tot = spec.length if spec.length is not None else hdr + 32
    if not hdr <= tot <= 65535:
        raise ValueError(f"--len must be between {hdr} and 65535 for {spec.proto}")
    if not 0 <= spec.ttl <= 255:
        raise ValueError("--ttl must be 0..255")
    payload = bytes(tot - hdr)
    src, dst = socket.inet_aton(spec.src), socket.inet_aton(spec.dst)
    proto = PROTOS[spec.proto]
    if spec.proto == "icmp":
        l4 = struct.pack("!BBHHH", 8, 0, 0, spec.sport & 0xFFFF, 1) + payload
        l4 = l4[:2] + struct.pack("!H", _csum(l4)) + l4[4:]
    else:
        pseudo = src + dst + struct.pack("!BBH", 0, proto, tot - 20)
        if spec.proto == "tcp":
            flags = sum(TCP_FLAG_BITS[c] for c in spec.tcp_flags.upper())
            l4 = struct.pack("!HHIIBBHHH", spec.sport, spec.dport, 1000, 2000, 5 << 4, flags, 8192, 0, 0) + payload
            at = 16
        else:
            l4 = struct.pack("!HHHH", spec.sport, spec.dport, tot - 20, 0) + payload
            at = 6
        check = _csum(pseudo + l4) or (0xFFFF if spec.proto == "udp" else 0)
        l4 = l4[:at] + struct.pack("!H", check) + l4[at + 2:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, tot, 1, 0x4000, spec.ttl, proto, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return _mac(dst_mac) + _mac(src_mac) + b"\x08\x00" + ip + l4


def frame_summary(frame: bytes) -> Dict:
    """The addresses and ports of an Ethernet/IPv4 frame (for output)."""
    out: Dict = {"frame_len": len(frame)}
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return out
    out["ip_len"] = struct.unpack("!H", frame[16:18])[0]
    ihl = (frame[14] & 0xF) * 4
    proto = frame[23]
    out.update(src=socket.inet_ntoa(frame[26:30]), dst=socket.inet_ntoa(frame[30:34]), ttl=frame[22],
               proto={v: k for k, v in PROTOS.items()}.get(proto, str(proto)),
               eth_src=frame[6:12].hex(":"), eth_dst=frame[0:6].hex(":"))
    if proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP) and len(frame) >= 14 + ihl + 4:
        out["sport"], out["dport"] = struct.unpack("!HH", frame[14 + ihl:18 + ihl])
    return out


# --- the run --------------------------------------------------------------------


def _ip(u32: int) -> str:
    return socket.inet_ntoa(struct.pack("<I", u32))


class Explainer:
    """Runs explain runs on a loaded mirror.datapath.Datapath.  Call run()
    from a thread in the datapath's network namespace (ctx.ifindex is
    resolved there)."""

    def __init__(self, datapath, common_h_text: str):
        self.dp = datapath
        self.magic = explain_magic(common_h_text)
        self.sites = stage_sites(datapath.text)
        self.trace = datapath.table("explain_trace")

    def run(self, frame: bytes, ifindex: int) -> Dict:
        nonce = secrets.randbits(32) | 1
        ctx = SkBuff(ifindex=ifindex)
        ctx.cb[0], ctx.cb[1] = self.magic, nonce
        res = prog_test_run(self.dp.fd, frame, ctx)
        mine = [t for t in self.trace.getvalue(self.trace.Key(0)) if t.nonce == nonce]
        if len(mine) != 1:
            raise RuntimeError("the explain run left no trace (is the program an explain-capable build?)")
        return self.decode(mine[0], res.retval, res.data, frame)

    def decode(self, t, retval: int, out: bytes, frame: bytes) -> Dict:
        final = t.reason if t.reason in REASON_BY_VALUE else BY_NAME["ROUTE_UNSUPPORTED"]  # as lm_exit()
        reason = REASON_BY_VALUE[final]
        ran = [self.sites.get(i, f"stage {i}") for i in range(MAX_STAGES) if t.ran >> i & 1]
        steps = [{"stage": stage, "verdict": "FORWARDED"} for stage in ran]
        if steps:
            steps[-1]["verdict"] = REASON_BY_VALUE[t.reason].name if t.reason in REASON_BY_VALUE \
                else f"route action {t.reason}"
        result = {"verdict": reason.name, "action": outcome(reason.name), "why": reason.description,
                  "retval": retval, "steps": steps, "packet": frame_summary(frame)}
        if t.oif:
            result["route"] = {"daddr": _ip(t.daddr), "oif": t.oif,
                               "gateway": _ip(t.gateway) if t.gateway else None, "mtu": t.mtu}
        if reason.name == "FORWARDED":
            result["out"] = frame_summary(out)
            result["frame_out"] = out.hex()
        return result


def outcome(verdict: str) -> str:
    if verdict == "FORWARDED":
        return "forward"
    return "drop" if REASONS[BY_NAME[verdict]].drop else "punt"


# --- what the agent knows about the culprit ------------------------------------


def longest_prefix(routes: Dict, daddr: str):
    """(prefix, entry) of the desired-routes dict matching daddr, or None."""
    addr = ipaddress.IPv4Address(daddr)
    for plen in range(32, -1, -1):
        net = str(ipaddress.IPv4Network((int(addr) >> (32 - plen) << (32 - plen) if plen else 0, plen)).network_address)
        entry = routes.get((net, plen))
        if entry is not None:
            return f"{net}/{plen}", entry
    return None


def stage_notes(result: Dict, ctx: Dict) -> None:
    """Add a 'note' to the steps the agent can say more about.  ctx: names
    {ifindex: name}, routes (desired), neighbors (desired), kernel_neighbors
    {(ifindex, ip): state name}, flow (the flows entry or None), nf_gen,
    conntrack (conntrack_entry() or None), global_punt (why all forwarding
    punts, or None), ingress (name)."""
    names = ctx.get("names", {})
    pkt = result["packet"]
    route = result.get("route")
    daddr = route["daddr"] if route else pkt.get("dst")
    for step in result["steps"]:
        note = _note(step["stage"], step["verdict"], daddr, route, pkt, names, ctx)
        if note:
            step["note"] = note


def _note(stage, verdict, daddr, route, pkt, names, ctx):
    dev = lambda i: names.get(i, f"ifindex {i}")  # noqa: E731
    if stage == "gate":
        if verdict == "IFACE_UNMANAGED":
            return f"{ctx.get('ingress')}: {ctx.get('ingress_skip') or 'not attached'}"
        return f"{ctx.get('ingress')} is managed" if verdict == "FORWARDED" else None
    if stage == "fib_route" and daddr:
        hit = longest_prefix(ctx.get("routes", {}), daddr)
        if verdict in ("NETFILTER", "POLICY_ROUTING", "IPSEC") and ctx.get("global_punt"):
            return ctx["global_punt"]
        if hit is None:
            return f"no route to {daddr} in the fast path table"
        prefix, e = hit
        if e.action == ROUTE_KERNEL:
            chosen = f": the kernel chose via {route['gateway'] or route['daddr']} dev {dev(route['oif'])}" \
                if route and verdict == "FORWARDED" else ""
            return f"route {prefix} has several next hops, asked of the kernel's FIB{chosen}"
        if verdict == "FORWARDED" or e.action == 0:
            via = f" via {e.gateway}" if e.gateway else ""
            return f"route {prefix}{via} dev {dev(e.oif)} mtu {e.mtu}"
        return f"route {prefix} is compiled as punt {REASON_BY_VALUE[e.action].name}"
    if stage == "fwd_checks" and route:
        if verdict == "TTL_EXCEEDED":
            return f"TTL {pkt.get('ttl')} <= 1"
        if verdict == "MTU_EXCEEDED":
            return f"{pkt['ip_len']} bytes > path MTU {route['mtu']} (dev {dev(route['oif'])})"
    if stage == "fib_neigh" and route:
        nh = route["gateway"] or route["daddr"]
        key = (route["oif"], nh)
        if verdict == "FORWARDED":
            return f"{nh} dev {dev(route['oif'])} lladdr {ctx.get('neighbors', {}).get(key)}"
        state = ctx.get("kernel_neighbors", {}).get(key)
        return f"{nh} dev {dev(route['oif'])}: " + (f"kernel entry {state}" if state else "no kernel entry")
    if stage in ("fib_egress", "xmit") and route and verdict == "FORWARDED":
        link = ctx.get("links", {}).get(route["oif"])
        if stage == "fib_egress":
            return f"{dev(route['oif'])} is up and managed"
        if link is not None and link.flags & LINK_REDIRECT_PEER:
            return f"bpf_redirect_peer: into the peer of {dev(route['oif'])}"
        return f"bpf_redirect: out of {dev(route['oif'])}"
    if stage == "ct" and "conntrack" in ctx:
        return _ct_note(verdict, pkt, ctx["conntrack"])
    if stage == "verdict":
        f = ctx.get("flow")
        if f is None:
            return "no flows entry for this flow direction"
        gen = "current" if f["gen"] == ctx.get("nf_gen") else f"stale (gen {f['gen']}, ruleset gen {ctx.get('nf_gen')})"
        return f"flows entry: {f['action']}, oif {dev(f['oif'])}, {gen}"
    return None


# --- rendering -------------------------------------------------------------------


def _packet_text(p: Dict) -> str:
    src, dst = p.get("src", "?"), p.get("dst", "?")
    if "sport" in p:
        src, dst = f"{src}:{p['sport']}", f"{dst}:{p['dport']}"
    return f"{p.get('proto', '?')} {src} -> {dst} ttl {p.get('ttl')} len {p.get('ip_len')}"


def render_text(result: Dict, ingress: str) -> str:
    lines = [f"packet: {_packet_text(result['packet'])} in {ingress}"]
    for i, s in enumerate(result["steps"], 1):
        title = STAGE_TITLES.get(s["stage"], s["stage"])
        mark = "ok" if s["verdict"] == "FORWARDED" else s["verdict"]
        note = f"  {s['note']}" if s.get("note") else ""
        lines.append(f"  {i:2d}. {title:<16s} {mark:<18s}{note}".rstrip())
    verdict = result["verdict"]
    if verdict == "FORWARDED":
        out = result.get("out", {})
        lines.append(f"verdict: FORWARDED by the fast path, leaves as {_packet_text(out)} "
                     f"({out.get('eth_src')} -> {out.get('eth_dst')})")
    else:
        lines.append(f"verdict: {outcome(verdict)} {verdict}: {result['why']}")
    return "\n".join(lines)


# --- agent side: the request ------------------------------------------------------

NUD_NAMES = {0x01: "INCOMPLETE", 0x02: "REACHABLE", 0x04: "STALE", 0x08: "DELAY", 0x10: "PROBE",
             0x20: "FAILED", 0x40: "NOARP", 0x80: "PERMANENT"}


def neighbor_state_name(state: int) -> str:
    return "|".join(name for bit, name in NUD_NAMES.items() if state & bit) or "NONE"


def flow_entry(flows, ifindex: int, pkt: Dict, bridged: bool = False) -> Optional[Dict]:
    """The `flows` map entry for the packet's direction (TCP/UDP), decoded;
    `bridged`: switched within a bridge (no routing stage ran)."""
    if pkt.get("proto") not in ("tcp", "udp") or "sport" not in pkt:
        return None
    key = flows.Key(ifindex=ifindex, saddr=_u32(pkt["src"]), daddr=_u32(pkt["dst"]),
                    sport=socket.htons(pkt["sport"]), dport=socket.htons(pkt["dport"]), proto=PROTOS[pkt["proto"]],
                    bridged=int(bridged))
    try:
        f = flows[key]
    except KeyError:
        return None
    action = REASON_BY_VALUE.get(f.action)
    return {"gen": f.gen, "action": "ACCEPT" if f.action == 0 else (action.name if action else str(f.action)),
            "oif": f.oif, "nat": f"{_ip(f.nat_saddr)}:{socket.ntohs(f.nat_sport)} -> "
                                 f"{_ip(f.nat_daddr)}:{socket.ntohs(f.nat_dport)}",
            "packets": f.packets}


# uapi enum ip_conntrack_status bits and enum tcp_conntrack states (stable ABI).
IPS_NAMES = ("EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED", "SRC_NAT", "DST_NAT", "SEQ_ADJUST", "SRC_NAT_DONE",
             "DST_NAT_DONE", "DYING", "FIXED_TIMEOUT", "TEMPLATE", "UNTRACKED", "HELPER", "OFFLOAD", "HW_OFFLOAD")
TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT",
              "CLOSE", "SYN_SENT2")


def conntrack_entry(pkt: Dict) -> Optional[Dict]:
    """The kernel's conntrack entry for the packet's tuple (either
    direction), through ctnetlink in the caller's netns; None if none."""
    from pyroute2 import NFCTSocket
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    tup = NFCTAttrTuple(saddr=pkt["src"], daddr=pkt["dst"], proto=PROTOS[pkt["proto"]],
                        sport=pkt["sport"], dport=pkt["dport"])
    try:
        with NFCTSocket() as nfct:
            [msg] = [m for m in nfct.entry("get", tuple_orig=tup) if m.get_attr("CTA_STATUS") is not None]
    except NetlinkError:
        return None
    status = msg.get_attr("CTA_STATUS")
    orig, reply = (_tuple_text(msg.get_attr(a)) for a in ("CTA_TUPLE_ORIG", "CTA_TUPLE_REPLY"))
    state = None
    info = msg.get_attr("CTA_PROTOINFO")
    if info is not None and info.get_attr("CTA_PROTOINFO_TCP") is not None:
        state = TCP_STATES[info.get_attr("CTA_PROTOINFO_TCP").get_attr("CTA_PROTOINFO_TCP_STATE")]
    return {"original": orig, "reply": reply, "state": state, "timeout": msg.get_attr("CTA_TIMEOUT"),
            "status": [n for i, n in enumerate(IPS_NAMES) if status >> i & 1],
            "direction": "original" if orig.startswith(f"{pkt['src']}:{pkt['sport']} ") else "reply"}


def _tuple_text(t) -> str:
    ip, proto = t.get_attr("CTA_TUPLE_IP"), t.get_attr("CTA_TUPLE_PROTO")
    return (f"{ip.get_attr('CTA_IP_V4_SRC')}:{proto.get_attr('CTA_PROTO_SRC_PORT')} -> "
            f"{ip.get_attr('CTA_IP_V4_DST')}:{proto.get_attr('CTA_PROTO_DST_PORT')}")


def _ct_note(verdict, pkt, ct):
    if verdict in ("CT_PROTO", "SKB_MARK", "CT_TCP_FLAGS"):
        return None  # decided from the packet itself
    if ct is None:
        return f"no kernel conntrack entry for {pkt.get('proto')} {pkt.get('src')}:{pkt.get('sport')} -> " \
               f"{pkt.get('dst')}:{pkt.get('dport')}"
    state = f"{ct['state']} " if ct["state"] else ""
    return (f"kernel entry {ct['original']} / {ct['reply']}: {state}{'|'.join(ct['status'])}, "
            f"{ct['timeout']} s left; this packet is the {ct['direction']} direction")


def _u32(ip: str) -> int:
    return struct.unpack("<I", socket.inet_aton(ip))[0]


def spec_from_request(p: Dict) -> PacketSpec:
    proto = p.get("proto", "udp")
    if proto not in PROTOS:
        raise ValueError(f"--proto must be one of {', '.join(PROTOS)}")
    for name in ("src", "dst"):
        socket.inet_aton(p[name])  # OSError on a bad address
    return PacketSpec(src=p["src"], dst=p["dst"], proto=proto, sport=int(p.get("sport", 40000)),
                      dport=int(p.get("dport", 80)), ttl=int(p.get("ttl", 64)),
                      length=None if p.get("length") is None else int(p["length"]),
                      tcp_flags=p.get("tcp_flags", "A"))


# --- recorded frames ----------------------------------------------------------------

PCAP_MAGICS = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">", b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}
LINKTYPE_ETHERNET = 1


def read_pcap(data: bytes) -> List[bytes]:
    """The frames of a classic pcap file (Ethernet link type)."""
    order = PCAP_MAGICS.get(data[:4])
    if order is None:
        raise ValueError("not a pcap file (pcapng is not supported: convert with editcap -F pcap)")
    linktype = struct.unpack(order + "I", data[20:24])[0]
    if linktype != LINKTYPE_ETHERNET:
        raise ValueError(f"pcap link type {linktype}: only Ethernet (1) frames can be explained")
    frames, off = [], 24
    while off + 16 <= len(data):
        incl, orig = struct.unpack(order + "II", data[off + 8:off + 16])
        if incl != orig:
            raise ValueError(f"frame {len(frames) + 1} was captured truncated ({incl} of {orig} bytes)")
        frames.append(data[off + 16:off + 16 + incl])
        off += 16 + incl
    return frames
