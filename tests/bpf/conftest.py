"""Fixtures for the BPF packet tests: the compiled datapath, a throwaway
network namespace with veth pairs (entered by the test process, because
BPF_PROG_TEST_RUN resolves ctx.ifindex in the caller's netns), and typed
access to the maps.  Everything is removed at session end, even on failure.
"""

import os
import sys
from dataclasses import dataclass

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from lm_bpfrun import TOPO_MACS as MACS, Maps, TestNetns  # noqa: E402


def _skip_reason():
    if os.geteuid() != 0:
        return "needs root (BPF_PROG_TEST_RUN, BPF maps, network namespaces)"
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return f"BCC not importable ({e}); run tools/setup"
    return None


ROOT_FIXTURES = {"topo", "datapath", "maps"}


def pytest_collection_modifyitems(config, items):
    """Tests here that use the root fixtures get the `root` marker, and are
    skipped with the reason when not root / no BCC."""
    reason = _skip_reason()
    here = os.path.dirname(os.path.realpath(__file__))
    for item in items:
        if not os.path.realpath(str(item.fspath)).startswith(here + os.sep):
            continue
        if ROOT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.root)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@dataclass
class Topo:
    """in0: the ingress veth; out0: plain egress (bpf_redirect); out1: egress
    veth whose peer is 'in another netns' (bpf_redirect_peer)."""

    ns: TestNetns
    in0: int
    in0_mac: bytes
    out0: int
    out0_mac: bytes
    out1: int
    out1_mac: bytes


@pytest.fixture(scope="session")
def topo():
    ns = TestNetns()
    try:
        for name, m in MACS.items():
            ns.ip("link", "add", name, "address", m, "type", "veth", "peer", "name", name + "p")
            ns.ip("link", "set", name, "up")
        idx = {name: ns.link(name) for name in MACS}
        yield Topo(ns, *idx["in0"], *idx["out0"], *idx["out1"])
    finally:
        ns.close()


@pytest.fixture(scope="session")
def datapath(topo):
    from mirror.datapath import Datapath

    # Small tables: the tests need a handful of entries, and the hash maps
    # are preallocated.
    dp = Datapath(sizes={"LM_MAX_ROUTES": 256, "LM_MAX_NEIGHBORS": 256, "LM_MAX_LINKS": 64,
                         "LM_MAX_FLOWS": 1024, "LM_MAX_FDB": 256, "LM_MAX_IFACE_SLOTS": 16})
    try:
        yield dp
    finally:
        dp.close()


@pytest.fixture(scope="session")
def maps(datapath):
    return Maps(datapath)
