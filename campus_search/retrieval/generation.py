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
        # (tag, clock reading when its read started): one attribute, so a thread never pairs one read's tag
        # with another read's time
        self._state: tuple[str | None, float] = (None, float("-inf"))

    def current(self) -> str:
        value, read_at = self._state
        if value is not None and self.clock() - read_at < self.max_age:
            return value
        return self.refresh()

    def read_since(self, moment: float) -> str | None:
        """The tag if a read of it (by any thread of this process) started at or after ``moment`` (a
        :attr:`clock` reading) and has finished, else None. Such a read took its snapshot after
        ``moment`` and before now, so it brackets a search that starts now as tightly as a new read
        would, without the round trip."""
        value, read_at = self._state
        return value if value is not None and read_at >= moment else None

    def invalidate(self) -> None:
        """Make the next :meth:`current` read the tag afresh (a write this process knows of moved it)."""
        self._state = (self._state[0], float("-inf"))

    def refresh(self) -> str:
        started = self.clock()  # age counts from before the read: conservative
        value = self._read()
        self._state = (value, started)
        return value


def read_generation(db: Any) -> str:
    """``sysid:database:generation:xmin`` of ``index_state``, from the read pool (where searches run): one
    statement in autocommit, one round trip (``Database.read_statement``)."""
    row = db.read_statement(GENERATION_SQL, read=True)
    if row is None:
        return "none"
    generation, xmin, database, sysid = row
    return f"{sysid}:{database}:{generation}:{xmin}"
