"""mirror/btf.py and the loader's pure parts, without root: a synthetic BTF
blob, and the kfunc call patcher on hand-made instructions."""

import struct

import pytest

from mirror import btf as B
from mirror.datapath import BPF_CALL, DatapathError, patch_kfunc_calls


def _blob(types, strings):
    """types: list of (name_off, info, size_or_type, extra bytes)."""
    tdata = b"".join(struct.pack("<III", n, i, s) + extra for n, i, s, extra in types)
    sdata = strings
    hdr = struct.pack("<HBBIIIII", B.BTF_MAGIC, 1, 0, 24, 0, len(tdata), len(tdata), len(sdata))
    return hdr + tdata + sdata


def _info(kind, vlen=0):
    return (kind << 24) | vlen


def make_btf():
    strings = b"\0int\0u8\0inner\0a\0b\0outer\0x\0arr\0ids\0ONE\0TWO\0f\0"
    off = {name: strings.index(b"\0" + name.encode() + b"\0") + 1
           for name in ("int", "u8", "inner", "a", "b", "outer", "x", "arr", "ids", "ONE", "TWO", "f")}
    types = [
        (off["int"], _info(B.INT), 4, struct.pack("<I", 32)),                       # 1 int
        (off["u8"], _info(B.INT), 1, struct.pack("<I", 8)),                         # 2 u8
        (off["inner"], _info(B.STRUCT, 2), 8, struct.pack("<III", off["a"], 1, 0)  # 3 struct inner {int a; int b}
         + struct.pack("<III", off["b"], 1, 32)),
        (0, _info(B.ARRAY), 0, struct.pack("<III", 3, 1, 2)),                       # 4 inner[2]
        (0, _info(B.UNION, 1), 8, struct.pack("<III", off["x"], 3, 0)),             # 5 anon union {inner x}
        (off["outer"], _info(B.STRUCT, 3), 32, struct.pack("<III", off["arr"], 4, 0)  # 6 struct outer
         + struct.pack("<III", 0, 5, 128) + struct.pack("<III", off["f"], 2, 192)),
        (off["ids"], _info(B.ENUM, 2), 4, struct.pack("<Ii", off["ONE"], 1) + struct.pack("<Ii", off["TWO"], 2)),
        (off["f"], _info(B.FUNC), 0, b""),                                          # 8 func f
    ]
    return B.Btf(_blob(types, strings))


def test_member_paths_arrays_and_anonymous_members():
    b = make_btf()
    assert b.member("outer", "arr[0].a") == (0, 4)
    assert b.member("outer", "arr[1].b") == (12, 4)
    assert b.member("outer", "x.b") == (20, 4)      # through the anonymous union at 16
    assert b.member("outer", "f") == (24, 1)
    assert b.sizeof(b.type_id(B.STRUCT, "outer")) == 32
    assert b.enum_value("ids", "TWO") == 2
    assert b.func_id("f") == 8


@pytest.mark.parametrize("path", ["nope", "arr[2].a", "f.a", "arr.a[0]"])
def test_missing_members_raise(path):
    with pytest.raises(B.BtfError):
        make_btf().member("outer", path)


def test_missing_names_raise():
    b = make_btf()
    with pytest.raises(B.BtfError):
        b.func_id("g")
    with pytest.raises(B.BtfError):
        b.enum_value("ids", "THREE")
    with pytest.raises(B.BtfError):
        B.Btf(b"\0" * 24)


def _insn(code, regs=0, off=0, imm=0):
    return struct.pack("<BBhi", code, regs, off, imm)


def test_patch_kfunc_calls():
    ph = {0x7FF00001: 111, 0x7FF00002: 222}
    prog = bytearray(_insn(0xB7, 1, 0, 5) + _insn(BPF_CALL, 0, 0, 0x7FF00001) + _insn(BPF_CALL, 0, 0, 12)
                     + _insn(BPF_CALL, 0, 0, 0x7FF00001) + _insn(0x95))
    assert patch_kfunc_calls(prog, ph) == {0x7FF00001: 2, 0x7FF00002: 0}
    calls = [struct.unpack_from("<BBhi", prog, o) for o in range(0, len(prog), 8)]
    assert calls[1] == (BPF_CALL, 0x20, 0, 111) and calls[3] == (BPF_CALL, 0x20, 0, 111)
    assert calls[2] == (BPF_CALL, 0, 0, 12)  # a real helper call stays


def test_placeholder_outside_a_call_is_refused():
    prog = bytearray(_insn(0x18, 1, 0, 0x7FF00001) + _insn(0) + _insn(0x95))  # ld_imm64 r1 = placeholder
    with pytest.raises(DatapathError):
        patch_kfunc_calls(prog, {0x7FF00001: 1})


def test_loader_refuses_a_kernel_without_what_ct_h_reads():
    from mirror import datapath

    with pytest.raises(DatapathError, match="lacks"):
        datapath.kernel_cflags(make_btf())


def test_loader_refuses_modular_nf_conntrack(tmp_path, monkeypatch):
    from mirror import datapath

    (tmp_path / "nf_conntrack").write_bytes(b"")
    monkeypatch.setattr(datapath, "NF_CONNTRACK_MODULE_BTF", tmp_path / "nf_conntrack")
    with pytest.raises(DatapathError, match="module"):
        datapath.kernel_cflags(make_btf())


@pytest.mark.skipif(not B.VMLINUX.exists(), reason="no /sys/kernel/btf/vmlinux")
def test_running_kernel_layout():
    """The running kernel's BTF has everything the datapath reads."""
    from mirror import datapath

    flags, ids = datapath.kernel_cflags()
    assert len(ids) == len(datapath.KFUNCS) and all(i > 0 for i in ids.values())
    names = {f.split("=")[0][2:] for f in flags}
    assert {m for m, *_ in datapath.NFCT_LAYOUT} <= names
