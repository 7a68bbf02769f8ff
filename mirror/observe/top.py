"""`loxi-mirror top`: per-reason packet rates from two status samples."""

from typing import Dict, List, Tuple


def counts(status: Dict) -> Dict[str, int]:
    """Packets per verdict: FORWARDED (fast path) and each punt reason."""
    c = status.get("counters", {})
    out = {"FORWARDED": c.get("fast_path_packets", 0)}
    out.update(c.get("punt", {}))
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


def render(rows: List[Tuple[str, float, int]], interval: float, header: str) -> str:
    total_rate = sum(r for _, r, _ in rows)
    fast = next((r for name, r, _ in rows if name == "FORWARDED"), 0.0)
    share = f"{100.0 * fast / total_rate:5.1f}%" if total_rate else "    -"
    lines = [header, f"fast path {share} of {total_rate:,.0f} packets/s (every {interval:g} s; Ctrl-C quits)", "",
             f"{'verdict':<24} {'packets/s':>14} {'total':>16}"]
    for name, rate, total in rows:
        if rate or total:
            lines.append(f"{name:<24} {rate:>14,.1f} {total:>16,}")
    return "\n".join(lines)
