"""pgbouncer transaction pooling compatibility: prepared statements off when going through pgbouncer,
and migrations that take only a transaction-scoped lock."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from campus_search.config import Settings, load_settings
from campus_search.db import MIGRATION_LOCK, Database, migrate, prepare_threshold
from campus_search.errors import ConfigError


@pytest.mark.parametrize(("setting", "dsn", "expected"), [
    ("auto", "postgresql://app:pw@pgbouncer:6432/campus_search", None),
    ("auto", "postgresql://app:pw@db.example.org:6432/campus_search", None),
    ("auto", "host=pgbouncer-ro port=5432 dbname=campus_search", None),
    ("auto", "postgresql://app:pw@primary:5432/campus_search", 5),
    ("none", "postgresql://app:pw@primary:5432/campus_search", None),
    ("0", "postgresql://app:pw@pgbouncer:6432/campus_search", 0),
    ("12", "postgresql://app:pw@primary/campus_search", 12),
])
def test_prepare_threshold(setting: str, dsn: str, expected: int | None) -> None:
    assert prepare_threshold(Settings(db_prepare_threshold=setting, data_dir="/x"), dsn) == expected


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
