"""The twin network for tools/fuzz: two identical copies of the node and its
pods, A (the kernel alone, never an agent) and B (loxi-mirror running in its
node), configured with the same commands and sent the same frames; what
arrives where is captured and compared per packet.

Each copy: <prefix>-{a,b}-node with veth1..vethN, <prefix>-{a,b}-podI with
eth0.  One agent runs in B's node for the whole run and follows every case's
reconfiguration (a case is applied, then a sentinel route marks when the
agent has seen all of it).  Frames are sent and captured through AF_PACKET
sockets that this process opens once inside the pods' namespaces.
"""

import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from topology import Agent, Netns, in_netns

import fuzz_bridge
import fuzz_gen as g

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
COPIES = ("a", "b")
SETTLE = 0.08    # s after the last frame: neighbour resolution/failure (30 ms retrans) ends within it
QUIET = 0.02     # s without a frame before a capture counts as finished
SECOND_LOOK = 0.4  # s more to wait for stragglers before a difference counts (a loaded machine)
HARNESS_STEPS = {"conntrack", "sentinel"}  # must succeed (a case's own commands may fail, alike in both copies)


class Twin(Netns):
    ROLES = tuple(f"{c}-{r}" for c in COPIES for r in ["node"] + [f"pod{i}" for i in range(1, g.PODS + 1)])

    def __init__(self, prefix="lmf", features=("routed",)):
        super().__init__(prefix, ipv6=False)
        self.features = tuple(features)
        self.socks: Dict[Tuple[str, int], socket.socket] = {}
        self.agent = None
        self.cases_applied = 0
        self.diverged = []  # how the copies' configuration differed in the last apply

    def _build(self):
        for c in COPIES:
            if "bridge" in self.features:
                self.run(f"{c}-node", ["ip", "link", "add", g.BRIDGE, "type", "bridge"])
            for i in range(1, g.PODS + 1):
                self._veth(f"{c}-node", f"veth{i}", g.node_mac(i), f"{c}-pod{i}", "eth0", g.pod_mac(i))
                self.run(f"{c}-pod{i}", ["ip", "link", "set", "eth0", "mtu", str(g.POD_MTU), "up"])
                # Pods only capture: their own stack must not answer (no
                # RSTs, echo replies or ICMP errors of their own); ARP stays.
                self.run(f"{c}-pod{i}", ["iptables", "-A", "INPUT", "-j", "DROP"])
            write_sysctls(self.nsname(f"{c}-node"), g.NODE_FIXED_SYSCTLS)
        for c in COPIES:
            for i in range(1, g.PODS + 1):
                with in_netns(self.nsname(f"{c}-pod{i}")):
                    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                    s.bind(("eth0", 0))
                    s.setblocking(False)
                self.socks[(c, i)] = s

    def down(self):
        if self.agent is not None:
            self.agent.stop()
            self.agent = None
        for s in self.socks.values():
            s.close()
        self.socks.clear()
        super().down()

    def start_agent(self, timeout=60.0):
        # This checkout's agent (the venv's), whatever /usr/local/bin points at.
        exe = os.path.join(os.path.dirname(sys.executable), "loxi-mirror")
        self.agent = Agent(self, ns="b-node", exe=exe if os.path.exists(exe) else "loxi-mirror")
        self.agent.start(timeout=timeout)
        return self.agent

    # ---- one case ------------------------------------------------------
    def apply(self, t: g.Topology, timeout=10.0):
        """Configure both copies for topology t; return once B's agent has
        caught up (it shows this case's sentinel route, and with netfilter
        features this case's ruleset)."""
        self.cases_applied += 1
        n = self.cases_applied
        sentinel = f"198.{18 + (n >> 16) % 2}.{(n >> 8) & 255}.{n & 255}"
        netfilter = "filter" in t.features or "nat" in t.features
        nf_gen = self._agent_nf_gen() if netfilter and self.agent is not None else None
        # In stages, both copies at once: links and addresses; the bridge's
        # ports and FDB; conntrack flushed; last the sentinel route, so that
        # the agent (one netlink socket, in order) has seen all before it.
        stages = [{}, {}, {}]
        for c in COPIES:
            write_sysctls(self.nsname(f"{c}-node"), g.node_sysctls(t))
            stages[0][c, "node"] = lambda c=c: self._batch(f"{c}-node", g.node_commands(t, None))
            for i in range(1, g.PODS + 1):
                stages[0][c, f"pod{i}"] = lambda c=c, i=i: self._batch(f"{c}-pod{i}", g.pod_commands(t, i))
            if netfilter:
                stages[0][c, "iptables"] = lambda c=c: self._restore(f"{c}-node", g.iptables_restore(t, f"case-{n}"))
                stages[1][c, "conntrack"] = lambda c=c: self._feed(
                    ["ip", "netns", "exec", self.nsname(f"{c}-node"), "conntrack", "-F"], "")
            if "bridge" in t.features:
                stages[1][c, "bridge"] = lambda c=c: self._feed(
                    ["bridge", "-n", self.nsname(f"{c}-node"), "-force", "-batch", "-"],
                    "\n".join(fuzz_bridge.bridge_commands(t)) + "\n")
            stages[2][c, "sentinel"] = lambda c=c: self._batch(f"{c}-node", [f"route add blackhole {sentinel}/32"])
        errors = {}
        for stage in stages:
            procs = {key: start() for key, start in stage.items()}
            errors.update({key: p.communicate(timeout=30)[1] for key, p in procs.items()})
            failed = [f"{c}: {errors[c, what]}" for (c, what), p in procs.items()
                      if what in HARNESS_STEPS and p.returncode != 0]
            if failed:  # not the case's configuration: the harness itself
                raise RuntimeError(f"harness step failed: {failed}")
        # The oracle holds only if both copies ended up configured alike.
        self.diverged = [f"configuring {what}: kernel copy said {errors['a', what]!r}, "
                         f"loxi-mirror copy said {errors['b', what]!r}"
                         for c, what in errors if c == "a" and errors["a", what] != errors["b", what]]
        if self.agent is not None:
            self._wait_agent_route(f"{sentinel}/32", timeout)
            if nf_gen is not None:
                self._wait_agent_netfilter(nf_gen, timeout)

    def snapshot(self) -> str:
        """Both nodes' kernel state and B's agent tables, for a mismatch report."""
        out = []
        for c in COPIES:
            for what in (["addr"], ["route", "show", "table", "all"], ["neigh", "show", "nud", "all"]):
                cp = self.run(f"{c}-node", ["ip", "-o"] + what, check=False)
                out.append(f"## {c}-node: ip {' '.join(what)}\n{cp.stdout.strip()}")
        if self.agent is not None:
            for table in ("routes", "neighbors", "links"):
                cp = self.run("b-node", [self.agent.exe, "dump", table], check=False)
                out.append(f"## b-node agent: dump {table}\n{cp.stdout.strip()}{cp.stderr.strip()}")
        return "\n".join(out)

    def _batch(self, role, lines):
        return self._feed(["ip", "-n", self.nsname(role), "-force", "-batch", "-"], "\n".join(lines) + "\n")

    def _restore(self, role, text):
        return self._feed(["ip", "netns", "exec", self.nsname(role), "iptables-restore"], text)

    @staticmethod
    def _feed(argv, text):
        """Start argv with `text` on stdin; stderr is kept (see apply)."""
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
        p.stdin.write(text)
        p.stdin.close()
        p.stdin = None  # communicate() must not flush it again
        return p

    def _agent_status(self):
        from mirror import control
        with in_netns(self.nsname("b-node")):
            return control.request({"cmd": "status"})

    def _agent_nf_gen(self):
        return self._agent_status().get("offload", {}).get("nf_gen")

    def _wait_agent_netfilter(self, before, timeout):
        """The netfilter watcher is its own thread: wait until the agent has
        read this case's rules (a new ruleset generation: every case's rules
        differ by their marker) and no change holds forwarding any more."""
        deadline = time.monotonic() + timeout
        while True:
            st = self._agent_status()
            why = st.get("forwarding_punted_because") or ""
            if st.get("offload", {}).get("nf_gen") != before and "change is under way" not in why:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent's netfilter view not updated within {timeout} s ({why!r})")
            time.sleep(0.005)

    def _wait_agent_route(self, prefix, timeout):
        from mirror import control
        deadline = time.monotonic() + timeout
        while True:
            with in_netns(self.nsname("b-node")):
                reply = control.request({"cmd": "dump", "table": "routes", "match": {"prefix": prefix}})
            if reply.get("entries"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent did not mirror the case within {timeout} s "
                                   f"(reply {reply}); log:\n{self.agent.log_tail()}")
            time.sleep(0.002)

    def exchange(self, frames: List[bytes], senders: List[int], pauses=None) -> Dict[str, List[Tuple[int, bytes]]]:
        """Send the frames from their pods in both copies (waiting pauses[i]
        s before frame i); {copy: [(pod, frame), ...]} of everything the pods
        received afterwards, in arrival order per pod.  The sender stays on
        one CPU: each frame enters its node through that CPU's backlog, so
        the frames of a flow reach the node in the order they were sent."""
        for s in self.socks.values():
            _drain(s)
        cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(cpus)})
        try:
            for f, sender, pause in zip(frames, senders, pauses or [0.0] * len(frames)):
                if pause:
                    time.sleep(pause)
                for c in COPIES:
                    try:
                        self.socks[(c, sender)].send(f)
                    except OSError:
                        pass  # too short/long for AF_PACKET: the same in both copies
        finally:
            os.sched_setaffinity(0, cpus)
        time.sleep(SETTLE)
        return self.collect(QUIET)

    def collect(self, quiet) -> Dict[str, List[Tuple[int, bytes]]]:
        """What the pods received until nothing came for `quiet` seconds."""
        got = {c: [] for c in COPIES}
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < quiet:
            ready, _, _ = select.select(list(self.socks.values()), [], [], quiet)
            for (c, i), s in self.socks.items():
                if s in ready:
                    frames_in = _drain(s)
                    if frames_in:
                        quiet_since = time.monotonic()
                    got[c] += [(i, f) for f in frames_in]
        return got


def _drain(s) -> List[bytes]:
    out = []
    while True:
        try:
            data, addr = s.recvfrom(65535)
        except BlockingIOError:
            return out
        if addr[2] != PACKET_OUTGOING:
            out.append(data)


def write_sysctls(ns, pairs):
    with in_netns(ns):
        for key, value in pairs:
            path = "/proc/sys/" + key.replace(".", "/")
            try:
                with open(path, "w") as f:
                    f.write(f"{value}\n")
            except OSError:
                pass  # a key this kernel lacks: the same in both copies


# ---- comparison -----------------------------------------------------------

ICMP_ERRORS = {3, 4, 5, 11, 12}


@dataclass
class Outcome:
    """Per packet index: sorted [(pod, normalized hex)]; frames no packet
    owns (the node's own replies, ARP answers) as a sorted list too."""
    per_packet: Dict[int, List[Tuple[int, str]]] = field(default_factory=dict)
    other: List[Tuple[int, str]] = field(default_factory=list)


class _Own:
    """Membership of a frame's source address in the node's networks."""

    def __init__(self, nets):
        self.nets = [(int(n.network_address), int(n.netmask)) for n in nets]

    def __contains__(self, addr: bytes) -> bool:
        a = int.from_bytes(addr, "big")
        return any(a & mask == net for net, mask in self.nets)


def outcome(captured: List[Tuple[int, bytes]], node_nets, n_packets: int, tag: int, tolerated=None) -> Outcome:
    out = Outcome()
    own = _Own(node_nets)
    for pod, f in captured:
        if _is_node_arp_request(f) or _is_node_igmp(f, own):
            continue  # its count depends on neighbour or multicast timers, not on the packets
        f = _normalize(f, own)
        owner = _owner(f, own, n_packets, tag)
        if owner == "late":  # an earlier case's straggler: its own case already judged it
            _count(tolerated, "late frame of an earlier case")
        elif owner is None:
            out.other.append((pod, f.hex()))
        else:
            out.per_packet.setdefault(owner, []).append((pod, f.hex()))
    for v in out.per_packet.values():
        v.sort()
    out.other.sort()
    return out


def _is_node_arp_request(f: bytes) -> bool:
    return len(f) >= 22 and f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x01"


def _is_node_igmp(f: bytes, own) -> bool:
    """The node's IGMP reports (a bridge's address joins groups): sent after
    a random delay."""
    return _ipv4(f) and f[23] == 2 and f[26:30] in own


def _ipv4(f: bytes) -> bool:
    return len(f) >= 34 and f[12:14] == b"\x08\x00"


def _node_sent(f: bytes, own) -> bool:
    """A frame the node's own stack sent: every ICMP error (whatever its
    source: NAT rewrites the source of an error about a translated flow, e.g.
    to the service address), and from one of its addresses anything but TCP
    without RST, UDP and echo requests: those are forwarded frames it
    translated (SNAT/MASQUERADE) or a pod spoofed, and keep the sender's IP id."""
    if not _ipv4(f):
        return False
    proto, l4 = f[23], 14 + (f[14] & 0xF) * 4
    if proto == 1 and len(f) > l4 and f[l4] in ICMP_ERRORS:
        return True
    if f[26:30] not in own or proto == 17:
        return False
    if proto == 6:
        return _is_rst(f)
    return not (proto == 1 and len(f) > l4 and f[l4] == 8)


def _is_rst(f: bytes) -> bool:
    l4 = 14 + (f[14] & 0xF) * 4
    return f[23] == 6 and len(f) > l4 + 13 and bool(f[l4 + 13] & 0x04)


def _normalize(f: bytes, own) -> bytes:
    """Frames the node itself sends (ICMP errors, echo replies, RSTs) get an
    IP id from a randomised generator: blank it and the header checksum."""
    if _node_sent(f, own):
        b = bytearray(f)
        b[18:20] = b"\0\0"
        b[24:26] = b"\0\0"
        return bytes(b)
    return f


def _count(tolerated, what, n=1):
    if tolerated is not None:
        tolerated[what] = tolerated.get(what, 0) + n


def _owner(f: bytes, own, n_packets: int, tag: int):
    if not _ipv4(f):
        return None
    ident = int.from_bytes(f[18:20], "big")
    if _node_sent(f, own):
        icmp = 14 + (f[14] & 0xF) * 4
        if f[23] != 1 or len(f) < icmp + 8 + 20 or f[icmp] not in ICMP_ERRORS:
            return None
        ident = int.from_bytes(f[icmp + 8 + 4:icmp + 8 + 6], "big")  # the quoted header's id
    frame_tag, i = g.split_ident(ident)
    if frame_tag != tag % 2048:
        # A RST that REJECT --reject-with tcp-reset sent in the name of the
        # destination (not from a node address) has an id of its own: compare it.
        return None if _is_rst(f) else "late"
    return i if i < n_packets else None


# Destination unreachable codes 0, 1 and 13 come from ip_error() (unreachable/
# prohibit routes, no route), which allows one per second per source after a
# burst of five, by jiffies (net.ipv4.route.error_cost/_burst exist only in the
# root namespace): whether one is sent depends on timing, not on the packet.
# When only one copy sent such an error the difference is tolerated (counted);
# when both did, the bytes must match.  Neighbour failures (code 1) are not
# limited this way but share the code.
RATE_LIMITED = {(3, 0), (3, 1), (3, 13)}


def _rate_limited(hexframe: str) -> bool:
    f = bytes.fromhex(hexframe)
    if not _ipv4(f) or f[23] != 1:
        return False
    icmp = 14 + (f[14] & 0xF) * 4
    return len(f) > icmp + 1 and (f[icmp], f[icmp + 1]) in RATE_LIMITED


def compare(a: Outcome, b: Outcome, n_packets: int, tolerated=None, sent=None) -> List[str]:
    """Human-readable differences; [] when B did exactly what A did.
    Rate-limited ICMP errors sent by one copy only are counted in
    tolerated["rate-limited ICMP"] instead."""
    diffs = []
    chosen = {}  # NAT ports the kernel chose: copy A's port -> copy B's, one to one
    for i in range(n_packets):
        pa, pb = a.per_packet.get(i, []), b.per_packet.get(i, [])
        if pa == pb:
            continue
        strict_a = [x for x in pa if not _rate_limited(x[1])]
        strict_b = [x for x in pb if not _rate_limited(x[1])]
        if strict_a == strict_b and (len(strict_a) == len(pa) or len(strict_b) == len(pb)):
            _count(tolerated, "rate-limited ICMP")
            continue
        if sent and _kernel_chosen_ports(pa, pb, chosen, sent[i]):
            _count(tolerated, "NAT source port chosen by the kernel (tuple clash)")
            continue
        diffs.append(f"packet {i}: kernel {_where(pa)} / loxi-mirror {_where(pb)}")
    if a.other != b.other:
        diffs.append(f"other frames: kernel {_where(a.other)} / loxi-mirror {_where(b.other)}")
    return diffs


def _kernel_chosen_ports(pa, pb, chosen, sent: bytes) -> bool:
    """True when the frames differ only in one TCP/UDP source or destination
    port (and the L4 checksum), both copies changed that port from the one
    sent, consistently with the earlier packets of the case: when a NAT tuple
    clashes, the kernel picks a free port at random (nf_nat_l4proto_unique_tuple()),
    so each copy's kernel chose its own.  `chosen` maps (position, A's port)
    to B's port and B's back, one to one."""
    if len(pa) != len(pb) or not pa:
        return False
    for (pod_a, ha), (pod_b, hb) in zip(pa, pb):
        fa, fb = bytes.fromhex(ha), bytes.fromhex(hb)
        if pod_a != pod_b or len(fa) != len(fb) or not _ipv4(fa) or fa[23] not in (6, 17):
            return False
        l4 = 14 + (fa[14] & 0xF) * 4
        csum = l4 + (16 if fa[23] == 6 else 6)
        if len(fa) < csum + 2:
            return False
        blank = lambda f: f[:l4] + f[l4 + 4:csum] + f[csum + 2:]  # noqa: E731
        if blank(fa) != blank(fb):
            return False
        for pos in (0, 2):
            port_a, port_b = fa[l4 + pos:l4 + pos + 2], fb[l4 + pos:l4 + pos + 2]
            if port_a == port_b:
                continue
            port_sent = sent[l4 + pos:l4 + pos + 2] if _ipv4(sent) and 14 + (sent[14] & 0xF) * 4 == l4 else b""
            if (port_sent in (port_a, port_b) or chosen.setdefault(("a", pos, port_a), port_b) != port_b
                    or chosen.setdefault(("b", pos, port_b), port_a) != port_a):
                return False
    return True


def _where(frames):
    if not frames:
        return "dropped"
    return "; ".join(f"pod{pod} {h}" for pod, h in frames)


def differences(twin: Twin, case: g.Case, tolerated=None) -> List[str]:
    """Apply the case's topology to both copies, send its frames, compare."""
    twin.apply(case.topology)
    return twin.diverged + exchange_and_compare(twin, case, tolerated)


def exchange_and_compare(twin: Twin, case: g.Case, tolerated=None) -> List[str]:
    """Send the case's frames in both copies as they are configured now; compare."""
    tag = twin.cases_applied
    frames = case.frames(tag)
    got = twin.exchange(frames, [p.sender for p in case.packets], [p.pause for p in case.packets])
    nets = case.topology.node_nets()

    def judge(counts):
        a = outcome(got["a"], nets, len(frames), tag, counts)
        b = outcome(got["b"], nets, len(frames), tag, counts)
        return compare(a, b, len(frames), counts, frames)

    counts = {}
    diffs = judge(counts)
    if diffs:
        # A loaded machine can hold a frame back past the settle time: wait
        # for stragglers once before a difference counts.
        more = twin.collect(SECOND_LOOK)
        if any(more.values()):
            for c in COPIES:
                got[c] += more[c]
            counts = {}
            diffs = judge(counts)
            if not diffs:
                _count(tolerated, "straggler (arrived after the settle time)")
    for what, n in counts.items():
        _count(tolerated, what, n)
    return diffs
