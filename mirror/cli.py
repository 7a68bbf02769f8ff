"""loxi-mirror command line: start, stop, status, dump.

Every command acts on the network namespace it runs in; use
`ip netns exec NS loxi-mirror ...` for another one.
"""

import json
import logging
import re
import sys
import time

import click

from . import control, tc

EXIT_ERROR = 1


def _regex(ctx, param, value):
    if value is not None:
        try:
            re.compile(value)
        except re.error as e:
            raise click.BadParameter(f"not a regular expression: {e}")
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
@click.option("--ebpf", is_flag=True, help="Print the datapath's C source and exit.")
def start(include, exclude, verbose, ebpf):
    """Run the agent in the foreground (stops on SIGINT/SIGTERM)."""
    if ebpf:
        from .datapath import source_text
        click.echo(source_text())
        return
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s loxi-mirror %(levelname)s %(message)s")
    from .agent import Agent
    from .datapath import DatapathError
    from .translate import Selection

    try:
        code = Agent(Selection(include, exclude)).run()
    except control.AlreadyRunning as e:
        _fail(f"another agent is already running in this network namespace ({e})")
    except DatapathError as e:
        _fail(f"BPF/TC unavailable: {e}")
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
def status(as_json):
    """Whether an agent runs here, its tables and counters."""
    try:
        st = control.request({"cmd": "status"})
    except control.NotRunning:
        st = {"running": False, "ready": False, "interfaces": [], "tables": {},
              "counters": {"fast_path_packets": 0, "fast_path_bytes": 0, "punt": {}}}
    if "error" in st:
        _fail(f"the agent could not answer: {st['error']}")
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    if not st["running"]:
        click.echo("loxi-mirror: not running in this network namespace")
        return
    c = st["counters"]
    click.echo(f"loxi-mirror: running (pid {st['pid']}), "
               f"{'ready since ' + st['ready_since'] if st['ready'] else 'not ready'}")
    click.echo(f"interfaces: {', '.join(st['interfaces']) or '-'}")
    click.echo("tables: " + ", ".join(f"{k} {v}" for k, v in sorted(st["tables"].items())))
    if st.get("forwarding_punted_because"):
        click.echo(f"all forwarded traffic punts: {st['forwarding_punted_because']}")
    total = c["fast_path_packets"] + sum(c["punt"].values())
    share = f" ({100.0 * c['fast_path_packets'] / total:.1f}% of packets)" if total else ""
    click.echo(f"fast path: {c['fast_path_packets']} packets, {c['fast_path_bytes']} bytes{share}")
    punts = {k: v for k, v in c["punt"].items() if v}
    click.echo("punted: " + (", ".join(f"{k} {v}" for k, v in sorted(punts.items())) or "none"))


@main.command()
@click.argument("table", type=click.Choice(["routes", "neighbors", "links"]))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def dump(table, as_json):
    """Show a fast-path table as the datapath sees it."""
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
    return f"{row['ifindex']}: {row['name']} {row['mac']} mtu {row['mtu']} <{','.join(row['flags'])}>"


def _fail(message):
    click.echo(f"loxi-mirror: {message}", err=True)
    sys.exit(EXIT_ERROR)
