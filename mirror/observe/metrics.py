"""`start --metrics ADDR:PORT`: Prometheus text format, off by default.

Every scrape reads the agent's own status (the same numbers `status --json`
shows), so the endpoint can never disagree with the CLI.
"""

import ipaddress
from typing import Callable, Dict, Tuple

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

PREFIX = "loxi_mirror_"


def parse_address(text: str) -> Tuple[str, int]:
    """"ADDR:PORT" or "[v6]:PORT" -> (addr, port); ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r}: expected ADDR:PORT, e.g. 127.0.0.1:9470")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ipaddress.ip_address(host)  # an address, not a name: nothing resolved behind the user's back
    port_n = int(port)
    if not 0 < port_n < 65536:
        raise ValueError(f"port {port} out of range")
    return host, port_n


class AgentCollector:
    """Turns one status() dict into metric families at each scrape."""

    def __init__(self, status: Callable[[], Dict]):
        self.status = status

    def collect(self):
        st = self.status()
        ready = GaugeMetricFamily(PREFIX + "ready", "1 when the agent is ready and the fast path is on")
        ready.add_metric([], 1.0 if st.get("ready") else 0.0)
        yield ready
        c = st.get("counters", {})
        for unit in ("packets", "bytes"):
            fast = CounterMetricFamily(PREFIX + f"fast_path_{unit}",
                                       f"{unit.capitalize()} the fast path handled itself")
            fast.add_metric([], c.get(f"fast_path_{unit}", 0))
            yield fast
            punt = CounterMetricFamily(PREFIX + f"punted_{unit}", f"{unit.capitalize()} left to the kernel, by reason",
                                       labels=["reason"])
            for reason, n in sorted(c.get("punt" if unit == "packets" else "punt_bytes", {}).items()):
                punt.add_metric([reason], n)
            yield punt
        drop = CounterMetricFamily(PREFIX + "dropped_packets",
                                   "Packets the fast path dropped because the ruleset drops them, by reason",
                                   labels=["reason"])
        for reason, n in sorted(c.get("drop", {}).items()):
            drop.add_metric([reason], n)
        yield drop
        yield from _per_interface(c.get("interfaces", {}))
        entries = GaugeMetricFamily(PREFIX + "table_entries", "Entries written to each eBPF map", labels=["table"])
        for table, n in sorted(st.get("tables", {}).items()):
            entries.add_metric([table], n)
        yield entries
        cap = GaugeMetricFamily(PREFIX + "table_capacity", "Capacity of each eBPF map", labels=["table"])
        for table, n in sorted(st.get("table_capacity", {}).items()):
            cap.add_metric([table], n)
        yield cap
        unwritten = GaugeMetricFamily(PREFIX + "routes_unwritten",
                                      "Routes the route map has no room for (their covering routes punt)")
        unwritten.add_metric([], (st.get("route_overflow") or {}).get("unwritten", 0))
        yield unwritten
        for key, help_text in (("resyncs", "Full re-dumps of kernel state (lost events, errors)"),
                               ("map_resyncs", "Re-reads of the maps after a failed write")):
            m = CounterMetricFamily(PREFIX + key, help_text)
            m.add_metric([], st.get(key, 0))
            yield m
        lat = st.get("reconcile_seconds")
        if lat:
            h = HistogramMetricFamily(PREFIX + "reconcile_seconds",
                                      "Time from a batch of kernel events to the maps matching it")
            buckets = [(_le(le), n) for le, n in lat["buckets"]] + [("+Inf", lat["count"])]
            h.add_metric([], buckets, lat["sum"])
            yield h


def _per_interface(interfaces: Dict[str, Dict]):
    """The same counters by ingress interface (reasons never counted on an
    interface are left out); "(other)" counts packets of no managed ingress."""
    for unit in ("packets", "bytes"):
        fast = CounterMetricFamily(PREFIX + f"interface_fast_path_{unit}",
                                   f"{unit.capitalize()} the fast path handled itself, by ingress interface",
                                   labels=["interface"])
        punt = CounterMetricFamily(PREFIX + f"interface_punted_{unit}",
                                   f"{unit.capitalize()} left to the kernel, by ingress interface and reason",
                                   labels=["interface", "reason"])
        for name, c in sorted(interfaces.items()):
            fast.add_metric([name], c.get(f"fast_path_{unit}", 0))
            for reason, n in sorted(c.get("punt" if unit == "packets" else "punt_bytes", {}).items()):
                punt.add_metric([name, reason], n)
        yield fast
        yield punt
    drop = CounterMetricFamily(PREFIX + "interface_dropped_packets",
                               "Packets the fast path dropped because the ruleset drops them, "
                               "by ingress interface and reason", labels=["interface", "reason"])
    for name, c in sorted(interfaces.items()):
        for reason, n in sorted(c.get("drop", {}).items()):
            drop.add_metric([name, reason], n)
    yield drop


def _le(bound: float) -> str:
    return repr(float(bound))


def serve(address: str, status: Callable[[], Dict]):
    """Start the HTTP endpoint in a daemon thread; returns the server (shutdown())."""
    host, port = parse_address(address)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(status))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
