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
                hit |= src.drain()
            except OSError:
                hit = True
        return hit

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
            self.post(("netfilter_read", (self.seq, netfilter.read_state())))
