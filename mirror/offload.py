"""Flow offload: the agent's part of the stateful fast path.

The datapath punts a packet of a confirmed kernel flow it has no current
verdict for (FLOW_PENDING), or whose TCP entry is not yet liberal
(CT_NOT_LIBERAL), and tells the agent through the `flow_events` ring buffer
(rate-limited per flow).  FlowEventReader (its own thread) posts the events
to the main loop; Offloader handles them there:

    ctnetlink get -> may the fast path carry it (flows.kernel_keeps)
    -> FlowView -> nfverdict.flow_verdict() -> flows.flow_entry()
    -> BE_LIBERAL on TCP (only for flows it will carry: conntrack.take_over)
    -> Reconciler.write_flow

Duplicate events are cheap (one netlink round trip); a flow whose handling
fails keeps punting, and the failure is logged once per kind.
"""

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

from . import conntrack as ct
from . import flows, nfverdict
from . import model as m
from .reasons import REASONS
from .translate import NF_STATEFUL, nf_config

log = logging.getLogger(__name__)

POLL_MS = 200  # ring buffer poll timeout: how fast the reader notices a stop
REMEMBERED = 65536  # verdicts kept for `dump conntrack`


@dataclass(frozen=True)
class FlowEvent:
    """struct lm_flow_event, copied out of the ring buffer."""

    key: flows.FlowKey
    oif: int
    dir: int
    why: str  # the punt reason's name


class FlowEventReader:
    """Polls the datapath's `flow_events` in a thread and posts ("flow", FlowEvent)."""

    def __init__(self, datapath, post, decode_key):
        """decode_key: struct lm_flow_key -> flows.FlowKey."""
        self.datapath, self.post, self.decode_key = datapath, post, decode_key
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="flow-events", daemon=True)
        datapath.open_flow_events(self._on_event)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        """Before the datapath is closed: its ring buffer goes with it."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def _run(self):
        while not self.stopping.is_set():
            try:
                self.datapath.poll_flow_events(POLL_MS)
            except Exception:
                log.exception("reading flow events failed; flows keep punting")
                self.stopping.wait(1.0)

    def _on_event(self, ev):
        try:
            why = REASONS[ev.why].name if ev.why < len(REASONS) else str(ev.why)
            self.post(("flow", FlowEvent(self.decode_key(ev.key), ev.oif, ev.dir, why)))
        except Exception:  # never let one bad event stop the reader
            log.exception("undecodable flow event")


class Offloader:
    """Turns flow events into `flows` entries (main loop thread only)."""

    def __init__(self, sync):
        self.sync = sync
        self.ct = ct.Conntrack()
        self.decided = OrderedDict()  # FlowKey -> Verdict, newest last
        self.stats = {"events": 0, "written": 0, "kernel_keeps": 0, "no_entry": 0, "punt_verdict": 0,
                      "taken_over": 0, "errors": 0}
        self._logged = set()

    def close(self):
        self.ct.close()

    def handle(self, events, state: m.KernelState):
        """One batch of events, after the model and maps are up to date."""
        if nf_config(state).nf_mode != NF_STATEFUL:
            return  # the datapath carries no conntrack flows: nothing to decide
        host = flows.host_view(state)
        for event in {(e.key, e.oif): e for e in events}.values():  # duplicates: once
            self.stats["events"] += 1
            try:
                self._offload(event, state, host)
            except Exception as e:
                self.stats["errors"] += 1
                kind = f"{type(e).__name__}: {e}"
                if kind not in self._logged and len(self._logged) < 100:
                    self._logged.add(kind)
                    log.exception("flow %s: cannot decide (%s); it keeps punting", event.key, kind)

    def _offload(self, event: FlowEvent, state: m.KernelState, host):
        key = event.key
        entry = self.ct.get(key.proto, key.saddr, key.daddr, key.sport, key.dport)
        if entry is None:
            self.stats["no_entry"] += 1
            return
        direction = entry.direction(key.wire)
        why = flows.kernel_keeps(entry, direction, key.bridged)
        if why is not None:
            self.stats["kernel_keeps"] += 1
            log.debug("flow %s stays with the kernel: %s", key, why)
            return
        if not event.oif:
            return  # the datapath found no egress: nothing to decide for
        devices = flows.flow_devices(state, key, event.oif)
        if devices is None:
            return  # a link event is on its way; the next packet asks again
        view = flows.flow_view(entry, direction, key.wire, devices)
        verdict = nfverdict.flow_verdict(state.nf_rulesets, view, host)
        flow = flows.flow_entry(verdict, state.nf_gen, event.oif, entry, direction)
        if verdict.action == "PUNT":
            self.stats["punt_verdict"] += 1
        elif entry.proto == flows.TCP and not entry.taken_over:
            self.ct.take_over(entry)  # before the fast path takes over (the datapath checks it too)
            self.stats["taken_over"] += 1
        self.sync.write_flow(key, flow)
        self.stats["written"] += 1
        self._remember(key, verdict)

    def _remember(self, key, verdict):
        self.decided.pop(key, None)
        self.decided[key] = verdict
        while len(self.decided) > REMEMBERED:
            self.decided.popitem(last=False)


    def rule_use(self, nf_gen: int):
        """{rule name: (packets, bytes)} the fast path carried for flows of the
        current ruleset generation, by the rule that decided each flow (the
        kernel's own counters never see these packets)."""
        out = {}
        for key, verdict in list(self.decided.items()):
            current = self.sync.read_flow(key)
            if verdict.rule is None or current is None or current[0].gen != nf_gen:
                continue
            packets, nbytes = out.get(verdict.rule, (0, 0))
            out[verdict.rule] = (packets + current[1], nbytes + current[2])
        return out

    def dump(self, state: m.KernelState):
        """The flows with a verdict of the current generation in the map
        (forwarded, dropped or left to the kernel), each with the kernel's
        entry as it is now."""
        names = {i: l.name for i, l in state.links.items()}
        rows = []
        with ct.Conntrack() as sock:  # the caller's thread's own socket
            for key, verdict in list(self.decided.items()):
                current = self.sync.read_flow(key)
                if current is None or current[0].gen != state.nf_gen:
                    continue
                flow, packets, nbytes = current
                kernel = sock.get(key.proto, key.saddr, key.daddr, key.sport, key.dport)
                rows.append(_dump_row(key, flow, packets, nbytes, verdict, kernel, names))
        return rows


def _dump_row(key, flow, packets, nbytes, verdict, kernel, names):
    row = {"proto": {flows.TCP: "tcp", flows.UDP: "udp"}.get(key.proto, key.proto),
           "in": names.get(key.ifindex, key.ifindex), "out": names.get(flow.oif, flow.oif),
           "bridged": key.bridged,  # switched between the two ports in/out (br_netfilter)
           "wire": f"{key.saddr}:{key.sport} -> {key.daddr}:{key.dport}",
           "translated": f"{flow.nat_saddr}:{flow.nat_sport} -> {flow.nat_daddr}:{flow.nat_dport}",
           "verdict": verdict.action, "rule": verdict.rule, "reason": verdict.reason,
           "packets": packets, "bytes": nbytes, "kernel": None}
    if kernel is not None:
        row["kernel"] = {"orig": list(kernel.orig), "reply": list(kernel.reply), "state": kernel.tcp_state_name,
                         "status": kernel.status_names, "timeout": kernel.timeout, "mark": kernel.mark}
    return row
