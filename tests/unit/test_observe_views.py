"""Pure parts of the operator views: rates for `top`, the metrics families,
the latency histogram."""

import pytest
from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mirror.observe import metrics, top
from mirror.observe.latency import Histogram


def test_rates_busiest_first_and_restart_safe():
    before = {"FORWARDED": 100, "NO_ROUTE": 10, "LOCAL": 50}
    after = {"FORWARDED": 300, "NO_ROUTE": 10, "LOCAL": 5, "TTL_EXCEEDED": 4}
    rows = top.rates(before, after, 2.0)
    assert rows[0] == ("FORWARDED", 100.0, 300)
    assert ("LOCAL", 2.5, 5) in rows  # went backwards: agent restarted, count from zero
    assert ("NO_ROUTE", 0.0, 10) in rows
    text = top.render(rows, 2.0, "hdr")
    assert "FORWARDED" in text and "fast path  95.7%" in text


def test_histogram_is_cumulative():
    h = Histogram(buckets=(0.001, 0.01, 0.1))
    for s in (0.0005, 0.005, 0.005, 0.05, 3.0):
        h.observe(s)
    snap = h.snapshot()
    assert snap["buckets"] == [[0.001, 1], [0.01, 3], [0.1, 4]]
    assert snap["count"] == 5 and snap["sum"] == pytest.approx(3.0605)


@pytest.mark.parametrize("text,ok", [("127.0.0.1:9470", ("127.0.0.1", 9470)), ("[::1]:80", ("::1", 80)),
                                     ("localhost:80", None), ("127.0.0.1", None), ("127.0.0.1:0", None)])
def test_parse_address(text, ok):
    if ok is None:
        with pytest.raises(ValueError):
            metrics.parse_address(text)
    else:
        assert metrics.parse_address(text) == ok


def test_collector_output_parses_as_prometheus_text():
    status = {"ready": True, "tables": {"routes": 3}, "table_capacity": {"routes": 65536},
              "counters": {"fast_path_packets": 7, "fast_path_bytes": 700,
                           "punt": {"NO_ROUTE": 2}, "punt_bytes": {"NO_ROUTE": 120},
                           "interfaces": {"veth1": {"fast_path_packets": 5, "fast_path_bytes": 500,
                                                    "punt": {"NO_ROUTE": 2}, "punt_bytes": {"NO_ROUTE": 120},
                                                    "drop": {"NF_DROP": 1}},
                                          "veth2": {"fast_path_packets": 2, "fast_path_bytes": 200}}},
              "resyncs": 1, "map_resyncs": 0,
              "reconcile_seconds": {"buckets": [[0.001, 1], [0.01, 2]], "sum": 0.006, "count": 3}}
    reg = CollectorRegistry(auto_describe=False)
    reg.register(metrics.AgentCollector(lambda: status))
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    sample = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert sample[("loxi_mirror_ready", ())] == 1
    assert sample[("loxi_mirror_fast_path_packets_total", ())] == 7
    assert sample[("loxi_mirror_punted_packets_total", (("reason", "NO_ROUTE"),))] == 2
    assert sample[("loxi_mirror_table_capacity", (("table", "routes"),))] == 65536
    assert sample[("loxi_mirror_reconcile_seconds_bucket", (("le", "+Inf"),))] == 3
    assert sample[("loxi_mirror_reconcile_seconds_count", ())] == 3
    assert sample[("loxi_mirror_interface_fast_path_packets_total", (("interface", "veth2"),))] == 2
    assert sample[("loxi_mirror_interface_punted_bytes_total",
                   (("interface", "veth1"), ("reason", "NO_ROUTE")))] == 120
    assert sample[("loxi_mirror_interface_dropped_packets_total",
                   (("interface", "veth1"), ("reason", "NF_DROP")))] == 1


def test_interface_rates_busiest_first_with_top_reasons():
    def st(ifaces):
        return {"counters": {"interfaces": ifaces}}

    before = top.interface_counts(st({"a": {"fast_path_packets": 10, "punt": {"LOCAL": 4}},
                                      "b": {"fast_path_packets": 0, "punt": {"NOT_IP": 1}}}))
    after = top.interface_counts(st({"a": {"fast_path_packets": 30, "punt": {"LOCAL": 8, "NO_ROUTE": 2},
                                           "drop": {"NF_DROP": 6}},
                                     "b": {"fast_path_packets": 100, "punt": {"NOT_IP": 1}},
                                     "idle": {"fast_path_packets": 0}}))
    rows = top.interface_rates(before, after, 2.0)
    assert [r.name for r in rows] == ["b", "a"]  # busiest first; never-counted "idle" left out
    a = rows[1]
    assert (a.fast, a.punted, a.dropped) == (10.0, 3.0, 3.0)
    assert [name for name, _, _ in a.reasons] == ["NF_DROP", "LOCAL", "NO_ROUTE"]
    text = top.render(top.rates({}, {"FORWARDED": 130}, 2.0), 2.0, "hdr", rows)
    assert "NF_DROP 3/s, LOCAL 2/s, NO_ROUTE 1/s" in text and text.index("b ") < text.index("a ")
