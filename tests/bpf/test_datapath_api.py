"""mirror/datapath.py without root: reason list, source flattening, errors."""

import re

import pytest

from mirror import datapath
from mirror.datapath import BPF_DIR, DatapathError, reasons, source_text


def test_reasons_match_common_h():
    rs = reasons()
    assert rs[0] == (0, "FORWARDED", "forwarded by the fast path")
    assert [v for v, _, _ in rs] == list(range(len(rs)))
    names = [n for _, n, _ in rs]
    assert len(set(names)) == len(names)
    for name in ("AGENT_STALE", "IFACE_UNMANAGED", "LOCAL", "NO_ROUTE", "RP_FILTER",
                 "MTU_EXCEEDED", "GSO_UNSUPPORTED"):
        assert name in names
    assert all(desc for _, _, desc in rs)


def test_reasons_rejects_gaps(tmp_path):
    h = tmp_path / "common.h"
    h.write_text('#define LM_REASONS(X) \\\n\tX(FORWARDED, 0, "a") \\\n\tX(B, 2, "b")\n')
    with pytest.raises(DatapathError):
        reasons(h)
    h.write_text("/* nothing */\n")
    with pytest.raises(DatapathError):
        reasons(h)


def test_source_text_inlines_local_headers_once():
    text = source_text()
    assert "int lm_tc_ingress(struct __sk_buff *skb)" in text
    # No project include is left for BCC to resolve (it would not rewrite
    # map calls in it); system includes stay.
    assert not re.search(r'^\s*#\s*include\s+"', text, re.M)
    assert "#include <uapi/linux/bpf.h>" in text
    for hdr in sorted(BPF_DIR.glob("*.h")):
        assert text.count(f'#line 1 "{hdr}"') == 1, hdr.name
    assert text.count("#define LM_COMMON_H") == 1


def test_size_overrides_validated():
    assert datapath._size_cflags({"LM_MAX_ROUTES": 10}) == ["-DLM_MAX_ROUTES=10"]
    with pytest.raises(DatapathError):
        datapath._size_cflags({"LM_MAX_BOGUS": 10})
    with pytest.raises(DatapathError):
        datapath._size_cflags({"LM_MAX_LINKS": 0})
