"""GET /health, /health/live, /health/ready and /api/admin/stats on the demo corpus."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from conftest import TEST_SECRET

from campus_search.app import create_app
from campus_search.ops.health import _Cached, _timed


@pytest.fixture(scope="module")
def ops_app(demo_services_with: Any) -> Any:
    """The demo app with health results reused for a long time (to observe the caching)."""
    app = create_app(demo_services_with(health_cache_seconds=300.0))
    app.config["TESTING"] = True
    return app


def test_health_reports_every_component(client: Any, demo_services: Any) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    body = r.get_json()
    assert body["overall_healthy"] is True
    assert isinstance(body["timestamp"], float)
    comps = body["components"]
    assert set(comps) == {"database", "embedding_service", "cache", "search_functionality"}
    for comp in comps.values():
        assert comp["healthy"] is True
        assert isinstance(comp["response_time"], float) and comp["response_time"] >= 0
    with demo_services.db.connection(read=True) as conn:
        chunks = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
    assert comps["database"]["chunk_count"] == chunks > 0
    assert comps["database"]["pool_size"] >= 1
    assert comps["embedding_service"]["embedding_length"] == 384
    assert comps["cache"]["connection_active"] is False  # in-process cache: there is no connection
    assert comps["search_functionality"]["end_to_end_functional"] is True
    assert comps["search_functionality"]["results_returned"] == 1


def test_health_leaks_no_secret_and_no_document_text(client: Any, demo_services: Any) -> None:
    text = client.get("/health").get_data(as_text=True)
    settings = demo_services.settings
    for secret in (TEST_SECRET, settings.audit_hmac_key, settings.database_url, settings.data_dir):
        assert secret and secret not in text
    with demo_services.db.connection(read=True) as conn:
        snippets = [row[0][:40] for row in conn.execute("SELECT text FROM chunks")]
    assert not any(s in text for s in snippets)
    assert "postgres" not in text.lower()


def test_probes(client: Any) -> None:
    live = client.get("/health/live")
    assert live.status_code == 200 and live.get_json()["alive"] is True
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.get_json() == {"ready": True, "checks": {"database": True, "model": True}}
    assert client.head("/health/live").status_code == 200


def test_health_needs_no_token_but_refuses_other_methods(client: Any) -> None:
    assert client.get("/health").status_code == 200  # no Authorization header
    r = client.post("/health")
    assert r.status_code == 405 and r.get_json()["error"]["code"] == "method_not_allowed"


def test_health_results_are_reused_within_the_interval(ops_app: Any, demo_services: Any) -> None:
    """Within HEALTH_CACHE_SECONDS (the app's setting, 300 s here) the same report is served: proven by
    the chunk count, which a fresh check would read anew after the statistics row changed."""
    c = ops_app.test_client()
    first = c.get("/health").get_json()
    real = first["components"]["database"]["chunk_count"]
    with demo_services.db.connection() as conn:  # change what a fresh check would read, then undo it
        conn.execute("UPDATE lexical_stats SET chunks = chunks + 1000")
        conn.commit()
        try:
            again = [c.get("/health").get_json() for _ in range(3)]
        finally:
            conn.execute("UPDATE lexical_stats SET chunks = chunks - 1000")
            conn.commit()
    assert [r["timestamp"] for r in again] == [first["timestamp"]] * 3
    assert [r["components"]["database"]["chunk_count"] for r in again] == [real] * 3
    assert ops_app.extensions["campus_search"].health._report.ttl == 300.0  # the settings of the app's Services


def test_concurrent_checks_run_once() -> None:
    calls: list[int] = []
    gate = threading.Event()

    def compute() -> dict[str, Any]:
        gate.wait(5)
        calls.append(1)
        return {"n": len(calls)}

    cached = _Cached(300.0, compute)
    results: list[dict[str, Any]] = []
    threads = [threading.Thread(target=lambda: results.append(cached.get())) for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert calls == [1] and results == [{"n": 1}] * 8
    assert _Cached(0.0, compute).get() == {"n": 2} and len(calls) == 2  # ttl 0: computed every time


# ---- /api/admin/stats

def test_admin_stats_shape_and_values(client: Any, token: Any, demo_services: Any) -> None:
    """Counters are session-wide (other tests search too), so every figure is checked as the change one
    known zero-result search by a Library staff member makes (as test_metrics.py does)."""
    admin = token("it_administrator", sub="admin-1")
    staff = token("professional_services", departments=["Library"])
    before = client.get("/api/admin/stats", headers={"Authorization": admin}).get_json()
    r = client.post("/api/search", json={"query": "qqxz none", "config": {"similarity_threshold": 0.99}},
                    headers={"Authorization": staff})
    assert r.status_code == 200 and r.get_json()["count"] == 0
    r = client.get("/api/admin/stats", headers={"Authorization": admin})
    assert r.status_code == 200
    body = r.get_json()
    assert set(body["database"]) >= {"pool_size", "active_connections"}
    assert set(body["cache"]) >= {"used_memory", "connected_clients", "keyspace_hits", "keyspace_misses"}
    assert set(body["system"]) >= {"uptime", "requests_total", "avg_response_time"}
    assert body["database"]["pool_size"] >= 1
    # the first stats request and the search have been answered since `before`
    assert body["system"]["requests_total"] - before["system"]["requests_total"] == 2
    assert body["system"]["avg_response_time"] > 0
    assert body["system"]["uptime"] >= before["system"]["uptime"] > 0
    with demo_services.db.connection(read=True) as conn:
        docs, chunks = conn.execute("SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM chunks)"
                                    ).fetchone()
    assert body["index"]["documents"] == docs and body["index"]["chunks"] == chunks
    with demo_services.db.connection(read=True) as conn:  # the searching server's shared memory, as it says
        size, status = conn.execute("SELECT pg_size_bytes(current_setting('shared_memory_size')), "
                                    "current_setting('huge_pages_status')").fetchone()
    assert body["database"]["shared_memory_mb"] == size // 2**20 > 0
    assert body["database"]["huge_pages"] == status and status in {"on", "off", "unknown"}

    def delta(path: tuple[str, ...], key: str) -> Any:
        new, old = body, before
        for part in path:
            new, old = new[part], old[part]
        return new.get(key, 0) - old.get(key, 0)

    assert delta(("searches", "zero_results_by_department"), "Library") == 1
    assert delta(("searches", "by_role"), "staff") == 1
    audit = body["audit"]  # the same, from the audit log (survives restarts)
    assert audit["days"] == 30
    assert delta(("audit",), "searches") == 1 and delta(("audit",), "zero_result_searches") == 1
    assert delta(("audit", "zero_results_by_department"), "Library") == 1
    text = json.dumps(body)
    assert "qqxz" not in text and "admin-1" not in text  # aggregates only


@pytest.mark.parametrize("role", ["student", "professional_services", "academic_staff"])
def test_admin_stats_refuses_non_admins(client: Any, token: Any, role: str) -> None:
    r = client.get("/api/admin/stats", headers={"Authorization": token(role)})
    assert r.status_code == 403
    assert r.get_json()["error"]["code"] == "forbidden"


def test_admin_stats_needs_a_token(client: Any, token: Any) -> None:
    assert client.get("/api/admin/stats").status_code == 401
    bad = client.get("/api/admin/stats", headers={"Authorization": "Bearer not-a-token"})
    assert bad.status_code == 401
    admin = token("admin")
    assert client.get("/api/admin/stats?days=abc", headers={"Authorization": admin}).status_code == 400
    assert client.get("/api/admin/stats?days=0", headers={"Authorization": admin}).status_code == 400


def test_redis_down_degrades_but_stays_healthy(settings_factory: Any, services_factory: Any) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = settings_factory(redis_url=f"redis://127.0.0.1:{port}/0", health_cache_seconds=0.0)
    app = create_app(services_factory(settings))
    r = app.test_client().get("/health")
    assert r.status_code == 200  # searches still work uncached: no reason to leave the load balancer
    body = r.get_json()
    assert body["overall_healthy"] is True and body["degraded"] is True
    cache = body["components"]["cache"]
    assert cache["healthy"] is False and cache["connection_active"] is False
    assert body["components"]["search_functionality"]["end_to_end_functional"] is True
    assert str(port) not in r.get_data(as_text=True)


# ---- the database check reads maintained statistics, not the whole index

def _health_docs(n: int) -> list[Any]:
    from campus_search.ingest.sources import Block, ParsedDocument

    return [ParsedDocument(external_id=f"h{i}", title=f"Health doc {i}", source=f"h{i}",
                           blocks=[Block(f"Paragraph {j} of health document {i} about printing credit and "
                                         f"library opening hours. " * 3) for j in range(1 + i % 3)], metadata={})
            for i in range(n)]


def test_chunk_count_is_exact_after_ingest_and_delete_without_scanning_chunks(
        settings_factory: Any, services_factory: Any) -> None:
    """``chunk_count`` equals the real number of chunks after adds and deletes, and the check reads no
    chunk: it answers while a writer holds an exclusive lock on ``chunks`` (count(*) would wait there
    until HEALTH_TIMEOUT and report the database unhealthy)."""
    import psycopg

    from campus_search.ingest.metadata import AccessMetadata
    from campus_search.ops.health import HealthMonitor

    settings = settings_factory(health_cache_seconds=0.0, health_timeout=1.0)
    services = services_factory(settings)
    monitor = HealthMonitor(services)

    def real() -> int:
        with services.db.connection(read=True) as conn:
            return int(conn.execute("SELECT count(*) FROM chunks").fetchone()[0])

    assert monitor._database()["chunk_count"] == real() == 0
    assert services.ingester.ingest(_health_docs(6), AccessMetadata()).failed == 0
    assert monitor._database()["chunk_count"] == real() >= 6
    assert services.ingester.delete(["h1", "h2"]) == 2
    assert monitor._database()["chunk_count"] == real() > 0
    with psycopg.connect(settings.database_url) as locker:
        locker.execute("LOCK TABLE chunks IN ACCESS EXCLUSIVE MODE")
        database = _timed(monitor._database, "database unreachable or not answering")
        locker.rollback()
    assert database["healthy"] is True, database
    assert database["chunk_count"] == real()
