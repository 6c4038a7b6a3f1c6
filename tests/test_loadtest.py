"""campus-search loadtest against the real server (gunicorn on loopback, demo corpus in PostgreSQL)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_SECRET, serving
from redis_server import free_port

from campus_search.cli.main import main
from campus_search.ops.loadtest import percentile

PER_MINUTE = 3


@pytest.fixture(scope="module")
def server(demo_services: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One gunicorn worker (so in-process rate limits are exact) serving the demo database."""
    tmp = tmp_path_factory.mktemp("loadtest-server")
    env = {**os.environ, "DATABASE_URL": demo_services.dsn, "JWT_SECRET_KEY": TEST_SECRET,
           "AUDIT_HMAC_KEY": "audit-" + "k" * 40, "DATA_DIR": str(tmp / "data"),
           "RATE_LIMIT_PER_MINUTE": str(PER_MINUTE), "RATE_LIMITS_ENABLED": "true",
           "DB_POOL_MIN_SIZE": "1", "DB_POOL_MAX_SIZE": "4", "EMBEDDING_THREADS": "1"}
    for name in ("REDIS_URL", "REDIS_HOST", "DATABASE_READ_URL"):
        env.pop(name, None)
    with serving(env, tmp, workers=1, threads=4) as base:
        yield base


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    monkeypatch.setenv("JWT_SECRET_KEY", TEST_SECRET)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, dict[str, Any]]:
    code = main(["loadtest", *argv])
    captured = capsys.readouterr()
    *report, last = captured.out.strip().splitlines()
    if code:
        assert captured.err.startswith("campus-search loadtest: ")  # says why it exits non-zero
    return code, "\n".join(report), json.loads(last)


def test_loadtest_reports_the_brief_figures_and_rate_limiting(
        server: str, cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    # 5 users x 4 searches, each user with their own token; the server allows 3 a minute per user.
    code, report, r = run(capsys, "--url", server, "--users", "5", "--requests", "4", "--role", "staff",
                          "--department", "IT Services", "--duration", "120", "--fail-under", "90")
    assert r["requests"] == r["planned_requests"] == 20
    assert r["successful"] == 5 * PER_MINUTE
    assert r["rate_limited"] == 5 * (4 - PER_MINUTE)
    assert r["statuses"] == {"200": 15, "429": 5}
    assert r["success_rate"] == 75.0
    assert r["failed"] == 0 and r["failures"] == {}  # rate limiting is not a failure, in the JSON and the text
    assert "Failed:             none" in report
    assert code == 1  # below --fail-under 90
    assert 0 < r["p50_s"] <= r["p95_s"] <= r["max_s"]
    assert 0 < r["avg_s"] <= r["max_s"]
    assert r["requests_per_second"] > 0 and not r["stopped_at_deadline"]
    for line in ("Success rate:       75.0%", "Rate limited (429): 5", "Requests/second:", "p50 / p95 / max:"):
        assert line in report


def test_loadtest_against_nothing_fails_cleanly(cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens here
    code, report, r = run(capsys, "--url", url, "--users", "2", "--requests", "2", "--timeout", "5")
    assert code == 1
    assert r["requests"] == 4 and r["successful"] == 0 and r["success_rate"] == 0.0
    assert r["statuses"] == {"error:ConnectionError": 4}
    assert r["failed"] == 4 and r["failures"] == {"error:ConnectionError": 4}
    assert r["requests_per_second"] == 0.0 and r["successful_per_second"] == 0.0  # nothing answered
    assert "Success rate:       0.0%" in report
    assert "Failed:             4 (error:ConnectionError: 4)" in report
    assert "Requests/second:    0.00 answered" in report


def test_loadtest_exits_nonzero_when_some_requests_fail_but_not_for_rate_limiting(
        server: str, cli_env: None, token: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queries = tmp_path / "queries.txt"
    queries.write_text("library opening hours\n" + "x" * 3000 + "\n")  # the second is too long: a 400
    auth = token("staff", sub="loadtest-mixed")
    code, report, r = run(capsys, "--url", server, "--users", "1", "--requests", "2", "--token", auth,
                          "--queries", str(queries))
    assert r["statuses"] == {"200": 1, "400": 1}
    assert r["failed"] == 1 and r["failures"] == {"400": 1} and r["rate_limited"] == 0
    assert "Failed:             1 (400: 1)" in report
    assert code == 1
    # Only rate limited (3 a minute, a 4th is refused): the server doing its job, exit 0.
    code, report, r = run(capsys, "--url", server, "--users", "1", "--requests", "4",
                          "--token", token("staff", sub="loadtest-limited"))
    assert r["statuses"] == {"200": 3, "429": 1} and r["failed"] == 0 and r["rate_limited"] == 1
    assert code == 0


def test_loadtest_pause_spaces_each_users_searches_within_the_deadline(cli_env: None,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """--pause: each user waits between its searches, and a pause that would end past the deadline ends
    the user instead (so a paced run stays bounded)."""
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens: each request fails at once
    code, _, r = run(capsys, "--url", url, "--users", "2", "--requests", "5", "--pause", "60", "--duration", "2")
    assert r["requests"] == 2 and r["stopped_at_deadline"]  # one search each, then the pause would overrun
    code, _, r = run(capsys, "--url", url, "--users", "2", "--requests", "3", "--pause", "0")
    assert r["requests"] == 6 and not r["stopped_at_deadline"]
    assert main(["loadtest", "--pause", "-1"]) == 2


def test_a_request_cut_by_the_deadline_is_not_a_failure(cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    """A server that accepts and never answers: the deadline ends the request; it is reported as cut,
    not as a failed request (the run's own end, not the server's fault)."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        code, _, r = run(capsys, "--url", url, "--users", "1", "--requests", "1", "--duration", "1")
    assert r["cut_at_deadline"] == 1 and r["requests"] == 0 and r["failed"] == 0
    with socket.socket() as silent:  # the per-request timeout, shorter than the run: a real failure
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        code, _, r = run(capsys, "--url", url, "--users", "1", "--requests", "1", "--duration", "30",
                         "--timeout", "0.5")
    assert r["failed"] == 1 and r["cut_at_deadline"] == 0 and r["statuses"] == {"error:ReadTimeout": 1}


def test_loadtest_bounds_are_enforced(cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", "--users", "100000"]) == 2
    assert "--users must be" in capsys.readouterr().err
    assert main(["loadtest", "--url", "ftp://127.0.0.1/"]) == 2


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert percentile(values, 95) == 19.0
    assert percentile(values, 50) == 10.0
    assert percentile([0.5], 95) == 0.5
    assert percentile([], 95) == 0.0
