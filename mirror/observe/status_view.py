"""`loxi-mirror status` for people: a summary of one status dict (the same
dict `status --json` prints), as rich tables on a terminal, plain text
otherwise."""

from typing import Dict, List, Tuple

from ..reasons import REASONS

DESCRIPTION = {r.name: r.description for r in REASONS}
# Punt reasons that switch off all forwarding; status names the culprit.
GLOBAL_REASONS = ("NETFILTER", "IPSEC", "POLICY_ROUTING", "ROUTE_UNSUPPORTED", "NETFILTER_CHANGING")
TOP_REASONS = 8


def top_punts(st: Dict) -> List[Tuple[str, int, float, str]]:
    """(reason, packets, packets/s, hint) for the busiest punt reasons."""
    punt = st.get("counters", {}).get("punt", {})
    rates = st.get("rates_pps", {})
    culprit = st.get("forwarding_punted_because")
    rows = []
    for reason, n in punt.items():
        if not n:
            continue
        hint = DESCRIPTION.get(reason, "")
        if culprit and reason in GLOBAL_REASONS:
            hint = f"{hint}: {culprit}"
        rows.append((reason, n, rates.get(reason, 0.0), hint))
    rows.sort(key=lambda r: (-r[2], -r[1], r[0]))
    return rows[:TOP_REASONS]


def bridge_lines(st: Dict) -> List[str]:
    out = []
    for name, br in sorted((st.get("bridges") or {}).items()):
        why = f"; routed egress punts: {br['egress_punted_because']}" if br.get("egress_punted_because") else ""
        out.append(f"bridge {name}: ports {', '.join(br['ports']) or '-'}"
                   f"{'; bridge-nf-call-iptables' if br.get('bridge_nf_call_iptables') else ''}{why}")
    return out


def tables(st: Dict) -> List[Tuple[str, int, int]]:
    cap = st.get("table_capacity", {})
    return [(name, n, cap.get(name, 0)) for name, n in sorted(st.get("tables", {}).items())]


def overflow_line(o: Dict) -> str:
    return (f"route map full: {o['unwritten']} route(s) not written (capacity {o['capacity']}); "
            f"{o['covers']} covering route(s) punt ROUTE_OVERFLOW")


def share(st: Dict) -> str:
    c = st["counters"]
    total = c["fast_path_packets"] + sum(c["punt"].values())
    return f"{100.0 * c['fast_path_packets'] / total:.1f}%" if total else "-"


def _headline(st: Dict) -> str:
    state = f"ready since {st['ready_since']}" if st["ready"] else "not ready"
    return f"loxi-mirror: running (pid {st['pid']}), {state}, up {_duration(st.get('uptime_s', 0))}"


def interface_counts(st: Dict, name: str) -> str:
    """"N fast path, M punted/dropped (REASON n, ...)" for packets received on
    one interface, or "" when none were counted."""
    c = st["counters"].get("interfaces", {}).get(name)
    if not c:
        return ""
    punts = sorted(((n, r) for r, n in {**c["punt"], **c.get("drop", {})}.items() if n), reverse=True)
    why = ", ".join(f"{r} {n}" for n, r in punts[:3])
    return f"{c['fast_path_packets']} fast path, {sum(n for n, _ in punts)} punted/dropped" + (f" ({why})" if why else "")


def render_plain(st: Dict) -> str:
    c = st["counters"]
    lines = [_headline(st), f"interfaces: {', '.join(st['interfaces']) or '-'}"]
    for name in st["interfaces"]:
        if interface_counts(st, name):
            lines.append(f"  {name}: {interface_counts(st, name)}")
    for name, why in sorted(st.get("skipped_interfaces", {}).items()):
        lines.append(f"  skipped {name}: {why}")
    lines.append("tables: " + ", ".join(f"{n} {used}/{cap}" if cap else f"{n} {used}" for n, used, cap in tables(st)))
    lines.extend(bridge_lines(st))
    if st.get("route_overflow"):
        lines.append(overflow_line(st["route_overflow"]))
    if st.get("forwarding_punted_because"):
        lines.append(f"all forwarded traffic punts: {st['forwarding_punted_because']}")
    fast_rate = st.get("rates_pps", {}).get("FORWARDED", 0.0)
    lines.append(f"fast path: {c['fast_path_packets']} packets, {c['fast_path_bytes']} bytes "
                 f"({share(st)} of packets), {fast_rate:g} packets/s")
    rows = top_punts(st)
    lines.append("punted: " + ("" if rows else "none"))
    for reason, n, rate, hint in rows:
        lines.append(f"  {reason} {n} ({rate:g}/s): {hint}")
    lines.extend(drop_and_offload_lines(st))
    return "\n".join(lines)


def drop_and_offload_lines(st: Dict) -> List[str]:
    out = []
    drops = {k: v for k, v in st["counters"].get("drop", {}).items() if v}
    if drops:
        out.append("dropped (as the kernel would): " + ", ".join(f"{k} {v}" for k, v in sorted(drops.items())))
    off = st.get("offload")
    if off and off.get("events"):
        out.append("flow offload: " + ", ".join(f"{k} {v}" for k, v in sorted(off.items())))
    return out


def render_rich(st: Dict, console) -> None:
    from rich.table import Table

    console.print(f"[bold]{_headline(st)}[/bold]")
    if st.get("forwarding_punted_because"):
        console.print(f"[yellow]all forwarded traffic punts:[/yellow] {st['forwarding_punted_because']}")
    if st.get("route_overflow"):
        console.print(f"[yellow]{overflow_line(st['route_overflow'])}[/yellow]")
    ifs = Table(title="interfaces", title_justify="left")
    ifs.add_column("name")
    ifs.add_column("fast path")
    ifs.add_column("packets received")
    for name in st["interfaces"]:
        ifs.add_row(name, "[green]attached[/green]", interface_counts(st, name))
    for name, why in sorted(st.get("skipped_interfaces", {}).items()):
        ifs.add_row(name, f"skipped: {why}", "")
    console.print(ifs)
    for line in bridge_lines(st):
        console.print(line)
    tab = Table(title="tables", title_justify="left")
    for col in ("table", "entries", "capacity", "fill"):
        tab.add_column(col, justify="right" if col != "table" else "left")
    for name, used, cap in tables(st):
        tab.add_row(name, str(used), str(cap or "-"), f"{100.0 * used / cap:.1f}%" if cap else "-")
    console.print(tab)
    c = st["counters"]
    verdicts = Table(title=f"packets (fast path {share(st)})", title_justify="left")
    for col in ("verdict", "packets", "packets/s", "why"):
        verdicts.add_column(col, justify="right" if col in ("packets", "packets/s") else "left")
    verdicts.add_row("[green]FORWARDED[/green]", str(c["fast_path_packets"]),
                     f"{st.get('rates_pps', {}).get('FORWARDED', 0.0):g}", "fast path")
    for reason, n, rate, hint in top_punts(st):
        verdicts.add_row(reason, str(n), f"{rate:g}", hint)
    console.print(verdicts)
    for line in drop_and_offload_lines(st):
        console.print(line)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
