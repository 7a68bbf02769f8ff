"""The agent: watch the kernel, keep the maps equal to the translation.

One main loop owns the model: watcher threads only post events into a
queue.  Each batch of events is applied to the model, translated and
reconciled; only then is the heartbeat extended, so a stuck or dead agent
turns the fast path off (the datapath punts once the deadline passes).
"""

import ctypes
import dataclasses
import errno
import gc
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections import deque
from datetime import datetime, timezone

from pyroute2.netlink.exceptions import NetlinkError

from . import control, conntrack, ifcounters, netfilter, netlink, netns, nfverdict, offload, tc, xfrm
from .punt_log import PuntLog
from . import model as m
from .datapath import COMMON_H, Datapath, DatapathError
from .observe.latency import Histogram
from .reasons import BY_NAME as REASON_NAMES
from .reasons import FORWARDED, REASONS
from .sync import Reconciler
from .translate import (LINK_BRIDGE, LINK_FORWARDING, LINK_REDIRECT_PEER, LINK_RPF_LOOSE, LINK_RPF_STRICT, LINK_UP,
                        MAP_TABLES, PORT_FORWARDING, ROUTE_KERNEL, PORT_ISOLATED, PORT_LEARNING, PORT_NF_IPV4,
                        SELECTION_SKIP, Selection, bridge_calls_iptables, bridge_egress_punt,
                        netfilter_punt, policy_routing_punt, route_punt_why, skipped_devices, translate,
                        translate_changes)

log = logging.getLogger("loxi-mirror")

HEARTBEAT_INTERVAL = 0.25  # s between heartbeats
HEARTBEAT_GRACE = 1.0  # s: the datapath punts this long after the last beat
SYSCTL_POLL = 2.0  # s; backstop for netconf events
# Namespace-wide sysctls with no notification at all that change what is
# forwarded (bridge-nf-call-*, conntrack timeouts, multipath hashing): read
# this often, so the fast path acts on an old value for this long at most.
GLOBAL_SYSCTL_POLL = 0.25  # s
NEIGH_REFRESH = 1.0  # s between scans for STALE neighbours in use
FDB_REFRESH = 0.25  # s: the shortest period between FDB refresh scans of a bridge
# The maps the reconciler writes: the translated tables, the config slot, flow
# verdicts, and the counters (a freed interface slot is zeroed).
RECONCILED_MAPS = MAP_TABLES + ("config", "flows", "counters")
# The netfilter hint thread must get the GIL at once when a change lands; with
# Python's default 5 ms switch interval a parsing thread could hold it that long.
GIL_SWITCH_INTERVAL = 0.0001  # s
QUIET_BEFORE_REDUMP = 0.05  # s without route events before uncertain prefixes are dumped again
R_RESYNC = REASON_NAMES["RESYNC"]
R_ROUTE_UNSUPPORTED = REASON_NAMES["ROUTE_UNSUPPORTED"]
# The route map's first capacity (it grows when the routes need it) and
# whether it may grow; tests force a small, fixed one to exercise overflow.
ROUTE_CAPACITY_ENV, ROUTE_GROWTH_ENV = "LOXI_MIRROR_ROUTE_CAPACITY", "LOXI_MIRROR_ROUTE_GROWTH"


class Agent:
    def __init__(self, selection: Selection = Selection(), cflags=(), metrics_address=None):
        self.selection = selection
        self.cflags = cflags
        self.metrics_address = metrics_address  # "ADDR:PORT" or None (off)
        self.reconcile_latency = Histogram()  # seconds per applied event batch
        self.started = time.time()
        self.rate_samples = deque(maxlen=2)  # (monotonic, counters) once a second, for rates
        self.events = queue.Queue()
        self.stopping = threading.Event()
        self.state = m.KernelState()
        self.nf_state = None  # the newest netfilter.NetfilterState (for dump rules)
        self.nf_answered = 0  # netfilter change hints answered by a state in the model
        self.ready_since = None
        self.stale_since = {}  # neighbour key -> its datapath use stamp when it became STALE
        self.refreshed = set()  # STALE neighbours we already asked to confirm
        self.attach_failed = {}  # ifindex -> (Link state in which attaching failed, why)
        self.resyncs = 0  # full re-dumps (lost events, errors)
        self.fdb_refreshed = {}  # (bridge, MAC) -> datapath use stamp at our last NTF_USE
        self.fdb_scan_due = {}  # bridge ifindex -> monotonic time of its next FDB refresh scan
        self.last_route_event = 0.0  # monotonic time of the last route event handled
        self.first_dump = None  # the state dumped while the datapath compiled
        # Held by the main loop while it changes the model, and by control
        # requests that read it (they run in the server thread).
        self.state_lock = threading.Lock()
        self.punt_log = PuntLog(log)  # one line per unsupported object
        self.full_tables = set()  # maps whose refusal of an entry was logged
        self.rules_to_log = None  # netfilter rulesets whose punting rules are not logged yet

    # -- lifecycle ---------------------------------------------------------
    def run(self) -> int:
        server = control.Server(self.handle_request)  # AlreadyRunning
        gc.disable()  # until the first sync: see settle_memory()
        try:
            self.netlink = netlink.NetlinkWatcher(self.events.put, on_lost=self._events_lost)
            self.datapath = self._build_datapath_while_dumping()  # DatapathError
            try:
                return self._run(server)
            finally:
                self.datapath.close()
        finally:
            server.close()

    def _build_datapath_while_dumping(self):
        """Compile and load the datapath (seconds of clang, which releases
        the GIL) in a thread while this one dumps the kernel's state: with a
        full routing table both take seconds, so start-up takes the longer
        of the two instead of their sum."""
        capacity = os.environ.get(ROUTE_CAPACITY_ENV)
        sizes = {"LM_MAX_ROUTES": int(capacity)} if capacity else None
        built = {}

        def build():
            try:
                built["datapath"] = Datapath(cflags=self.cflags, sizes=sizes)
            except BaseException as e:  # noqa: BLE001 - raised again below
                built["error"] = e
        compiler = threading.Thread(target=build, name="compile", daemon=True)
        compiler.start()
        try:
            self.first_dump = self.netlink.fresh_dump()
        finally:
            compiler.join()
        if "error" in built:
            self.netlink.close()
            raise built["error"]
        return built["datapath"]

    def _run(self, server) -> int:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self.sync = Reconciler({name: self.datapath.table(name) for name in RECONCILED_MAPS},
                               beat=self.datapath.beat, hz=self.datapath.measure_hz(),
                               grow_routes=os.environ.get(ROUTE_GROWTH_ENV, "1") != "0")
        self.sync.on_full = self._map_full
        removed = tc.cleanup_leftovers()
        if removed:
            log.info("removed leftovers of an earlier agent on %d interface(s)", removed)
        self.netns_inode = netns.current_inode()
        self.attacher = tc.TcAttacher(self.datapath.fd)
        self.offloader = offload.Offloader(self.sync)
        self.flow_reader = offload.FlowEventReader(self.datapath, self.events.put, self.sync.codec.decode_flow_key)
        # The first sign of a netfilter change stops forwarding in one map write, before
        # anything is re-read: in the kernel for nftables commits (nfswitch), in a
        # child process for iptables-legacy's lock (nfhintd), and on the watcher's
        # hint thread (on_hint) for everything.
        self.nf_watch = netfilter.NetfilterWatcher(
            lambda st: self.events.put(("netfilter", st)), on_hint=self.sync.hold_forward,
            kernel_switch=(self.sync.config_fd, REASON_NAMES["NETFILTER_CHANGING"], self.sync.config_size))
        self.sync.hint_pending = self.nf_watch.hint_pending
        self.xfrm_watch = xfrm.XfrmWatcher(self.events.put)
        server.start()
        metrics_server = self._serve_metrics()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stopping.set())
        try:
            self._initial_sync()
            self.netlink.start()
            self.nf_watch.start()
            self.xfrm_watch.start()
            self.flow_reader.start()
            self._loop()
        finally:
            self._shutdown()
            if metrics_server is not None:
                metrics_server.shutdown()
        return 0

    def _serve_metrics(self):
        if not self.metrics_address:
            return None
        from .observe import metrics  # prometheus_client only when asked for
        server = metrics.serve(self.metrics_address, self._locked_status)
        log.info("metrics on http://%s/metrics", self.metrics_address)
        return server

    def _initial_sync(self):
        self.state, self.first_dump = self.first_dump or self.netlink.fresh_dump(), None
        self._set_netfilter(netfilter.read_state())
        self.state.xfrm_impact = xfrm.read()
        self._refresh_sysctls()
        self._reconcile()
        self._release_after_dump()
        self._log_rule_punts()
        if self.attach_failed and not self.attacher.attached:
            # Not one interface took the program: clsact/cls_bpf missing,
            # no CAP_NET_ADMIN ...  Say so instead of idling.
            raise DatapathError(next(iter(self.attach_failed.values()))[1])
        self._beat()
        settle_memory()
        self.ready_since = time.time()
        log.info("ready: %d interfaces, %d routes, %d neighbours", len(self.attacher.attached),
                 len(self.sync.shadow.routes), len(self.sync.shadow.neighbors))

    def _shutdown(self):
        log.info("stopping: fast path off, detaching")
        self.nf_watch.stop()
        self.flow_reader.stop()
        self.offloader.close()
        self.xfrm_watch.close()
        self.netlink.close()
        self.sync.heartbeat(False)
        self.attacher.detach_all()

    # -- main loop ---------------------------------------------------------
    def _loop(self):
        next_beat = next_sysctl = next_global = next_neigh = next_fdb = 0.0
        healthy = True
        while not self.stopping.is_set():
            # Uncertain prefixes: look again soon, to re-dump once routes are quiet.
            batch = self._drain(timeout=QUIET_BEFORE_REDUMP if self.state.uncertain else HEARTBEAT_INTERVAL)
            now = time.monotonic()
            poll = now >= next_sysctl
            if poll:
                next_sysctl = now + SYSCTL_POLL
                if not netns.held_by_others(self.netns_inode):
                    log.warning("the network namespace was deleted (nothing but this agent holds it): exiting")
                    break
            if not healthy:
                batch.append(("resync", None))  # None: whatever the generation
            elif not poll and now >= next_global:
                next_global = now + GLOBAL_SYSCTL_POLL
                values = _read_global_sysctls()
                if values != self._global_sysctls():
                    batch.append(("sysctls", values))
            if batch or poll or self.state.uncertain:
                try:
                    started = time.monotonic()
                    with self.state_lock:
                        self._apply_batch(batch, poll)
                    if batch:
                        self.reconcile_latency.observe(time.monotonic() - started)
                    healthy = True
                except Exception:
                    # The maps may no longer match the kernel: stop the
                    # heartbeat (the datapath punts within a second) and
                    # rebuild from full dumps until that succeeds.
                    log.exception("reconciling failed; fast path off until a resync succeeds")
                    healthy = False
            if healthy and now >= next_neigh:
                next_neigh = now + NEIGH_REFRESH
                self._refresh_neighbors()
                self.rate_samples.append((now, self._counters()[0]))
            if healthy and now >= next_fdb:
                next_fdb = now + FDB_REFRESH
                self._refresh_fdb()
            if healthy and time.monotonic() >= next_beat:
                self._beat()
                next_beat = time.monotonic() + HEARTBEAT_INTERVAL

    def _drain(self, timeout):
        batch = []
        try:
            batch.append(self.events.get(timeout=timeout))
            while True:
                batch.append(self.events.get_nowait())
        except queue.Empty:
            pass
        return batch

    def _apply_batch(self, batch, poll):
        reread_sysctls = poll
        resync = False
        tc_changed = set()  # ifindexes with qdisc/filter events
        flow_events = []
        for kind, payload in batch:
            if kind == "netlink":
                gen, msgs = payload
                if gen != self.netlink.gen:
                    continue  # queued before the last dump: never replay it over it
                for msg in msgs:
                    netlink.apply(self.state, msg)
                    event = msg.get("event")
                    reread_sysctls |= event in ("RTM_NEWLINK", "RTM_NEWNETCONF") and "nsid" not in msg
                    if event in netlink.ROUTE_EVENTS:
                        self.last_route_event = time.monotonic()
                    elif event in ("RTM_NEWNEIGH", "RTM_DELNEIGH"):
                        self._track_stale(msg)
                    elif event in netlink.TC_EVENTS:
                        tc_changed.add(msg["index"])
            elif kind == "netfilter":
                self._set_netfilter(payload)
                self.nf_answered = max(self.nf_answered, payload.hint_seq or 0)
            elif kind == "xfrm":
                self.state.xfrm_impact = payload
            elif kind == "sysctls":
                self._set_global_sysctls(payload)
            elif kind == "flow":
                flow_events.append(payload)
            elif kind == "resync":
                resync |= payload is None or payload == self.netlink.gen
        # Prefixes that changed during the last dump punt until a dump is
        # clean: try once routes have been quiet for a moment.
        quiet = time.monotonic() - self.last_route_event > QUIET_BEFORE_REDUMP
        resync |= bool(self.state.uncertain) and (poll or quiet)
        if resync:
            self.resyncs += 1
            gc.disable()
            try:
                self.state = self._resynced_state()
            finally:
                gc.enable()
            reread_sysctls = True
        elif tc_changed or poll:
            # tcx programs come and go without an event: the poll catches them.
            self._reread_tc(set(self.state.links) if poll else tc_changed)
        if poll and not resync:
            self._reread_promiscuity()
        if not resync:
            self._read_new_peers()
        if reread_sysctls:
            self._refresh_sysctls()
            self.state.xfrm_impact = xfrm.read()  # the default policy has no event
        self._reconcile(full=resync)
        if flow_events:  # decided against the ruleset generation now in the maps
            self.offloader.handle(flow_events, self.state)
        self.sync.release_hold(self.nf_answered)  # the re-read netfilter state is in the maps now
        if resync:
            self._release_after_dump()
            settle_memory()
        self._log_rule_punts()

    def _reread_tc(self, indexes):
        busy = netlink.read_egress_tc(self.netlink.requests, indexes)
        after = netlink.read_ingress_tc_after(self.netlink.requests, indexes)
        bridges = [i for i in indexes if getattr(self.state.links.get(i), "kind", "") == "bridge"]
        ingress = netlink.read_ingress_tc(self.netlink.requests, bridges)
        for index in indexes:
            self.state.set_egress_tc(index, busy.get(index))
            self.state.set_ingress_tc_after(index, after.get(index))
            if index in bridges:
                self.state.set_ingress_tc(index, ingress.get(index))
            if index in self.attacher.attached and not self.attacher.still_attached(index):
                log.info("our filter on %s was removed: attaching again", self.attacher.attached[index])
                self.attacher.forget(index)  # _reconcile attaches it again

    def _reread_promiscuity(self):
        for index, count in netlink.read_promiscuity(self.netlink.requests).items():
            link = self.state.links.get(index)
            if link is not None and link.promiscuity != count:
                self.state.set_link(dataclasses.replace(link, promiscuity=count))

    def _read_new_peers(self):
        """Peers of veths that are new or moved: read once, their later
        changes arrive as events from their namespace."""
        for link in list(self.state.links.values()):
            key = link.peer_key
            if key is not None and key not in self.state.peers:
                self.state.set_peer(key, netlink.read_peer(key))

    def _events_lost(self):
        """Reader thread, events just lost: the maps may hold what the
        kernel no longer has, so nothing is forwarded until the re-dump
        (before the first reconcile nothing is forwarded anyway)."""
        if hasattr(self, "sync"):
            self.sync.hold_punt(R_RESYNC)

    def _release_after_dump(self):
        """The maps match a dump no lost event predates: forward again,
        unless events were lost again since (another resync is queued)."""
        with self.netlink.lock:
            if self.netlink.lost_gen < self.netlink.gen:
                self.sync.release_punt()

    def _resynced_state(self):
        fresh = self.netlink.fresh_dump()
        old = self.state
        fresh.set_netfilter(old.netfilter_impact, old.netfilter_unsupported, old.nf_rulesets)
        fresh.nf_gen = old.nf_gen
        fresh.new_nf_generation()  # verdicts are recomputed after a resync
        fresh.bridge_nf_impact = old.bridge_nf_impact
        fresh.xfrm_impact = self.state.xfrm_impact
        return fresh

    def _reconcile(self, full=True):
        """Full: translate everything (start, resync).  Otherwise only what
        the model recorded as changed, so a batch costs what it touches."""
        if full:
            self.state.take_changes()
            desired = translate(self.state, self.selection)
        else:
            desired = translate_changes(self.state, self.state.take_changes(), self.selection)
        changes = self.sync.apply(desired, full=full)
        self._log_punts(desired, full)
        for ifindex, name in desired.attach.items():
            if ifindex not in self.attacher.attached:
                self._attach(ifindex, name)
        for ifindex in list(self.attacher.attached):
            if ifindex not in desired.attach:
                if ifindex in self.state.links:
                    self.attacher.detach(ifindex)
                else:
                    self.attacher.forget(ifindex)
        if changes:
            log.debug("applied %d map changes", changes)

    def _log_punts(self, desired, full):
        """The one-time log line for each object that newly makes traffic punt."""
        def why(prefix):
            return route_punt_why(self.state, prefix) or REASONS[R_ROUTE_UNSUPPORTED].description
        if full:  # a million prefixes: only the unsupported ones are named
            self.punt_log.update("route", {f"{p[0]}/{p[1]}": why(p) for p, e in desired.routes.items()
                                           if e is not None and e.action == R_ROUTE_UNSUPPORTED})
        else:
            self.punt_log.change("route", {f"{p[0]}/{p[1]}": why(p) if e is not None and e.action == R_ROUTE_UNSUPPORTED
                                           else None for p, e in desired.routes.items()})
        self.punt_log.update("interface", {name: why for name, why in skipped_devices(self.state, self.selection).items()
                                           if name != "lo" and why != SELECTION_SKIP})  # not unsupported
        # Policy rules the kernel lookup cannot reproduce punt all forwarding:
        # the "setting forwarding" line below names them (policy_routing_punt).
        self.punt_log.update("veth peer", {
            link.name: "an XDP program on the peer: bpf_redirect instead of redirect_peer"
            for link in self.state.links.values()
            if link.peer_key is not None and getattr(self.state.peers.get(link.peer_key), "xdp", False)})
        if not (self.sync.held or self.sync.holding):  # transient holds are not configuration
            why = self._punt_forward_explanation()
            self.punt_log.update("setting", {"forwarding": f"all forwarded traffic punts: {why}"} if why else {})
        self.full_tables &= {name for name, pending in self.sync.unwritten.items() if pending}

    def _log_rule_punts(self):
        """The one-time line per iptables rule that punts, once the new
        ruleset is in the maps (compiling thousands of rules takes a while)."""
        if self.rules_to_log is not None:
            rulesets, self.rules_to_log = self.rules_to_log, None
            self.punt_log.update("iptables rule", {f"{r.backend} {r.table} {r.chain} {r.rule!r}": r.reason
                                                   for r in nfverdict.classify(rulesets) if r.status == "punt"})

    def _map_full(self, table, key):
        """The reconciler could not write an entry: the map is full."""
        if table not in self.full_tables:
            self.full_tables.add(table)
            log.warning("the %s map is full (%d entries): new entries are not written, their traffic punts "
                        "(status: unwritten)", table, self.datapath.table(table).max_entries)

    def _attach(self, ifindex, name):
        link = self.state.links.get(ifindex)
        if self.attach_failed.get(ifindex, (None,))[0] == link:
            return  # failed before in this very state: retry once it changes
        try:
            self.attacher.attach(ifindex, name)
            self.attach_failed.pop(ifindex, None)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return  # the link vanished meanwhile; its RTM_DELLINK follows
            # Unattached, the interface simply stays with the kernel.
            log.warning("cannot attach to %s (ifindex %d): %s", name, ifindex, e)
            self.attach_failed[ifindex] = (link, f"cannot attach the TC program to {name}: {e}")

    def _beat(self):
        self.sync.repair_config()
        self.sync.heartbeat(True, HEARTBEAT_GRACE)

    # -- inputs besides rtnetlink -----------------------------------------
    def _set_netfilter(self, nf_state):
        self.nf_state = nf_state
        if nf_state.forward_impact != self.state.netfilter_impact:
            log.info("netfilter: %s", nf_state.forward_impact or "no rules affect forwarded traffic")
        self.state.bridge_nf_impact = nf_state.bridge_impact
        # A failed read leaves no rulesets to evaluate: punt, whatever else it says.
        unsupported = nf_state.unsupported or ("; ".join(nf_state.errors) or None)
        if unsupported is None and "ct_lookup" not in self.datapath.text:
            # A datapath without the conntrack stage would ignore nf_mode.
            unsupported = "this datapath has no conntrack stage"
        if nf_state.forward_impact is not None and unsupported != self.state.netfilter_unsupported:
            log.info("netfilter: %s", f"all forwarded traffic punts: {unsupported}" if unsupported
                     else "stateful: established flows get per-flow verdicts")
        self.state.set_netfilter(nf_state.forward_impact, unsupported, nf_state.rulesets)
        self.rules_to_log = nf_state.rulesets

    def _refresh_sysctls(self):
        names = [l.name for l in self.state.links.values()]
        self.state.set_sysctls(netlink.read_sysctls(names))
        self._set_global_sysctls(_read_global_sysctls())

    _GLOBAL_SYSCTLS = ("fwd_use_pmtu", "fwd_update_priority", "multipath_hash_policy", "bridge_sysctls", "ct_sysctls")

    def _global_sysctls(self) -> tuple:
        return tuple(getattr(self.state, name) for name in self._GLOBAL_SYSCTLS)

    def _set_global_sysctls(self, values):
        """Put these namespace-wide sysctls in the model (the translator
        recomputes what they decide on every reconcile)."""
        for name, value in zip(self._GLOBAL_SYSCTLS, values):
            setattr(self.state, name, value)

    # -- neighbour confirmation -------------------------------------------
    def _track_stale(self, msg):
        neigh = netlink.parse_neighbor(msg) if msg.get("family") == socket.AF_INET else None
        if neigh is None:
            return
        if msg.get("event") == "RTM_NEWNEIGH" and neigh.state == m.NUD_STALE:
            # The datapath's use stamp now; any later stamp is use since.
            self.stale_since.setdefault(neigh.key, self.sync.neighbor_used(neigh.key))
        else:
            self.stale_since.pop(neigh.key, None)
            self.refreshed.discard(neigh.key)

    def _refresh_neighbors(self):
        """The kernel re-confirms a STALE neighbour when it transmits to it;
        the fast path transmits instead, so do the kernel's part (NTF_USE)
        for STALE neighbours the datapath used since they became STALE."""
        for key, since in list(self.stale_since.items()):
            if key in self.refreshed or key not in self.sync.shadow.neighbors:
                continue
            if self.sync.neighbor_used(key) > since:
                try:
                    self.netlink.neighbor_use(*key)
                    self.refreshed.add(key)
                except Exception as e:
                    log.debug("neighbour refresh %s failed: %s", key, e)

    # -- bridge FDB ageing -------------------------------------------------
    def _refresh_fdb(self):
        """The bridge re-learns (refreshes) an entry each time it sees a frame
        from that MAC; frames the fast path switches it never sees.  So for
        learned entries the datapath used since our last refresh, tell the
        bridge (NTF_USE).  Each bridge is scanned every third of its
        ageing_time, so an entry in use never gets older than that."""
        now = time.monotonic()
        due = {b for b, link in self.state.links.items() if link.kind == "bridge"
               # (or its ageing_time was lowered since the scan was planned)
               and not 0 < self.fdb_scan_due.get(b, 0.0) - now <= self._fdb_refresh_period(b)}
        for bridge in due:
            self.fdb_scan_due[bridge] = now + self._fdb_refresh_period(bridge)
        for key, target in list(self.sync.shadow.fdb.items()):
            if key[0] not in due or target.local:
                continue
            entry = self.state.fdb.get((key[0], key[1], 0))
            if entry is None or entry.static:
                continue  # static entries never age
            used = self.sync.fdb_used(key)
            if used <= self.fdb_refreshed.get(key, 0):
                continue
            try:
                self.netlink.fdb_use(target.port, key[1])
                self.fdb_refreshed[key] = used
            except Exception as e:  # port gone meanwhile: its events follow
                log.debug("FDB refresh %s failed: %s", key, e)
        for key in [k for k in self.fdb_refreshed if k not in self.sync.shadow.fdb]:
            del self.fdb_refreshed[key]

    def _fdb_refresh_period(self, bridge):
        """A third of the bridge's ageing time (at least the scan period)."""
        link = self.state.links.get(bridge)
        ageing = link.bridge.ageing_time / 100.0 if link is not None and link.bridge else 300.0
        return max(FDB_REFRESH, ageing / 3)

    # -- control requests (server thread) ---------------------------------
    def handle_request(self, req):
        cmd = req.get("cmd")
        if cmd == "ping":
            return {"pid": _pid()}
        if cmd == "status":
            return self._locked_status()
        if cmd == "dump":
            with self.state_lock:
                return {"entries": self.dump(req.get("table", ""), req.get("match"))}
        if cmd == "explain":
            with self.state_lock:
                return self.explain(req)
        if cmd == "stop":
            self.stopping.set()
            return {"stopping": True, "pid": _pid()}
        return {"error": f"unknown command {cmd!r}"}

    def _locked_status(self):
        with self.state_lock:
            return self.status()

    def status(self):
        ready = self.ready_since is not None and not self.stopping.is_set()
        out = {"running": True, "ready": ready, "pid": _pid(), "netns": tc.netns_id(),
               "ready_since": _iso(self.ready_since), "interfaces": [], "tables": {},
               "counters": {"fast_path_packets": 0, "fast_path_bytes": 0, "punt": {}, "punt_bytes": {}}}
        if not hasattr(self, "sync"):
            return out
        counters, per_interface = self._counters()
        out["interfaces"] = sorted(dict(self.attacher.attached).values())
        out["tables"] = self.sync.table_counts()
        out["table_capacity"] = {name: self.datapath.table(name).max_entries for name in out["tables"]}
        out["reconcile_seconds"] = self.reconcile_latency.snapshot()
        out["uptime_s"] = round(time.time() - self.started, 1)
        out["skipped_interfaces"] = self._skipped_interfaces()
        out["rates_pps"] = self._rates()
        out["counters"] = ifcounters.summary(counters)
        out["counters"]["interfaces"] = {name: ifcounters.summary(c) for name, c in per_interface.items()}
        out["forwarding_punted_because"] = self._punt_forward_explanation()
        out["bridges"] = self._bridges_status()
        out["netfilter_hints"] = self.nf_watch.hint_summary()
        out["offload"] = dict(self.offloader.stats, nf_gen=self.state.nf_gen)
        out["route_map"] = {"capacity": self.sync.route_capacity, "growths": self.sync.route_growths,
                            "memlock_bytes": self.datapath.routes.memlock(), "id": self.datapath.routes.map_id()}
        out["route_overflow"] = self.sync.route_overflow()
        out["map_resyncs"] = self.sync.resyncs
        out["unwritten"] = {name: len(pending) for name, pending in self.sync.unwritten.items() if pending}
        out["resyncs"] = self.resyncs
        return out

    def _skipped_interfaces(self):
        """{name: why} for every interface the fast path does not receive on."""
        out = skipped_devices(self.state, self.selection)
        for ifindex, (_, why) in self.attach_failed.items():
            link = self.state.links.get(ifindex)
            if link is not None:
                out[link.name] = why
        return out

    def _counters(self):
        """({reason: (packets, bytes)} in total, the same per ingress interface
        name); reads only the counter slots in use."""
        slots, retired = self.sync.counter_slots()
        rows = self.datapath.counter_rows(ifcounters.high_water(slots))
        names = {ifindex: link.name for ifindex, link in self.state.links.items()}
        return ifcounters.totals(rows, retired), ifcounters.by_interface(rows, slots, names)

    def _rates(self):
        """Packets/s per verdict over the last sampling second (empty at first)."""
        if len(self.rate_samples) < 2:
            return {}
        (t0, before), (t1, after) = self.rate_samples
        return {name: round((after[name][0] - before.get(name, (0, 0))[0]) / (t1 - t0), 1)
                for name in after if after[name][0] != before.get(name, (0, 0))[0]}

    def _punt_forward_explanation(self):
        if self.sync.held:
            return "resync: kernel events were lost, re-reading the kernel state"
        if self.sync.holding:
            return "netfilter: a change is under way (held until it is re-read)"
        nf = netfilter_punt(self.state)
        if nf:
            return f"netfilter: {nf}"
        if self.state.xfrm_impact:
            return f"ipsec: {self.state.xfrm_impact}"
        if self.state.fwd_use_pmtu:
            return "ip_forward_use_pmtu=1: learned path MTUs decide"
        if not self.state.fwd_update_priority:
            return "ip_forward_update_priority=0: forwarding keeps the packet's priority"
        why = policy_routing_punt(self.state)
        if why:
            return f"policy routing: {why}"
        return None

    def _bridges_status(self):
        """{bridge: {"ports": [...], "punted_because": why routed egress punts}}."""
        out = {}
        for index, link in sorted(self.state.links.items()):
            if link.kind != "bridge":
                continue
            ports = [self.state.links[i].name for i in self.state.ports_of(index)]
            out[link.name] = {"ports": sorted(ports), "egress_punted_because": bridge_egress_punt(self.state, link),
                              "bridge_nf_call_iptables": bridge_calls_iptables(self.state, link)}
        return out

    def explain(self, req):
        """Run frames through the loaded program as explain runs (no side
        effects) and say what the agent knows about each stage's culprit.
        req: {"in": IFACE, "packet": {src, dst, proto, ...}} or {"in": IFACE,
        "frames": [hex, ...]}."""
        from . import explain
        if not hasattr(self, "sync"):
            return {"error": "the agent is not ready yet"}
        link = next((l for l in self.state.links.values() if l.name == req.get("in")), None)
        if link is None:
            return {"error": f"no interface {req.get('in')!r} in this network namespace"}
        if "packet" in req:
            frames = [explain.build_frame(explain.spec_from_request(req["packet"]), link.mac)]
        else:
            frames = [bytes.fromhex(f) for f in req.get("frames", [])]
        if not hasattr(self, "explainer"):
            self.explainer = explain.Explainer(self.datapath, COMMON_H.read_text())
        ctx = self._explain_context(link)
        results = []
        for frame in frames:
            result = self.explainer.run(frame, link.index)
            stages = {s["stage"] for s in result["steps"]}
            ctx["flow"] = explain.flow_entry(self.datapath.table("flows"), link.index, result["packet"],
                                             bridged="ct" in stages and "fib_route" not in stages)
            ctx.pop("conntrack", None)
            if any(s["stage"] == "ct" for s in result["steps"]) and "sport" in result["packet"]:
                ctx["conntrack"] = explain.conntrack_entry(result["packet"])
            explain.stage_notes(result, ctx)
            results.append(result)
        return {"in": link.name, "ifindex": link.index, "mac": link.mac, "results": results}

    def _explain_context(self, link):
        from .explain import neighbor_state_name
        cfg = self.datapath.table("config")[self.datapath.table("config").Key(0)]
        return {"names": {i: l.name for i, l in self.state.links.items()}, "ingress": link.name,
                "ingress_skip": self._skipped_interfaces().get(link.name),
                "routes": self.sync.shadow.routes, "neighbors": self.sync.shadow.neighbors,
                "links": self.sync.shadow.links,
                "kernel_neighbors": {k: neighbor_state_name(n.state) for k, n in self.state.neighbors.items()},
                "nf_gen": cfg.nf_gen, "global_punt": self._punt_forward_explanation()}

    def dump(self, table, match=None):
        """A table as rows; `match` {"prefix": ...} or {"interface": ..., "ip": ...}
        or {"bridge": ..., "mac": ...} looks up just that entry (a full read of
        a big table is slow)."""
        if table == "conntrack":
            return self.offloader.dump(self.state)
        if table == "rules":
            return self._dump_rules()
        if table not in ("routes", "neighbors", "links", "fdb"):
            raise ValueError(f"no table {table!r}")
        names = {i: l.name for i, l in self.state.links.items()}
        rows = self.sync.read(table, self._keys(table, match or {}, names))
        reason_names = {r.value: r.name for r in REASONS}
        if table == "routes":
            return [
                {"prefix": f"{dst}/{plen}",
                 "action": "forward" if e.action == FORWARDED else "kernel-fib" if e.action == ROUTE_KERNEL
                 else f"punt:{reason_names.get(e.action, e.action)}",
                 "oif": names.get(e.oif, e.oif) if e.oif else None, "gateway": e.gateway,
                 "mtu": e.mtu or None}
                for (dst, plen), e in sorted(rows.items(), key=lambda kv: (_ip_sort(kv[0][0]), kv[0][1]))
            ]
        if table == "neighbors":
            return [{"interface": names.get(i, i), "ip": ip, "mac": mac}
                    for (i, ip), mac in sorted(rows.items(), key=lambda kv: (kv[0][0], _ip_sort(kv[0][1])))]
        if table == "fdb":
            return [{"bridge": names.get(b, b), "mac": mac, "port": names.get(e.port, e.port),
                     "local": e.local, "used": self.sync.fdb_used((b, mac)) or None}
                    for (b, mac), e in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1]))]
        ports = self.sync.read("ports")
        return [{"ifindex": i, "name": names.get(i, ""), "mac": e.mac, "mtu": e.mtu,
                 "flags": _link_flag_names(e.flags), **_port_row(ports.get(i), e, names)}
                for i, e in sorted(rows.items())]

    def _dump_rules(self):
        """Every iptables rule: compiled, punt (and why) or unused; plus what the
        evaluator cannot read at all (native nft tables, read errors)."""
        st = self.nf_state
        if st is None:
            return []
        fast = self.offloader.rule_use(self.state.nf_gen)
        kernel = netfilter.read_rule_counters()
        rows = []
        for r in nfverdict.classify(st.rulesets):
            packets, nbytes = kernel.get((r.backend, r.table, r.chain, r.rule), (None, None))
            used = fast.get(r.name, (0, 0))
            rows.append(dict(r.as_dict(), kernel_packets=packets, kernel_bytes=nbytes,
                             fast_path_packets=used[0], fast_path_bytes=used[1]))
        if st.unsupported:
            rows.append({"backend": "*", "table": "", "chain": "", "index": 0, "rule": "",
                         "status": "punt", "reason": f"all forwarded traffic: {st.unsupported}"})
        return rows

    @staticmethod
    def _keys(table, match, names):
        if table == "routes" and "prefix" in match:
            dst, plen = match["prefix"].split("/")
            return [(dst, int(plen))]
        if table == "neighbors" and "ip" in match and "interface" in match:
            return [(i, match["ip"]) for i, name in names.items() if name == match["interface"]]
        if table == "fdb" and "mac" in match and "bridge" in match:
            return [(i, match["mac"]) for i, name in names.items() if name == match["bridge"]]
        return None


def _read_global_sysctls() -> tuple:
    """In the order of Agent._GLOBAL_SYSCTLS."""
    return (netlink.read_fwd_use_pmtu(), netlink.read_fwd_update_priority(), netlink.read_multipath_hash_policy(),
            netlink.read_bridge_sysctls(), conntrack.read_sysctls())


def settle_memory():
    """After a full dump: move what survived into the collector's permanent
    generation (gc.freeze: a million routes are never scanned again, each
    full collection would stall the event loop for a second), and give the
    heap's free pages back to the system (glibc malloc_trim: the dump and the
    first translation leave hundreds of MB of freed temporaries).  The
    collector is off while a dump builds the state (it would scan the growing
    heap again and again) and on again here."""
    gc.freeze()
    gc.enable()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def _link_flag_names(flags):
    names = [("up", LINK_UP), ("forwarding", LINK_FORWARDING), ("redirect_peer", LINK_REDIRECT_PEER),
             ("rp_filter_strict", LINK_RPF_STRICT), ("rp_filter_loose", LINK_RPF_LOOSE), ("bridge", LINK_BRIDGE)]
    return [n for n, bit in names if flags & bit]


def _port_row(port, link, names):
    """The bridge-port columns of a `dump links` row (empty for other links)."""
    if port is None:
        return {}
    reason_names = {r.value: r.name for r in REASONS}
    flags = [n for n, bit in (("forwarding", PORT_FORWARDING), ("learning", PORT_LEARNING),
                              ("isolated", PORT_ISOLATED), ("br_netfilter", PORT_NF_IPV4)) if port.flags & bit]
    punts = {what: reason_names.get(v, v) for what, v in (("all", port.punt), ("bridged_ipv4", port.ipv4_punt),
                                                           ("to_bridge", port.up_punt)) if v}
    return {"bridge": names.get(port.bridge, port.bridge), "port_flags": flags, "port_punts": punts,
            "peer_mac": link.peer_mac}


def _ip_sort(ip):
    return tuple(int(x) for x in ip.split("."))


def _iso(ts):
    return datetime.fromtimestamp(ts, timezone.utc).isoformat() if ts else None


def _pid():
    return os.getpid()
