"""The reason list parsed from kernel_bpf/common.h (no root)."""

import pytest

from mirror import reasons


def test_reasons_match_common_h():
    rs = reasons.REASONS
    assert rs[0][:3] == (0, "FORWARDED", "forwarded by the fast path")
    assert [r.value for r in rs] == list(range(len(rs)))
    names = [r.name for r in rs]
    assert len(set(names)) == len(names)
    for name in ("AGENT_STALE", "IFACE_UNMANAGED", "LOCAL", "NO_ROUTE", "RP_FILTER",
                 "MTU_EXCEEDED", "GSO_UNSUPPORTED"):
        assert name in names
    assert all(r.description for r in rs)
    assert {r.name for r in rs if r.drop} == {"NF_DROP", "NAT_FAILED"}


def test_drop_list_must_name_known_reasons(tmp_path):
    h = tmp_path / "common.h"
    h.write_text('#define LM_REASONS(X) \\\n\tX(FORWARDED, 0, "a") \\\n\tX(B, 1, "b")\n\n'
                 "#define LM_DROP_REASONS(X) X(B)\n")
    assert [r.drop for r in reasons.load(str(h))] == [False, True]
    h.write_text(h.read_text().replace("X(B)\n", "X(C)\n"))
    with pytest.raises(ValueError):
        reasons.load(str(h))


def test_reasons_rejects_gaps_and_missing_list(tmp_path):
    h = tmp_path / "common.h"
    h.write_text('#define LM_REASONS(X) \\\n\tX(FORWARDED, 0, "a") \\\n\tX(B, 2, "b")\n\n')
    with pytest.raises(ValueError):
        reasons.load(str(h))
    h.write_text("/* nothing */\n")
    with pytest.raises(ValueError):
        reasons.load(str(h))
