"""Database manager: connection pools (write + optional read replica) and versioned migrations."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

import psycopg
from pgvector.psycopg import register_vector
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout, TooManyRequests
from psycopg_pool.pool import PoolConnection

from .breaker import CircuitBreaker
from .config import Settings
from .errors import ConfigError, ServiceUnavailable

log = logging.getLogger(__name__)

MIGRATION_LOCK = 7_450_113  # pg_advisory_lock key: one migrator at a time across processes


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for entry in resources.files("campus_search.migrations").iterdir():
        m = re.match(r"(\d+)_(.+)\.sql$", entry.name)
        if m:
            found.append((int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    return sorted(found)


def migrate(dsn: str, *, model: str, dimension: int) -> int:
    """Apply pending migrations under an advisory lock; check the index matches the embedding model.

    Returns the schema version. Raises ConfigError if the stored vectors come from another model.
    """
    # One transaction holding a transaction-scoped lock: a session lock would be taken and released on
    # different server connections behind pgbouncer in transaction pooling mode.
    with psycopg.connect(dsn, prepare_threshold=None) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                            version integer PRIMARY KEY, name text NOT NULL,
                            applied_at timestamptz NOT NULL DEFAULT now())""")
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        version = max(applied, default=0)
        for number, name, sql in _migrations():
            if number in applied:
                continue
            log.info("applying migration %03d_%s", number, name)
            with conn.transaction():
                conn.execute(sql.replace("{dim}", str(int(dimension))).encode())
                conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                             (number, name))
            version = number
        row = conn.execute("SELECT model, dimension FROM index_state").fetchone()
        if row is None:
            conn.execute("INSERT INTO index_state (model, dimension) VALUES (%s, %s)", (model, dimension))
        elif row[1] != dimension or row[0] != model:
            # Vectors of two models are not comparable, even at the same dimension.
            raise ConfigError(
                f"the index holds {row[1]}-dimensional vectors from model {row[0]!r}, but the configured "
                f"model is {model!r} ({dimension} dimensions); configure the original model, or point "
                "DATABASE_URL (or DATA_DIR) at a new database and ingest the documents again")
        return version


#: SQLSTATEs that mean the server cannot be used right now (not that a statement failed):
#: class 08 (connection exception), admin/crash shutdown, and "cannot connect now" (starting up).
_DOWN_STATES = ("08", "57P01", "57P02", "57P03")


def server_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` says the database server is down or unreachable, rather than that a statement
    failed (a statement timeout, a lock wait, a constraint): only the former should trip the breaker."""
    if isinstance(exc, (PoolTimeout, TooManyRequests)) or not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith(_DOWN_STATES)


class PoolGuard:
    """A pool's circuit breaker. Connection attempts (the pool's own, in the background, and a request's)
    report to it; while it is open, requests fail at once with 503 "database unavailable" instead of each
    waiting ``DB_POOL_TIMEOUT`` for a server that is known to be down. After ``DB_RETRY_AFTER`` seconds one
    request probes the server with a direct connection of its own (the pool may be between reconnection
    attempts); when that works, the circuit closes and the pool refills at once.
    """

    def __init__(self, dsn: str, name: str, settings: Settings) -> None:
        self.dsn = dsn
        self.breaker = CircuitBreaker(settings.db_retry_after, name=f"database ({name} pool)",
                                      consequence="requests fail at once with 503")
        self.probe_timeout = max(1, round(min(settings.db_pool_timeout, settings.health_timeout)))
        self.prepare = prepare_threshold(settings, dsn)
        guard = self

        class GuardedConnection(PoolConnection):
            @classmethod
            def connect(cls, *args: Any, **kwargs: Any) -> Any:
                try:
                    conn = super().connect(*args, **kwargs)
                except psycopg.OperationalError as exc:
                    guard.breaker.failure(exc)
                    raise
                guard.breaker.success()
                return conn

        self.connection_class = GuardedConnection

    def admit(self) -> None:
        """Raise ServiceUnavailable unless the circuit is closed or this caller may probe the server."""
        if not self.breaker.allow():
            raise ServiceUnavailable("database unavailable", headers={"Retry-After": str(self.retry_after())})
        if self.breaker.state == "closed":
            return
        try:  # half-open, and this caller is the one probe: a connection of its own, not a pool wait
            psycopg.connect(self.dsn, connect_timeout=self.probe_timeout, prepare_threshold=self.prepare,
                            autocommit=True).close()
        except Exception as exc:
            self.breaker.failure(exc)
            raise ServiceUnavailable("database unavailable",
                                     headers={"Retry-After": str(self.retry_after())}) from exc
        self.breaker.success()

    def retry_after(self) -> int:
        return max(1, round(self.breaker.pause))


class Database:
    """Pooled access to PostgreSQL. ``write`` for ingestion and audit, ``read`` for searches.

    Pools are created closed; :meth:`open` opens them (after gunicorn forks, never before).
    Each pool has a :class:`PoolGuard` (circuit breaker); pools give up a reconnection attempt after
    ``DB_RETRY_AFTER`` seconds (psycopg_pool's ``reconnect_timeout``, 5 minutes by default, during which
    its back-off grows to a minute between attempts) and grow again as soon as a request needs them,
    so a database that comes back is used within seconds.
    """

    def __init__(self, settings: Settings, dsn: str, read_dsn: str | None = None) -> None:
        self.settings = settings
        self.dsn = dsn
        self.read_dsn = read_dsn or dsn
        self.guards: dict[str, PoolGuard] = {}
        self.write_pool = self._pool(dsn, "write")
        self.read_pool = self._pool(self.read_dsn, "read") if self.read_dsn != dsn else self.write_pool

    def _pool(self, dsn: str, name: str) -> ConnectionPool:
        settings = self.settings
        guard = self.guards[name] = PoolGuard(dsn, name, settings)
        return ConnectionPool(
            dsn, name=name, kwargs={"prepare_threshold": guard.prepare},
            connection_class=guard.connection_class,
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_max_size,
            timeout=settings.db_pool_timeout,
            reconnect_timeout=max(settings.db_retry_after, 1.0),
            configure=self._configure,
            check=ConnectionPool.check_connection,
            max_waiting=settings.db_pool_max_size * 20,
            open=False,
        )

    def guard(self, pool: ConnectionPool) -> PoolGuard:
        return self.guards[pool.name]

    def _configure(self, conn: psycopg.Connection) -> None:
        register_vector(conn)
        conn.execute("SELECT set_config('statement_timeout', %s, false)",
                     (str(self.settings.db_statement_timeout_ms),))
        conn.commit()

    def open(self, wait: bool = True) -> None:
        for pool in {id(p): p for p in (self.write_pool, self.read_pool)}.values():
            pool.open(wait=wait, timeout=max(self.settings.db_pool_timeout, 10.0))

    def close(self) -> None:
        for pool in {id(p): p for p in (self.write_pool, self.read_pool)}.values():
            pool.close()

    @contextmanager
    def connection(self, *, read: bool = False, timeout: float | None = None) -> Iterator[psycopg.Connection]:
        """A pooled connection in a transaction, committed on success. Pool exhaustion and lost
        connections become ServiceUnavailable (503), never a hang or a stack trace: "database busy"
        when every connection is in use, "database unavailable" when the server cannot be reached
        (then at once, without waiting, until the circuit breaker lets a probe through).
        ``timeout``: longest wait for a connection (default ``DB_POOL_TIMEOUT``)."""
        pool = self.read_pool if read else self.write_pool
        guard = self.guard(pool)
        guard.admit()
        try:
            with pool.connection(timeout=timeout) as conn:
                yield conn
        except (PoolTimeout, TooManyRequests) as exc:
            if guard.breaker.state != "closed":  # no connection because the server is down, not busy
                raise ServiceUnavailable("database unavailable",
                                         headers={"Retry-After": str(guard.retry_after())}) from exc
            raise ServiceUnavailable("database busy, try again shortly", headers={"Retry-After": "1"}) from exc
        except psycopg.OperationalError as exc:
            if server_unreachable(exc):
                guard.breaker.failure(exc)
            log.warning("database unavailable: %s", exc.__class__.__name__)
            raise ServiceUnavailable("database unavailable",
                                     headers={"Retry-After": str(guard.retry_after())}) from exc

    def stats(self) -> dict[str, Any]:
        s = self.read_pool.get_stats()
        size = s.get("pool_size", 0)
        return {"pool_size": size, "pool_max": self.read_pool.max_size,
                "active_connections": size - s.get("pool_available", 0),
                "requests_waiting": s.get("requests_waiting", 0)}

    def generation(self) -> int:
        with self.connection(read=True) as conn:
            row = conn.execute("SELECT generation FROM index_state").fetchone()
        return int(row[0]) if row else 0


def prepare_threshold(settings: Settings, dsn: str) -> int | None:
    """psycopg's ``prepare_threshold`` for connections to ``dsn`` (DB_PREPARE_THRESHOLD).

    pgbouncer in transaction pooling mode hands each transaction to any server connection, where a
    statement prepared on another one does not exist; ``None`` turns preparation off.
    """
    value = settings.db_prepare_threshold
    if value == "none":
        return None
    if value != "auto":
        return int(value)
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return 5
    if "pgbouncer" in str(info.get("host", "")).lower() or str(info.get("port", "")) == "6432":
        return None
    return 5  # psycopg's default


def resolve_dsns(settings: Settings) -> tuple[str, str | None]:
    """(write DSN, read DSN or None). Starts the embedded cluster when no database is configured."""
    dsn = settings.dsn()
    if dsn is None:
        from .embedded_pg import ensure_embedded_database

        dsn = ensure_embedded_database(settings.data_dir)
    return dsn, settings.database_read_url
