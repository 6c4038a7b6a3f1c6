"""A small thread-safe LRU whose entries expire: the process-local memo behind the verified-token cache
(security/auth.py) and the searcher's visible shares (retrieval/search.py). Base layer: imports nothing
from campus_search."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


def _monotonic() -> float:
    return time.monotonic()  # looked up on each call, so the clock follows time.monotonic as it is now


class ExpiringLRU(Generic[K, V]):
    """At most ``size`` entries, each kept until its own deadline on ``clock``; the least recently used goes
    first when full. An expired entry is a miss (and is dropped)."""

    def __init__(self, size: int, clock: Callable[[], float] | None = None) -> None:
        self.size = size
        self.clock = clock or _monotonic
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= self.clock():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: K, value: V, until: float) -> None:
        """Keep ``value`` until ``until`` (a time on ``clock``)."""
        with self._lock:
            self._entries[key] = (until, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
