"""The verdict of the mirrored iptables rulesets for one direction of a confirmed flow.

Pure: no I/O.  ``flow_verdict(rulesets, flow, host)`` walks, per backend, every
chain a packet of a CONFIRMED conntrack entry traverses, in hook order, each with
the packet as that hook sees it:

    raw PREROUTING      no conntrack entry attached yet (ctstate INVALID), wire tuple
    mangle PREROUTING   entry attached, wire tuple
    (nat PREROUTING: not traversed by packets of confirmed entries; DNAT applied)
    mangle FORWARD, filter FORWARD, security FORWARD, mangle POSTROUTING
                        source as on the wire, destination translated
    (nat POSTROUTING: not traversed; SNAT applied)

and says ACCEPT only when every backend accepts at every hook, DROP when a backend
drops (and nothing undecided comes before it at that hook or earlier), and PUNT as
soon as anything on the path is not understood: a match that may vary per packet
of the flow, a stateful match, a target other than ACCEPT/DROP/RETURN/jump/goto.
A rule is skipped only when one of its matches is decided false for this flow
(and no stateful match the kernel would evaluate comes before it).

``classify(rulesets)`` lists every rule with whether the evaluator understands it
(for ``loxi-mirror dump rules``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

from mirror.iptables import BUILTIN_CHAINS, Rule, Ruleset
from mirror.nfmatch import Compiled, HookPacket, Undecided, compile_match, ip_int

ACCEPT, DROP, PUNT = "ACCEPT", "DROP", "PUNT"

# (hook, tables in priority order) that packets of a confirmed forwarded flow meet.
HOOKS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("PREROUTING", ("raw", "mangle")),
    ("FORWARD", ("mangle", "filter", "security")),
    ("POSTROUTING", ("mangle",)),
)
TRAVERSED = frozenset((t, h) for h, ts in HOOKS for t in ts)
MAX_DEPTH = 64            # the kernel refuses deeper jump nesting / loops at load time


@dataclass(frozen=True)
class FlowView:
    """One direction of a confirmed kernel conntrack entry, as a packet of it
    crosses this host (the fast path only carries TCP/UDP without SYN/FIN/RST)."""

    proto: int                 # 6 or 17
    in_iface: str              # ingress device name
    out_iface: str             # egress device name (route of the translated destination)
    src: str
    dst: str
    sport: int
    dport: int                 # as it arrives (wire)
    xsrc: str
    xdst: str
    xsport: int
    xdport: int                # as it leaves (after all NAT)
    ctstate: str               # "ESTABLISHED", or "NEW" (one-way UDP, original direction)
    ctdir: str                 # "ORIGINAL" | "REPLY"
    ctstatus: frozenset        # {"CONFIRMED", "ASSURED", "SEEN_REPLY", ...}
    nat: frozenset             # subset of {"SNAT", "DNAT"} (for --ctstate SNAT/DNAT)
    ctmark: int
    orig: tuple                # ORIGINAL tuple (src, dst, sport, dport)
    reply: tuple               # REPLY tuple (src, dst, sport, dport)
    mark: int = 0              # skb mark at ingress (the fast path only takes 0)
    bridged: bool = False      # br_netfilter: physdev_in/out are the bridge ports
    physdev_in: str = ""
    physdev_out: str = ""


@dataclass(frozen=True)
class HostView:
    local_addrs: frozenset     # this namespace's addresses (addrtype LOCAL)
    broadcast_addrs: frozenset = frozenset()


@dataclass(frozen=True)
class Verdict:
    action: str                # "ACCEPT" | "DROP" | "PUNT"
    reason: str                # why, human-readable (names the rule)
    rule: Optional[str] = None  # "iptables-nft filter FORWARD #3" etc.


# --------------------------------------------------------------------------- compiled rules

TERMINAL = frozenset({"ACCEPT", "DROP"})


@dataclass(frozen=True)
class CompiledRule:
    rule: Rule
    matches: Tuple[Compiled, ...]
    kind: str                   # "ACCEPT" "DROP" "RETURN" "JUMP" "GOTO" "NONE" "OTHER"
    problem: Optional[str]      # why the evaluator cannot use this rule exactly (None: it can)
    prefilter: Optional[Callable[[HookPacket], bool]] = None   # exact built-in criteria, checked first


def _compile_rule(rule: Rule, chains: FrozenSet[str]) -> CompiledRule:
    matches = tuple(compile_match(m) for m in rule.matches)
    problems = [c.problem for c in matches if c.problem]
    t = rule.target
    if t is None:
        kind = "NONE"
    elif t in ("ACCEPT", "DROP", "RETURN"):
        kind = t
    elif t in chains:
        kind = "GOTO" if rule.goto else "JUMP"
    else:
        kind = "OTHER"
        problems.append(f"target {t}")
    if rule.unparsed:
        problems.insert(0, f"not parsed: {rule.unparsed}")
    # The kernel checks -s/-d/-i/-o/-p before any match module; with thousands of
    # rules most are decided by them, so they run inline in the walk.
    prefilter = None
    if rule.matches and rule.matches[0].module == "" and matches[0].problem is None and not rule.unparsed:
        prefilter = matches[0].pred
    return CompiledRule(rule, matches, kind, "; ".join(problems) or None, prefilter)


class _Program:
    """A ruleset's chains, compiled once (rule sets are immutable once read)."""

    def __init__(self, rs: Ruleset):
        self.chains: Dict[Tuple[str, str], List[CompiledRule]] = {}
        self.policies: Dict[Tuple[str, str], Optional[str]] = {}
        for tname, table in rs.tables.items():
            names = frozenset(table.chains)
            for cname, chain in table.chains.items():
                self.chains[(tname, cname)] = [_compile_rule(r, names) for r in chain.rules]
                self.policies[(tname, cname)] = chain.policy
        self.unparsed = [u for u in rs.unparsed]
        self.uncommitted = [t for t, table in rs.tables.items() if not table.committed]


# Ruleset is unhashable (a dataclass compared by content): cache by identity,
# dropped when the ruleset is.
_programs: Dict[int, _Program] = {}


def _program(rs: Ruleset) -> _Program:
    prog = _programs.get(id(rs))
    if prog is None:
        prog = _programs[id(rs)] = _Program(rs)
        weakref.finalize(rs, _programs.pop, id(rs), None)
    return prog


# --------------------------------------------------------------------------- the walk

class _Stop(Exception):
    """Ends the walk of one hook: a verdict (ACCEPT of the hook, DROP, PUNT)."""

    def __init__(self, action: str, reason: str, rule: Optional[str] = None):
        super().__init__(reason)
        self.verdict = Verdict(action, reason, rule)


def _rule_label(backend: str, table: str, chain: str, index: int) -> str:
    return f"{backend} {table} {chain} #{index}"


def _rule_matches(cr: CompiledRule, pkt: HookPacket, where: Tuple[str, str, str, int]) -> bool:
    """True/False when decided; raises _Stop(PUNT) when the rule could match and
    we cannot tell, or a stateful match would be evaluated by the kernel."""
    if cr.rule.unparsed:
        label = _rule_label(*where)
        raise _Stop(PUNT, f"{label} not parsed: {cr.rule.unparsed}", label)
    undecided: Optional[str] = None
    for c in cr.matches:
        try:
            if not c.pred(pkt):
                return False
        except Undecided as e:
            if e.stateful:
                label = _rule_label(*where)
                raise _Stop(PUNT, f"{label}: {e.reason} (`{cr.rule.raw}`)", label)
            undecided = undecided or e.reason
    if undecided:
        label = _rule_label(*where)
        raise _Stop(PUNT, f"{label} could match: {undecided} (`{cr.rule.raw}`)", label)
    return True


def _walk_chain(prog: _Program, backend: str, table: str, chain: str, pkt: HookPacket,
                depth: int = 0) -> Optional[Verdict]:
    """Run ``chain``; a Verdict when a rule decides (ACCEPT/DROP), None when the
    chain returns (RETURN or its end) to its caller."""
    if depth > MAX_DEPTH:
        raise _Stop(PUNT, f"{backend} {table}: chain nesting deeper than {MAX_DEPTH} (loop?)")
    rules = prog.chains.get((table, chain))
    if rules is None:
        raise _Stop(PUNT, f"{backend} {table}: jump to missing chain {chain}")
    for i, cr in enumerate(rules, 1):
        if cr.prefilter is not None and not cr.prefilter(pkt):
            continue
        if not _rule_matches(cr, pkt, (backend, table, chain, i)):
            continue
        if cr.kind == "NONE":
            continue
        if cr.kind in TERMINAL:
            label = _rule_label(backend, table, chain, i)
            return Verdict(cr.kind, f"{label}: {cr.rule.raw}", label)
        if cr.kind == "RETURN":
            return None
        if cr.kind == "OTHER":
            label = _rule_label(backend, table, chain, i)
            raise _Stop(PUNT, f"{label} reached, target {cr.rule.target} (`{cr.rule.raw}`)", label)
        v = _walk_chain(prog, backend, table, cr.rule.target, pkt, depth + 1)
        if v is not None:
            return v
        if cr.kind == "GOTO":
            return None           # -g: the called chain's return returns from this one too
    return None


def _walk_builtin(prog: _Program, backend: str, table: str, hook: str, pkt: HookPacket) -> Verdict:
    v = _walk_chain(prog, backend, table, hook, pkt)
    if v is not None:
        return v
    policy = prog.policies.get((table, hook)) or "ACCEPT"
    label = f"{backend} {table} {hook} policy"
    if policy not in TERMINAL:
        raise _Stop(PUNT, f"{label} {policy} not modelled", label)
    return Verdict(policy, f"{label} {policy}", label)


def hook_packets(flow: FlowView, host: HostView) -> Dict[Tuple[str, str], HookPacket]:
    """The packet as each (hook, table) sees it.

    A bridged frame (br_netfilter) meets the same hooks: PREROUTING from
    br_nf_pre_routing() with -i the bridge, FORWARD from br_nf_forward_ip()
    with -i and -o the bridge, POSTROUTING from br_nf_post_routing() with no
    input device and -o the bridge.  Its egress port (physdev-out, and with
    it physdev-is-bridged/-is-out) is only known from FORWARD on: br_netfilter
    records it there."""
    src, dst, xdst = ip_int(flow.src), ip_int(flow.dst), ip_int(flow.xdst)
    o, r = flow.orig, flow.reply
    common = dict(
        proto=flow.proto, sport=flow.sport, ctdir=flow.ctdir.upper(),
        ctstatus=frozenset(s.upper() for s in flow.ctstatus), ctmark=flow.ctmark, ctproto=flow.proto,
        orig=(ip_int(o[0]), ip_int(o[1]), o[2], o[3]), reply=(ip_int(r[0]), ip_int(r[1]), r[2], r[3]),
        mark=flow.mark, bridged=flow.bridged, physdev_in=flow.physdev_in,
        local_addrs=frozenset(ip_int(a) for a in host.local_addrs),
        broadcast_addrs=frozenset(ip_int(a) for a in host.broadcast_addrs))
    states = frozenset({flow.ctstate.upper()}) | frozenset(n.upper() for n in flow.nat)
    raw = HookPacket(src=src, dst=dst, dport=flow.dport, in_iface=flow.in_iface, out_iface="",
                     has_ct=False, ctstates=frozenset({"INVALID"}), physdev_out="", **common)
    pre = HookPacket(src=src, dst=dst, dport=flow.dport, in_iface=flow.in_iface, out_iface="",
                     has_ct=True, ctstates=states, physdev_out="", **common)
    fwd = HookPacket(src=src, dst=xdst, dport=flow.xdport, in_iface=flow.in_iface,
                     out_iface=flow.out_iface, has_ct=True, ctstates=states, physdev_out=flow.physdev_out, **common)
    # ip_output passes the input device as indev to POSTROUTING of forwarded
    # packets; br_nf_post_routing() passes none.
    post = replace(fwd, in_iface="") if flow.bridged else fwd
    return {("PREROUTING", "raw"): raw, ("PREROUTING", "mangle"): pre,
            ("FORWARD", "mangle"): fwd, ("FORWARD", "filter"): fwd, ("FORWARD", "security"): fwd,
            ("POSTROUTING", "mangle"): post}


def _ruleset_problem(backend: str, prog: _Program) -> Optional[str]:
    if prog.unparsed:
        u = prog.unparsed[0]
        return f"{backend}: {len(prog.unparsed)} line(s) not understood (line {u.lineno}: {u.reason})"
    if prog.uncommitted:
        return f"{backend}: table(s) {', '.join(prog.uncommitted)} incomplete"
    return None


def flow_verdict(rulesets: Dict[str, Optional[Ruleset]], flow: FlowView, host: HostView) -> Verdict:
    """ACCEPT / DROP / PUNT for every packet of this direction of the flow.  Never raises."""
    try:
        return _flow_verdict(rulesets, flow, host)
    except Exception as e:     # a bug here must punt, never forward
        return Verdict(PUNT, f"evaluator error: {type(e).__name__}: {e}")


def _flow_verdict(rulesets: Dict[str, Optional[Ruleset]], flow: FlowView, host: HostView) -> Verdict:
    if flow.proto not in (6, 17):
        return Verdict(PUNT, f"protocol {flow.proto}: only TCP and UDP flows are evaluated")
    try:
        pkts = hook_packets(flow, host)
    except (OSError, ValueError, IndexError, TypeError) as e:
        return Verdict(PUNT, f"flow not understood: {e}")
    progs = []
    for backend, rs in sorted(rulesets.items()):
        if rs is None:
            return Verdict(PUNT, f"{backend}: ruleset not read")
        prog = _program(rs)
        problem = _ruleset_problem(backend, prog)
        if problem:
            return Verdict(PUNT, problem)
        progs.append((backend, prog))
    accepted: List[str] = []
    for hook, tables in HOOKS:
        # Within one hook, the backends' tables interleave by priority (and, at equal
        # priority, by registration order): a DROP wins only if no backend punts here.
        drop: Optional[Verdict] = None
        for table in tables:
            for backend, prog in progs:
                if (table, hook) not in prog.chains:
                    continue
                try:
                    v = _walk_builtin(prog, backend, table, hook, pkts[(hook, table)])
                except _Stop as s:
                    return s.verdict
                if v.action == DROP:
                    drop = drop or v
                else:
                    accepted.append(v.rule or "")
            if drop is not None:
                break
        if drop is not None:
            return drop
    if not accepted:
        return Verdict(ACCEPT, "no iptables chain on the forward path")
    return Verdict(ACCEPT, "accepted by " + ", ".join(accepted), accepted[-1])


# --------------------------------------------------------------------------- classify

@dataclass(frozen=True)
class RuleClass:
    backend: str
    table: str
    chain: str
    index: int                 # 1-based position in its chain
    rule: str                  # the rule text after "-A CHAIN"
    status: str                # "compiled" | "punt" | "unused"
    reason: Optional[str]      # for punt: what is not understood; for unused: why it is never reached

    @property
    def name(self) -> str:
        """As Verdict.rule names the rule that decided a flow."""
        return _rule_label(self.backend, self.table, self.chain, self.index)

    def as_dict(self) -> Dict[str, object]:
        return {"backend": self.backend, "table": self.table, "chain": self.chain, "index": self.index,
                "rule": self.rule, "status": self.status, "reason": self.reason}


def _reachable(prog: _Program) -> Dict[Tuple[str, str], str]:
    """(table, chain) reached from a traversed built-in chain -> that built-in chain."""
    seen: Dict[Tuple[str, str], str] = {}
    for table, hook in sorted(TRAVERSED):
        stack = [(table, hook)]
        while stack:
            key = stack.pop()
            if key in seen or key not in prog.chains:
                continue
            seen[key] = f"{key[0]} {hook}"
            stack.extend((key[0], cr.rule.target) for cr in prog.chains[key] if cr.kind in ("JUMP", "GOTO"))
    return seen


def classify(rulesets: Dict[str, Optional[Ruleset]]) -> List[RuleClass]:
    """Every rule of every backend: compiled (the evaluator understands all of it),
    punt (reaching it punts the flow, and why), or unused (no packet of a confirmed
    forwarded flow reaches it: nat table, INPUT/OUTPUT, unreferenced chains)."""
    out: List[RuleClass] = []
    for backend, rs in sorted(rulesets.items()):
        if rs is None:
            continue
        prog = _program(rs)
        reach = _reachable(prog)
        for tname, table in rs.tables.items():
            for cname in table.chains:
                for i, cr in enumerate(prog.chains[(tname, cname)], 1):
                    out.append(_classify_rule(backend, tname, cname, i, cr, reach))
        for u in rs.unparsed:
            out.append(RuleClass(backend, u.table or "", "", 0, u.line, "punt",
                                 f"line {u.lineno} not understood: {u.reason}"))
    return out


def _classify_rule(backend: str, table: str, chain: str, index: int, cr: CompiledRule,
                   reach: Dict[Tuple[str, str], str]) -> RuleClass:
    args = (backend, table, chain, index, cr.rule.raw)
    if (table, chain) not in reach:
        if table == "nat":
            why = "nat table: not traversed by packets of confirmed flows"
        elif chain in BUILTIN_CHAINS.get(table, ()):
            why = f"{table} {chain}: not on the forward path"
        else:
            why = "chain not reached from the forward path"
        return RuleClass(*args, "unused", why)
    if cr.problem:
        return RuleClass(*args, "punt", cr.problem)
    return RuleClass(*args, "compiled", None)

