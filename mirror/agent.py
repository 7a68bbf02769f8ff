"""The agent: watch the kernel, keep the maps equal to the translation.

One main loop owns the model: watcher threads only post events into a
queue.  Each batch of events is applied to the model, translated and
reconciled; only then is the heartbeat extended, so a stuck or dead agent
turns the fast path off (the datapath punts once the deadline passes).
"""

import dataclasses
import errno
import logging
import os
import queue
import signal
import socket
import threading
import time
from datetime import datetime, timezone

from pyroute2.netlink.exceptions import NetlinkError

from . import control, netfilter, netlink, netns, tc, xfrm
from . import model as m
from .datapath import Datapath, DatapathError
from .reasons import BY_NAME, FORWARDED, REASONS
from .sync import Reconciler
from .translate import (LINK_FORWARDING, LINK_REDIRECT_PEER, LINK_RPF_LOOSE, LINK_RPF_STRICT, LINK_UP, Selection,
                        custom_rules, translate, translate_changes)

log = logging.getLogger("loxi-mirror")

HEARTBEAT_INTERVAL = 0.25  # s between heartbeats
HEARTBEAT_GRACE = 1.0  # s: the datapath punts this long after the last beat
SYSCTL_POLL = 2.0  # s; backstop for netconf events
NEIGH_REFRESH = 1.0  # s between scans for STALE neighbours in use
QUIET_BEFORE_REDUMP = 0.05  # s without route events before uncertain prefixes are dumped again
MAP_TABLES = ("routes", "neighbors", "links", "config")
R_RESYNC = BY_NAME["RESYNC"]


class Agent:
    def __init__(self, selection: Selection = Selection(), cflags=()):
        self.selection = selection
        self.cflags = cflags
        self.events = queue.Queue()
        self.stopping = threading.Event()
        self.state = m.KernelState()
        self.ready_since = None
        self.stale_since = {}  # neighbour key -> its datapath use stamp when it became STALE
        self.refreshed = set()  # STALE neighbours we already asked to confirm
        self.attach_failed = {}  # ifindex -> (Link state in which attaching failed, why)
        self.resyncs = 0  # full re-dumps (lost events, errors)
        self.last_route_event = 0.0  # monotonic time of the last route event handled
        # Held by the main loop while it changes the model, and by control
        # requests that read it (they run in the server thread).
        self.state_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------
    def run(self) -> int:
        server = control.Server(self.handle_request)  # AlreadyRunning
        try:
            self.datapath = Datapath(cflags=self.cflags)  # DatapathError
            try:
                return self._run(server)
            finally:
                self.datapath.close()
        finally:
            server.close()

    def _run(self, server) -> int:
        self.sync = Reconciler({name: self.datapath.table(name) for name in MAP_TABLES},
                               beat=self.datapath.beat, hz=self.datapath.measure_hz())
        removed = tc.cleanup_leftovers()
        if removed:
            log.info("removed leftovers of an earlier agent on %d interface(s)", removed)
        self.netns_inode = netns.current_inode()
        self.attacher = tc.TcAttacher(self.datapath.fd)
        self.netlink = netlink.NetlinkWatcher(self.events.put, on_lost=self._events_lost)
        self.nf_watch = netfilter.NetfilterWatcher(lambda st: self.events.put(("netfilter", st)))
        self.xfrm_watch = xfrm.XfrmWatcher(self.events.put)
        server.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stopping.set())
        try:
            self._initial_sync()
            self.netlink.start()
            self.nf_watch.start()
            self.xfrm_watch.start()
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _initial_sync(self):
        self.state = self.netlink.fresh_dump()
        self._set_netfilter(netfilter.read_state())
        self.state.xfrm_impact = xfrm.read()
        self._refresh_sysctls()
        self._reconcile()
        self._release_after_dump()
        if self.attach_failed and not self.attacher.attached:
            # Not one interface took the program: clsact/cls_bpf missing,
            # no CAP_NET_ADMIN ...  Say so instead of idling.
            raise DatapathError(next(iter(self.attach_failed.values()))[1])
        self._beat()
        self.ready_since = time.time()
        log.info("ready: %d interfaces, %d routes, %d neighbours", len(self.attacher.attached),
                 len(self.sync.shadow.routes), len(self.sync.shadow.neighbors))

    def _shutdown(self):
        log.info("stopping: fast path off, detaching")
        self.nf_watch.stop()
        self.xfrm_watch.close()
        self.netlink.close()
        self.sync.heartbeat(False)
        self.attacher.detach_all()

    # -- main loop ---------------------------------------------------------
    def _loop(self):
        next_beat = next_sysctl = next_neigh = 0.0
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
            if batch or poll or self.state.uncertain:
                try:
                    with self.state_lock:
                        self._apply_batch(batch, poll)
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
            elif kind == "xfrm":
                self.state.xfrm_impact = payload
            elif kind == "resync":
                resync |= payload is None or payload == self.netlink.gen
        # Prefixes that changed during the last dump punt until a dump is
        # clean: try once routes have been quiet for a moment.
        quiet = time.monotonic() - self.last_route_event > QUIET_BEFORE_REDUMP
        resync |= bool(self.state.uncertain) and (poll or quiet)
        if resync:
            self.resyncs += 1
            self.state = self._resynced_state()
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
        if resync:
            self._release_after_dump()

    def _reread_tc(self, indexes):
        busy = netlink.read_egress_tc(self.netlink.requests, indexes)
        after = netlink.read_ingress_tc_after(self.netlink.requests, indexes)
        for index in indexes:
            self.state.set_egress_tc(index, busy.get(index))
            self.state.set_ingress_tc_after(index, after.get(index))
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
        kernel no longer has, so nothing is forwarded until the re-dump."""
        self.sync.hold_punt(R_RESYNC)

    def _release_after_dump(self):
        """The maps match a dump no lost event predates: forward again,
        unless events were lost again since (another resync is queued)."""
        with self.netlink.lock:
            if self.netlink.lost_gen < self.netlink.gen:
                self.sync.release_punt()

    def _resynced_state(self):
        fresh = self.netlink.fresh_dump()
        fresh.netfilter_impact = self.state.netfilter_impact
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
        self.sync.heartbeat(True, HEARTBEAT_GRACE)

    # -- inputs besides rtnetlink -----------------------------------------
    def _set_netfilter(self, nf_state):
        if nf_state.forward_impact != self.state.netfilter_impact:
            log.info("netfilter: %s", nf_state.forward_impact or "no rules affect forwarded traffic")
        self.state.netfilter_impact = nf_state.forward_impact

    def _refresh_sysctls(self):
        names = [l.name for l in self.state.links.values()]
        self.state.set_sysctls(netlink.read_sysctls(names))
        self.state.fwd_use_pmtu = netlink.read_fwd_use_pmtu()
        self.state.fwd_update_priority = netlink.read_fwd_update_priority()

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

    # -- control requests (server thread) ---------------------------------
    def handle_request(self, req):
        cmd = req.get("cmd")
        if cmd == "ping":
            return {"pid": _pid()}
        if cmd == "status":
            with self.state_lock:
                return self.status()
        if cmd == "dump":
            with self.state_lock:
                return {"entries": self.dump(req.get("table", ""), req.get("match"))}
        if cmd == "stop":
            self.stopping.set()
            return {"stopping": True, "pid": _pid()}
        return {"error": f"unknown command {cmd!r}"}

    def status(self):
        ready = self.ready_since is not None and not self.stopping.is_set()
        out = {"running": True, "ready": ready, "pid": _pid(), "netns": tc.netns_id(),
               "ready_since": _iso(self.ready_since), "interfaces": [], "tables": {},
               "counters": {"fast_path_packets": 0, "fast_path_bytes": 0, "punt": {}, "punt_bytes": {}}}
        if not hasattr(self, "sync"):
            return out
        counters = self.datapath.counters()
        out["interfaces"] = sorted(dict(self.attacher.attached).values())
        out["tables"] = self.sync.table_counts()
        c = out["counters"]
        c["fast_path_packets"], c["fast_path_bytes"] = counters.pop(REASONS[FORWARDED].name)
        c["punt"] = {name: pkts for name, (pkts, _) in counters.items()}
        c["punt_bytes"] = {name: nbytes for name, (_, nbytes) in counters.items()}
        out["forwarding_punted_because"] = self._punt_forward_explanation()
        out["map_resyncs"] = self.sync.resyncs
        out["resyncs"] = self.resyncs
        return out

    def _punt_forward_explanation(self):
        if self.sync.held:
            return "resync: kernel events were lost, re-reading the kernel state"
        if self.state.netfilter_impact:
            return f"netfilter: {self.state.netfilter_impact}"
        if self.state.xfrm_impact:
            return f"ipsec: {self.state.xfrm_impact}"
        if self.state.fwd_use_pmtu:
            return "ip_forward_use_pmtu=1: learned path MTUs decide"
        if not self.state.fwd_update_priority:
            return "ip_forward_update_priority=0: forwarding keeps the packet's priority"
        rules = custom_rules(self.state)
        if rules:
            return "policy routing: " + ", ".join(f"{how} rule pref {r.priority} table {r.table}" for how, r in rules)
        return None

    def dump(self, table, match=None):
        """A table as rows; `match` {"prefix": ...} or {"interface": ..., "ip": ...}
        looks up just that entry (a full read of a big table is slow)."""
        if table not in ("routes", "neighbors", "links"):
            raise ValueError(f"no table {table!r}")
        names = {i: l.name for i, l in self.state.links.items()}
        rows = self.sync.read(table, self._keys(table, match or {}, names))
        reason_names = {r.value: r.name for r in REASONS}
        if table == "routes":
            return [
                {"prefix": f"{dst}/{plen}",
                 "action": "forward" if e.action == FORWARDED else f"punt:{reason_names.get(e.action, e.action)}",
                 "oif": names.get(e.oif, e.oif) if e.oif else None, "gateway": e.gateway,
                 "mtu": e.mtu or None}
                for (dst, plen), e in sorted(rows.items(), key=lambda kv: (_ip_sort(kv[0][0]), kv[0][1]))
            ]
        if table == "neighbors":
            return [{"interface": names.get(i, i), "ip": ip, "mac": mac}
                    for (i, ip), mac in sorted(rows.items(), key=lambda kv: (kv[0][0], _ip_sort(kv[0][1])))]
        return [{"ifindex": i, "name": names.get(i, ""), "mac": e.mac, "mtu": e.mtu,
                 "flags": _link_flag_names(e.flags)} for i, e in sorted(rows.items())]

    @staticmethod
    def _keys(table, match, names):
        if table == "routes" and "prefix" in match:
            dst, plen = match["prefix"].split("/")
            return [(dst, int(plen))]
        if table == "neighbors" and "ip" in match and "interface" in match:
            return [(i, match["ip"]) for i, name in names.items() if name == match["interface"]]
        return None


def _link_flag_names(flags):
    names = [("up", LINK_UP), ("forwarding", LINK_FORWARDING), ("redirect_peer", LINK_REDIRECT_PEER),
             ("rp_filter_strict", LINK_RPF_STRICT), ("rp_filter_loose", LINK_RPF_LOOSE)]
    return [n for n, bit in names if flags & bit]


def _ip_sort(ip):
    return tuple(int(x) for x in ip.split("."))


def _iso(ts):
    return datetime.fromtimestamp(ts, timezone.utc).isoformat() if ts else None


def _pid():
    return os.getpid()
