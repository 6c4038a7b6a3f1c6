"""Redis failing under a running app: searches keep answering (uncached), /health's cache component says
degraded, and caching comes back by itself when Redis does. Each test owns its redis-server and kills
(SIGKILL) or freezes (SIGSTOP) it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from test_cache import DOCS, QUERY, ingest

from campus_search.app import create_app


@pytest.fixture
def app_on_own_redis(settings_factory: Callable[..., Any], services_factory: Callable[..., Any],
                     redis_factory: Callable[[], Any]) -> Callable[..., tuple[Any, Any, Any]]:
    def make(**overrides: Any) -> tuple[Any, Any, Any]:
        server = redis_factory()
        settings = settings_factory(redis_url=server.url, redis_timeout=0.2, redis_retry_after=0.3,
                                    rate_limits_enabled=True, **overrides)
        services = services_factory(settings)
        ingest(services, DOCS)
        app = create_app(services)
        app.config["TESTING"] = True
        return server, services, app.test_client()

    return make


def post(client: Any, auth: str) -> Any:
    return client.post("/api/search", json=QUERY, headers={"Authorization": auth})


def search_ok(client: Any, auth: str) -> dict[str, Any]:
    r = post(client, auth)
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def until_cached(client: Any, auth: str, deadline: float = 20.0) -> bool:
    """Search until an answer comes from cache (Redis back and the breaker closed), or give up."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if search_ok(client, auth)["from_cache"]:
            return True
        time.sleep(0.05)
    return False


def test_redis_killed_mid_run_then_restarted(app_on_own_redis: Any, token: Any) -> None:
    server, services, client = app_on_own_redis()
    auth = token("student", sub="s1")
    assert search_ok(client, auth)["from_cache"] is False
    assert search_ok(client, auth)["from_cache"] is True
    assert services.cache.health()["healthy"] is True

    server.kill()
    during = [search_ok(client, auth) for _ in range(5)]
    assert all(b["from_cache"] is False and b["count"] > 0 for b in during)
    backend = services.cache.backend
    assert backend.breaker.failures >= 1 and backend.skipped >= 1  # most calls never touched the dead server
    health = services.cache.health()
    assert health["healthy"] is False and health["status"] == "degraded" and health["required"] is False
    assert health["connection_active"] is False and health["backend"] == "redis"

    server.start()  # same port, empty
    assert until_cached(client, auth), "caching did not resume after Redis came back"
    assert services.cache.health()["healthy"] is True and services.cache.health()["circuit"] == "closed"


def test_hung_redis_costs_timeouts_not_failures(app_on_own_redis: Any, token: Any) -> None:
    server, services, client = app_on_own_redis()
    auth = token("student", sub="s1")
    search_ok(client, auth)
    server.freeze()  # accepts connections, never answers
    try:
        during = [search_ok(client, auth) for _ in range(3)]
        assert all(b["from_cache"] is False for b in during)
        assert services.cache.backend.breaker.last_error == "TimeoutError"
    finally:
        server.thaw()
    assert until_cached(client, auth)


def test_rate_limits_fail_closed_when_configured(app_on_own_redis: Any, token: Any) -> None:
    server, _, client = app_on_own_redis(rate_limit_fail_open=False)
    auth = token("student", sub="s1")
    assert post(client, auth).status_code == 200
    server.kill()
    for _ in range(3):  # first a failed call, then the open breaker answers without trying Redis
        r = post(client, auth)
        assert r.status_code == 503
        assert r.get_json()["error"]["code"] == "service_unavailable"
        assert int(r.headers["Retry-After"]) >= 1
    assert client.get("/no-such-page").status_code == 404  # only rate-limited endpoints are refused
    server.start()
    end = time.monotonic() + 20
    while post(client, auth).status_code != 200:
        assert time.monotonic() < end, "rate limiting did not recover"
        time.sleep(0.05)


def test_rate_limits_fail_open_by_default(app_on_own_redis: Any, token: Any) -> None:
    server, _, client = app_on_own_redis(rate_limit_per_minute=3)
    auth = token("student", sub="s1")
    server.kill()
    # Redis is gone: still limited, now per process in memory (flask-limiter's fallback).
    codes = [post(client, auth).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
