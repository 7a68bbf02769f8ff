"""mirror/datapath.py without root: source flattening, errors."""

import re

import pytest

from mirror import datapath
from mirror.datapath import BPF_DIR, DatapathError, source_text


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
