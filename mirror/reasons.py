"""Verdict reason names, read from the one definition in kernel_bpf/common.h."""

import os
import re
from typing import Dict, List, NamedTuple

BPF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernel_bpf")
COMMON_H = os.path.join(BPF_DIR, "common.h")

_ENTRY = re.compile(r'X\((\w+),\s*(\d+),\s*"([^"]*)"\)')
_DROP = re.compile(r'#define LM_DROP_REASONS\(X\)((?:[^\n]*\\\n)*[^\n]*)')


class Reason(NamedTuple):
    value: int
    name: str
    description: str
    drop: bool = False  # listed in LM_DROP_REASONS: the datapath drops, not punts


def load(path: str = COMMON_H) -> List[Reason]:
    """The LM_REASONS X-macro entries, in value order."""
    with open(path) as f:
        text = f.read()
    if "#define LM_REASONS(X)" not in text:
        raise ValueError(f"{path}: no '#define LM_REASONS(X)'")
    block = text[text.index("#define LM_REASONS(X)"):]
    block = block[: block.index("\n\n")]
    m = _DROP.search(text)
    drops = set(re.findall(r"X\((\w+)\)", m.group(1))) if m else set()
    out = sorted(Reason(int(v), n, d, n in drops) for n, v, d in _ENTRY.findall(block))
    if drops - {r.name for r in out}:
        raise ValueError(f"{path}: LM_DROP_REASONS names unknown reasons {sorted(drops - {r.name for r in out})}")
    if [r.value for r in out] != list(range(len(out))):
        raise ValueError(f"{path}: LM_REASONS values must be 0..N-1 without gaps")
    return out


REASONS = load()
BY_NAME: Dict[str, int] = {r.name: r.value for r in REASONS}
FORWARDED = BY_NAME["FORWARDED"]
