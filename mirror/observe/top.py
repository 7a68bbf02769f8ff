"""`loxi-mirror top`: per-interface and per-reason packet rates from two status samples."""

from typing import Dict, List, NamedTuple, Tuple

from ..reasons import REASONS

DROPS = frozenset(r.name for r in REASONS if r.drop)
TOP_REASONS = 3  # punt/drop reasons shown per interface


def counts(status: Dict) -> Dict[str, int]:
    """Packets per verdict: FORWARDED (fast path), each punt and drop reason."""
    return _verdicts(status.get("counters", {}))


def interface_counts(status: Dict) -> Dict[str, Dict[str, int]]:
    """{ingress interface: packets per verdict}, as counts() per interface."""
    return {name: _verdicts(c) for name, c in status.get("counters", {}).get("interfaces", {}).items()}


def _verdicts(c: Dict) -> Dict[str, int]:
    out = {"FORWARDED": c.get("fast_path_packets", 0)}
    out.update(c.get("punt", {}))
    out.update(c.get("drop", {}))
    return out


def rates(before: Dict[str, int], after: Dict[str, int], seconds: float) -> List[Tuple[str, float, int]]:
    """(reason, packets/s, total) for every reason seen, busiest first.
    A counter that went backwards (agent restarted) counts from zero."""
    rows = []
    for reason, total in after.items():
        delta = total - before.get(reason, 0)
        if delta < 0:
            delta = total
        rows.append((reason, delta / seconds if seconds > 0 else 0.0, total))
    rows.sort(key=lambda r: (-r[1], -r[2], r[0]))
    return rows


class InterfaceRow(NamedTuple):
    name: str
    fast: float                            # packets/s the fast path forwarded
    punted: float                          # packets/s left to the kernel
    dropped: float                         # packets/s dropped as the ruleset does
    reasons: List[Tuple[str, float, int]]  # busiest punt/drop reasons: (name, packets/s, total)


def interface_rates(before: Dict[str, Dict[str, int]], after: Dict[str, Dict[str, int]],
                    seconds: float) -> List[InterfaceRow]:
    """One row per interface with any packet counted, busiest first."""
    out = []
    for name, now in after.items():
        verdicts = rates(before.get(name, {}), now, seconds)
        if not any(total for _, _, total in verdicts):
            continue
        fast = next((r for v, r, _ in verdicts if v == "FORWARDED"), 0.0)
        others = [v for v in verdicts if v[0] != "FORWARDED" and v[2]]
        out.append(InterfaceRow(name, fast, sum(r for v, r, _ in others if v not in DROPS),
                                sum(r for v, r, _ in others if v in DROPS), others[:TOP_REASONS]))
    out.sort(key=lambda r: (-(r.fast + r.punted + r.dropped), r.name))
    return out


def render(rows: List[Tuple[str, float, int]], interval: float, header: str,
           interfaces: List[InterfaceRow] = ()) -> str:
    total_rate = sum(r for _, r, _ in rows)
    fast = next((r for name, r, _ in rows if name == "FORWARDED"), 0.0)
    share = f"{100.0 * fast / total_rate:5.1f}%" if total_rate else "    -"
    lines = [header, f"fast path {share} of {total_rate:,.0f} packets/s (every {interval:g} s; Ctrl-C quits)", ""]
    if interfaces:
        lines.append(f"{'interface':<16} {'fast path/s':>13} {'punted/s':>11} {'dropped/s':>10}  top punt/drop reasons")
        for i in interfaces:
            reasons = ", ".join(f"{name} {rate:,.0f}/s" if rate else f"{name} ({total:,})"
                                for name, rate, total in i.reasons)
            lines.append(f"{i.name:<16} {i.fast:>13,.1f} {i.punted:>11,.1f} {i.dropped:>10,.1f}  {reasons}")
        lines.append("")
    lines.append(f"{'verdict':<24} {'packets/s':>14} {'total':>16}")
    for name, rate, total in rows:
        if rate or total:
            lines.append(f"{name:<24} {rate:>14,.1f} {total:>16,}")
    return "\n".join(lines)
