"""Pure model of iptables / nftables rule sets, and what they mean for the fast path.

No I/O here: the watcher (mirror/netfilter.py) runs the tools and hands the text
to these functions, so everything below is unit-testable without root.

- ``parse_save(text)`` parses ``iptables-save`` output (and ``iptables-restore``
  payloads, and ``iptables -S`` style ``-P``/``-N`` lines) into a :class:`Ruleset`.
  It never raises: a line it cannot understand becomes an :class:`Unparsed` entry
  (or, when its chain is known, a :class:`Rule` whose ``unparsed`` says why), and
  whatever it cannot understand makes forwarded traffic punt.
- ``forward_impact(ruleset)`` says whether the rules can touch forwarded IPv4
  traffic (today: any rule or non-ACCEPT policy in a chain a forwarded packet
  traverses means "punt").
- ``nft_forward_impact(doc, iptables_nft=None)`` does the same for native
  nftables tables in ``nft -j list ruleset`` output, skipping the tables that
  iptables-nft owns (those are covered by iptables-nft-save).

Two rulesets compare equal (``==``) when their content is equal; packet/byte
counters and line numbers are not part of the comparison.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

# Tables iptables knows, with their built-in chains (kernel xt tables for IPv4).
BUILTIN_CHAINS: Dict[str, Tuple[str, ...]] = {
    "raw": ("PREROUTING", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}

# Chains a forwarded IPv4 packet traverses, in table order.
FORWARD_PATH: Tuple[Tuple[str, str], ...] = (
    ("raw", "PREROUTING"),
    ("mangle", "PREROUTING"),
    ("nat", "PREROUTING"),
    ("mangle", "FORWARD"),
    ("filter", "FORWARD"),
    ("security", "FORWARD"),
    ("mangle", "POSTROUTING"),
    ("nat", "POSTROUTING"),
)

# nftables hooks a routed packet can meet. "egress" is included on purpose:
# a netdev egress chain sees packets the fast path redirects, punting is safe.
NFT_FORWARD_HOOKS = frozenset({"prerouting", "forward", "postrouting", "ingress", "egress"})
NFT_FORWARD_FAMILIES = frozenset({"ip", "inet", "netdev"})

# Built-in iptables criteria (not part of any -m module). Value: canonical name.
_BUILTIN_OPTS = {
    "-p": "-p", "--protocol": "-p",
    "-s": "-s", "--source": "-s", "--src": "-s",
    "-d": "-d", "--destination": "-d", "--dst": "-d",
    "-i": "-i", "--in-interface": "-i",
    "-o": "-o", "--out-interface": "-o",
    "-f": "-f", "--fragment": "-f",
}
# Protocols whose match module iptables loads implicitly after "-p PROTO".
_IMPLICIT_PROTO_MODULES = frozenset({"tcp", "udp", "icmp", "sctp", "udplite", "dccp", "esp", "ah"})
_RULE_COMMANDS = {"-A": "-A", "--append": "-A", "-I": "-I", "--insert": "-I"}
_OTHER_COMMANDS = {
    "-D", "--delete", "-R", "--replace", "-X", "--delete-chain", "-F", "--flush",
    "-Z", "--zero", "-E", "--rename-chain", "-C", "--check", "-L", "--list", "-S",
    "--list-rules",
}


@dataclass(frozen=True)
class Option:
    """One option of a match or target: ``! --ctstate NEW,ESTABLISHED``."""

    name: str                       # as written: "--dport", "-s", "--to-destination"
    args: Tuple[str, ...] = ()
    negated: bool = False

    def __str__(self) -> str:
        parts = (["!"] if self.negated else []) + [self.name] + [_quote(a) for a in self.args]
        return " ".join(parts)


@dataclass(frozen=True)
class Match:
    """A match module and its options. Built-in criteria (-s -d -i -o -p -f) are
    collected in one Match with module "" (first in ``Rule.matches``)."""

    module: str
    options: Tuple[Option, ...] = ()
    implicit: bool = False          # loaded by "-p tcp" without "-m tcp"

    def option(self, name: str) -> Optional[Option]:
        for o in self.options:
            if o.name == name:
                return o
        return None


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    matches: Tuple[Match, ...] = ()
    target: Optional[str] = None     # "ACCEPT", "DNAT", a chain name; None: no target
    target_args: Tuple[Option, ...] = ()
    goto: bool = False               # -g CHAIN instead of -j CHAIN
    raw: str = ""                    # the rule text after "-A CHAIN" (counters removed)
    unparsed: Optional[str] = None   # why this rule is not (fully) understood
    counters: Optional[Tuple[int, int]] = field(default=None, compare=False)
    lineno: int = field(default=0, compare=False)

    def match(self, module: str) -> Optional[Match]:
        for m in self.matches:
            if m.module == module:
                return m
        return None

    @property
    def builtin(self) -> Optional[Match]:
        return self.match("")


@dataclass
class Chain:
    name: str
    policy: Optional[str] = None     # None for user-defined chains ("-")
    rules: List[Rule] = field(default_factory=list)
    counters: Optional[Tuple[int, int]] = field(default=None, compare=False)

    @property
    def is_builtin(self) -> bool:
        return self.policy is not None


@dataclass
class Table:
    name: str
    chains: Dict[str, Chain] = field(default_factory=dict)
    committed: bool = False

    def chain(self, name: str) -> Optional[Chain]:
        return self.chains.get(name)


@dataclass(frozen=True)
class Unparsed:
    lineno: int = field(compare=False)
    line: str
    reason: str
    table: Optional[str] = None


@dataclass
class Ruleset:
    tables: Dict[str, Table] = field(default_factory=dict)
    unparsed: List[Unparsed] = field(default_factory=list)

    def table(self, name: str) -> Optional[Table]:
        return self.tables.get(name)

    def chain(self, table: str, chain: str) -> Optional[Chain]:
        t = self.tables.get(table)
        return t.chains.get(chain) if t else None

    def rules(self) -> Iterator[Rule]:
        for t in self.tables.values():
            for c in t.chains.values():
                yield from c.rules

    def unparsed_rules(self) -> List[Rule]:
        return [r for r in self.rules() if r.unparsed]

    @property
    def empty(self) -> bool:
        return not self.tables and not self.unparsed

    def counts(self) -> Tuple[int, int, int]:
        """(tables, chains, rules)"""
        return (len(self.tables), sum(len(t.chains) for t in self.tables.values()),
                sum(1 for _ in self.rules()))


# --------------------------------------------------------------------------- parsing

class _TokenError(ValueError):
    pass


def tokenize(line: str) -> List[Tuple[str, bool]]:
    """Split a rule line the way iptables-restore does: whitespace separates,
    double quotes group (backslash escapes inside quotes). Returns (token, quoted)."""
    out: List[Tuple[str, bool]] = []
    buf: List[str] = []
    quoted = in_quote = escaped = have = False
    for ch in line:
        if in_quote:
            if escaped:
                buf.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_quote = False
            else:
                buf.append(ch)
            continue
        if ch == '"':
            in_quote = quoted = have = True
        elif ch in " \t\r\n":
            if have:
                out.append(("".join(buf), quoted))
            buf, quoted, have = [], False, False
        else:
            buf.append(ch)
            have = True
    if in_quote:
        raise _TokenError("unterminated quote")
    if have:
        out.append(("".join(buf), quoted))
    return out


def _quote(s: str) -> str:
    if s == "" or any(c in s for c in ' \t"\\'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return s


def _is_opt(tok: Tuple[str, bool]) -> bool:
    s, quoted = tok
    return not quoted and len(s) > 1 and s[0] == "-" and not s[1:2].isdigit()


def _parse_counters(s: str) -> Optional[Tuple[int, int]]:
    if len(s) >= 2 and s[0] == "[" and s[-1] == "]" and ":" in s:
        p, b = s[1:-1].split(":", 1)
        if p.isdigit() and b.isdigit():
            return int(p), int(b)
    return None


def parse_rule_tokens(table: str, chain: str, toks: List[Tuple[str, bool]],
                      raw: str = "", lineno: int = 0,
                      counters: Optional[Tuple[int, int]] = None) -> Rule:
    """Turn the tokens after "-A CHAIN" into a Rule. Never raises: problems end up
    in ``Rule.unparsed``."""
    builtin: List[Option] = []
    matches: List[Tuple[str, List[Option], bool]] = []   # (module, options, implicit)
    target: Optional[str] = None
    target_args: List[Option] = []
    goto = False
    context = None            # None | ("match", index) | "target"
    proto: Optional[str] = None
    problems: List[str] = []
    negate = False
    i, n = 0, len(toks)
    while i < n:
        tok, quoted = toks[i]
        if tok == "!" and not quoted:
            if negate:
                problems.append("double negation")
            negate = True
            i += 1
            continue
        if not _is_opt(toks[i]):
            problems.append(f"unexpected argument {tok!r}")
            i += 1
            continue
        # gather the option's arguments: tokens up to the next option
        j = i + 1
        args: List[str] = []
        post_negate = False
        while j < n and not _is_opt(toks[j]):
            if toks[j] == ("!", False):
                if j + 1 < n and _is_opt(toks[j + 1]):
                    break        # "!" belongs to the next option
                post_negate = True   # old syntax: "-s ! 1.2.3.4"
            else:
                args.append(toks[j][0])
            j += 1
        neg = negate or post_negate
        negate = False
        i = j

        if tok in ("-m", "--match", "-j", "--jump", "-g", "--goto"):
            if not args:
                problems.append(f"{tok} without a name")
                continue
            if len(args) > 1:
                problems.append("unexpected argument(s) " + " ".join(repr(a) for a in args[1:]))
        if tok in ("-m", "--match"):
            matches.append((args[0], [], False))
            context = ("match", len(matches) - 1)
            continue
        if tok in ("-j", "--jump", "-g", "--goto"):
            if target is not None:
                problems.append(f"second target {args[0]!r}")
                continue
            target = args[0]
            goto = tok in ("-g", "--goto")
            context = "target"
            continue
        if tok in ("-c", "--set-counters"):
            if len(args) == 2 and all(a.isdigit() for a in args):
                counters = (int(args[0]), int(args[1]))
            else:
                problems.append(f"bad {tok}")
            continue
        if tok in _BUILTIN_OPTS:
            canon = _BUILTIN_OPTS[tok]
            want = 0 if canon == "-f" else 1
            if len(args) != want:
                problems.append(f"{tok} takes {want} argument(s)")
            builtin.append(Option(canon, tuple(args), neg))
            if canon == "-p" and args:
                proto = args[0].lower()
            continue
        if tok in _RULE_COMMANDS or tok in _OTHER_COMMANDS or tok in ("-N", "-P"):
            problems.append(f"second command {tok}")
            continue
        opt = Option(tok, tuple(args), neg)
        if context == "target":
            target_args.append(opt)
        elif context is not None:
            matches[context[1]][1].append(opt)
        elif proto in _IMPLICIT_PROTO_MODULES:
            matches.append((proto, [opt], True))
            context = ("match", len(matches) - 1)
        else:
            problems.append(f"option {tok} outside any match or target")
            # keep it, under an unknown module, so nothing is silently lost
            matches.append(("?", [opt], True))
            context = ("match", len(matches) - 1)
    if negate:
        problems.append("dangling '!'")
    ms: List[Match] = []
    if builtin:
        ms.append(Match("", tuple(builtin)))
    ms.extend(Match(m, tuple(o), imp) for m, o, imp in matches)
    return Rule(table=table, chain=chain, matches=tuple(ms), target=target,
                target_args=tuple(target_args), goto=goto, raw=raw,
                unparsed="; ".join(problems) or None, counters=counters, lineno=lineno)


def parse_save(text: str) -> Ruleset:
    """Parse iptables-save output / an iptables-restore payload. Never raises."""
    rs = Ruleset()
    table: Optional[Table] = None

    def bad(lineno: int, line: str, reason: str) -> None:
        rs.unparsed.append(Unparsed(lineno, line, reason, table.name if table else None))

    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        try:
            if not s:
                continue
            if s.startswith("#"):
                # iptables-nft-save prints this (exit status 0) for tables it cannot show
                if "incompatible" in s or s.startswith("# Error") or "ERROR" in s:
                    bad(lineno, s, "tool reports: " + s.lstrip("# "))
                continue
            if s.startswith("*"):
                name = s[1:].strip()
                if table is not None and not table.committed:
                    bad(lineno, s, f"table {table.name} not committed")
                if not name or any(c.isspace() for c in name):
                    table = None
                    bad(lineno, s, "bad table line")
                    continue
                table = rs.tables.setdefault(name, Table(name))
                table.committed = False
                if name not in BUILTIN_CHAINS:
                    bad(lineno, s, f"unknown table {name}")
                continue
            if s == "COMMIT":
                if table is None:
                    bad(lineno, s, "COMMIT outside a table")
                else:
                    table.committed = True
                    table = None
                continue
            if table is None:
                bad(lineno, s, "line outside a table")
                continue
            if s.startswith(":"):
                parts = s[1:].split()
                if len(parts) not in (2, 3) or (len(parts) == 3 and _parse_counters(parts[2]) is None):
                    bad(lineno, s, "bad chain line")
                    continue
                name, pol = parts[0], parts[1]
                cnt = _parse_counters(parts[2]) if len(parts) == 3 else None
                ch = table.chains.get(name)
                if ch is None:
                    ch = table.chains[name] = Chain(name)
                ch.policy = None if pol == "-" else pol
                ch.counters = cnt
                continue
            toks = tokenize(s)
            counters = None
            if toks and _parse_counters(toks[0][0]) is not None and not toks[0][1]:
                counters = _parse_counters(toks[0][0])
                toks = toks[1:]
            if not toks:
                bad(lineno, s, "empty rule")
                continue
            cmd = toks[0][0]
            if cmd in ("-N", "--new-chain") and len(toks) == 2:
                table.chains.setdefault(toks[1][0], Chain(toks[1][0]))
                continue
            if cmd in ("-P", "--policy") and len(toks) == 3:
                ch = table.chains.setdefault(toks[1][0], Chain(toks[1][0]))
                ch.policy = toks[2][0]
                continue
            if cmd in _RULE_COMMANDS and len(toks) >= 2 and not _is_opt(toks[1]):
                chain_name = toks[1][0]
                rest = toks[2:]
                pos = None
                if _RULE_COMMANDS[cmd] == "-I" and rest and rest[0][0].isdigit() and not rest[0][1]:
                    pos = int(rest[0][0])
                    rest = rest[1:]
                raw = " ".join(_quote(t) if q else t for t, q in rest)
                rule = parse_rule_tokens(table.name, chain_name, rest, raw=raw,
                                         lineno=lineno, counters=counters)
                ch = table.chains.get(chain_name)
                if ch is None:
                    ch = table.chains[chain_name] = Chain(chain_name)
                    if chain_name not in BUILTIN_CHAINS.get(table.name, ()):
                        bad(lineno, s, f"chain {chain_name} used before it is declared")
                if _RULE_COMMANDS[cmd] == "-I":
                    idx = (pos - 1) if pos else 0
                    ch.rules.insert(max(0, min(idx, len(ch.rules))), rule)
                else:
                    ch.rules.append(rule)
                continue
            bad(lineno, s, f"command {cmd} not modelled")
        except Exception as e:          # never crash on input
            bad(lineno, s, f"{type(e).__name__}: {e}")
    if table is not None and not table.committed:
        bad(0, "", f"table {table.name} not committed (truncated output?)")
    return rs


# --------------------------------------------------------------------------- impact

def forward_impact(ruleset: Ruleset) -> Optional[str]:
    """None when these iptables rules cannot affect forwarded IPv4 traffic,
    else a short explanation ("filter FORWARD: 3 rules; nat PREROUTING: policy DROP").

    Today's rule: any rule or non-ACCEPT policy in a chain a forwarded packet
    traverses, and anything the parser did not understand, means punt."""
    reasons: List[str] = []
    for tname, cname in FORWARD_PATH:
        ch = ruleset.chain(tname, cname)
        if ch is None:
            continue
        bits = []
        if ch.rules:
            n = len(ch.rules)
            bits.append(f"{n} rule{'s' if n != 1 else ''}")
        if ch.policy is not None and ch.policy != "ACCEPT":
            bits.append(f"policy {ch.policy}")
        if bits:
            reasons.append(f"{tname} {cname}: " + ", ".join(bits))
    if ruleset.unparsed:
        u = ruleset.unparsed[0]
        n = len(ruleset.unparsed)
        reasons.append(f"{n} unparsed line{'s' if n != 1 else ''} ({u.reason})")
    return "; ".join(reasons) or None


# --------------------------------------------------------------------------- nftables

IPTABLES_NFT_FAMILY = "ip"


def _nft_objects(doc: Any) -> List[Dict[str, Any]]:
    if isinstance(doc, (str, bytes)):
        doc = json.loads(doc)
    objs = doc["nftables"]
    if not isinstance(objs, list):
        raise ValueError("'nftables' is not a list")
    return objs


def iptables_nft_owned_tables(doc: Any, iptables_nft: Optional[Ruleset] = None) -> List[str]:
    """Names of the family-ip tables in ``doc`` that iptables-nft owns (and that
    iptables-nft-save therefore already showed us).

    A table is iptables-nft's when it is in family ``ip``, has an iptables table
    name (filter, nat, mangle, raw, security), every base chain has a built-in chain
    name of that table hooked where the name says, and — when the parsed
    iptables-nft-save output is given — that output lists the table with the same
    chains and the same number of rules per chain (iptables-nft-save skips tables
    it cannot represent, printing "# Table `x' is incompatible"). Anything else in
    family ip is treated as a native nftables table."""
    objs = _nft_objects(doc)
    chains: Dict[str, Dict[str, Dict[str, Any]]] = {}
    nrules: Dict[Tuple[str, str], int] = {}
    for o in objs:
        if not isinstance(o, dict):
            continue
        if "table" in o:
            t = o["table"]
            if t.get("family") == IPTABLES_NFT_FAMILY:
                chains.setdefault(t.get("name"), {})
        elif "chain" in o:
            c = o["chain"]
            if c.get("family") == IPTABLES_NFT_FAMILY:
                chains.setdefault(c.get("table"), {})[c.get("name")] = c
        elif "rule" in o:
            r = o["rule"]
            if r.get("family") == IPTABLES_NFT_FAMILY:
                k = (r.get("table"), r.get("chain"))
                nrules[k] = nrules.get(k, 0) + 1
    owned = []
    for tname, tchains in chains.items():
        if tname not in BUILTIN_CHAINS:
            continue
        ok = True
        for cname, c in tchains.items():
            if "hook" in c and (cname not in BUILTIN_CHAINS[tname] or c["hook"] != cname.lower()):
                ok = False
        if ok and iptables_nft is not None:
            t = iptables_nft.table(tname)
            if t is None or not t.committed:
                ok = False
            else:
                for cname, c in tchains.items():
                    sc = t.chains.get(cname)
                    if (sc is None or len(sc.rules) != nrules.get((tname, cname), 0)
                            or ("hook" in c and (sc.policy or "").lower() != c.get("policy", "accept"))):
                        ok = False
                # iptables-nft creates built-in chains lazily, iptables-nft-save lists
                # them all: a chain only in the save output must be empty and ACCEPT.
                for cname, sc in t.chains.items():
                    if cname not in tchains and (sc.rules or sc.policy not in (None, "ACCEPT")):
                        ok = False
        if ok:
            owned.append(tname)
    return owned


# Every bridged frame meets these: bridge-family chains (ebtables-nft, nft
# bridge tables) at any hook, and netdev chains on the ports.
NFT_BRIDGE_FAMILIES = frozenset({"bridge", "netdev"})
NFT_BRIDGE_HOOKS = frozenset({"prerouting", "input", "forward", "output", "postrouting", "ingress", "egress"})


def nft_bridge_impact(doc: Any) -> Optional[str]:
    """Explanation when nftables chains can affect bridged frames, else None."""
    return nft_forward_impact(doc, None, NFT_BRIDGE_FAMILIES, NFT_BRIDGE_HOOKS)


def nft_forward_impact(doc: Any, iptables_nft: Optional[Ruleset] = None, families=NFT_FORWARD_FAMILIES,
                       hooks=NFT_FORWARD_HOOKS) -> Optional[str]:
    """Explanation when native nftables chains can affect routed IPv4 traffic, else None.

    ``doc`` is ``nft -j list ruleset`` output (str or parsed). Base chains in
    families ip, inet, netdev hooked at prerouting/forward/postrouting/ingress/egress
    with rules or a non-accept policy count; iptables-nft's own tables are skipped
    (see iptables_nft_owned_tables). Unreadable input is reported, never ignored."""
    try:
        objs = _nft_objects(doc)
        owned = set(iptables_nft_owned_tables({"nftables": objs}, iptables_nft))
    except Exception as e:
        return f"nft ruleset unreadable ({type(e).__name__}: {e})"
    base: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
    nrules: Dict[Tuple[str, str, str], int] = {}
    for o in objs:
        if not isinstance(o, dict):
            continue
        if "chain" in o and isinstance(o["chain"], dict):
            c = o["chain"]
            k = (c.get("family"), c.get("table"), c.get("name"))
            if "hook" in c:
                base[k] = c
        elif "rule" in o and isinstance(o["rule"], dict):
            r = o["rule"]
            k = (r.get("family"), r.get("table"), r.get("chain"))
            nrules[k] = nrules.get(k, 0) + 1
    reasons = []
    for k, c in base.items():
        fam, tname, cname = k
        if fam not in families or c.get("hook") not in hooks:
            continue
        if fam == IPTABLES_NFT_FAMILY and tname in owned:
            continue
        bits = []
        n = nrules.get(k, 0)
        if n:
            bits.append(f"{n} rule{'s' if n != 1 else ''}")
        pol = c.get("policy", "accept")
        if pol != "accept":
            bits.append(f"policy {pol}")
        if bits:
            reasons.append(f"nft {fam} {tname} {cname} (hook {c.get('hook')}): " + ", ".join(bits))
    return "; ".join(sorted(reasons)) or None


_NFT_VOLATILE_KEYS = frozenset({"handle", "packets", "bytes", "used", "expires"})


def nft_normalize(doc: Any) -> Any:
    """``nft -j`` output without metainfo, handles and counter values, so two
    listings of the same rules compare equal."""
    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in _NFT_VOLATILE_KEYS}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    try:
        objs = _nft_objects(doc)
    except Exception:
        return doc
    return [strip(o) for o in objs if not (isinstance(o, dict) and "metainfo" in o)]
