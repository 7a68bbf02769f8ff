"""First sign of a ruleset change -> the fast path stops using flow verdicts at once.

A rule inserted mid-flow must apply to the very next packet of every flow.
The netfilter watcher debounces and re-reads (tens of ms); this thread only
waits for the first change signal (nfnetlink NFNLGRP_NFTABLES for
iptables-nft/nft, the xtables lock for iptables-legacy), posts
("netfilter_hint", n) — the agent then starts a new ruleset generation
with no verdicts, so every flow punts to the kernel, which applies the new
rule — and then reads the rules itself and posts ("netfilter_read", (n,
state)).  Verdicts resume with the read of the latest hint: it began after
that hint, so it holds every change signalled so far (a watcher read that
began earlier may not).
"""

import logging
import os
import select
import threading

from . import netfilter

log = logging.getLogger(__name__)

SETTLE = 0.003  # s of quiet before reading: a restore commits in one burst


def legacy_table_names(path: str = "/proc/net/ip_tables_names") -> str:
    """The legacy iptables tables of this netns (empty: none)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


class NetfilterHints:
    def __init__(self, post):
        self.post = post
        self.sources = []
        for make in (netfilter._NftMonitor, lambda: netfilter._Inotify(netfilter.XTABLES_LOCK)):
            try:
                self.sources.append(make())
            except OSError as e:  # the watcher's polling still catches changes, later
                log.warning("netfilter change hints unavailable: %s", e)
        self._wake_r, self._wake_w = os.pipe()
        self.stopping = threading.Event()
        self.seq = 0
        self.legacy_tables = True  # until a read says otherwise
        self.thread = threading.Thread(target=self._run, name="nf-hints", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        os.write(self._wake_w, b"x")
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        for src in self.sources:
            src.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _hinted(self) -> bool:
        hit = False
        for src in self.sources:
            try:
                if src.drain():
                    hit |= isinstance(src, netfilter._NftMonitor) or self._legacy_here()
            except OSError:
                hit = True
        return hit

    def _legacy_here(self) -> bool:
        """The xtables lock is shared by every netns: a legacy change elsewhere
        touches it too.  It concerns us only if this netns has legacy tables
        now, or had at the last read (then they may have been removed)."""
        return self.legacy_tables or bool(legacy_table_names())

    def _run(self):
        fds = [s.fd for s in self.sources] + [self._wake_r]
        while not self.stopping.is_set():
            ready, _, _ = select.select(fds, [], [])
            if self.stopping.is_set() or not self._hinted():
                continue
            self.seq += 1
            self.post(("netfilter_hint", self.seq))
            while select.select(fds, [], [], SETTLE)[0] and not self.stopping.is_set():
                self._hinted()
            state = netfilter.read_state()
            legacy = state.rulesets.get("iptables-legacy")
            self.legacy_tables = legacy is None or not legacy.empty
            self.post(("netfilter_read", (self.seq, state)))
