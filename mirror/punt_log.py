"""One log line per unsupported object: the first time the agent sees that
an interface, route, policy rule, netfilter rule or setting makes traffic
punt to the kernel, and why.  Not per event or resync: an object is logged
again only when its reason changes, or after it was gone."""

import logging
from typing import Dict, Hashable, Optional

log = logging.getLogger("loxi-mirror")


class PuntLog:
    def __init__(self, logger: logging.Logger = log):
        self.log = logger
        self.seen: Dict[str, Dict[Hashable, str]] = {}  # kind -> {object: why}

    def update(self, kind: str, current: Dict[Hashable, str]) -> None:
        """`current`: every object of this kind that punts now, with why."""
        old = self.seen.get(kind, {})
        for obj, why in current.items():
            if old.get(obj) != why:
                self._emit(kind, obj, why)
        self.seen[kind] = dict(current)

    def change(self, kind: str, changes: Dict[Hashable, Optional[str]]) -> None:
        """Only the objects that may have changed (None: no longer punts)."""
        seen = self.seen.setdefault(kind, {})
        for obj, why in changes.items():
            if why is None:
                seen.pop(obj, None)
            elif seen.get(obj) != why:
                self._emit(kind, obj, why)
                seen[obj] = why

    def _emit(self, kind, obj, why):
        self.log.warning("unsupported %s %s: %s", kind, obj, why)
