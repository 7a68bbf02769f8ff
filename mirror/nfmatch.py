"""iptables matches, compiled into predicates over one packet of a confirmed flow.

Pure: no I/O.  ``compile_match(match, rule)`` turns a parsed :class:`Match` into a
function ``pred(pkt) -> bool`` that says exactly what the kernel's match would say
for that packet, or raises :class:`Undecided` when it cannot know (a match that
varies per packet of the flow, depends on state we do not mirror, or that this
module does not implement).  Compilation never fails: what is not understood
compiles into a predicate that raises, and ``Compiled.problem`` says why (for
``loxi-mirror dump rules``).

The packet (:class:`HookPacket`) is what one netfilter hook sees: the addresses
and ports as rewritten so far, the devices the hook knows, whether conntrack has
attached the entry yet (not in raw PREROUTING), plus the flow's conntrack facts.
Semantics follow the kernel's xt modules (net/netfilter/xt_*.c,
net/ipv4/netfilter/ip_tables.c ip_packet_match); comments name the exceptions.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

from mirror.iptables import Match, Option

PROTO_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "igmp": 2, "gre": 47, "esp": 50, "ah": 51,
                 "sctp": 132, "udplite": 136, "dccp": 33, "ipip": 4, "ipv6": 41, "mh": 135}
PORTED_PROTOS = frozenset({6, 17, 132, 33, 136})

# Matches that keep state per evaluation (a token bucket, a counter, a list of
# addresses): evaluating them where the kernel would, and skipping them where it
# would not, changes later verdicts.  Reaching one undecided is never skippable.
STATEFUL_MODULES = frozenset({"limit", "hashlimit", "recent", "statistic", "quota", "connlimit",
                              "nfacct", "connbytes", "rateest", "cluster"})


class Undecided(Exception):
    """The match's result for this packet is not known."""

    def __init__(self, reason: str, stateful: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.stateful = stateful


@dataclass(frozen=True)
class HookPacket:
    """One packet of the flow as one hook sees it (addresses as host-order ints)."""

    proto: int
    src: int
    dst: int
    sport: int
    dport: int
    in_iface: str          # "" where the hook has no input device
    out_iface: str         # "" where the hook has no output device (PREROUTING)
    has_ct: bool           # conntrack attached the entry (every hook after raw PREROUTING)
    ctstates: FrozenSet[str]   # e.g. {"ESTABLISHED", "DNAT"}; {"INVALID"} without ct
    ctdir: str
    ctstatus: FrozenSet[str]
    ctmark: int
    ctproto: int
    orig: Tuple[int, int, int, int]     # (src, dst, sport, dport), addresses as ints
    reply: Tuple[int, int, int, int]
    mark: int
    bridged: bool
    physdev_in: str
    physdev_out: str
    local_addrs: FrozenSet[int]
    broadcast_addrs: FrozenSet[int]


Pred = Callable[[HookPacket], bool]


@dataclass(frozen=True)
class Compiled:
    pred: Pred
    problem: Optional[str] = None     # why it is not (fully) understood; None: exact
    stateful: bool = False


def ip_int(text: str) -> int:
    return struct.unpack("!I", socket.inet_aton(text))[0]


class _Bad(ValueError):
    """A match or option this module does not understand (compile time)."""


# --------------------------------------------------------------------------- helpers

@lru_cache(maxsize=65536)
def _net(text: str) -> Tuple[int, int]:
    """'10.0.0.0/8', '1.2.3.4', '1.2.3.0/255.255.255.0' -> (network, mask)."""
    addr, _, plen = text.partition("/")
    try:
        a = ip_int(addr)
    except OSError:
        raise _Bad(f"address {text!r} is not numeric IPv4")
    if not plen:
        return a, 0xFFFFFFFF
    if plen.isdigit():
        n = int(plen)
        if n > 32:
            raise _Bad(f"prefix length in {text!r}")
        mask = (0xFFFFFFFF << (32 - n)) & 0xFFFFFFFF
    else:
        try:
            mask = ip_int(plen)       # dotted masks, also non-contiguous ones (iptables allows them)
        except OSError:
            raise _Bad(f"mask in {text!r}")
    return a & mask, mask


def _nets(text: str) -> List[Tuple[int, int]]:
    return [_net(t) for t in text.split(",") if t]


def _in_nets(addr: int, nets: List[Tuple[int, int]]) -> bool:
    return any(addr & m == n for n, m in nets)


def _port_ranges(text: str, sep: str = ",") -> List[Tuple[int, int]]:
    out = []
    for part in text.split(sep):
        lo, colon, hi = part.partition(":")
        try:
            a = int(lo) if lo else 0
            b = int(hi) if hi else (65535 if colon else a)
        except ValueError:
            try:
                a = b = socket.getservbyname(part)     # iptables-save prints numbers; restore may not
            except OSError:
                raise _Bad(f"port {part!r}")
        out.append((a, b))
    return out


def _in_ranges(port: int, ranges: List[Tuple[int, int]]) -> bool:
    return any(a <= port <= b for a, b in ranges)


def _iface_matcher(pattern: str) -> Callable[[str], bool]:
    """iptables interface names: exact, or a prefix ending in '+'."""
    if pattern.endswith("+"):
        prefix = pattern[:-1]
        return lambda name: name.startswith(prefix)
    return lambda name: name == pattern


def _mark_mask(text: str) -> Tuple[int, int]:
    value, _, mask = text.partition("/")
    try:
        return int(value, 0), (int(mask, 0) if mask else 0xFFFFFFFF)
    except ValueError:
        raise _Bad(f"mark {text!r}")


def _one_arg(opt: Option) -> str:
    if len(opt.args) != 1:
        raise _Bad(f"{opt.name} takes one argument")
    return opt.args[0]


def _negatable(opt: Option, test: Pred) -> Pred:
    if opt.negated:
        return lambda p: not test(p)
    return test


def _all(preds: List[Pred]) -> Pred:
    if len(preds) == 1:
        return preds[0]

    def pred(p: HookPacket) -> bool:
        for t in preds:
            if not t(p):
                return False
        return True
    return pred


def _options(m: Match, handlers: Dict[str, Callable[[Option], Pred]]) -> Pred:
    """AND of one predicate per option; an option without a handler is undecided."""
    return _all([handlers[o.name](o) if o.name in handlers else _undecided(f"{m.module} option {o.name}")
                 for o in m.options])


def _undecided(reason: str, stateful: bool = False) -> Pred:
    def pred(_p: HookPacket) -> bool:
        raise Undecided(reason, stateful)
    return pred


# --------------------------------------------------------------------------- built-in criteria

def _proto_number(name: str) -> int:
    name = name.lower()
    if name in ("all", "0"):
        return 0
    if name.isdigit():
        return int(name)
    if name in PROTO_NUMBERS:
        return PROTO_NUMBERS[name]
    raise _Bad(f"protocol {name!r}")


def _builtin(opt: Option) -> Pred:
    if opt.name == "-p":
        num = _proto_number(_one_arg(opt))
        if num == 0:
            # "-p all" matches everything; "! -p all" is refused by iptables
            return lambda p: not opt.negated
        return _negatable(opt, lambda p: p.proto == num)
    if opt.name in ("-s", "-d"):
        nets = _nets(_one_arg(opt))
        if opt.negated and len(nets) > 1:
            raise _Bad("negated address list")
        if opt.name == "-s":
            return _negatable(opt, lambda p: _in_nets(p.src, nets))
        return _negatable(opt, lambda p: _in_nets(p.dst, nets))
    if opt.name in ("-i", "-o"):
        m = _iface_matcher(_one_arg(opt))
        if opt.name == "-i":
            return _negatable(opt, lambda p: m(p.in_iface))
        return _negatable(opt, lambda p: m(p.out_iface))
    if opt.name == "-f":
        # The fast path never carries fragments: "-f" (second and later fragments) fails.
        return lambda p: opt.negated
    raise _Bad(f"option {opt.name}")


# --------------------------------------------------------------------------- modules

def _tcp_udp(module: str, proto: int):
    def compile_opts(m: Match) -> Pred:
        preds: List[Pred] = []
        for o in m.options:
            if o.name in ("--sport", "--source-port", "--dport", "--destination-port"):
                ranges = _port_ranges(_one_arg(o), sep="\0")
                if o.name in ("--sport", "--source-port"):
                    preds.append(_negatable(o, lambda p, r=ranges: _in_ranges(p.sport, r)))
                else:
                    preds.append(_negatable(o, lambda p, r=ranges: _in_ranges(p.dport, r)))
            elif module == "tcp" and o.name in ("--syn", "--tcp-flags"):
                preds.append(_tcp_flags(o))
            else:
                preds.append(_undecided(f"{module} option {o.name}"))
        preds.insert(0, _requires_proto(module, proto))
        return _all(preds)
    return compile_opts


def _requires_proto(module: str, proto: int) -> Pred:
    def pred(p: HookPacket) -> bool:
        if p.proto != proto:
            # The kernel only accepts this module after "-p <proto>", which failed first.
            raise Undecided(f"{module} match on a protocol {p.proto} packet")
        return True
    return pred


TCP_FLAGS = {"FIN": 0x01, "SYN": 0x02, "RST": 0x04, "PSH": 0x08, "ACK": 0x10, "URG": 0x20,
             "ECE": 0x40, "CWR": 0x80, "ALL": 0xFF, "NONE": 0}
# The fast path only carries segments without these (the kernel sees every one that has them).
_ALWAYS_CLEAR = 0x01 | 0x02 | 0x04


def _flag_bits(text: str) -> int:
    bits = 0
    for name in text.split(","):
        if name.upper() not in TCP_FLAGS:
            raise _Bad(f"tcp flag {name!r}")
        bits |= TCP_FLAGS[name.upper()]
    return bits


def _tcp_flags(o: Option) -> Pred:
    """(flags & mask) == comp, decided from SYN/FIN/RST being clear on every packet
    the fast path carries.  Anything depending on ACK/PSH/URG/ECE/CWR is undecided."""
    if o.name == "--syn":
        mask, comp = 0x17, 0x02
    else:
        if len(o.args) != 2:
            raise _Bad("--tcp-flags takes two arguments")
        mask, comp = _flag_bits(o.args[0]), _flag_bits(o.args[1])
    if comp & mask & _ALWAYS_CLEAR:
        return lambda p: o.negated          # a required SYN/FIN/RST is never set: no match
    if mask & ~_ALWAYS_CLEAR & 0xFF:
        return _undecided(f"tcp flags {o} depend on flags that vary per packet")
    return lambda p: not o.negated          # only SYN/FIN/RST examined, all clear: match


def _multiport(m: Match) -> Pred:
    preds: List[Pred] = []
    for o in m.options:
        if o.name not in ("--sports", "--source-ports", "--dports", "--destination-ports", "--ports"):
            preds.append(_undecided(f"multiport option {o.name}"))
            continue
        ranges = _port_ranges(_one_arg(o))
        if o.name in ("--sports", "--source-ports"):
            preds.append(_negatable(o, lambda p, r=ranges: _in_ranges(p.sport, r)))
        elif o.name == "--ports":
            preds.append(_negatable(o, lambda p, r=ranges: _in_ranges(p.sport, r) or _in_ranges(p.dport, r)))
        else:
            preds.append(_negatable(o, lambda p, r=ranges: _in_ranges(p.dport, r)))

    def ported(p: HookPacket) -> bool:
        if p.proto not in PORTED_PROTOS:
            raise Undecided("multiport on a protocol without ports")
        return True
    return _all([ported] + preds)


CT_STATES = frozenset({"INVALID", "NEW", "ESTABLISHED", "RELATED", "UNTRACKED", "SNAT", "DNAT"})
CT_STATUS = frozenset({"NONE", "EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED"})


def _names(text: str, allowed: FrozenSet[str], what: str) -> FrozenSet[str]:
    names = frozenset(n.upper() for n in text.split(","))
    bad = names - allowed
    if bad:
        raise _Bad(f"{what} {','.join(sorted(bad))}")
    return names


def _ct_tuple_addr(o: Option, index: int, which: str) -> Pred:
    nets = _nets(_one_arg(o))
    return _negatable(o, lambda p: _in_nets(getattr(p, which)[index], nets))


def _ct_tuple_port(o: Option, index: int, which: str) -> Pred:
    ranges = _port_ranges(_one_arg(o))
    return _negatable(o, lambda p: _in_ranges(getattr(p, which)[index], ranges))


_CT_TUPLE_OPTS = {
    "--ctorigsrc": (_ct_tuple_addr, 0, "orig"), "--ctorigdst": (_ct_tuple_addr, 1, "orig"),
    "--ctreplsrc": (_ct_tuple_addr, 0, "reply"), "--ctrepldst": (_ct_tuple_addr, 1, "reply"),
    "--ctorigsrcport": (_ct_tuple_port, 2, "orig"), "--ctorigdstport": (_ct_tuple_port, 3, "orig"),
    "--ctreplsrcport": (_ct_tuple_port, 2, "reply"), "--ctrepldstport": (_ct_tuple_port, 3, "reply"),
}


def _conntrack(m: Match) -> Pred:
    """xt_conntrack: without an entry (raw PREROUTING) the state is INVALID and
    every other criterion fails, negated or not."""
    state: Optional[Pred] = None
    others: List[Pred] = []
    for o in m.options:
        if o.name in ("--ctstate", "--state"):
            want = _names(_one_arg(o), CT_STATES, "ctstate")
            state = _negatable(o, lambda p, w=want: bool(w & p.ctstates))
        elif o.name == "--ctstatus":
            want = _names(_one_arg(o), CT_STATUS, "ctstatus")
            others.append(_negatable(o, lambda p, w=want: bool(w & p.ctstatus)))
        elif o.name == "--ctdir":
            d = _one_arg(o).upper()
            if d not in ("ORIGINAL", "REPLY"):
                raise _Bad(f"ctdir {d}")
            others.append(_negatable(o, lambda p, d=d: p.ctdir == d))
        elif o.name == "--ctproto":
            num = _proto_number(_one_arg(o))
            others.append(_negatable(o, lambda p, n=num: p.ctproto == n))
        elif o.name in _CT_TUPLE_OPTS:
            fn, index, which = _CT_TUPLE_OPTS[o.name]
            others.append(fn(o, index, which))
        else:
            others.append(_undecided(f"conntrack option {o.name}"))   # --ctexpire varies

    def pred(p: HookPacket) -> bool:
        if state is not None and not state(p):
            return False
        if not p.has_ct:
            return state is not None
        return all(t(p) for t in others)
    return pred


def _state(m: Match) -> Pred:
    def state(o: Option) -> Pred:
        # xt_state knows no SNAT/DNAT bits
        want = _names(_one_arg(o), CT_STATES - {"SNAT", "DNAT"}, "state")
        return _negatable(o, lambda p: bool(want & p.ctstates - {"SNAT", "DNAT"}))
    return _options(m, {"--state": state})


def _mark_test(attr: str) -> Callable[[Option], Pred]:
    def test(o: Option) -> Pred:
        value, mask = _mark_mask(_one_arg(o))
        return _negatable(o, lambda p: getattr(p, attr) & mask == value)
    return test


def _mark(m: Match) -> Pred:
    return _options(m, {"--mark": _mark_test("mark")})


def _connmark(m: Match) -> Pred:
    test = _options(m, {"--mark": _mark_test("ctmark")})
    return lambda p: p.has_ct and test(p)       # no entry: no match, even negated


ADDR_TYPES = frozenset({"UNSPEC", "UNICAST", "LOCAL", "BROADCAST", "ANYCAST", "MULTICAST",
                        "BLACKHOLE", "UNREACHABLE", "PROHIBIT", "THROW", "NAT", "XRESOLVE"})
# Types we can tell from HostView; an address that is none of them has some route
# type (unicast, blackhole, ...) we do not model.
_KNOWN_TYPES = frozenset({"LOCAL", "BROADCAST", "MULTICAST"})


def _addr_type(addr: int, p: HookPacket) -> Optional[str]:
    if addr in p.local_addrs:
        return "LOCAL"
    if addr == 0 or addr == 0xFFFFFFFF or addr in p.broadcast_addrs:
        return "BROADCAST"
    if addr >> 28 == 0xE:
        return "MULTICAST"
    return None


def _addrtype(m: Match) -> Pred:
    preds = []
    for o in m.options:
        if o.name in ("--src-type", "--dst-type"):
            want = _names(_one_arg(o), ADDR_TYPES, "address type")
            src = o.name == "--src-type"

            def test(p: HookPacket, want=want, src=src) -> bool:
                t = _addr_type(p.src if src else p.dst, p)
                if t is None:
                    if want <= _KNOWN_TYPES:
                        return False      # not local/broadcast/multicast: none of wanted
                    raise Undecided("addrtype of a non-local address (route type not modelled)")
                return t in want
            preds.append(_negatable(o, test))
        else:
            preds.append(_undecided(f"addrtype option {o.name}"))   # --limit-iface-in/out
    return _all(preds)


def _physdev(m: Match) -> Pred:
    """xt_physdev.  Without bridge information on the skb (not bridged, not from a
    bridge port) it matches only if every option used is negated.  With it: no
    input port passes --physdev-in (negated or not), no output port fails
    --physdev-out (negated or not), as physdev_mt() does."""
    preds = []
    for o in m.options:
        if o.name == "--physdev-in":
            t = _iface_matcher(_one_arg(o))
            preds.append(lambda p, t=t, neg=o.negated: not p.physdev_in or t(p.physdev_in) != neg)
        elif o.name == "--physdev-out":
            t = _iface_matcher(_one_arg(o))
            preds.append(lambda p, t=t, neg=o.negated: bool(p.physdev_out) and t(p.physdev_out) != neg)
        elif o.name == "--physdev-is-in":
            preds.append(_negatable(o, lambda p: bool(p.physdev_in)))
        elif o.name in ("--physdev-is-out", "--physdev-is-bridged"):
            preds.append(_negatable(o, lambda p: bool(p.physdev_out)))
        else:
            preds.append(_undecided(f"physdev option {o.name}"))
    negated_all = all(o.negated for o in m.options)
    test = _all(preds)

    def pred(p: HookPacket) -> bool:
        if not (p.bridged or p.physdev_in or p.physdev_out):
            return negated_all
        return test(p)
    return pred


def _iprange(m: Match) -> Pred:
    preds = []
    for o in m.options:
        if o.name not in ("--src-range", "--dst-range"):
            preds.append(_undecided(f"iprange option {o.name}"))
            continue
        lo, _, hi = _one_arg(o).partition("-")
        a, b = _net(lo)[0], _net(hi or lo)[0]
        attr = "src" if o.name == "--src-range" else "dst"
        preds.append(_negatable(o, lambda p, a=a, b=b, attr=attr: a <= getattr(p, attr) <= b))
    return _all(preds)


def _pkttype(m: Match) -> Pred:
    preds = []
    for o in m.options:
        if o.name != "--pkt-type":
            preds.append(_undecided(f"pkttype option {o.name}"))
            continue
        t = _one_arg(o).lower()
        if t not in ("unicast", "broadcast", "multicast", "host", "otherhost"):
            raise _Bad(f"pkt-type {t}")
        # The fast path only carries unicast frames to our MAC with a unicast destination.
        hit = t in ("unicast", "host")
        preds.append(lambda p, hit=hit, neg=o.negated: hit != neg)
    return _all(preds)


def _comment(m: Match) -> Pred:
    return lambda p: True


def _never(module: str) -> Callable[[Match], Pred]:
    """icmp: iptables only loads it after "-p icmp", which TCP/UDP never match."""
    def compile_opts(m: Match) -> Pred:
        def pred(p: HookPacket) -> bool:
            if p.proto in (6, 17):
                return False
            raise Undecided(f"{module} match on protocol {p.proto}")
        return pred
    return compile_opts


MODULES: Dict[str, Callable[[Match], Pred]] = {
    "tcp": _tcp_udp("tcp", 6),
    "udp": _tcp_udp("udp", 17),
    "multiport": _multiport,
    "conntrack": _conntrack,
    "state": _state,
    "mark": _mark,
    "connmark": _connmark,
    "comment": _comment,
    "addrtype": _addrtype,
    "physdev": _physdev,
    "iprange": _iprange,
    "pkttype": _pkttype,
    "icmp": _never("icmp"),
}


# Built-in criteria as data, checked in one loop: with thousands of rules most
# are decided here, so this avoids a Python call per criterion.
_SRC, _DST, _PROTO, _IIF, _OIF, _CALL = range(6)


def _builtin_check(opt: Option) -> Tuple[int, object, object, bool]:
    if opt.name in ("-s", "-d"):
        nets = _nets(_one_arg(opt))
        if len(nets) == 1:
            return (_SRC if opt.name == "-s" else _DST), nets[0][0], nets[0][1], opt.negated
    elif opt.name == "-p":
        num = _proto_number(_one_arg(opt))
        if num:
            return _PROTO, num, None, opt.negated
    elif opt.name in ("-i", "-o"):
        name = _one_arg(opt)
        kind = _IIF if opt.name == "-i" else _OIF
        return (kind, None, name[:-1], opt.negated) if name.endswith("+") else (kind, name, None, opt.negated)
    return _CALL, _builtin(opt), None, False


def _builtin_match(m: Match) -> Pred:
    checks = tuple(_builtin_check(o) for o in m.options)

    def pred(p: HookPacket) -> bool:
        for kind, a, b, neg in checks:
            if kind == _SRC:
                ok = p.src & b == a
            elif kind == _DST:
                ok = p.dst & b == a
            elif kind == _PROTO:
                ok = p.proto == a
            elif kind == _IIF:
                ok = p.in_iface == a if b is None else p.in_iface.startswith(b)
            elif kind == _OIF:
                ok = p.out_iface == a if b is None else p.out_iface.startswith(b)
            else:
                ok = a(p)
            if ok == neg:
                return False
        return True
    return pred


def compile_match(m: Match) -> Compiled:
    """A predicate for one match (the built-in criteria form the match with module "")."""
    try:
        if m.module == "":
            return Compiled(_builtin_match(m))
        if m.module in MODULES:
            pred = MODULES[m.module](m)
            problem = _option_problem(m)
            return Compiled(pred, problem)
    except _Bad as e:
        return Compiled(_undecided(str(e)), str(e))
    except Exception as e:     # never crash on input: what we cannot compile punts
        why = f"{m.module or 'built-in'} match not understood ({type(e).__name__}: {e})"
        return Compiled(_undecided(why), why)
    stateful = m.module in STATEFUL_MODULES
    what = f"match {m.module!r}" + (" keeps per-packet state" if stateful else " is not modelled")
    return Compiled(_undecided(what, stateful), what, stateful)


_KNOWN_OPTIONS: Dict[str, FrozenSet[str]] = {
    "tcp": frozenset({"--sport", "--source-port", "--dport", "--destination-port", "--syn", "--tcp-flags"}),
    "udp": frozenset({"--sport", "--source-port", "--dport", "--destination-port"}),
    "multiport": frozenset({"--sports", "--source-ports", "--dports", "--destination-ports", "--ports"}),
    "conntrack": frozenset({"--ctstate", "--state", "--ctstatus", "--ctdir", "--ctproto"}) | frozenset(_CT_TUPLE_OPTS),
    "state": frozenset({"--state"}),
    "mark": frozenset({"--mark"}),
    "connmark": frozenset({"--mark"}),
    "addrtype": frozenset({"--src-type", "--dst-type"}),
    "physdev": frozenset({"--physdev-in", "--physdev-out", "--physdev-is-in", "--physdev-is-out",
                          "--physdev-is-bridged"}),
    "iprange": frozenset({"--src-range", "--dst-range"}),
    "pkttype": frozenset({"--pkt-type"}),
}


def _option_problem(m: Match) -> Optional[str]:
    known = _KNOWN_OPTIONS.get(m.module)
    if known is None:
        return None
    unknown = [o.name for o in m.options if o.name not in known]
    if unknown:
        return f"{m.module} option(s) {', '.join(unknown)} not modelled"
    if m.module == "tcp":
        flags = [o for o in m.options if o.name == "--tcp-flags"]
        for o in flags:
            try:
                _tcp_flags(o)(None)  # type: ignore[arg-type]
            except Undecided as e:
                return e.reason
    if m.module == "addrtype":
        for o in m.options:
            if not _names(_one_arg(o), ADDR_TYPES, "address type") <= _KNOWN_TYPES:
                return f"addrtype {o} needs route types (decided only for local/broadcast/multicast addresses)"
    return None
