"""A fixed-bucket latency histogram the agent fills and `status` reports
(Prometheus histogram semantics: cumulative counts per upper bound)."""

import threading
from typing import Dict, List

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    def __init__(self, buckets=BUCKETS):
        self.bounds = tuple(buckets)
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0
        self._count = 0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._sum += seconds
            self._count += 1
            for i, bound in enumerate(self.bounds):
                if seconds <= bound:
                    self._counts[i] += 1
                    break

    def snapshot(self) -> Dict[str, object]:
        """{"buckets": [[le, cumulative count], ...], "sum": s, "count": n}."""
        with self._lock:
            cumulative: List[List[float]] = []
            running = 0
            for bound, n in zip(self.bounds, self._counts):
                running += n
                cumulative.append([bound, running])
            return {"buckets": cumulative, "sum": self._sum, "count": self._count}
