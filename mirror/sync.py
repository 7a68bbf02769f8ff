"""Reconciler: the only code that writes the BPF maps.

It keeps a shadow of what it wrote, diffs the translator's Desired against
it and applies the minimal set of updates.  Any map error makes it re-read
the real maps (full resync) before trying again.  Every lookup miss in the
datapath punts, so no write order can cause a wrong forward; deletes of
routes still go first so removed paths stop being used as early as possible.
"""

import ctypes
import errno
import itertools
import logging
import os
import socket
import struct
import threading
from dataclasses import asdict, replace

from . import ifcounters
from . import routemap
from .flows import FlowEntry, FlowKey
from .reasons import BY_NAME, REASONS
from .translate import MAP_TABLES as TABLES
from .translate import Desired, FdbTarget, LinkEntry, NfConfig, PortEntry, RouteEntry, overflow_covers

log = logging.getLogger(__name__)

FDB_LOCAL = 1 << 0  # LM_FDB_LOCAL
# Tables whose entries may simply stay unwritten when the map is full: a
# missing entry already punts (neighbour: NO_NEIGHBOR, link: IFACE_UNMANAGED /
# EGRESS_UNMANAGED, FDB: BR_UNKNOWN_UNICAST / BR_LEARN).  A port entry is the
# exception that needs its link gone too (without it, a port is routed).
BOUNDED_TABLES = ("links", "ports", "neighbors", "fdb")


# Errors of a write that found no room for a new entry (a full hash map
# says E2BIG, a full LPM trie ENOSPC, a trie the kernel cannot grow ENOMEM).
NO_ROOM = (errno.ENOSPC, errno.E2BIG, errno.ENOMEM)
_NO_ROOM_TEXT = tuple(os.strerror(e) for e in NO_ROOM)


def no_room(exc: Exception) -> bool:
    """Whether a failed map write means the map is full: by errno for the
    direct bpf() writes (mirror/bpfsys.py), by text for BCC's tables (it
    reports a failed update only as a message)."""
    return getattr(exc, "errno", None) in NO_ROOM or any(text in str(exc) for text in _NO_ROOM_TEXT)


_ZERO4 = bytes(4)
FORWARDED = BY_NAME["FORWARDED"]
# Route map slots kept free for the cover of last resort (0.0.0.0/0 punting
# ROUTE_OVERFLOW) when a route that did not fit has no covering route.
ROUTE_SLOTS_RESERVED = 1


def ip_to_u32(ip: str) -> int:
    """IPv4 text -> u32 whose memory holds network byte order."""
    return struct.unpack("=I", socket.inet_aton(ip))[0]


def u32_to_ip(value: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", value))


def mac_to_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def bytes_to_mac(raw) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


class Codec:
    """Converts between translator values and BCC's ctypes keys/leaves."""

    def __init__(self, tables):
        self.t = tables

    # routes: (dst, len) <-> lm_route_key, RouteEntry <-> lm_route
    def route_key(self, prefix):
        dst, length = prefix
        return self.t["routes"].Key(length, ip_to_u32(dst))

    def route_leaf(self, e: RouteEntry):
        gw = ip_to_u32(e.gateway) if e.gateway else 0
        return self.t["routes"].Leaf(e.action, e.oif, gw, e.mtu)

    @staticmethod
    def route_keys_bytes(prefixes) -> bytes:
        """struct lm_route_key of each prefix, packed (for batched writes)."""
        pack, aton = routemap.KEY.pack, socket.inet_aton
        return b"".join([pack(plen, aton(dst)) for dst, plen in prefixes])

    @staticmethod
    def route_leaf_bytes(e: RouteEntry) -> bytes:
        return routemap.LEAF.pack(e.action, e.oif, socket.inet_aton(e.gateway) if e.gateway else _ZERO4, e.mtu)

    def decode_route(self, k, v):
        gw = u32_to_ip(v.gateway) if v.gateway else None
        return (u32_to_ip(k.addr), k.prefixlen), RouteEntry(v.action, v.oif, gw, v.mtu)

    # neighbors: (ifindex, ip) <-> lm_neigh_key, MAC <-> lm_neigh
    def neigh_key(self, key):
        ifindex, ip = key
        return self.t["neighbors"].Key(ifindex, ip_to_u32(ip))

    def neigh_leaf(self, mac: str):
        leaf = self.t["neighbors"].Leaf()
        ctypes.memmove(leaf.mac, mac_to_bytes(mac), 6)
        return leaf

    def decode_neigh(self, k, v):
        return (k.ifindex, u32_to_ip(k.addr)), bytes_to_mac(v.mac)

    # links: ifindex <-> u32, LinkEntry <-> lm_link
    def link_key(self, ifindex):
        return self.t["links"].Key(ifindex)

    def link_leaf(self, e: LinkEntry):
        leaf = self.t["links"].Leaf()
        ctypes.memmove(leaf.mac, mac_to_bytes(e.mac), 6)
        if e.peer_mac:
            ctypes.memmove(leaf.peer_mac, mac_to_bytes(e.peer_mac), 6)
        leaf.flags, leaf.mtu, leaf.slot = e.flags, e.mtu, e.slot
        return leaf

    def decode_link(self, k, v):
        peer_mac = bytes_to_mac(v.peer_mac)
        return k.value, LinkEntry(bytes_to_mac(v.mac), v.flags, v.mtu,
                                  None if peer_mac == "00:00:00:00:00:00" else peer_mac, v.slot)

    # ports: ifindex <-> u32, PortEntry <-> lm_port
    def port_key(self, ifindex):
        return self.t["ports"].Key(ifindex)

    def port_leaf(self, e: PortEntry):
        return self.t["ports"].Leaf(e.bridge, e.flags, e.punt, e.ipv4_punt, e.up_punt)

    def decode_port(self, k, v):
        return k.value, PortEntry(v.bridge, v.flags, v.punt, v.ipv4_punt, v.up_punt)

    # fdb: (bridge, MAC) <-> lm_fdb_key, FdbTarget <-> lm_fdb
    def fdb_key(self, key):
        bridge, mac = key
        k = self.t["fdb"].Key()
        k.bridge = bridge
        ctypes.memmove(k.mac, mac_to_bytes(mac), 6)
        return k

    def fdb_leaf(self, e: FdbTarget):
        return self.t["fdb"].Leaf(e.port, FDB_LOCAL if e.local else 0, 0)

    def decode_fdb(self, k, v):
        return (k.bridge, bytes_to_mac(k.mac)), FdbTarget(v.port, bool(v.flags & FDB_LOCAL))


    # flows: FlowKey <-> lm_flow_key, FlowEntry <-> lm_flow (ports in network byte order, like addresses)
    def flow_key(self, k: FlowKey):
        return self.t["flows"].Key(ifindex=k.ifindex, saddr=ip_to_u32(k.saddr), daddr=ip_to_u32(k.daddr),
                                   sport=socket.htons(k.sport), dport=socket.htons(k.dport), proto=k.proto,
                                   bridged=int(k.bridged))

    def flow_leaf(self, e: FlowEntry, packets=0, nbytes=0):
        return self.t["flows"].Leaf(
            gen=e.gen, action=e.action, oif=e.oif, ct_mark=e.ct_mark, ct_status=e.ct_status,
            nat_saddr=ip_to_u32(e.nat_saddr), nat_daddr=ip_to_u32(e.nat_daddr),
            nat_sport=socket.htons(e.nat_sport), nat_dport=socket.htons(e.nat_dport), packets=packets, bytes=nbytes)

    @staticmethod
    def decode_flow_key(k) -> FlowKey:
        return FlowKey(k.ifindex, u32_to_ip(k.saddr), u32_to_ip(k.daddr), socket.ntohs(k.sport),
                       socket.ntohs(k.dport), k.proto, bool(k.bridged))

    def decode_flow(self, k, v):
        key = self.decode_flow_key(k)
        entry = FlowEntry(v.gen, v.action, v.oif, v.ct_mark, v.ct_status, u32_to_ip(v.nat_saddr),
                          u32_to_ip(v.nat_daddr), socket.ntohs(v.nat_sport), socket.ntohs(v.nat_dport))
        return key, (entry, v.packets, v.bytes)


class Reconciler:
    def __init__(self, tables, beat, hz: int, grow_routes: bool = True, covers_for=overflow_covers):
        """tables: name -> BCC table for routes, neighbors, links and config;
        beat(ttl_jiffies): runs the datapath's heartbeat program; hz: the
        kernel's jiffies per second.  grow_routes: rebuild the route map
        bigger when the routes do not fit (else they overflow); covers_for:
        the translator's decision of which entries punt for the routes that
        did not fit (translate.overflow_covers)."""
        self.tables = tables
        self.grow_routes = grow_routes
        self.covers_for = covers_for
        # Routes the map has no room for: prefix -> the translator's entry.
        self.unwritten_routes = {}
        # Entries punting ROUTE_OVERFLOW for them: prefix -> the translator's
        # entry there (None: the translator wants none, e.g. 0.0.0.0/0).
        self.covered = {}
        self.route_growths = 0
        self._overflow_logged = False  # the "route map full" line is out, not yet cleared
        self._leaves = {}  # id(RouteEntry) -> (it, its packed lm_route)
        self._beat = beat
        self.hz = hz
        self.codec = Codec(tables)
        self.shadow = Desired()
        self.lock = threading.Lock()
        # The config slot has its own lock: a netfilter change hint must be able to
        # stop forwarding while a long apply() holds self.lock.
        self._config_lock = threading.Lock()
        self._punt_forward_reason = 0  # as written to the map
        self._wanted_reason = 0  # as the translator last asked
        self._fib_flags = 0  # as written (and asked)
        self._nf = NfConfig()  # as written (and asked: it is never held)
        self._hold_seq = self._released_seq = 0  # netfilter change hints (see hold_forward)
        # True while an nftables change message is not handled yet: the kernel-side
        # switch (mirror/nfswitch.py) may have set the hold for it (set by the agent).
        self.hint_pending = lambda: False
        # A punt-everything reason set from any thread when kernel events
        # were lost (RESYNC), until the re-dump is in the maps.
        self.held = 0
        self.resyncs = 0
        # Per-interface counters: each link's slot, and what links gone since
        # counted (optional: unit tests run without a counters table).
        self._counters = tables.get("counters")
        self.slots = ifcounters.SlotAllocator(self._counters.max_entries // len(REASONS)
                                              if self._counters is not None else 1)
        self.retired = [(0, 0)] * len(REASONS)
        # Entries the translator wants but a full map refused: table -> {key: value}.
        # They are absent from the map (and the shadow), so they punt; retried after
        # every apply, once deletes may have made room.
        self.unwritten = {name: {} for name in BOUNDED_TABLES}
        self.on_full = lambda table, key: None  # the agent logs the first refusal per table
        self._write_config()

    # -- maps ------------------------------------------------------------
    def apply(self, desired: Desired, full: bool = True) -> int:
        """Make the maps match `desired`; returns how many entries changed.

        full: `desired` holds every entry, anything else is deleted.
        Otherwise it is a delta: only its keys are touched (None = delete).
        """
        with self.lock:
            try:
                return self._apply(self._as_delta(desired) if full else desired)
            except Exception as e:  # the shadow may now be wrong: re-read
                log.warning("map update failed (%s): resyncing from the maps", e)
                self.resyncs += 1
                self._load_shadow()
                return self._apply(self._as_delta(desired) if full else desired)

    def _as_delta(self, desired: Desired) -> Desired:
        delta = Desired(punt_forward_reason=desired.punt_forward_reason, fib_flags=desired.fib_flags, nf=desired.nf)
        for table in TABLES:
            want = getattr(desired, table)
            gone = {k: None for k in getattr(self.shadow, table) if k not in want}
            gone.update((k, None) for k in self.unwritten.get(table, ()) if k not in want)
            setattr(delta, table, {**want, **gone} if gone else want)  # no copy of a full table when nothing goes
        return delta

    def _apply(self, delta: Desired) -> int:
        c, t, cur = self.codec, self.tables, self.shadow
        changes = 0
        # Tighter global switches first, looser ones last: stateful mode and
        # a new ruleset generation make the datapath check more, not less.
        tighter = delta.punt_forward_reason or delta.nf.nf_mode != self._nf.nf_mode or delta.nf.nf_gen != self._nf.nf_gen
        if tighter:
            changes += self._set_config(delta.punt_forward_reason, delta.nf, delta.fib_flags)
        changes += self._apply_routes(delta.routes)
        changes += self._delete(t["fdb"], cur.fdb, delta.fdb, c.fdb_key)
        links = {k: v and replace(v, slot=self._slot_of(k)) for k, v in delta.links.items()}
        for name in BOUNDED_TABLES:
            changes += self._upsert_bounded(name, links if name == "links" else getattr(delta, name))
        changes += self._delete(t["neighbors"], cur.neighbors, delta.neighbors, c.neigh_key)
        changes += self._delete(t["ports"], cur.ports, delta.ports, c.port_key)
        changes += self._delete(t["links"], cur.links, links, c.link_key)
        for ifindex in (k for k, v in links.items() if v is None):
            self._retire(self.slots.release(ifindex))
        changes += self._retry_unwritten()
        if not tighter:
            changes += self._set_config(delta.punt_forward_reason, delta.nf, delta.fib_flags)
        return changes

    # -- routes: room, overflow, growth -------------------------------------
    def _apply_routes(self, delta) -> int:
        """Write the route delta.  New routes the map has no room for (and
        cannot grow for) stay unwritten; the entries covering them punt
        ROUTE_OVERFLOW (decided by covers_for), written before anything is
        deleted, so a lookup never falls through to a less specific route
        than the kernel's.  Unwritten routes are tried again each time."""
        cur = self.shadow.routes
        for key, value in delta.items():
            self.unwritten_routes.pop(key, None)
            if key in self.covered:
                self.covered[key] = value  # the translator's entry, for when it stops punting
        covered = self.covered
        deletes = [k for k, v in delta.items() if v is None and k in cur and k not in covered]
        # A million entries at start: the cheap tests first.
        writes = {k: v for k, v in delta.items()
                  if v is not None and (old := cur.get(k)) is not v and (old is None or old != v) and k not in covered}
        new = [k for k in writes if k not in cur] if cur else list(writes)
        new += [k for k in self.unwritten_routes if k not in writes]
        writes.update(self.unwritten_routes)
        self.unwritten_routes = {}
        # Covers of last resort (not wanted by the translator) use the reserved slot.
        reserved = sum(1 for v in self.covered.values() if v is None)
        room = self._route_room(len(cur) - len(deletes) - reserved, len(new))
        if len(new) > room:
            # Punting entries (local addresses ...) first, then the least
            # specific: a missing /24 costs the /16 that covers it, a missing
            # /16 could cost the default route.
            new.sort(key=lambda k: (writes[k].action == FORWARDED, k[1]))
            for key in new[max(room, 0):]:
                self.unwritten_routes[key] = writes.pop(key)
        gone = set(deletes)
        present = lambda k: (k in cur and k not in gone) or k in writes  # noqa: E731
        covers = self.covers_for(self.unwritten_routes, present) if self.unwritten_routes else {}
        n = self._cover(covers, delta, writes)
        n += self._delete_routes(deletes)
        failed = self._write_routes(writes)
        if failed:  # no room after all (kernel memory): cover those too
            self.unwritten_routes.update({k: writes[k] for k in failed})
            covers = self.covers_for(self.unwritten_routes, lambda k: k in cur)
            n += self._cover(covers, delta, {})
        n += len(writes) - len(failed) + self._uncover(covers)
        self._log_overflow()
        return n

    def _route_room(self, kept: int, new: int) -> int:
        """How many new entries fit; grows the map first if allowed and needed."""
        table = self.tables["routes"]
        capacity = getattr(table, "max_entries", 1 << 32) - ROUTE_SLOTS_RESERVED
        if new > capacity - kept and self.grow_routes and hasattr(table, "rebuild"):
            try:
                self._grow(kept + new)
            except OSError as e:  # no memory for a bigger trie: what does not fit overflows
                log.warning("cannot grow the route map beyond %d entries (%s)", table.max_entries, e)
            capacity = table.max_entries - ROUTE_SLOTS_RESERVED
        return capacity - kept

    def _grow(self, needed: int):
        """A bigger trie with every current entry, swapped in (routemap.py)."""
        table, cur, c = self.tables["routes"], self.shadow.routes, self.codec
        old, capacity = table.max_entries, routemap.headroom(needed + ROUTE_SLOTS_RESERVED)
        keys = c.route_keys_bytes(cur)
        leaves = b"".join(map(self._leaf_bytes, cur.values()))
        table.rebuild(capacity, keys, leaves, len(cur))
        self.route_growths += 1
        log.info("route map grown from %d to %d entries (%d routes wanted)", old, capacity, needed)

    def _cover(self, covers, delta, writes) -> int:
        """Make the covering entries punt ROUTE_OVERFLOW (they exist, are
        about to be written, or are the reserved slot's 0.0.0.0/0),
        remembering the translator's entry for when they stop covering."""
        cur, n = self.shadow.routes, 0
        for key, entry in covers.items():
            if key in writes:
                self.covered[key] = writes.pop(key)
            elif key not in self.covered:
                self.covered[key] = delta[key] if key in delta else cur.get(key)
            if cur.get(key) != entry:
                self._write_route(key, entry)
                n += 1
        return n

    def _uncover(self, covers) -> int:
        """Entries that no longer cover an unwritten route: the translator's again."""
        n = 0
        for key in [k for k in self.covered if k not in covers]:
            want = self.covered.pop(key)
            if want is None:
                n += self._delete_routes([key])
            else:
                self._write_route(key, want)
                n += 1
        return n

    def _write_route(self, key, entry):
        self.tables["routes"][self.codec.route_key(key)] = self.codec.route_leaf(entry)
        self.shadow.routes[key] = entry

    def _write_routes(self, writes) -> list:
        """Write entries (batched where the table allows); returns the keys
        that found no room."""
        table, cur, c = self.tables["routes"], self.shadow.routes, self.codec
        done = 0
        if len(writes) > 1 and hasattr(table, "update_batch"):
            keys = c.route_keys_bytes(writes)
            leaves = b"".join(map(self._leaf_bytes, writes.values()))
            try:
                table.update_batch(keys, leaves, len(writes))
                cur.update(writes)
                return []
            except OSError as e:
                done = getattr(e, "done", 0)  # the rest one by one, below
        cur.update(itertools.islice(writes.items(), done))
        failed = []
        for key, value in itertools.islice(writes.items(), done, None):
            try:
                self._write_route(key, value)
            except OSError as e:
                if not no_room(e):
                    raise
                failed.append(key)
        return failed

    def _leaf_bytes(self, entry) -> bytes:
        """Packed lm_route, computed once per entry object (the translator
        makes equal entries one object: a big table has a few)."""
        cached = self._leaves.get(id(entry))
        if cached is None or cached[0] is not entry:
            if len(self._leaves) > 65536:
                self._leaves.clear()
            cached = self._leaves[id(entry)] = (entry, self.codec.route_leaf_bytes(entry))
        return cached[1]

    def _delete_routes(self, keys) -> int:
        table, cur, c = self.tables["routes"], self.shadow.routes, self.codec
        if len(keys) > 1 and hasattr(table, "delete_batch"):
            try:
                table.delete_batch(c.route_keys_bytes(keys), len(keys))
                for key in keys:
                    del cur[key]
                return len(keys)
            except OSError:
                pass  # one was absent already: one by one
        for key in keys:
            try:
                del table[c.route_key(key)]
            except KeyError:
                pass  # already absent: the goal is reached
            cur.pop(key, None)
        return len(keys)

    def _log_overflow(self):
        overflowing = bool(self.unwritten_routes)
        if overflowing and not self._overflow_logged:
            log.warning("route map full: %d route(s) not written (capacity %d); the routes covering them "
                        "punt ROUTE_OVERFLOW", len(self.unwritten_routes), self.route_capacity)
        elif not overflowing and self._overflow_logged:
            log.info("route map overflow cleared: every route is written")
        self._overflow_logged = overflowing

    @property
    def route_capacity(self) -> int:
        return getattr(self.tables["routes"], "max_entries", 0)

    def route_overflow(self):
        """{"unwritten", "covers", "capacity"} while routes do not fit, else None."""
        with self.lock:
            if not self.unwritten_routes:
                return None
            return {"unwritten": len(self.unwritten_routes), "covers": len(self.covered), "capacity": self.route_capacity}

    def _upsert_bounded(self, name, delta) -> int:
        """Write the delta's entries of a table whose entries may be refused
        when the map is full: a refused entry stays absent (it punts) and is
        remembered."""
        table, current, unwritten = self.tables[name], getattr(self.shadow, name), self.unwritten[name]
        key_fn, leaf_fn = self._key_fn(name), self._leaf_fn(name)
        n = 0
        for key, value in delta.items():
            unwritten.pop(key, None)
            if value is None or current.get(key) == value:
                continue
            if name == "links" and key in self.unwritten["ports"]:
                unwritten[key] = value  # a bridge port without its port entry would be routed
                continue
            try:
                table[key_fn(key)] = leaf_fn(value)
            except Exception as e:
                if not no_room(e) or key in current:
                    raise
                unwritten[key] = value
                self.on_full(name, key)
                if name == "ports":
                    self._drop_link(key)
                continue
            current[key] = value
            n += 1
        return n

    def _drop_link(self, ifindex) -> None:
        """The port entry of `ifindex` did not fit: its link entry goes too
        (the gate then punts IFACE_UNMANAGED), until both fit."""
        value = self.shadow.links.pop(ifindex, None) or self.unwritten["links"].get(ifindex)
        if value is not None:
            self.unwritten["links"][ifindex] = value
            try:
                del self.tables["links"][self.codec.link_key(ifindex)]
            except KeyError:
                pass

    def _retry_unwritten(self) -> int:
        """Deletes may have made room: try refused entries again (ports
        before links, so a link is written only once its port entry is)."""
        n = 0
        for name in ("ports", "links", "neighbors", "fdb"):
            pending = self.unwritten[name]
            if pending:
                self.unwritten[name] = {}
                n += self._upsert_bounded(name, pending)
        return n

    def _leaf_fn(self, name):
        c = self.codec
        return {"neighbors": c.neigh_leaf, "links": c.link_leaf, "ports": c.port_leaf, "fdb": c.fdb_leaf}[name]

    @staticmethod
    def _delete(table, current, delta, key_fn) -> int:
        n = 0
        for key, value in delta.items():
            if value is None and key in current:
                try:
                    del table[key_fn(key)]
                except KeyError:
                    pass  # already absent: the goal is reached
                del current[key]
                n += 1
        return n

    def _load_shadow(self):
        t = self.tables
        self.unwritten = {name: {} for name in BOUNDED_TABLES}  # a full apply follows
        self.shadow = Desired(**{name: dict(self._decoder(name)(k, v) for k, v in t[name].items())
                                 for name in TABLES})
        self.slots.reset({ifindex: e.slot for ifindex, e in self.shadow.links.items()})
        with self._config_lock:
            config = self._config()
            self._punt_forward_reason = config.punt_forward_reason
            self._fib_flags = config.fib_flags
            self._nf = NfConfig(**{name: getattr(config, name) for name in asdict(self._nf)})

    # -- per-interface counters ------------------------------------------
    def _slot_of(self, ifindex: int) -> int:
        slot, new = self.slots.assign(ifindex)
        if new:
            self._retire(slot)  # counts of a link that had it before: not this one's
        return slot

    def _retire(self, slot) -> None:
        """Fold a freed slot's counts into `retired` and zero it."""
        if not slot or self._counters is None:
            return
        t = self._counters
        for reason, (packets, nbytes) in enumerate(ifcounters.read_rows(t, slot, 1)[0]):
            if packets or nbytes:
                p0, b0 = self.retired[reason]
                self.retired[reason] = (p0 + packets, b0 + nbytes)
                t[t.Key(slot * len(REASONS) + reason)] = t.Leaf()

    def counter_slots(self):
        """(ifindex -> slot, counts of links gone) for reading the counters."""
        with self.lock:
            return dict(self.slots.by_ifindex), list(self.retired)

    # -- flows -------------------------------------------------------------
    # Not diffed against a shadow: the map is an LRU the datapath also writes
    # (use counters), and an entry for an older generation or another
    # conntrack state simply punts.  Written one at a time, on request.
    def write_flow(self, key: FlowKey, entry: FlowEntry):
        """Set one flow's verdict; the fast-path counters of the flow are kept
        across a new verdict."""
        table, k = self.tables["flows"], self.codec.flow_key(key)
        with self.lock:
            try:
                old = table[k]
                packets, nbytes = old.packets, old.bytes
            except KeyError:
                packets = nbytes = 0
            table[k] = self.codec.flow_leaf(entry, packets, nbytes)

    def read_flow(self, key: FlowKey):
        """(FlowEntry, packets, bytes) as the datapath sees it, or None."""
        k = self.codec.flow_key(key)
        with self.lock:
            try:
                return self.codec.decode_flow(k, self.tables["flows"][k])[1]
            except KeyError:
                return None

    # -- config and heartbeat --------------------------------------------
    def _config(self):
        return self.tables["config"][ctypes.c_int(0)]

    def _write_config(self):
        leaf = self.tables["config"].Leaf(punt_forward_reason=self._punt_forward_reason, hz=self.hz,
                                          fib_flags=self._fib_flags, **asdict(self._nf))
        self.tables["config"][ctypes.c_int(0)] = leaf

    def hold_punt(self, reason: int):
        """Punt all forwarded traffic now, whatever the maps say, until
        release_punt() (one map write; safe from any thread)."""
        with self._config_lock:
            self.held = reason
            self._write_effective(self._nf)

    def release_punt(self):
        with self._config_lock:
            if self.held:
                self.held = 0
                self._write_effective(self._nf)

    def _set_config(self, reason: int, nf: NfConfig, fib_flags: int = 0) -> int:
        with self._config_lock:
            self._wanted_reason = reason
            changed = fib_flags != self._fib_flags
            self._fib_flags = fib_flags
            return self._write_effective(nf, force=changed)

    def _write_effective(self, nf: NfConfig, force: bool = False) -> int:
        """Write the effective config: the translator's, with RESYNC while lost
        events are being re-read (hold_punt), and NETFILTER_CHANGING as the
        punt reason while a netfilter change hint is not yet answered
        by a re-read (or not even handled yet: the kernel switch may have set
        it for that change)."""
        changing = BY_NAME["NETFILTER_CHANGING"]
        held = self._hold_seq > self._released_seq or self.hint_pending()
        reason = self._wanted_reason or self.held or (changing if held else 0)
        if (reason, nf) == (self._punt_forward_reason, self._nf) and not force:
            return 0
        self._punt_forward_reason, self._nf = reason, nf
        self._write_config()
        if reason == 0 and self.hint_pending():
            # A change landed while we wrote: the kernel switch's hold was overwritten.
            self._punt_forward_reason = changing
            self._write_config()
        return 1

    @property
    def config_fd(self) -> int:
        """The config map's fd (for the switches, mirror/nfswitch.py, nfhintd.py)."""
        return self.tables["config"].map_fd

    @property
    def config_size(self) -> int:
        return ctypes.sizeof(self.tables["config"].Leaf)

    def hold_forward(self, seq: int) -> None:
        """A netfilter change is coming or done but not read yet (hint number
        `seq`): punt all forwarding from now on, in one map write.  Runs on the
        watcher's thread and never waits for a running apply()."""
        with self._config_lock:
            self._hold_seq = max(self._hold_seq, seq)
            self._write_effective(self._nf)

    def release_hold(self, seq: int) -> int:
        """The state read after hint `seq` is in the maps: end holds up to it."""
        with self._config_lock:
            self._released_seq = max(self._released_seq, seq)
            return self._write_effective(self._nf)

    def repair_config(self) -> bool:
        """With nothing held or pending, make the map's punt reason the
        translator's again: undo a re-hold no longer needed, or a switch write no
        hint will answer (a switch that acted on a change already read and
        released).  Cheap; the agent calls it per heartbeat."""
        with self._config_lock:
            if self._hold_seq > self._released_seq or self.hint_pending():
                return False
            if self._write_effective(self._nf):
                return True
            if self._config().punt_forward_reason == self._punt_forward_reason:
                return False
            log.warning("config punt reason changed behind our back: rewriting")
            self._write_config()
            return True

    @property
    def holding(self) -> bool:
        return self._hold_seq > self._released_seq

    def heartbeat(self, alive: bool, seconds: float = 1.0):
        """Fast path on for `seconds` more, or off from now."""
        with self.lock:
            self._beat(max(1, round(self.hz * seconds)) if alive else 0)

    # -- reading ---------------------------------------------------------
    def table_counts(self):
        """Entries per map, as written (reading 65k entries back is slow)."""
        with self.lock:
            return {name: len(getattr(self.shadow, name)) for name in TABLES}

    def read(self, name, keys=None):
        """A table's real contents, decoded (for `dump`); with `keys`, just
        those entries, looked up one by one."""
        t = self.tables
        decode = self._decoder(name)
        if keys is None:
            with self.lock:
                return dict(decode(k, v) for k, v in t[name].items())
        key_fn = self._key_fn(name)
        out = {}
        with self.lock:
            for key in keys:
                if name == "routes" and key not in self.shadow.routes:
                    # An LPM lookup answers with the longest covering
                    # prefix: without this, a /32 that is not in the map
                    # would show its covering route's entry.
                    continue
                k = key_fn(key)
                try:
                    out.update([decode(k, t[name][k])])
                except KeyError:
                    pass
        return out

    def _decoder(self, name):
        c = self.codec
        return {"routes": c.decode_route, "neighbors": c.decode_neigh, "links": c.decode_link,
                "ports": c.decode_port, "fdb": c.decode_fdb}[name]

    def _key_fn(self, name):
        c = self.codec
        return {"routes": c.route_key, "neighbors": c.neigh_key, "links": c.link_key,
                "ports": c.port_key, "fdb": c.fdb_key}[name]

    def fdb_used(self, key) -> int:
        """When the datapath last fast-pathed a frame from this (bridge, MAC)
        (jiffies, 0 = never)."""
        try:
            return self.tables["fdb"][self.codec.fdb_key(key)].used
        except KeyError:
            return 0

    def neighbor_used(self, key) -> int:
        """When the datapath last used the neighbour (jiffies, 0 = never)."""
        try:
            return self.tables["neighbors"][self.codec.neigh_key(key)].used
        except KeyError:
            return 0
