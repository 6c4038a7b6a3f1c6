"""pgbouncer transaction pooling compatibility: prepared statements off when going through pgbouncer,
and migrations that take only a transaction-scoped lock."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from campus_search.config import Settings, load_settings
from campus_search.errors import ConfigError
from campus_search.storage.db import MIGRATION_LOCK, Database, migrate, prepare_threshold


@pytest.mark.parametrize(("setting", "dsn", "expected"), [
    # a configured URL may lead to a pooler whatever its name or port: never prepared unless told
    ("auto", "postgresql://app:pw@pgbouncer:6432/campus_search", None),
    ("auto", "postgresql://app:pw@db.example.org:6432/campus_search", None),
    ("auto", "postgresql://app:pw@pool.example.org:5432/campus_search", None),
    ("auto", "postgresql://app:pw@primary:5432/campus_search", None),
    ("none", "postgresql://app:pw@primary:5432/campus_search", None),
    ("0", "postgresql://app:pw@pgbouncer:6432/campus_search", 0),
    ("12", "postgresql://app:pw@primary/campus_search", 12),
])
def test_prepare_threshold(setting: str, dsn: str, expected: int | None) -> None:
    settings = Settings(db_prepare_threshold=setting, data_dir="/x", database_url=dsn)
    assert prepare_threshold(settings, dsn) == expected


def test_prepare_threshold_auto_prepares_only_on_the_embedded_cluster() -> None:
    """The embedded cluster (no DATABASE_URL/DB_HOST) is ours, on a Unix socket: certainly direct."""
    embedded = "postgresql://postgres:@/campus_search?host=/data/pgdata"
    assert prepare_threshold(Settings(data_dir="/x"), embedded) == 5
    assert prepare_threshold(Settings(data_dir="/x", db_host="pgbouncer.internal", db_port=5432),
                             "postgresql://u@pgbouncer.internal:5432/db") is None
    # a read URL configured beside the embedded primary is not assumed direct either
    assert prepare_threshold(Settings(data_dir="/x", database_read_url="postgresql://u@r:5432/db"),
                             "postgresql://u@r:5432/db") is None


def test_prepare_threshold_setting_is_validated(tmp_path: Path) -> None:
    assert load_settings({"DATA_DIR": str(tmp_path), "DB_PREPARE_THRESHOLD": "None"}).db_prepare_threshold == "none"
    with pytest.raises(ConfigError, match="DB_PREPARE_THRESHOLD"):
        load_settings({"DATA_DIR": str(tmp_path), "DB_PREPARE_THRESHOLD": "sometimes"})


def test_pool_connections_follow_the_setting(make_database: Callable[[], str], tmp_path: Path) -> None:
    dsn = make_database()
    settings = load_settings({"DATABASE_URL": dsn, "DATA_DIR": str(tmp_path), "DB_PREPARE_THRESHOLD": "none",
                              "DB_POOL_MIN_SIZE": "0", "DB_POOL_MAX_SIZE": "2"})
    migrate(dsn, model="all-MiniLM-L6-v2", dimension=384)
    db = Database(settings, dsn)
    db.open()
    try:
        with db.connection() as conn:
            assert conn.prepare_threshold is None
            for _ in range(8):  # more executions than psycopg's default threshold: still nothing prepared
                conn.execute("SELECT generation FROM index_state").fetchone()
            assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
    finally:
        db.close()


def test_migration_lock_is_transaction_scoped(make_database: Callable[[], str]) -> None:
    """No session-level advisory lock survives a migration (it would leak onto a pooled server connection)."""
    dsn = make_database()
    with psycopg.connect(dsn, autocommit=True) as watcher:
        assert migrate(dsn, model="all-MiniLM-L6-v2", dimension=384) >= 1
        held: Any = watcher.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s",
                                    (MIGRATION_LOCK,)).fetchone()
        assert held == (0,)
        # and a second run is a no-op that still checks the model's dimension
        assert migrate(dsn, model="all-MiniLM-L6-v2", dimension=384) >= 1
        with pytest.raises(ConfigError, match="384-dimensional"):
            migrate(dsn, model="other", dimension=768)


def test_migrations_run_without_a_statement_timeout(make_database: Callable[[], str]) -> None:
    """A role- or database-level statement_timeout (the old postgres/init-primary.sh set 10 s on the role)
    must not cancel a data-bearing migration on a large database at start-up."""
    dsn = make_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET statement_timeout = 1', "
                     "current_database()); END $$")
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    with psycopg.connect(dsn) as conn:  # the default really is in force for new sessions
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1ms",)
    assert migrate(dsn, model="all-MiniLM-L6-v2", dimension=384) >= 1


def test_search_transactions_carry_their_own_statement_timeout(make_database: Callable[[], str],
                                                               tmp_path: Path) -> None:
    """DB_STATEMENT_TIMEOUT_MS is SET LOCAL in each search transaction: in force for the search's
    statements, gone when the transaction ends (so nothing stays on a server connection that pgbouncer
    hands to another client), and absent from write transactions."""
    from campus_search.retrieval.search import Searcher

    dsn = make_database()
    settings = load_settings({"DATABASE_URL": dsn, "DATA_DIR": str(tmp_path), "DB_STATEMENT_TIMEOUT_MS": "1234",
                              "DB_POOL_MIN_SIZE": "0", "DB_POOL_MAX_SIZE": "1"})
    migrate(dsn, model="all-MiniLM-L6-v2", dimension=384)
    db = Database(settings, dsn)
    db.open()
    try:
        searcher = Searcher(db, embedder=None)  # type: ignore[arg-type]
        assert searcher._fetch("SELECT current_setting('statement_timeout')", {}, 1) == [("1234ms",)]
        with db.connection() as conn:  # the same (only) pooled connection, a write transaction
            assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
    finally:
        db.close()
