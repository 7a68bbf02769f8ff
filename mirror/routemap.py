"""The route map: an LPM trie the agent creates itself (BPF_MAP_CREATE) at
the size the routing table needs, which the datapath reaches through the
one-slot BPF_ARRAY_OF_MAPS `routes` (common.h, lm_route_lookup()).

Growing means a new, bigger trie, filled with every entry, then swapped in
with one write of the slot: a packet sees the old trie or the new one, never
a half-filled one (the old one is freed after the packets using it are done,
RCU).  An LPM trie is never preallocated: its capacity is only a limit and
its memory follows the entries (fdinfo memlock), so headroom costs nothing.

RouteTable offers the subset of BCC's table interface the agent and the
tests use (Key, Leaf, [], del, keys(), items(), max_entries), plus batched
writes of keys and values packed as KEY and LEAF (update_batch, delete_batch).
"""

import ctypes
import errno
import os
import struct

from . import bpfsys

KEY = struct.Struct("=I4s")  # struct lm_route_key: prefixlen, addr (network order)
LEAF = struct.Struct("=II4sI")  # struct lm_route: action, oif, gateway (network order), mtu
DEFAULT_CAPACITY = 65536
BATCH = 65536  # entries per BPF_MAP_*_BATCH call


class RouteKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint32)]


class RouteLeaf(ctypes.Structure):
    _fields_ = [("action", ctypes.c_uint32), ("oif", ctypes.c_uint32), ("gateway", ctypes.c_uint32),
                ("mtu", ctypes.c_uint32)]


def headroom(needed: int) -> int:
    """The capacity for a table that must hold `needed` entries: twice that,
    room for the table to double before the next growth."""
    return 2 * needed


class RouteTable:
    Key, Leaf = RouteKey, RouteLeaf

    def __init__(self, outer_fd: int, capacity: int = DEFAULT_CAPACITY):
        self.outer_fd = outer_fd
        self.fd = self._create(capacity)
        self.max_entries = capacity
        self._swap_in(self.fd)

    @staticmethod
    def _create(capacity: int) -> int:
        return bpfsys.map_create(bpfsys.BPF_MAP_TYPE_LPM_TRIE, KEY.size, LEAF.size, capacity,
                                 bpfsys.BPF_F_NO_PREALLOC, b"lm_routes")

    def _swap_in(self, fd: int):
        bpfsys.map_update(self.outer_fd, struct.pack("=I", 0), struct.pack("=I", fd))

    def rebuild(self, capacity: int, keys: bytes, leaves: bytes, count: int):
        """Replace the trie by a new one of `capacity` holding these entries
        (packed), swapped in once it is complete."""
        fd = self._create(capacity)
        try:
            write_batches(fd, keys, leaves, count)
            self._swap_in(fd)
        except OSError:
            os.close(fd)
            raise
        old, self.fd, self.max_entries = self.fd, fd, capacity
        os.close(old)

    # -- BCC-like access (one syscall per entry) ---------------------------
    def __setitem__(self, key, leaf):
        bpfsys.map_update(self.fd, bytes(key), bytes(leaf))

    def __getitem__(self, key) -> RouteLeaf:
        try:
            return RouteLeaf.from_buffer_copy(bpfsys.map_lookup(self.fd, bytes(key), LEAF.size))
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise KeyError(key) from None
            raise

    def __delitem__(self, key):
        try:
            bpfsys.map_delete(self.fd, bytes(key))
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise KeyError(key) from None
            raise

    def keys(self):
        return [RouteKey.from_buffer_copy(k) for k in bpfsys.map_keys(self.fd, KEY.size)]

    def items(self):
        out = []
        for k in self.keys():
            try:
                out.append((k, self[k]))
            except KeyError:
                pass  # deleted meanwhile
        return out

    # -- batches -----------------------------------------------------------
    def update_batch(self, keys: bytes, leaves: bytes, count: int) -> None:
        write_batches(self.fd, keys, leaves, count)

    def delete_batch(self, keys: bytes, count: int) -> None:
        """Delete packed keys that are all present."""
        for start in range(0, count, BATCH):
            n = min(BATCH, count - start)
            bpfsys.map_delete_batch(self.fd, keys[start * KEY.size:(start + n) * KEY.size], n)

    def memlock(self) -> int:
        """Bytes the kernel accounts to the trie (its entries), from fdinfo."""
        return fd_memlock(self.fd)

    def map_id(self) -> int:
        return bpfsys.map_id(self.fd)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write_batches(fd: int, keys: bytes, leaves: bytes, count: int) -> None:
    for start in range(0, count, BATCH):
        n = min(BATCH, count - start)
        bpfsys.map_update_batch(fd, keys[start * KEY.size:(start + n) * KEY.size],
                                leaves[start * LEAF.size:(start + n) * LEAF.size], n)


def fd_memlock(fd: int) -> int:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("memlock:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
