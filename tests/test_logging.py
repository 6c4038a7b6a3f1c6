"""Structured logs: JSON lines with request ids, no query text; X-Request-ID only from trusted proxies."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from campus_search.app import create_app
from campus_search.ops.logs import configure_logging, request_id_for

SECRET_QUERY = "quokka zebra confidential grievance about my supervisor"


@pytest.fixture
def log_stream(demo_services: Any) -> Iterator[Any]:
    """Capture the service's log output (JSON) for the duration of a test, then restore logging."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = configure_logging(demo_services.settings.replace(log_format="json", log_level="INFO"), stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def records(stream: Any) -> list[dict[str, Any]]:
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    assert lines, "nothing was logged"
    return [json.loads(line) for line in lines]  # every line must be one JSON object


def test_access_log_lines_are_json_with_request_ids(client: Any, token: Any, log_stream: Any) -> None:
    auth = token("professional_services", sub="staff-log-1", departments=["IT Services"])
    r = client.post("/api/search", json={"query": SECRET_QUERY}, headers={"Authorization": auth})
    assert r.status_code == 200
    bad = client.post("/api/search", json={"query": SECRET_QUERY, "filters": {"nope": 1}},
                      headers={"Authorization": auth})
    assert bad.status_code == 400
    missing = client.get("/no/such/page")
    assert missing.status_code == 404

    recs = records(log_stream)
    access = [rec for rec in recs if rec["logger"] == "campus_search.access"]
    by_id = {rec["request_id"]: rec for rec in access}
    ok = by_id[r.headers["X-Request-ID"]]
    assert ok["request_id"] == r.get_json()["request_id"]
    assert ok["method"] == "POST" and ok["path"] == "/api/search" and ok["status"] == 200
    assert ok["endpoint"] == "search.search_documents"
    assert ok["user_id"] == "staff-log-1" and ok["role"] == "staff"
    assert isinstance(ok["latency_ms"], float) and ok["latency_ms"] > 0
    assert {"ts", "level", "logger", "message", "pid"} <= set(ok)
    assert by_id[bad.headers["X-Request-ID"]]["status"] == 400
    assert by_id[missing.headers["X-Request-ID"]]["status"] == 404
    assert bad.get_json()["error"]["request_id"] == bad.headers["X-Request-ID"]


def test_query_text_never_reaches_the_logs(client: Any, token: Any, log_stream: Any) -> None:
    auth = token("student", sub="student-log")
    for body in ({"query": SECRET_QUERY}, {"query": SECRET_QUERY, "config": {"max_results": "x"}},
                 {"query": SECRET_QUERY, "user": {"user_id": "someone-else"}}):
        client.post("/api/search", json=body, headers={"Authorization": auth})
    client.get("/api/search?query=" + SECRET_QUERY.replace(" ", "+"))
    text = log_stream.getvalue()
    assert text
    for word in SECRET_QUERY.split():
        assert word not in text


def test_development_logs_are_readable_text(demo_services: Any, client: Any) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging(demo_services.settings.replace(log_format="auto", env="development"), stream)
    try:
        r = client.get("/api/admin/stats")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    line = next(line for line in stream.getvalue().splitlines() if "campus_search.access" in line)
    assert f"[{r.headers['X-Request-ID']}] GET /api/admin/stats 401" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_request_id_is_accepted_only_from_trusted_proxies(demo_services_with: Any) -> None:
    app = create_app(demo_services_with(trusted_proxies=("10.0.0.0/8",)))
    c = app.test_client()
    proxy = {"REMOTE_ADDR": "10.1.2.3"}
    stranger = {"REMOTE_ADDR": "192.0.2.7"}

    assert c.get("/health/live", headers={"X-Request-ID": "lb-42.abc"}, environ_base=proxy
                 ).headers["X-Request-ID"] == "lb-42.abc"
    forged = c.get("/health/live", headers={"X-Request-ID": "lb-42.abc"}, environ_base=stranger)
    assert forged.headers["X-Request-ID"].startswith("req_")
    for bad in ("has space", "x" * 200, "<script>", "-leading-dash", ""):
        got = c.get("/health/live", headers={"X-Request-ID": bad}, environ_base=proxy).headers["X-Request-ID"]
        assert got.startswith("req_") and got != bad


def test_request_id_without_any_trusted_proxy(demo_services: Any) -> None:
    class Req:
        headers = {"X-Request-ID": "abc-123"}
        remote_addr = "127.0.0.1"

    assert request_id_for(Req(), demo_services.settings.replace(trusted_proxies=())).startswith("req_")
    assert request_id_for(Req(), demo_services.settings.replace(trusted_proxies=("127.0.0.1",))) == "abc-123"


def test_banner_lists_configuration_and_endpoints_without_secrets(demo_app: Any, demo_services: Any) -> None:
    from campus_search.ops.banner import banner

    settings = demo_services.settings.replace(
        database_url="postgresql://search:hunter2pw@db.example:5432/campus", redis_url="redis://:redispw@cache:6379/0",
        database_read_url="postgresql://search:replicapw@replica:5432/campus", trusted_proxies=("10.0.0.0/8",))
    text = banner(settings, 4, 2, app=demo_app, bind="0.0.0.0:5100", metrics_dir="/tmp/m")
    for secret in ("hunter2pw", "redispw", "replicapw", settings.jwt_secret_key, settings.audit_hmac_key):
        assert secret and secret not in text
    assert "0.0.0.0:5100" in text and "4 workers x 2 threads" in text and "10.0.0.0/8" in text
    assert "db.example:5432/campus" in text and "secret (set)" in text
    for rule in demo_app.url_map.iter_rules():
        if rule.endpoint != "static":
            assert rule.rule in text
