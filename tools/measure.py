"""Measurements between pod1 (client) and pod2 (server) of a tools/topology.py
topology. Stdlib only. Servers are started through topo.popen() and stopped
by PID (topo.kill); nothing else is signalled.

    iperf3(topo, seconds=5, streams=1)  -> {"gbps", "retransmits", ...}
    udp_pps(topo, seconds=5, size=64)   -> {"pps" (received), "sent_pps", "lost_percent"}
    ping_rtt(topo, count=2000)         -> {"median_us", "min_us", "avg_us", "max_us", ...}
    qperf_lat(topo, seconds=3)         -> {"tcp_lat_us": ...}   (None if qperf is missing)
    sockperf_rtt(topo, "tcp"|"udp")    -> {"median_us", "p99_us", ...}  request/response round trips
    summary(values)                    -> {"min", "median", "max", "n"}
"""

import json
import re
import shutil
import statistics
import subprocess

IPERF_PORT = 5201
QPERF_PORT = 19765
# Not iperf3's: sockperf's TCP server cannot bind a port that an earlier
# iperf3 connection left in TIME_WAIT (it exits 0 without listening).
SOCKPERF_PORT = 11111


def summary(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return {"min": None, "median": None, "max": None, "n": 0}
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}


def warmup(topo, count=3):
    """A few pings pod1 -> pod2 (resolves ARP, checks connectivity)."""
    topo.run("pod1", ["ping", "-n", "-c", str(count), "-i", "0.01", "-W", "1", topo.pod2_ip])


def iperf3(topo, seconds=5, streams=1, omit=1, port=IPERF_PORT, affinity=None, extra=(), to=None):
    """One iperf3 TCP test pod1 -> pod2. Returns receiver-side Gbit/s.

    affinity=(client_cpu, server_cpu) pins both ends (iperf3 -A c,s);
    to=(address, port) the client connects to instead (a service VIP that
    the node translates to pod2's server)."""
    srv = topo.popen("pod2", ["iperf3", "-s", "-1", "-p", str(port)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        topo.wait_listen("pod2", port, proc=srv)
        dst, dport = to or (topo.pod2_ip, port)
        cmd = ["iperf3", "-c", dst, "-p", str(dport), "-t", str(seconds), "-J"]
        if omit:
            cmd += ["-O", str(omit)]
        if streams > 1:
            cmd += ["-P", str(streams)]
        if affinity:
            cmd += ["-A", f"{affinity[0]},{affinity[1]}"]
        cp = topo.run("pod1", cmd + list(extra), check=False, timeout=seconds + omit + 30)
        try:
            res = json.loads(cp.stdout)
        except ValueError:
            raise RuntimeError(f"iperf3 client gave no JSON (rc {cp.returncode}): "
                               f"{cp.stderr.strip()} {cp.stdout[-300:]}")
        if res.get("error") or cp.returncode != 0:
            raise RuntimeError(f"iperf3 failed: {res.get('error') or cp.stderr.strip()}")
        end = res["end"]
        recv, sent = end["sum_received"], end["sum_sent"]
        cpu = end.get("cpu_utilization_percent", {})
        try:
            srv.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        return {
            "gbps": recv["bits_per_second"] / 1e9,
            "sender_gbps": sent["bits_per_second"] / 1e9,
            "bytes": recv["bytes"],
            "retransmits": sent.get("retransmits"),
            "cpu_host": cpu.get("host_total"),
            "cpu_remote": cpu.get("remote_total"),
            "streams": streams,
            "seconds": seconds,
        }
    finally:
        topo.kill(srv)


def udp_pps(topo, seconds=5, size=64, port=IPERF_PORT, to=None):
    """iperf3 -u unlimited rate with `size`-byte UDP payloads pod1 -> pod2:
    packets per second that reached the receiver (the forwarding rate).
    to: as for iperf3()."""
    srv = topo.popen("pod2", ["iperf3", "-s", "-1", "-p", str(port)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        topo.wait_listen("pod2", port, proc=srv)
        dst, dport = to or (topo.pod2_ip, port)
        cp = topo.run("pod1", ["iperf3", "-c", dst, "-p", str(dport), "-u", "-b", "0",
                               "-l", str(size), "-t", str(seconds), "-J"], check=False, timeout=seconds + 30)
        try:
            end = json.loads(cp.stdout)["end"]
        except (ValueError, KeyError):
            raise RuntimeError(f"iperf3 -u gave no result (rc {cp.returncode}): {cp.stderr.strip()} "
                               f"{cp.stdout[-300:]}")
        recv, sent = end["sum_received"], end["sum_sent"]
        try:
            srv.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        return {"pps": (recv["packets"] - recv["lost_packets"]) / recv["seconds"],
                "sent_pps": sent["packets"] / sent["seconds"], "lost_percent": recv["lost_percent"],
                "size": size, "seconds": seconds}
    finally:
        topo.kill(srv)


_RTT = re.compile(r"time=([\d.]+) ms")


def ping_rtt(topo, count=2000, interval=None, size=56):
    """pod1 -> pod2 ICMP echo; per-packet RTTs in microseconds (median is the headline).

    interval=None: adaptive ping (-A, next probe as soon as the reply is in), which
    measures the hot path; a fixed interval (e.g. 0.002) mostly measures how fast idle
    CPUs wake up (median ~2x higher and noisier here). ping's resolution is 1 us.
    """
    pace = ["-A"] if interval is None else ["-i", str(interval)]
    timeout = count * (interval or 0.001) + 30
    cp = topo.run("pod1", ["ping", "-n", "-c", str(count)] + pace + ["-s", str(size),
                           "-W", "1", topo.pod2_ip], check=False, timeout=timeout)
    rtts = [float(m) * 1000.0 for m in _RTT.findall(cp.stdout)]
    if not rtts:
        raise RuntimeError(f"ping got no replies (rc {cp.returncode}): {cp.stdout[-300:]} {cp.stderr}")
    rtts.sort()
    return {
        "median_us": statistics.median(rtts),
        "min_us": rtts[0],
        "avg_us": statistics.fmean(rtts),
        "p99_us": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))],
        "max_us": rtts[-1],
        "received": len(rtts),
        "sent": count,
    }


_QPERF = re.compile(r"^\s*latency\s*=\s*([\d.]+)\s*(ns|us|ms|sec)\s*$", re.M)
_UNIT_US = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "sec": 1e6}


def qperf_available():
    return shutil.which("qperf") is not None


def qperf_lat(topo, seconds=3, tests=("tcp_lat",), port=QPERF_PORT):
    """qperf latency tests pod1 -> pod2 (server in pod2). {"<test>_us": float} or None."""
    if not qperf_available():
        return None
    srv = topo.popen("pod2", ["qperf", "-lp", str(port)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        topo.wait_listen("pod2", port, proc=srv)
        cp = topo.run("pod1", ["qperf", "-lp", str(port), "-t", str(seconds), topo.pod2_ip] + list(tests),
                      check=False, timeout=seconds * len(tests) + 30)
        vals = [float(v) * _UNIT_US[u] for v, u in _QPERF.findall(cp.stdout)]
        if cp.returncode != 0 or len(vals) != len(tests):
            raise RuntimeError(f"qperf failed (rc {cp.returncode}): {cp.stdout.strip()} {cp.stderr.strip()}")
        return {f"{t}_us": v for t, v in zip(tests, vals)}
    finally:
        topo.kill(srv)


_SOCKPERF_PCT = re.compile(r"percentile (\d+\.\d+) =\s*([\d.]+)")
_SOCKPERF_AVG = re.compile(r"avg-rtt=([\d.]+)")
_SOCKPERF_MINMAX = re.compile(r"<(MIN|MAX)> observation =\s*([\d.]+)")
SOCKPERF_CLIENT_PORT = 40123  # UDP: one flow for the warm-up and the measured run


def sockperf_available():
    return shutil.which("sockperf") is not None


def sockperf_rtt(topo, proto="tcp", seconds=3, size=64, port=SOCKPERF_PORT, to=None, warmup=0):
    """sockperf ping-pong pod1 -> pod2: one request of `size` bytes, wait for
    the reply, repeat, for `seconds` (TCP: one connection; UDP: one flow from
    a fixed client port). Round trips in microseconds, sockperf's own
    percentiles (its 400 ms warm-up excluded). ping is ICMP and the fast path
    leaves ICMP to the kernel; this is the latency of TCP/UDP request/response.

    warmup: seconds of ping-pong on the same flow before the measured run
    (UDP: a stateful node carries a reply flow only once the kernel has
    marked it ASSURED). to: (address, port) instead of pod2's, as for iperf3()."""
    if proto not in ("tcp", "udp"):
        raise ValueError(proto)
    tcp = ["--tcp"] if proto == "tcp" else []
    srv = topo.popen("pod2", ["sockperf", "server"] + tcp + ["-i", "0.0.0.0", "-p", str(port)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        topo.wait_listen("pod2", port, proto=proto, proc=srv)
        dst, dport = to or (topo.pod2_ip, port)
        base = ["sockperf", "ping-pong"] + tcp + ["-i", dst, "-p", str(dport), "-m", str(size), "--full-rtt"]
        if proto == "udp":
            base += ["--client_port", str(SOCKPERF_CLIENT_PORT)]
        if warmup:
            topo.run("pod1", base + ["-t", str(warmup)], check=False, timeout=warmup + 30)
        cp = topo.run("pod1", base + ["-t", str(seconds)], check=False, timeout=seconds + 30)
        text = cp.stdout + cp.stderr
        pct = {float(p): float(v) for p, v in _SOCKPERF_PCT.findall(text)}
        avg = _SOCKPERF_AVG.search(text)
        if cp.returncode != 0 or 50.0 not in pct or 99.0 not in pct or not avg:
            raise RuntimeError(f"sockperf {proto} failed (rc {cp.returncode}): {text.strip()[-400:]}")
        minmax = dict(_SOCKPERF_MINMAX.findall(text))
        return {"median_us": pct[50.0], "p99_us": pct[99.0], "avg_us": float(avg.group(1)),
                "min_us": float(minmax.get("MIN", "nan")), "max_us": float(minmax.get("MAX", "nan")),
                "proto": proto, "size": size, "seconds": seconds}
    finally:
        topo.kill(srv)
