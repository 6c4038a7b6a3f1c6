"""Read routing over streaming replicas (SPEC §5): which node serves a search, and when it may.

``DATABASE_READ_URL`` names one or more read nodes (streaming replicas, or pgbouncer databases in front
of them). Each process probes every replica every ``REPLICA_CHECK_SECONDS`` on a fresh connection (a
background thread; requests never wait for a probe) and reads from the first *eligible* one, starting
at an offset chosen by its pid, so the processes of a host spread over the replicas while each process
keeps reading from one node. A replica is eligible when

- its last probe succeeded (it answers, and it is in recovery, or it is a primary itself);
- its replay lag is at most ``REPLICA_MAX_LAG_SECONDS``: 0 when it has replayed everything the primary
  had written when the probe began (``pg_current_wal_lsn()`` on the primary against
  ``pg_last_wal_replay_lsn()`` on the replica), else the age of its last replayed transaction
  (``pg_last_xact_replay_timestamp()``); when the primary cannot be asked, the replica's own received
  and replayed positions stand in for the primary's;
- it has replayed the **write fence** (read-your-writes, below).

Otherwise searches read from the primary (``DATABASE_URL``), and return to the replica at the first
probe that finds it eligible again. A replica that fails under a request (its pool cannot hand out a
connection within ``REPLICA_CONNECT_TIMEOUT``, or the connection breaks mid-query, or the standby cancels
the query for a recovery conflict) is marked down at once, and the search runs again on the next
node: the caller never sees the replica's failure.

Read-your-writes. Every write that changes what searches see (ingest, document and metadata changes,
deletes: the transactions that move ``index_state.generation``) records the primary's WAL position just
after its commit as the process's write fence, and publishes it to Redis (``<prefix>write-fence``,
kept at its maximum), where every process of every app instance and every CLI command finds it. A search
reads the shared fence first (one Redis GET, only when replicas are configured); a replica whose last
probe had not replayed that far is not eligible, so the search reads from the primary, and from the
replica again once a probe shows it has caught up. A fence newer than the one a process knew also
re-reads the result cache's generation tag, so no cached answer from before the write is served.
Without Redis the fence is only this process's own (the CLI's writes are then not seen by the server
processes until the replica replays them, at most ``REPLICA_MAX_LAG_SECONDS`` later).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from campus_search import metrics
from campus_search.config import redact_url
from campus_search.errors import ServiceUnavailable

log = logging.getLogger(__name__)

#: The node name under which the primary serves reads (in /health and the metrics' ``node`` label).
PRIMARY = "primary"

_REPLICA_PROBE = ("SELECT pg_is_in_recovery(), "
                  "(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)"
                  " - '0/0'::pg_lsn, "
                  "(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() END) - '0/0'::pg_lsn, "
                  "extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())")
PRIMARY_LSN_SQL = "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"


def split_read_urls(value: str | None) -> list[str]:
    """The read nodes of ``DATABASE_READ_URL``: URLs separated by whitespace, or by commas that precede
    the next ``postgres://``/``postgresql://`` (a comma inside one URL, as in libpq's multi-host form,
    stays). A keyword DSN (``host=... dbname=...``) is one node."""
    if not value or not value.strip():
        return []
    if "://" not in value:
        return [value.strip()]
    parts = re.split(r"\s*,\s*(?=postgres(?:ql)?://)|\s+", value.strip())
    return [p for p in parts if p]


class ReplicaFailed(ServiceUnavailable):
    """A read failed because of the replica that served it; the caller may run it again elsewhere."""

    def __init__(self, message: str = "read replica failed") -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class WriteFence:
    """The primary's WAL position (bytes) after the latest search-visible write this process knows of.

    ``shared_get``/``shared_advance`` connect it to every other process (Redis; see the module text)."""

    def __init__(self) -> None:
        self.lsn = 0
        self._lock = threading.Lock()
        self.shared_get: Callable[[], int | None] | None = None
        self.shared_advance: Callable[[int], None] | None = None

    def advance(self, lsn: int, *, publish: bool = True) -> bool:
        """Move the fence forward to ``lsn``; True if it moved."""
        with self._lock:
            moved = lsn > self.lsn
            if moved:
                self.lsn = lsn
        if publish and self.shared_advance is not None:
            try:
                self.shared_advance(lsn)
            except Exception as exc:  # Redis down: other processes fall back on the lag bound
                log.warning("write fence not shared: %s", exc.__class__.__name__)
        return moved

    def sync(self) -> bool:
        """Take in the shared fence; True if it was ahead of this process's."""
        if self.shared_get is None:
            return False
        try:
            shared = self.shared_get()
        except Exception as exc:
            log.debug("write fence not read: %s", exc.__class__.__name__)
            return False
        return shared is not None and self.advance(shared, publish=False)


@dataclass
class Replica:
    """One read node and what its last probe found."""

    name: str
    dsn: str
    pool: ConnectionPool
    up: bool = False
    lag_seconds: float | None = None
    replay_lsn: int = 0
    in_recovery: bool = True
    checked_at: float = 0.0
    error: str | None = "not probed yet"
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: Builds a fresh pool for this replica (see :meth:`ReadRouter._renew_pool`); None keeps the pool.
    new_pool: Callable[[], ConnectionPool] | None = field(default=None, repr=False)
    failed: bool = False  # failed since its pool was made

    def describe(self, max_lag: float, fence: int) -> dict[str, Any]:
        lag = None if self.lag_seconds is None or math.isinf(self.lag_seconds) else round(self.lag_seconds, 3)
        out: dict[str, Any] = {"name": self.name, "target": redact_url(self.dsn), "up": self.up,
                               "lag_seconds": lag, "lag_bound_seconds": max_lag,
                               "in_recovery": self.in_recovery,
                               "replayed_write_fence": self.replay_lsn >= fence,
                               "checked_seconds_ago": round(time.time() - self.checked_at, 3)
                               if self.checked_at else None}
        if self.error:
            out["error"] = self.error
        return out


def replica_lag(in_recovery: bool, replay_lsn: int | None, receive_lsn: int | None,
                replay_age: float | None, primary_lsn: int | None) -> float:
    """Seconds a replica is behind (see the module text); ``inf`` when it cannot be told."""
    if not in_recovery:
        return 0.0
    if replay_lsn is None:
        return math.inf
    reference = primary_lsn if primary_lsn is not None else receive_lsn
    if reference is not None and replay_lsn >= reference:
        return 0.0
    return max(0.0, replay_age) if replay_age is not None else math.inf


class ReadRouter:
    """Chooses the node each read runs on; probes the replicas in a background thread."""

    def __init__(self, primary_pool: ConnectionPool, replicas: list[Replica], *, max_lag: float,
                 check_seconds: float, connect_timeout: float, primary_dsn: str) -> None:
        self.primary_pool = primary_pool
        self.primary_dsn = primary_dsn
        self.replicas = replicas
        self.max_lag = max_lag
        self.check_seconds = check_seconds
        self.connect_timeout = connect_timeout
        self.fence = WriteFence()
        self.primary_lsn: int | None = None
        self.serving = PRIMARY
        self._offset = os.getpid() % len(replicas) if replicas else 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._probe_lock = threading.Lock()

    # ---- life cycle

    def start(self) -> None:
        """Probe once now (so the first search already knows), then every ``check_seconds``."""
        self.probe()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="replica-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.connect_timeout + 5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.check_seconds):
            try:
                self.probe()
            except Exception:  # never let the probe thread die
                log.exception("replica probe failed")

    # ---- probing

    def _connect_timeout(self) -> int:
        return max(1, math.ceil(self.connect_timeout))  # libpq takes whole seconds

    def _primary_lsn(self) -> int | None:
        try:
            with self.primary_pool.connection(timeout=self.connect_timeout) as conn:
                row = conn.execute(PRIMARY_LSN_SQL).fetchone()
            return int(row[0]) if row and row[0] is not None else None
        except Exception as exc:
            log.debug("primary WAL position unknown: %s", exc.__class__.__name__)
            return None

    def probe(self) -> None:
        """Refresh every replica's state (one round of probes)."""
        with self._probe_lock:
            primary_lsn = self._primary_lsn()
            self.primary_lsn = primary_lsn
            for replica in self.replicas:
                self._probe_one(replica, primary_lsn)
            self._publish()

    def _probe_one(self, replica: Replica, primary_lsn: int | None) -> None:
        try:
            with psycopg.connect(replica.dsn, connect_timeout=self._connect_timeout(), prepare_threshold=None,
                                 autocommit=True) as conn:
                conn.execute(f"SET statement_timeout = {int(self.connect_timeout * 1000)}")
                row = conn.execute(_REPLICA_PROBE).fetchone()
        except Exception as exc:
            with replica.lock:
                was_up = replica.up
                replica.up, replica.error, replica.checked_at = False, "unreachable", time.time()
                replica.lag_seconds = None
                replica.failed = True
            if was_up:
                log.warning("read replica %s unreachable (%s): searches read from the primary",
                            replica.name, exc.__class__.__name__)
            return
        assert row is not None
        in_recovery, replay, receive, age = row
        replay_lsn = int(replay) if replay is not None else None
        lag = replica_lag(bool(in_recovery), replay_lsn, int(receive) if receive is not None else None,
                          float(age) if age is not None else None, primary_lsn)
        with replica.lock:
            was_up = replica.up
            replica.up, replica.error, replica.checked_at = True, None, time.time()
            replica.in_recovery, replica.lag_seconds = bool(in_recovery), lag
            replica.replay_lsn = replay_lsn or 0
        if replica.failed:
            self._renew_pool(replica)
        if not was_up:
            log.info("read replica %s answers (lag %s s)", replica.name, "unknown" if math.isinf(lag) else
                     round(lag, 3))

    # ---- choosing

    def why_not(self, replica: Replica, fence: int) -> str | None:
        """None when ``replica`` may serve reads now, else the reason (a metric label)."""
        if not replica.up:
            return "down"
        if replica.lag_seconds is None or replica.lag_seconds > self.max_lag:
            return "lag"
        if replica.replay_lsn < fence:
            return "fence"
        return None

    def _pick(self, fence: int) -> tuple[Replica | None, str | None]:
        """The first eligible replica from this process's offset, or (None, why the first one is not)."""
        n = len(self.replicas)
        reason = None
        for i in range(n):
            replica = self.replicas[(self._offset + i) % n]
            why = self.why_not(replica, fence)
            if why is None:
                return replica, None
            reason = reason or why
        return None, reason

    def choose(self) -> Replica | None:
        """The replica reads go to now, or None for the primary."""
        chosen, reason = self._pick(self.fence.lsn)
        self.serving = chosen.name if chosen else PRIMARY
        if chosen is None and reason is not None:
            metrics.read_fallback(reason)
        return chosen

    def _renew_pool(self, replica: Replica) -> None:
        """A replica that answers again after failing: give it a fresh pool. The old pool's connections
        are broken and its reconnection attempts back off (seconds), so searches sent to it would wait
        for a connection and fall back again."""
        replica.failed = False
        if replica.new_pool is None:
            return
        old, replica.pool = replica.pool, replica.new_pool()
        replica.pool.open(wait=False)
        threading.Thread(target=old.close, name="replica-pool-close", daemon=True).start()

    def mark_down(self, replica: Replica, exc: BaseException) -> None:
        with replica.lock:
            replica.up, replica.error, replica.failed = False, "failed under a request", True
        log.warning("read replica %s failed under a request (%s): reading from the next node until it "
                    "answers a probe", replica.name, exc.__class__.__name__)
        metrics.read_fallback("error")
        self._publish()

    @contextlib.contextmanager
    def connection(self, replica: Replica | None = None,
                   wait: float | None = None) -> Iterator[tuple[psycopg.Connection, Replica | None]]:
        """A pooled connection on the chosen node: ``(conn, replica or None for the primary)``.

        A replica that cannot hand out a connection in time is marked down and the primary is used at
        once. A failure of the replica during the caller's block raises :class:`ReplicaFailed` (after
        marking it down, unless it was a recovery conflict) so the caller can run the read again.
        ``wait``: a caller that holds a connection of this pool already and can do without a second one
        waits this long at most; then PoolTimeout, and the replica is not marked down (it is busy, not
        failing)."""
        replica = replica or self.choose()
        if replica is not None:
            with contextlib.ExitStack() as stack:
                try:
                    conn = stack.enter_context(replica.pool.connection(
                        timeout=self.connect_timeout if wait is None else wait))
                except PoolTimeout as exc:
                    if wait is not None:
                        raise
                    self.mark_down(replica, exc)
                except psycopg.OperationalError as exc:
                    self.mark_down(replica, exc)
                else:
                    try:
                        yield conn, replica
                        return
                    except psycopg.errors.SerializationFailure as exc:
                        # "canceling statement due to conflict with recovery": the replica is fine
                        metrics.read_fallback("conflict")
                        raise ReplicaFailed("read cancelled by the replica's recovery") from exc
                    except psycopg.OperationalError as exc:
                        if not conn.broken:
                            raise
                        self.mark_down(replica, exc)
                        raise ReplicaFailed() from exc
        with self.primary_pool.connection() as conn:
            yield conn, None

    # ---- reporting

    def describe(self) -> dict[str, Any]:
        fence = self.fence.lsn
        chosen, _ = self._pick(fence)
        return {"node": chosen.name if chosen else PRIMARY, "lag_bound_seconds": self.max_lag,
                "replicas": [r.describe(self.max_lag, fence) for r in self.replicas]}

    def _publish(self) -> None:
        chosen, _ = self._pick(self.fence.lsn)
        serving = self.serving = chosen.name if chosen else PRIMARY
        metrics.read_routing(serving, PRIMARY, [(r.name, r.up, r.lag_seconds) for r in self.replicas])
