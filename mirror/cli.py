"""loxi-mirror command line: start, stop, status, top, explain, dump.

Every command acts on the network namespace it runs in; use
`ip netns exec NS loxi-mirror ...` for another one.
"""

import json
import os
import re
import shlex
import sys
import time

import click

from . import control, logfmt, tc

EXIT_ERROR = 1


def _regex(ctx, param, value):
    if value is not None:
        try:
            re.compile(value)
        except re.error as e:
            raise click.BadParameter(f"not a regular expression: {e}")
    return value


def _address(ctx, param, value):
    if value is not None:
        from .observe.metrics import parse_address
        try:
            parse_address(value)
        except ValueError as e:
            raise click.BadParameter(str(e))
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Transparent eBPF fast path for this network namespace's routing."""


@main.command()
@click.option("--include", callback=_regex, metavar="REGEX",
              help="Manage only interfaces whose whole name matches REGEX.")
@click.option("--exclude", callback=_regex, metavar="REGEX",
              help="Never manage interfaces whose whole name matches REGEX.")
@click.option("-v", "--verbose", is_flag=True, help="Log every map change.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one JSON object per line (journald, Kubernetes).")
@click.option("--metrics", "metrics_address", callback=_address, metavar="ADDR:PORT",
              help="Serve Prometheus metrics there (off by default), e.g. 127.0.0.1:9470.")
@click.option("--ebpf", is_flag=True, help="Print the datapath's C source and exit.")
def start(include, exclude, verbose, log_format, metrics_address, ebpf):
    """Run the agent in the foreground (stops on SIGINT/SIGTERM)."""
    if ebpf:
        from .datapath import source_text
        click.echo(source_text())
        return
    logfmt.configure(log_format, verbose, sys.stderr)
    from .agent import Agent
    from .datapath import DatapathError
    from .translate import Selection

    # Extra C flags for the datapath, for tests only (small table sizes such as
    # -DLM_MAX_NEIGHBORS=4, or -DLM_FAULT_VERIFIER to make loading fail).
    cflags = shlex.split(os.environ.get("LOXI_MIRROR_CFLAGS", ""))
    try:
        code = Agent(Selection(include, exclude), cflags=cflags, metrics_address=metrics_address).run()
    except control.AlreadyRunning as e:
        _fail(f"another agent is already running in this network namespace ({e})")
    except DatapathError as e:
        if verbose and e.detail:
            click.echo(e.detail.strip("\n"), err=True)
        _fail(f"BPF/TC unavailable: {e}" + ("" if verbose or not e.detail else " (-v shows the full output)"))
    except PermissionError as e:
        _fail(f"permission denied ({e}); run as root (CAP_BPF and CAP_NET_ADMIN)")
    sys.exit(code)


@main.command()
@click.option("--timeout", default=15.0, show_default=True, help="Seconds to wait for the agent to exit.")
def stop(timeout):
    """Stop this namespace's agent; clean up after a killed one."""
    try:
        reply = control.request({"cmd": "stop"})
        if "error" in reply:
            _fail(reply["error"])
    except control.NotRunning:
        removed = tc.cleanup_leftovers()
        if removed:
            click.echo(f"no agent running; removed leftovers from {removed} interface(s)")
        else:
            click.echo("no agent running")
        return
    deadline = time.monotonic() + timeout
    while control.running():
        if time.monotonic() > deadline:
            _fail(f"agent (pid {reply.get('pid')}) did not stop within {timeout:.0f} s")
        time.sleep(0.05)
    click.echo(f"stopped agent (pid {reply.get('pid')})")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--ready", "check_ready", is_flag=True,
              help="Print nothing; exit 0 only if an agent runs here and is ready (for probes).")
def status(as_json, check_ready):
    """Whether an agent runs here, its tables and counters."""
    try:
        st = control.request({"cmd": "status"})
    except control.NotRunning:
        st = {"running": False, "ready": False, "interfaces": [], "tables": {},
              "counters": {"fast_path_packets": 0, "fast_path_bytes": 0, "punt": {}}}
    if "error" in st:
        _fail(f"the agent could not answer: {st['error']}")
    if check_ready:
        sys.exit(0 if st.get("ready") else EXIT_ERROR)
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    if not st["running"]:
        click.echo("loxi-mirror: not running in this network namespace")
        return
    from .observe import status_view
    if sys.stdout.isatty():
        from rich.console import Console
        status_view.render_rich(st, Console())
    else:
        click.echo(status_view.render_plain(st))


@main.command()
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between samples.")
@click.option("--count", default=0, type=click.IntRange(min=0), help="Stop after N refreshes (0: until Ctrl-C).")
def top(interval, count):
    """Live packet rates per ingress interface and per verdict (fast path,
    each punt and drop reason)."""
    from .observe import top as view

    def sample():
        try:
            st = control.request({"cmd": "status"})
        except control.NotRunning:
            _fail("no agent running in this network namespace")
        return st, time.monotonic()

    clear = sys.stdout.isatty()
    before, t0 = sample()
    shown = 0
    try:
        while not count or shown < count:
            time.sleep(interval)
            after, t1 = sample()
            text = view.render(view.rates(view.counts(before), view.counts(after), t1 - t0), interval,
                               f"loxi-mirror top - {time.strftime('%H:%M:%S')}",
                               view.interface_rates(view.interface_counts(before), view.interface_counts(after),
                                                    t1 - t0))
            click.echo(("\x1b[H\x1b[2J" if clear else "") + text + ("" if clear else "\n"))
            before, t0 = after, t1
            shown += 1
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--in", "iface", required=True, metavar="IFACE", help="Ingress interface the packet arrives on.")
@click.option("--src", metavar="A", help="Source IPv4 address.")
@click.option("--dst", metavar="B", help="Destination IPv4 address.")
@click.option("--proto", type=click.Choice(["tcp", "udp", "icmp"]), default="udp", show_default=True)
@click.option("--sport", type=click.IntRange(0, 65535), default=40000, show_default=True)
@click.option("--dport", type=click.IntRange(0, 65535), default=80, show_default=True)
@click.option("--ttl", type=click.IntRange(0, 255), default=64, show_default=True)
@click.option("--len", "length", type=click.IntRange(28, 65535), help="IPv4 total length (default: headers + 32).")
@click.option("--tcp-flags", default="A", show_default=True, help="TCP flags, letters of FSRPAU.")
@click.option("--pcap", type=click.File("rb"), help="Explain every frame of this pcap file instead.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def explain(iface, src, dst, proto, sport, dport, ttl, length, tcp_flags, pcap, as_json):
    """What the fast path does with a packet, stage by stage, and why.

    Runs the packet through the loaded program (BPF_PROG_TEST_RUN, no side
    effects), so the answer is the datapath's own."""
    from . import explain as ex

    if pcap is not None:
        try:
            frames = ex.read_pcap(pcap.read())
        except ValueError as e:
            _fail(str(e))
        requests = [{"cmd": "explain", "in": iface, "frames": [f.hex() for f in chunk]}
                    for chunk in _chunks(frames, 20000)]
    else:
        if not src or not dst:
            raise click.UsageError("--src and --dst are needed (or --pcap FILE)")
        if set(tcp_flags.upper()) - set(ex.TCP_FLAG_BITS):
            raise click.BadParameter("letters of FSRPAU", param_hint="--tcp-flags")
        requests = [{"cmd": "explain", "in": iface, "packet": {
            "src": src, "dst": dst, "proto": proto, "sport": sport, "dport": dport, "ttl": ttl,
            "length": length, "tcp_flags": tcp_flags}}]
    replies = []
    for req in requests:
        try:
            reply = control.request(req, timeout=30)
        except control.NotRunning:
            _fail("no agent running in this network namespace")
        if "error" in reply:
            _fail(reply["error"])
        replies.append(reply)
    results = [r for reply in replies for r in reply["results"]]
    if as_json:
        click.echo(json.dumps({"in": iface, "results": results}, indent=2))
        return
    texts = [ex.render_text(r, iface) for r in results]
    if pcap is not None:
        texts = [f"frame {i}: {t}" for i, t in enumerate(texts, 1)]
    click.echo("\n\n".join(texts))


def _chunks(frames, max_bytes):
    """Frames in groups whose hex fits one control request."""
    chunk, size = [], 0
    for f in frames:
        if chunk and size + len(f) > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(f)
        size += len(f)
    if chunk:
        yield chunk


@main.command()
@click.argument("table", type=click.Choice(["routes", "neighbors", "links", "fdb", "rules", "conntrack"]))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def dump(table, as_json):
    """Show a fast-path table as the datapath sees it; `rules`: every iptables
    rule, compiled or punted (and why) or unused by forwarded flows;
    `conntrack`: the kernel flows with a current verdict (forward, drop or
    left to the kernel), the kernel's entry and the fast path's counters."""
    try:
        reply = control.request({"cmd": "dump", "table": table})
    except control.NotRunning:
        _fail("no agent running in this network namespace")
    if "error" in reply:
        _fail(reply["error"])
    rows = reply["entries"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(_row_text(table, row))


def _row_text(table, row):
    if table == "routes":
        via = f" via {row['gateway']}" if row["gateway"] else ""
        dev = f" dev {row['oif']}" if row["oif"] is not None else ""
        mtu = f" mtu {row['mtu']}" if row["mtu"] else ""
        return f"{row['prefix']}{via}{dev}{mtu} {row['action']}"
    if table == "neighbors":
        return f"{row['ip']} dev {row['interface']} lladdr {row['mac']}"
    if table == "fdb":
        where = "local" if row["local"] else f"dev {row['port']}"
        return f"{row['mac']} {where} master {row['bridge']}"
    if table == "conntrack":
        return _flow_text(row)
    if table == "rules":
        why = f" ({row['reason']})" if row["reason"] else ""
        if row["index"]:
            counts = (f" [kernel {row['kernel_packets']} pkts, fast path {row['fast_path_packets']} pkts]"
                      if row.get("kernel_packets") is not None else "")
            return (f"{row['backend']} {row['table']} {row['chain']} #{row['index']}: {row['status']}{why}{counts}\n"
                    f"    -A {row['chain']} {row['rule']}")
        return f"{row['backend']}: {row['status']}{why}" + (f"\n    {row['rule']}" if row["rule"] else "")
    text = f"{row['ifindex']}: {row['name']} {row['mac']} mtu {row['mtu']} <{','.join(row['flags'])}>"
    if "bridge" in row:
        punts = " ".join(f"punt-{k}:{v}" for k, v in row["port_punts"].items())
        text += f" master {row['bridge']} <{','.join(row['port_flags'])}>" + (f" {punts}" if punts else "")
        text += f" peer {row['peer_mac']}" if row.get("peer_mac") else ""
    return text


def _flow_text(row):
    k = row["kernel"]
    kernel = "kernel entry gone" if k is None else (
        f"{k['state'] or ''} timeout {k['timeout']} [{','.join(k['status'])}] mark {k['mark']} "
        f"orig {k['orig'][0]}:{k['orig'][2]}->{k['orig'][1]}:{k['orig'][3]} "
        f"reply {k['reply'][0]}:{k['reply'][2]}->{k['reply'][1]}:{k['reply'][3]}")
    decided = row["rule"] or row["reason"]
    arrow = "=bridged=>" if row.get("bridged") else "=>"
    return (f"{row['proto']} {row['in']} {row['wire']} {arrow} {row['out']} {row['translated']} "
            f"{row['verdict']} ({decided}) {row['packets']} pkts {row['bytes']} bytes | {kernel}")


def _fail(message):
    click.echo(f"loxi-mirror: {message}", err=True)
    sys.exit(EXIT_ERROR)
