"""A circuit breaker: after a dependency fails, skip it for a while instead of waiting on it again.

Used for Redis (the cache, :mod:`campus_search.retrieval.cache_backends`, and the rate limits) and PostgreSQL
(:mod:`campus_search.storage.db`): while the dependency is known to be down, callers learn it at once instead
of each waiting for its own timeout, which would tie up every server thread during an outage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class CircuitBreaker:
    """Closed until a failure; then open (skip the dependency) for ``pause`` seconds; then half-open:
    exactly one caller tries, and its success closes the circuit again while its failure re-opens it."""

    def __init__(self, pause: float, clock: Callable[[], float] = time.monotonic, *, name: str = "redis",
                 consequence: str = "skipping it") -> None:
        self.pause = pause
        self.clock = clock
        self.name = name
        self.consequence = consequence
        self._open_until = 0.0  # 0 = closed
        self._probing = False
        self._lock = threading.Lock()
        self.failures = 0
        self.last_error: str | None = None

    @property
    def state(self) -> str:
        if not self._open_until:
            return "closed"
        return "half-open" if self.clock() >= self._open_until else "open"

    def allow(self) -> bool:
        if not self._open_until:  # fast path, no lock
            return True
        with self._lock:
            if not self._open_until:
                return True
            if self._probing or self.clock() < self._open_until:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        if self._open_until:
            with self._lock:
                if self._open_until:
                    log.info("%s reachable again; circuit closed", self.name)
                self._open_until, self._probing = 0.0, False

    def failure(self, exc: BaseException) -> None:
        with self._lock:
            if not self._open_until:
                log.warning("%s unavailable (%s); %s for %.1fs", self.name, exc.__class__.__name__,
                            self.consequence, self.pause)
            self._open_until = self.clock() + self.pause
            self._probing = False
            self.failures += 1
            self.last_error = exc.__class__.__name__
