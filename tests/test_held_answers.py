"""The brief's gunicorn command on loopback: a search's answer waits for its audit record without a thread.

With the audit chain head locked by the test (as a stalled disk or a slow commit would hold every append),
more searches than the server has threads (2 workers x 2) are in flight: none is answered before its
record is committed, and ``/health/live`` and other requests are still answered at once, because the
waiting answers hold no thread (``ops/held.py``). When the lock goes, every search is answered and its
record is in the log. A record the database refuses turns the held answer into the 503 that withholds the
results, counted as a 503 by the request metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
import requests
from conftest import TEST_SECRET
from prometheus_client.parser import text_string_to_metric_families
from test_gunicorn import Server, served_dsn, wait_for_a_locked_append  # noqa: F401  (served_dsn: a fixture, used by name)
from test_slow_clients import probe

THREADS = 4  # the brief's command as Server runs it: 2 workers x 2 threads


@pytest.fixture(scope="module")
def server(served_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:  # noqa: F811
    srv = Server(served_dsn, tmp_path_factory.mktemp("held"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def bearer(sub: str) -> str:
    from campus_search.config import Settings
    from campus_search.security.auth import mint_token

    return "Bearer " + mint_token(Settings(jwt_secret_key=TEST_SECRET, data_dir="/nonexistent"),
                                  sub=sub, role="it_administrator")


def search(srv: Server, query: str, sub: str = "held-admin") -> requests.Response:
    return srv.request("POST", "/api/search", json={"query": query}, headers={"Authorization": bearer(sub)})


def counted(srv: Server, status: str) -> float:
    text = srv.request("GET", "/metrics").text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "vector_search_requests_total" and s.labels.get("status") == status
               and s.labels.get("endpoint") == "search_documents")


def test_searches_waiting_for_their_audit_records_leave_the_threads_free(
        server: Server, served_dsn: str) -> None:  # noqa: F811
    queries = [f"student password reset, held answer {i}" for i in range(2 * THREADS)]
    with psycopg.connect(served_dsn) as lock_conn, ThreadPoolExecutor(len(queries)) as pool:
        lock_conn.execute("SELECT seq FROM audit_chain_head FOR UPDATE")  # audit appends now wait on us
        in_flight = [pool.submit(search, server, q) for q in queries]
        wait_for_a_locked_append(served_dsn)
        time.sleep(1.5)  # every search finishes its retrieval and hands its record to its worker's writer
        assert not any(f.done() for f in in_flight)  # nothing answered while its record waits
        # twice as many searches waiting as there are threads, and the server still answers at once
        assert [probe(server) for _ in range(3)] == [200, 200, 200]
        spec = server.request("GET", "/api/openapi.json")
        assert spec.status_code == 200 and not any(f.done() for f in in_flight)
        lock_conn.rollback()
        answers = [f.result(timeout=60) for f in in_flight]
    assert [a.status_code for a in answers] == [200] * len(queries), [a.text[:200] for a in answers]
    assert all(a.json()["count"] > 0 for a in answers)
    answered = [a.headers["X-Request-ID"] for a in answers]
    with psycopg.connect(served_dsn) as conn:
        recorded = {r[0] for r in conn.execute("SELECT request_id FROM audit_log WHERE request_id = ANY(%s)",
                                               (answered,))}
    assert recorded == set(answered)


def test_a_held_answer_whose_record_is_refused_is_a_503_and_counted_as_one(
        server: Server, served_dsn: str) -> None:  # noqa: F811
    """Only this user's records are refused (a constraint added for the test), so the held answer's
    alternative is what the client gets: the 503 with the app's headers, and the metrics say 503."""
    before = {s: counted(server, s) for s in ("200", "503")}
    with psycopg.connect(served_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE audit_log ADD CONSTRAINT refuse_held_user CHECK (user_id <> 'refused-user') "
                     "NOT VALID")
    try:
        refused = search(server, "library borrowing and renewals", sub="refused-user")
        allowed = search(server, "library borrowing and renewals")
    finally:
        with psycopg.connect(served_dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE audit_log DROP CONSTRAINT refuse_held_user")
    assert refused.status_code == 503, refused.text[:300]
    error: Any = refused.json()["error"]
    assert error["code"] == "audit_unavailable" and "withheld" in error["message"]
    assert refused.headers["X-Request-ID"] == error["request_id"] and refused.headers["Retry-After"] == "5"
    assert refused.headers["Content-Type"] == "application/json" and '"results"' not in refused.text
    assert refused.headers["Content-Length"] == str(len(refused.content))
    assert allowed.status_code == 200 and allowed.json()["count"] > 0
    deadline = time.monotonic() + 10
    while {s: counted(server, s) - before[s] for s in before} != {"200": 1, "503": 1}:
        assert time.monotonic() < deadline, {s: counted(server, s) - before[s] for s in before}
        time.sleep(0.1)
    assert "audit record NOT stored" in server.log_text()


def test_a_held_answer_is_sent_once_when_its_record_settles_or_its_deadline_passes() -> None:
    """The worker's side, without a process: an answer goes to a thread when its hold says it is ready
    (from the audit writer thread) or when the loop finds its deadline (the audit's WRITE_TIMEOUT) passed,
    whichever comes first, and only once."""
    from concurrent.futures import Future

    from test_slow_clients import _policy_worker

    from campus_search.ops.gunicorn_worker import _Held

    class Answer:
        def __init__(self, deadline: float) -> None:
            self.deadline, self.ready_callback = deadline, None

        def ready(self) -> bool:
            return False

        def when_ready(self, callback: Any) -> None:
            self.ready_callback = callback

    sent: list[Any] = []

    class Pool:
        def submit(self, fn: Any, conn: Any, held: Any) -> Future[Any]:
            assert conn is held.conn
            sent.append(held)
            return Future()

    worker, listener = _policy_worker()
    with listener:
        worker.tpool, worker.pending_conns = Pool(), []
        now = time.monotonic()
        waiting = _Held(None, object(), None, {}, Answer(now + 60), None)  # type: ignore[arg-type]
        overdue = _Held(None, object(), None, {}, Answer(now - 1), None)  # type: ignore[arg-type]
        for held in (waiting, overdue):
            worker._hold(held)
        worker.murder_pending()  # once per turn of the worker's event loop
        assert sent == [overdue]  # past its deadline: sent, whatever its record's fate (settled in the thread)
        waiting.respiter.ready_callback()  # its record's outcome arrives
        overdue.respiter.ready_callback()  # ... and the overdue one's, late: not sent twice
        worker.murder_pending()
        assert sent == [overdue, waiting]
