"""Reconciler: the only code that writes the BPF maps.

It keeps a shadow of what it wrote, diffs the translator's Desired against
it and applies the minimal set of updates.  Any map error makes it re-read
the real maps (full resync) before trying again.  Every lookup miss in the
datapath punts, so no write order can cause a wrong forward; deletes of
routes still go first so removed paths stop being used as early as possible.
"""

import ctypes
import logging
import socket
import struct
import threading

from .translate import Desired, LinkEntry, RouteEntry

log = logging.getLogger(__name__)

TABLES = ("routes", "neighbors", "links")


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
        leaf.flags, leaf.mtu = e.flags, e.mtu
        return leaf

    def decode_link(self, k, v):
        peer_mac = bytes_to_mac(v.peer_mac)
        return k.value, LinkEntry(bytes_to_mac(v.mac), v.flags, v.mtu,
                                  None if peer_mac == "00:00:00:00:00:00" else peer_mac)


class Reconciler:
    def __init__(self, tables, beat, hz: int):
        """tables: name -> BCC table for routes, neighbors, links and config;
        beat(ttl_jiffies): runs the datapath's heartbeat program; hz: the
        kernel's jiffies per second."""
        self.tables = tables
        self._beat = beat
        self.hz = hz
        self.codec = Codec(tables)
        self.shadow = Desired()
        self.lock = threading.Lock()
        self._punt_forward_reason = 0
        # A punt-everything reason set from any thread (lost events) until
        # released; config writes take this lock.
        self._config_lock = threading.Lock()
        self.held = 0
        self.resyncs = 0
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
        delta = Desired(punt_forward_reason=desired.punt_forward_reason)
        for table in TABLES:
            want = getattr(desired, table)
            gone = {k: None for k in getattr(self.shadow, table) if k not in want}
            setattr(delta, table, {**want, **gone})
        return delta

    def _apply(self, delta: Desired) -> int:
        c, t, cur = self.codec, self.tables, self.shadow
        changes = 0
        # Tighter global switch first, looser one last.
        if delta.punt_forward_reason:
            changes += self._set_punt_reason(delta.punt_forward_reason)
        changes += self._delete(t["routes"], cur.routes, delta.routes, c.route_key)
        changes += self._upsert(t["links"], cur.links, delta.links, c.link_key, c.link_leaf)
        changes += self._upsert(t["neighbors"], cur.neighbors, delta.neighbors, c.neigh_key, c.neigh_leaf)
        changes += self._upsert(t["routes"], cur.routes, delta.routes, c.route_key, c.route_leaf)
        changes += self._delete(t["neighbors"], cur.neighbors, delta.neighbors, c.neigh_key)
        changes += self._delete(t["links"], cur.links, delta.links, c.link_key)
        if not delta.punt_forward_reason:
            changes += self._set_punt_reason(0)
        return changes

    @staticmethod
    def _upsert(table, current, delta, key_fn, leaf_fn) -> int:
        n = 0
        for key, value in delta.items():
            if value is not None and current.get(key) != value:
                table[key_fn(key)] = leaf_fn(value)
                current[key] = value
                n += 1
        return n

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
        c, t = self.codec, self.tables
        self.shadow = Desired(
            routes=dict(c.decode_route(k, v) for k, v in t["routes"].items()),
            neighbors=dict(c.decode_neigh(k, v) for k, v in t["neighbors"].items()),
            links=dict(c.decode_link(k, v) for k, v in t["links"].items()),
        )
        self._punt_forward_reason = self._config().punt_forward_reason

    # -- config and heartbeat --------------------------------------------
    def _config(self):
        return self.tables["config"][ctypes.c_int(0)]

    def _write_config(self):
        with self._config_lock:
            leaf = self.tables["config"].Leaf(self.held or self._punt_forward_reason, self.hz)
            self.tables["config"][ctypes.c_int(0)] = leaf

    def hold_punt(self, reason: int):
        """Punt all forwarded traffic now, whatever the maps say, until
        release_punt() (one map write; safe from any thread)."""
        self.held = reason
        self._write_config()

    def release_punt(self):
        if self.held:
            self.held = 0
            self._write_config()

    def _set_punt_reason(self, reason: int) -> int:
        if reason == self._punt_forward_reason:
            return 0
        self._punt_forward_reason = reason
        self._write_config()
        return 1

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
        c, t = self.codec, self.tables
        decode = {"routes": c.decode_route, "neighbors": c.decode_neigh, "links": c.decode_link}[name]
        if keys is None:
            with self.lock:
                return dict(decode(k, v) for k, v in t[name].items())
        key_fn = {"routes": c.route_key, "neighbors": c.neigh_key, "links": c.link_key}[name]
        out = {}
        with self.lock:
            for key in keys:
                k = key_fn(key)
                try:
                    out.update([decode(k, t[name][k])])
                except KeyError:
                    pass
        return out

    def neighbor_used(self, key) -> int:
        """When the datapath last used the neighbour (jiffies, 0 = never)."""
        try:
            return self.tables["neighbors"][self.codec.neigh_key(key)].used
        except KeyError:
            return 0
