"""A small reader of the running kernel's BTF (/sys/kernel/btf/vmlinux).

The datapath calls conntrack kfuncs and reads struct nf_conn directly.  BCC
compiles against older kernel headers than the running kernel, so the layout
the program uses must come from the kernel itself: the loader asks this
module for kfunc type ids, member offsets and enum values at load time.

    btf = Btf.load()
    btf.func_id("bpf_ct_release")                      -> int
    btf.offset("nf_conn", "tuplehash[1].tuple.src.u3") -> bytes from the start
    btf.enum_value("nf_ct_ext_id", "NF_CT_EXT_HELPER") -> int

Everything raises BtfError (with the name that was not found) rather than
guessing.  Format: Documentation/bpf/btf.rst.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

VMLINUX = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F

# Kinds (BTF_KIND_*) and the size of the data that follows each type record.
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_FIXED_EXTRA = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_PER_MEMBER_EXTRA = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
_QUALIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}

_STEP = re.compile(r"^(\w+)(?:\[(\d+)\])?$")


class BtfError(LookupError):
    """A type, member, function or enum value is not in the kernel's BTF."""


@dataclass(frozen=True)
class BtfType:
    kind: int
    name: str
    size_or_type: int          # byte size (INT, STRUCT, UNION, ENUM) or referenced type id
    members: Tuple[Tuple[str, int, int], ...] = ()  # STRUCT/UNION: (name, type id, bit offset)
    array: Optional[Tuple[int, int]] = None         # ARRAY: (element type id, nelems)
    enums: Tuple[Tuple[str, int], ...] = ()         # ENUM/ENUM64: (name, value)


def _parse(data: bytes) -> List[Optional[BtfType]]:
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, _str_len = struct.unpack_from("<HBBIIIII", data)
    if magic != BTF_MAGIC:
        raise BtfError(f"not BTF data (magic {magic:#x})")
    tbase, sbase = hdr_len + type_off, hdr_len + str_off

    def name_at(off: int) -> str:
        return data[sbase + off: data.index(b"\0", sbase + off)].decode()

    types: List[Optional[BtfType]] = [None]  # type id 0 is void
    off, end = tbase, tbase + type_len
    while off < end:
        name_off, info, size_or_type = struct.unpack_from("<III", data, off)
        off += 12
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        members, array, enums = (), None, ()
        if kind in (STRUCT, UNION):
            ms = []
            for i in range(vlen):
                m_name, m_type, m_off = struct.unpack_from("<III", data, off + 12 * i)
                ms.append((name_at(m_name), m_type, m_off & 0xFFFFFF if kflag else m_off))
            members = tuple(ms)
        elif kind == ARRAY:
            elem, _index, nelems = struct.unpack_from("<III", data, off)
            array = (elem, nelems)
        elif kind == ENUM:
            enums = tuple((name_at(n), v) for n, v in
                          (struct.unpack_from("<Ii", data, off + 8 * i) for i in range(vlen)))
        elif kind == ENUM64:
            enums = tuple((name_at(n), lo | hi << 32) for n, lo, hi in
                          (struct.unpack_from("<III", data, off + 12 * i) for i in range(vlen)))
        if kind in _PER_MEMBER_EXTRA:
            off += _PER_MEMBER_EXTRA[kind] * vlen
        elif kind in _FIXED_EXTRA:
            off += _FIXED_EXTRA[kind]
        elif kind not in (PTR, FWD, FUNC, FLOAT) and kind not in _QUALIFIERS:
            raise BtfError(f"unknown BTF kind {kind} at type id {len(types)}")
        types.append(BtfType(kind, name_at(name_off), size_or_type, members, array, enums))
    return types


class Btf:
    """Parsed BTF with name lookups."""

    def __init__(self, data: bytes):
        self.types = _parse(data)
        self._by_name: Dict[Tuple[int, str], int] = {}
        for tid, t in enumerate(self.types):
            if t is not None and t.name:
                self._by_name.setdefault((t.kind, t.name), tid)

    @classmethod
    def load(cls, path: Path = VMLINUX) -> "Btf":
        return cls(Path(path).read_bytes())

    def type_id(self, kind: int, name: str) -> int:
        try:
            return self._by_name[(kind, name)]
        except KeyError:
            raise BtfError(f"no {_KIND_NAMES.get(kind, kind)} {name!r} in the kernel's BTF") from None

    def func_id(self, name: str) -> int:
        """BTF id of a kernel function (what a kfunc call's imm holds)."""
        return self.type_id(FUNC, name)

    def _resolve(self, tid: int) -> int:
        """Skip typedefs and qualifiers."""
        while self.types[tid] is not None and self.types[tid].kind in _QUALIFIERS:
            tid = self.types[tid].size_or_type
        return tid

    def sizeof(self, tid: int) -> int:
        tid = self._resolve(tid)
        t = self.types[tid]
        if t is None:
            raise BtfError("sizeof(void)")
        if t.kind == ARRAY:
            return self.sizeof(t.array[0]) * t.array[1]
        if t.kind == PTR:
            return 8
        if t.kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT):
            return t.size_or_type
        raise BtfError(f"no size for BTF kind {t.kind} ({t.name!r})")

    def _member(self, tid: int, name: str, where: str) -> Tuple[int, int]:
        """(type id, byte offset) of member `name`, looking through
        anonymous struct/union members as C does."""
        t = self.types[self._resolve(tid)]
        if t is None or t.kind not in (STRUCT, UNION):
            raise BtfError(f"{where}: not a struct or union")
        for m_name, m_type, m_bits in t.members:
            if m_name == name:
                if m_bits % 8:
                    raise BtfError(f"{where}.{name} is a bitfield")
                return m_type, m_bits // 8
        for m_name, m_type, m_bits in t.members:
            inner = self.types[self._resolve(m_type)]
            if not m_name and inner is not None and inner.kind in (STRUCT, UNION):
                try:
                    sub_type, sub_off = self._member(m_type, name, where)
                except BtfError:
                    continue
                return sub_type, m_bits // 8 + sub_off
        raise BtfError(f"{where} has no member {name!r}")

    def member(self, struct_name: str, path: str) -> Tuple[int, int]:
        """(byte offset, byte size) of a member path like
        "proto.tcp.seen[1].flags" in struct `struct_name`."""
        tid = self.type_id(STRUCT, struct_name)
        offset, where = 0, f"struct {struct_name}"
        for step in path.split("."):
            m = _STEP.match(step)
            if not m:
                raise BtfError(f"bad member path {path!r}")
            tid, off = self._member(tid, m.group(1), where)
            offset += off
            where += "." + m.group(1)
            if m.group(2) is not None:
                arr = self.types[self._resolve(tid)]
                index = int(m.group(2))
                if arr is None or arr.kind != ARRAY or index >= arr.array[1]:
                    raise BtfError(f"{where} is not an array with an element {index}")
                tid = arr.array[0]
                offset += index * self.sizeof(tid)
                where += f"[{index}]"
        return offset, self.sizeof(tid)

    def offset(self, struct_name: str, path: str) -> int:
        return self.member(struct_name, path)[0]

    def enum_value(self, enum_name: str, member: str) -> int:
        t = self.types[self.type_id(ENUM, enum_name)]
        for name, value in t.enums:
            if name == member:
                return value
        raise BtfError(f"enum {enum_name} has no value {member!r}")


_KIND_NAMES = {STRUCT: "struct", UNION: "union", ENUM: "enum", FUNC: "function", TYPEDEF: "typedef"}
