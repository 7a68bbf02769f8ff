"""Attaching the datapath at TC ingress, and leaving tc exactly as found.

The program goes in a clsact qdisc (created only where neither a clsact nor
an ingress qdisc exists) as a direct-action bpf filter with a fixed priority
and name, so a later agent or `stop` can find leftovers of an agent that was
SIGKILLed.  Which clsact qdiscs we created is recorded in a state file (per
network namespace), so they are removed again and nothing else is.
"""

import errno
import json
import logging
import os

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

FILTER_NAME = "loxi_mirror"
FILTER_PRIO = 0xFFF0  # after the user's own filters (lower numbers run first)
FILTER_HANDLE = 1
INGRESS_PARENT = 0xFFFFFFF2  # the ingress hook of a clsact (or ingress) qdisc
EGRESS_PARENT = 0xFFFFFFF3  # clsact's egress hook
RUN_DIR = "/run/loxi-mirror"


def netns_id() -> str:
    """Identity of the current network namespace (inode of its nsfs file)."""
    st = os.stat("/proc/self/ns/net")
    return f"{st.st_dev:x}-{st.st_ino}"


def state_path() -> str:
    return os.path.join(RUN_DIR, f"netns-{netns_id()}.json")


class TcAttacher:
    def __init__(self, prog_fd: int, ipr=None):
        self.prog_fd = prog_fd
        self.ipr = ipr or IPRoute()
        self.attached = {}  # ifindex -> name
        self.created_clsact = set(_load_state().get("created_clsact", []))

    def _has_ingress_hook(self, ifindex) -> bool:
        """clsact, or the older ingress qdisc (the two exclude each other;
        filters at ffff:fff2 work with either)."""
        return any(q.get_attr("TCA_KIND") in ("clsact", "ingress") for q in self.ipr.get_qdiscs(index=ifindex))

    def attach(self, ifindex: int, name: str):
        if not self._has_ingress_hook(ifindex):
            self.ipr.tc("add", "clsact", ifindex)
            self.created_clsact.add(ifindex)
            _save_state(self.created_clsact)
        self.ipr.tc("replace-filter", "bpf", ifindex, FILTER_HANDLE, fd=self.prog_fd, name=FILTER_NAME,
                    parent=INGRESS_PARENT, prio=FILTER_PRIO, direct_action=True, classid=1)
        self.attached[ifindex] = name
        log.info("attached to %s (ifindex %d)", name, ifindex)

    def still_attached(self, ifindex: int) -> bool:
        """Whether our filter is still there (a user's `tc qdisc del ...
        clsact` or `tc filter del` removes it without asking us)."""
        return bool(_our_filters(self.ipr, ifindex))

    def forget(self, ifindex: int):
        """The interface is gone (deleted or moved away): nothing to undo."""
        self.attached.pop(ifindex, None)
        if ifindex in self.created_clsact:
            self.created_clsact.discard(ifindex)
            _save_state(self.created_clsact)

    def detach(self, ifindex: int):
        remove_filter(self.ipr, ifindex, self.created_clsact)
        self.attached.pop(ifindex, None)
        self.created_clsact.discard(ifindex)
        _save_state(self.created_clsact)

    def detach_all(self):
        for ifindex in list(self.attached):
            self.detach(ifindex)
        cleanup_leftovers(self.ipr)


def is_ours(f) -> bool:
    opts = f.get_attr("TCA_OPTIONS")
    return bool(f.get_attr("TCA_KIND") == "bpf" and opts and (opts.get_attr("TCA_BPF_NAME") or "").startswith(FILTER_NAME))


def _our_filters(ipr, ifindex):
    try:
        filters = ipr.get_filters(index=ifindex, parent=INGRESS_PARENT)
    except NetlinkError:
        return []
    return [f for f in filters if is_ours(f)]


def remove_filter(ipr, ifindex, created_clsact):
    """Remove our filter; remove the clsact too if we created it and it is
    now empty (a filter the user added since keeps it)."""
    try:
        for f in _our_filters(ipr, ifindex):
            prio = (f["info"] >> 16) & 0xFFFF
            ipr.tc("del-filter", "bpf", ifindex, f["handle"], parent=INGRESS_PARENT, prio=prio)
        if ifindex in created_clsact:
            left = [f for f in ipr.get_filters(index=ifindex, parent=INGRESS_PARENT) if f.get_attr("TCA_KIND")]
            left += [f for f in ipr.get_filters(index=ifindex, parent=EGRESS_PARENT) if f.get_attr("TCA_KIND")]
            if not left:
                ipr.tc("del", "clsact", ifindex)
    except NetlinkError as e:
        if e.code not in (errno.ENODEV, errno.ENOENT):
            raise


def cleanup_leftovers(ipr=None) -> int:
    """Remove filters of ours in this netns (e.g. after a SIGKILLed agent)
    and the clsact qdiscs recorded as ours.  Returns how many it removed."""
    ipr = ipr or IPRoute()
    created = set(_load_state().get("created_clsact", []))
    removed = 0
    for link in ipr.get_links():
        idx = link["index"]
        if _our_filters(ipr, idx) or idx in created:
            remove_filter(ipr, idx, created)
            removed += 1
    _save_state(set())
    return removed


def _load_state():
    try:
        with open(state_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save_state(created_clsact):
    os.makedirs(RUN_DIR, exist_ok=True)
    path = state_path()
    if not created_clsact:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"created_clsact": sorted(created_clsact)}, f)
    os.replace(tmp, path)
