"""Per-user, per-role rate limits through the app: exact counts, the 429 answer and its headers,
anonymous callers by (proxy-aware) client address, counters in Redis or in memory."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from campus_search import metrics
from campus_search.app import create_app

BODY = {"query": "eduroam wifi", "config": {"max_results": 1}}


@pytest.fixture
def limited_app(settings_factory: Callable[..., Any], services_factory: Callable[..., Any], redis_server: Any,
                redis_prefix: str) -> Callable[..., Any]:
    """factory(redis=True, **settings) -> test client with rate limits on (empty index: searches are cheap)."""

    def make(redis: bool = True, **overrides: Any) -> Any:
        if redis:
            overrides.update(redis_url=redis_server.url, redis_key_prefix=redis_prefix)
        settings = settings_factory(**{"rate_limits_enabled": True, **overrides})
        app = create_app(services_factory(settings))
        app.config["TESTING"] = True
        return app.test_client()

    return make


def post(client: Any, auth: str | None = None, addr: str = "127.0.0.1", **headers: str) -> Any:
    if auth:
        headers["Authorization"] = auth
    return client.post("/api/search", json=BODY, headers=headers, environ_base={"REMOTE_ADDR": addr})


def refused_count(role: str) -> float:
    rows = metrics.samples(["vector_search_rate_limited_requests_total"])["vector_search_rate_limited_requests_total"]
    return sum(v for labels, v in rows if labels.get("user_role") == role)


def ratelimit_field(response: Any) -> tuple[str, int, int]:
    m = re.fullmatch(r'"([a-z0-9-]+)";r=(\d+);t=(\d+)', response.headers["RateLimit"])
    assert m, response.headers["RateLimit"]
    return m.group(1), int(m.group(2)), int(m.group(3))


@pytest.mark.parametrize("redis", [True, False], ids=["redis", "memory"])
def test_limit_is_exact_and_answers_429_with_headers(limited_app: Any, token: Any, redis: bool) -> None:
    client = limited_app(redis=redis, rate_limit_per_minute=5)
    auth = token("student", sub="alice")
    remaining = []
    for _ in range(5):
        r = post(client, auth)
        assert r.status_code == 200
        assert r.headers["RateLimit-Policy"] == '"per-minute";q=5;w=60, "per-hour";q=500;w=3600'
        name, left, reset = ratelimit_field(r)
        assert name == "per-minute" and 1 <= reset <= 60
        remaining.append(left)
    assert remaining == [4, 3, 2, 1, 0]

    before = refused_count("student")
    refused = post(client, auth)
    assert refused.status_code == 429
    assert refused_count("student") == before + 1  # vector_search_rate_limited_requests_total{user_role="student"}
    error = refused.get_json()["error"]
    assert set(error) == {"code", "message", "request_id"} and error["code"] == "rate_limited"
    assert error["request_id"] == refused.headers["X-Request-ID"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert ratelimit_field(refused)[:2] == ("per-minute", 0)
    assert "Traceback" not in refused.get_data(as_text=True)

    # Another user's budget is their own; health and other non-API paths are never counted.
    assert post(client, token("student", sub="bob")).status_code == 200
    assert client.get("/no-such-page").status_code == 404


def test_each_role_gets_its_own_limits(limited_app: Any, token: Any) -> None:
    client = limited_app()
    expected = {"student": (30, 500), "staff": (60, 1000), "academic": (100, 2000), "admin": (200, 5000)}
    for role, (per_minute, per_hour) in expected.items():
        r = post(client, token(role, sub=f"{role}-1"))
        assert r.status_code == 200
        assert r.headers["RateLimit-Policy"] == f'"per-minute";q={per_minute};w=60, "per-hour";q={per_hour};w=3600'
        assert ratelimit_field(r)[1] == per_minute - 1
    # An SSO role name maps to its role's limits.
    r = post(client, token("academic_staff", sub="prof"))
    assert r.headers["RateLimit-Policy"].startswith('"per-minute";q=100;')


def test_per_hour_limit_applies_too(limited_app: Any, token: Any) -> None:
    client = limited_app(roles_json={"student": {"per_minute": 10, "per_hour": 3}})
    auth = token("student", sub="carol")
    assert [post(client, auth).status_code for _ in range(4)] == [200, 200, 200, 429]
    refused = post(client, auth)
    assert ratelimit_field(refused)[0] == "per-hour"
    assert 60 < int(refused.headers["Retry-After"]) <= 3600


def test_the_headers_come_from_the_hit_without_more_redis_round_trips(limited_app: Any, token: Any,
                                                                      redis_server: Any) -> None:
    """With Redis and the default fixed window, each limit costs one call per request (the increment, which
    also returns the window's lifetime); the RateLimit header and a 429's Retry-After need no GET and no
    TTL afterwards (issue 14: round trips per search)."""
    client = limited_app(rate_limit_per_minute=2, cache_enabled=False)
    auth = token("student", sub="erin")
    server = redis_server.client()

    def calls() -> dict[str, int]:
        stats = server.info("commandstats")
        return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "get", "ttl")}

    post(client, auth)  # the scripts are loaded on first use
    before = calls()
    second = post(client, auth)
    after = calls()
    assert second.status_code == 200 and ratelimit_field(second)[:2] == ("per-minute", 0)
    assert {k: after[k] - before[k] for k in after} == {"evalsha": 2, "get": 0, "ttl": 0}
    refused = post(client, auth)
    assert refused.status_code == 429 and ratelimit_field(refused)[:2] == ("per-minute", 0)
    reset = ratelimit_field(refused)[2]
    assert 1 <= reset <= 60 and refused.headers["Retry-After"] == str(reset)
    assert calls()["get"] == after["get"] and calls()["ttl"] == after["ttl"]


def test_anonymous_callers_are_limited_by_client_address(limited_app: Any) -> None:
    client = limited_app(allow_anonymous=True, rate_limit_per_minute=2)
    assert [post(client, addr="198.51.100.7").status_code for _ in range(3)] == [200, 200, 429]
    # A forged X-Forwarded-For from an untrusted peer changes nothing ...
    assert post(client, addr="198.51.100.7", **{"X-Forwarded-For": "203.0.113.99"}).status_code == 429
    # ... another address has its own budget.
    assert post(client, addr="198.51.100.8").status_code == 200


def test_behind_a_trusted_proxy_the_forwarded_address_counts(limited_app: Any) -> None:
    client = limited_app(allow_anonymous=True, rate_limit_per_minute=1, trusted_proxies=("10.0.0.9",))
    proxy = "10.0.0.9"
    assert post(client, addr=proxy, **{"X-Forwarded-For": "203.0.113.1"}).status_code == 200
    assert post(client, addr=proxy, **{"X-Forwarded-For": "203.0.113.1"}).status_code == 429
    assert post(client, addr=proxy, **{"X-Forwarded-For": "203.0.113.2"}).status_code == 200


def test_bad_tokens_are_counted_by_address(limited_app: Any) -> None:
    client = limited_app(rate_limit_per_minute=2)
    codes = [post(client, "Bearer not-a-token", addr="192.0.2.50").status_code for _ in range(3)]
    assert codes == [401, 401, 429]


def test_limits_off_means_no_headers_and_no_429(limited_app: Any, token: Any) -> None:
    client = limited_app(rate_limits_enabled=False, rate_limit_per_minute=1)
    responses = [post(client, token("student")) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert all("RateLimit" not in r.headers and "RateLimit-Policy" not in r.headers for r in responses)


def test_counters_live_under_this_services_prefix(limited_app: Any, token: Any, redis_server: Any,
                                                  redis_prefix: str) -> None:
    client = limited_app()
    post(client, token("staff", sub="dave"))
    keys = [k.decode() for k in redis_server.client().keys(redis_prefix + "rl:*")]
    assert len(keys) == 2 and all("dave" not in k for k in keys)  # minute + hour, subject hashed


def test_the_shared_api_tests_run_with_rate_limits_on(client: Any, token: Any) -> None:
    """conftest's shared app (used by the API tests: search, health, security policy, ...) counts every
    request through the production limiter path, with limits no test reaches."""
    from conftest import HIGH_LIMITS

    r = client.post("/api/search", json={"query": "library opening hours"}, headers={"Authorization": token("student")})
    assert r.status_code == 200
    assert r.headers["RateLimit-Policy"] == (f'"per-minute";q={HIGH_LIMITS["student"]["per_minute"]};w=60, '
                                             f'"per-hour";q={HIGH_LIMITS["student"]["per_hour"]};w=3600')
    remaining = int(r.headers["RateLimit"].split(";r=")[1].split(";")[0])
    again = client.post("/api/search", json={"query": "library opening hours"},
                        headers={"Authorization": token("student")})
    assert int(again.headers["RateLimit"].split(";r=")[1].split(";")[0]) == remaining - 1  # counted
