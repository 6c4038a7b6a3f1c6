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
from psycopg_pool import ConnectionPool, PoolTimeout

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


class Database:
    """Pooled access to PostgreSQL. ``write`` for ingestion and audit, ``read`` for searches.

    Pools are created closed; :meth:`open` opens them (after gunicorn forks, never before).
    """

    def __init__(self, settings: Settings, dsn: str, read_dsn: str | None = None) -> None:
        self.settings = settings
        self.dsn = dsn
        self.read_dsn = read_dsn or dsn
        kwargs: dict[str, Any] = dict(
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_max_size,
            timeout=settings.db_pool_timeout,
            configure=self._configure,
            check=ConnectionPool.check_connection,
            max_waiting=settings.db_pool_max_size * 20,
            open=False,
        )
        self.write_pool = ConnectionPool(
            dsn, name="write", kwargs={"prepare_threshold": prepare_threshold(settings, dsn)}, **kwargs)
        self.read_pool = (ConnectionPool(self.read_dsn, name="read",
                                         kwargs={"prepare_threshold": prepare_threshold(settings, self.read_dsn)},
                                         **kwargs)
                          if self.read_dsn != dsn else self.write_pool)

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
    def connection(self, *, read: bool = False) -> Iterator[psycopg.Connection]:
        """A pooled connection in a transaction, committed on success. Pool exhaustion and lost
        connections become ServiceUnavailable (503), never a hang or a stack trace."""
        pool = self.read_pool if read else self.write_pool
        try:
            with pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise ServiceUnavailable("database busy, try again shortly", headers={"Retry-After": "1"}) from exc
        except psycopg.OperationalError as exc:
            log.warning("database unavailable: %s: %s", exc.__class__.__name__, " ".join(str(exc).split())[:300])
            raise ServiceUnavailable("database unavailable", headers={"Retry-After": "5"}) from exc

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
