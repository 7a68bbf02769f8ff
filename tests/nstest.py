"""Helpers for tests that need root and network namespaces."""

import os
import sys
import time

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

import topology  # noqa: E402

_ROOT_OK, _ROOT_WHY = topology.have_root_and_netns()

# `@skip_unless_root` on a test or class, or `pytestmark = skip_unless_root` in a module.
skip_unless_root = pytest.mark.skipif(not _ROOT_OK, reason=f"needs root and ip netns: {_ROOT_WHY}")


def unique_name(prefix="lmt"):
    """prefix-<6 hex> such that no namespace named '<that>-*' exists."""
    return topology.unique_prefix(prefix)


def wait_for(predicate, timeout, what, interval=0.05):
    """Poll predicate() until it is true and return its value; fail with `what` after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} (after {timeout} s)"
        time.sleep(interval)
