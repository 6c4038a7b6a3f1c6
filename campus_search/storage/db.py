"""Database manager: connection pools (the primary, and read replicas through :mod:`.replicas`), versioned
migrations, and the statement timeout of searches.

Timeouts are per transaction (``SET LOCAL statement_timeout``, :meth:`Database.search_settings`) at the
start of each search's transaction, because a session ``SET`` does not stay with one client behind
pgbouncer's transaction pooling. Writes (ingestion, audit) run without one, and migrations explicitly
with none (``SET LOCAL statement_timeout = 0``), so a data-bearing migration on a large database is never
cancelled by a role- or server-level default.
"""

from __future__ import annotations

import functools
import logging
import re
import select
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

import psycopg
from pgvector.psycopg import register_vector
from psycopg_pool import ConnectionPool, PoolTimeout, TooManyRequests
from psycopg_pool.pool import PoolConnection

from campus_search.breaker import CircuitBreaker
from campus_search.config import Settings
from campus_search.errors import ConfigError, ServiceUnavailable
from campus_search.storage.replicas import PRIMARY, PRIMARY_LSN_SQL, ReadRouter, Replica, ReplicaFailed, split_read_urls

log = logging.getLogger(__name__)

MIGRATION_LOCK = 7_450_113  # pg_advisory_lock key: one migrator at a time across processes


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for entry in resources.files("campus_search.storage.migrations").iterdir():
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
        # No timeout: a backfill over a large table must finish, whatever the role's or server's default.
        conn.execute("SET LOCAL statement_timeout = 0")
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


def _can_spare(pool: ConnectionPool) -> bool:
    """Whether ``pool`` can hand out a connection without waiting for one in use: an idle one nobody
    waits for, or room to open one."""
    stats = pool.get_stats()
    idle = stats.get("pool_available", 0) - stats.get("requests_waiting", 0)
    return idle > 0 or stats.get("pool_size", 0) < stats.get("pool_max", 0)


class Database:
    """Pooled access to PostgreSQL. Writes (ingestion, audit) on the primary; reads (searches) on a replica
    chosen by :class:`~campus_search.storage.replicas.ReadRouter` when ``DATABASE_READ_URL`` names any, else on
    the primary.

    Pools are created closed; :meth:`open` opens them (after gunicorn forks, never before).
    Each pool has a :class:`PoolGuard` (circuit breaker); pools give up a reconnection attempt after
    ``DB_RETRY_AFTER`` seconds (psycopg_pool's ``reconnect_timeout``, 5 minutes by default, during which
    its back-off grows to a minute between attempts) and grow again as soon as a request needs them,
    so a database that comes back is used within seconds.
    """

    def __init__(self, settings: Settings, dsn: str, read_dsn: str | None = None) -> None:
        self.settings = settings
        self.dsn = dsn
        self.read_dsns = [u for u in split_read_urls(read_dsn) if u != dsn]
        self.read_dsn = self.read_dsns[0] if self.read_dsns else dsn
        #: Bumped by every search-visible write of this process (:meth:`bump_generation`).
        self.write_epoch = 0
        self._fenced: set[int] = set()
        self.guards: dict[str, PoolGuard] = {}
        self.write_pool = self._pool(dsn, "write")
        self.router: ReadRouter | None = None
        if self.read_dsns:
            replicas = [Replica(f"replica{i}", url, self._pool(url, f"read{i}", replica=True),
                                new_pool=functools.partial(self._pool, url, f"read{i}", replica=True))
                        for i, url in enumerate(self.read_dsns, 1)]
            self.router = ReadRouter(self.write_pool, replicas, max_lag=settings.replica_max_lag_seconds,
                                     check_seconds=settings.replica_check_seconds,
                                     connect_timeout=settings.replica_connect_timeout, primary_dsn=dsn)

    def _pool(self, dsn: str, name: str, *, replica: bool = False) -> ConnectionPool:
        settings = self.settings
        guard = self.guards[name] = PoolGuard(dsn, name, settings)
        timeout = settings.db_pool_timeout
        if replica:  # a replica that cannot hand out a connection soon is skipped (replicas.py), not waited for
            timeout = min(timeout, settings.replica_connect_timeout)
        return ConnectionPool(
            dsn, name=name, kwargs={"prepare_threshold": guard.prepare},
            connection_class=guard.connection_class,
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_max_size,
            timeout=timeout,
            reconnect_timeout=max(settings.db_retry_after, 1.0),
            configure=self._configure,
            check=check_connection,
            max_waiting=settings.db_pool_max_size * 20,
            open=False,
        )

    def guard(self, pool: ConnectionPool) -> PoolGuard:
        return self.guards[pool.name]

    def _configure(self, conn: psycopg.Connection) -> None:
        register_vector(conn)  # client-side only: no session state on the server (pgbouncer-safe)
        conn.commit()

    def pools(self) -> list[ConnectionPool]:
        return [self.write_pool] + ([r.pool for r in self.router.replicas] if self.router else [])

    @property
    def read_pool(self) -> ConnectionPool:
        """The pool reads go to right now (a replica's, or the primary's)."""
        replica = self.router.choose() if self.router else None
        return replica.pool if replica is not None else self.write_pool

    def open(self, wait: bool = True) -> None:
        self.write_pool.open(wait=wait, timeout=max(self.settings.db_pool_timeout, 10.0))
        if self.router:
            for replica in self.router.replicas:
                replica.pool.open(wait=False)  # a replica that is down must not stop the server starting
            self.router.start()

    def close(self) -> None:
        if self.router:
            self.router.stop()
        for pool in self.pools():
            pool.close()

    def search_settings(self) -> str:
        """``SET LOCAL`` statements that start every search transaction (its statement timeout)."""
        return f"SET LOCAL statement_timeout = {int(self.settings.db_statement_timeout_ms)}"

    @contextmanager
    def connection(self, *, read: bool = False, timeout: float | None = None,
                   spare: float | None = None) -> Iterator[psycopg.Connection]:
        """A pooled connection in a transaction, committed on success. Pool exhaustion and lost
        connections become ServiceUnavailable (503), never a hang or a stack trace: "database busy"
        when every connection is in use, "database unavailable" when the server cannot be reached
        (then at once, without waiting, until the circuit breaker lets a probe through).
        ``timeout``: longest wait for a connection (default ``DB_POOL_TIMEOUT``). ``read=True``: on the
        replica the read router chooses, if any (its failure raises ReplicaFailed, see replicas.py; the
        router is that replica's breaker), else on the primary. ``spare``: a connection the caller can do
        without (it holds one of the same pool already, so waiting for one in use could be waiting for
        itself): "database busy" at once unless the pool has one idle or room to open one, and at most
        this long a wait for it; a busy replica is not marked down for it."""
        replica = self.router.choose() if read and self.router is not None else None
        if spare is not None and not _can_spare(replica.pool if replica is not None else self.write_pool):
            raise ServiceUnavailable("database busy, try again shortly", headers={"Retry-After": "1"})
        if replica is not None and self.router is not None:
            try:
                with self.router.connection(replica, wait=spare) as (conn, _node):
                    yield conn
            except ReplicaFailed:
                raise
            except (PoolTimeout, TooManyRequests) as exc:
                raise ServiceUnavailable("database busy, try again shortly", headers={"Retry-After": "1"}) from exc
            except psycopg.OperationalError as exc:
                log.warning("database unavailable: %s", exc.__class__.__name__)
                raise ServiceUnavailable("database unavailable", headers={"Retry-After": "5"}) from exc
            return
        pool = self.write_pool
        guard = self.guard(pool)
        guard.admit()
        try:
            with pool.connection(timeout=spare if spare is not None else timeout) as conn:
                try:
                    yield conn
                except BaseException:
                    self._fenced.discard(id(conn))
                    raise
                if id(conn) in self._fenced:
                    self._fenced.discard(id(conn))
                    self._record_fence(conn)
        except (PoolTimeout, TooManyRequests) as exc:
            if guard.breaker.state != "closed":  # no connection because the server is down, not busy
                raise ServiceUnavailable("database unavailable",
                                         headers={"Retry-After": str(guard.retry_after())}) from exc
            raise ServiceUnavailable("database busy, try again shortly", headers={"Retry-After": "1"}) from exc
        except psycopg.OperationalError as exc:
            if server_unreachable(exc):
                guard.breaker.failure(exc)
            log.warning("database unavailable: %s: %s", exc.__class__.__name__, " ".join(str(exc).split())[:300])
            raise ServiceUnavailable("database unavailable",
                                     headers={"Retry-After": str(guard.retry_after())}) from exc

    def read_statement(self, sql: str, params: Any = None, *, read: bool = False) -> tuple[Any, ...] | None:
        """The first row of one read-only statement, run in autocommit: its own implicit transaction, one
        round trip to PostgreSQL, where :meth:`connection`'s explicit transaction costs three (``BEGIN``,
        the statement, ``COMMIT``). One statement sees one snapshot either way. Same errors as
        :meth:`connection`; pgbouncer-safe (nothing outlives the statement)."""
        with self.connection(read=read) as conn, autocommit(conn):
            return conn.execute(sql, params).fetchone()

    def bump_generation(self, conn: psycopg.Connection) -> None:
        """Move ``index_state.generation`` in the caller's write transaction: cached answers retire, and
        once the transaction commits, the primary's WAL position becomes the write fence (replicas.py)."""
        conn.execute("UPDATE index_state SET generation = generation + 1")
        self.write_epoch += 1
        if self.router is not None:
            self._fenced.add(id(conn))

    def _record_fence(self, conn: psycopg.Connection) -> None:
        assert self.router is not None
        conn.commit()  # the write is durable now; its commit record lies before the position read next
        try:
            row = conn.execute(PRIMARY_LSN_SQL).fetchone()
            conn.commit()
        except psycopg.Error as exc:  # committed all the same; replicas then serve it within the lag bound
            log.warning("write fence not recorded: %s", exc.__class__.__name__)
            return
        if row and row[0] is not None:
            self.router.fence.advance(int(row[0]))

    def stats(self) -> dict[str, Any]:
        pool = self.read_pool
        s = pool.get_stats()
        size = s.get("pool_size", 0)
        return {"pool_size": size, "pool_max": pool.max_size,
                "active_connections": size - s.get("pool_available", 0),
                "requests_waiting": s.get("requests_waiting", 0)}

    def reads(self) -> dict[str, Any]:
        """Which node serves reads, and each replica's state (for /health)."""
        if self.router is None:
            return {"node": PRIMARY, "replicas": []}
        return self.router.describe()

    def generation(self) -> int:
        with self.connection(read=True) as conn:
            row = conn.execute("SELECT generation FROM index_state").fetchone()
        return int(row[0]) if row else 0


@contextmanager
def autocommit(conn: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """``conn`` (a pooled connection, idle) in autocommit mode for the block, then back in transaction
    mode, as the pool hands connections out."""
    conn.autocommit = True
    try:
        yield conn
    finally:
        if not conn.closed:
            conn.autocommit = False


def check_connection(conn: psycopg.Connection) -> None:
    """The pool's check of a connection it is about to hand out, without a round trip when it can.

    A connection that is idle, open and whose socket has nothing to read is handed out as it is: a
    server that ended it (a restart, ``pg_terminate_backend``, an idle timeout) sends a FATAL message
    and closes the socket, which makes it readable. Only then, or when the connection is not plainly
    idle, does the pool's own check run a query (one round trip) and discard the connection if it
    fails. The per-checkout query cost every search two round trips (its own and its audit record's);
    what is no longer caught at checkout, a peer that vanished without closing the socket, fails the
    first statement instead and is answered 503 like any lost connection."""
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the connection is closed")
    pgconn = conn.pgconn
    if (pgconn.status == psycopg.pq.ConnStatus.OK
            and pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE):
        poller = select.poll()  # (not select.select: a descriptor above 1023 would not fit its set)
        poller.register(pgconn.socket, select.POLLIN)
        if not poller.poll(0):
            return
    ConnectionPool.check_connection(conn)


def prepare_threshold(settings: Settings, dsn: str) -> int | None:
    """psycopg's ``prepare_threshold`` for connections to ``dsn`` (DB_PREPARE_THRESHOLD).

    pgbouncer in transaction pooling mode hands each transaction to any server connection, where a
    statement prepared on another one does not exist; ``None`` turns preparation off. ``auto`` prepares
    (after 5 executions, psycopg's default) only on the embedded cluster, which is certainly not behind a
    pooler; a configured URL may lead to one whatever its name or port, so there preparation is off
    unless DB_PREPARE_THRESHOLD gives a number (for a direct connection).
    """
    value = settings.db_prepare_threshold
    if value == "none":
        return None
    if value != "auto":
        return int(value)
    return 5 if settings.embedded_database and dsn not in split_read_urls(settings.database_read_url) else None


def resolve_dsns(settings: Settings) -> tuple[str, str | None]:
    """(write DSN, read DSN or None). Starts the embedded cluster when no database is configured."""
    dsn = settings.dsn()
    if dsn is None:
        from campus_search.storage.embedded_pg import ensure_embedded_database

        dsn = ensure_embedded_database(settings.data_dir)
    return dsn, settings.database_read_url


def ping(conn: Any) -> int:
    """1, from the server: the connection works."""
    return int(conn.execute("SELECT 1").fetchone()[0])


def statement_timeout_sql(seconds: float) -> str:
    """``SET LOCAL statement_timeout`` for this transaction: ``seconds``, in whole milliseconds."""
    return f"SET LOCAL statement_timeout = {int(seconds * 1000)}"
