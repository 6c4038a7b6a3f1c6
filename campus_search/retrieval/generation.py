"""The index generation tag that keys the result cache: ``index_state.generation`` (bumped with every
change to the index) with the row's ``xmin``, the database name and the cluster's identifier, re-read
at most every ``CACHE_GENERATION_CHECK`` seconds on the hit path."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: One statement, so every part comes from the same snapshot.
GENERATION_SQL = ("SELECT i.generation, i.xmin::text, current_database(), "
                  "(SELECT system_identifier FROM pg_control_system())::text FROM index_state i")


class GenerationTracker:
    """The index generation tag, re-read at most every ``max_age`` seconds on the hit path."""

    def __init__(self, read: Callable[[], str], max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self.max_age = max_age
        self.clock = clock
        self._value: str | None = None
        self._read_at = float("-inf")

    def current(self) -> str:
        if self._value is not None and self.clock() - self._read_at < self.max_age:
            return self._value
        return self.refresh()

    def invalidate(self) -> None:
        """Make the next :meth:`current` read the tag afresh (a write this process knows of moved it)."""
        self._read_at = float("-inf")

    def refresh(self) -> str:
        started = self.clock()  # age counts from before the read: conservative
        value = self._read()
        self._value, self._read_at = value, started
        return value


def read_generation(db: Any) -> str:
    """``sysid:database:generation:xmin`` of ``index_state``, from the read pool (where searches run)."""
    with db.connection(read=True) as conn:
        row = conn.execute(GENERATION_SQL).fetchone()
    if row is None:
        return "none"
    generation, xmin, database, sysid = row
    return f"{sysid}:{database}:{generation}:{xmin}"
