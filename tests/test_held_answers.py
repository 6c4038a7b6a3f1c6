"""The brief's gunicorn command on loopback: a search's answer waits for its audit record without a thread.

With the audit chain head locked by the test (as a stalled disk or a slow commit would hold every append),
more searches than the server has threads (2 workers x 2) are in flight: none is answered before its
record is committed, and ``/health/live`` and other requests are still answered at once, because the
waiting answers hold no thread (``ops/held.py``). When the lock goes, every search is answered and its
record is in the log. A record the database refuses turns the held answer into the 503 that withholds the
results, counted as a 503 by the request metrics.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_gunicorn import (  # noqa: F401  (served_dsn and server: fixtures, used by name)
    Server,
    admin_bearer,
    admin_search_any,
    served_dsn,
    server,
    wait_for_a_locked_append,
)
from test_slow_clients import probe

THREADS = 4  # the brief's command as Server runs it: 2 workers x 2 threads


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
        in_flight = [pool.submit(admin_search_any, server, q) for q in queries]
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


def test_held_answers_on_a_kept_alive_connection_come_in_order(server: Server, served_dsn: str) -> None:  # noqa: F811
    """Three searches pipelined on one kept-alive connection, then a fourth on it once they are answered,
    all while the chain head is locked at first: each answer waits for its own record, they arrive in the
    order asked, and the connection stays usable after a held answer (the worker's keep-alive path)."""
    auth = admin_bearer().encode()

    def request(query: str, close: bool = False) -> bytes:
        body = json.dumps({"query": query}).encode()
        return (b"POST /api/search HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAuthorization: " + auth
                + (b"\r\nConnection: close" if close else b"") + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\n\r\n" + body)

    queries = [f"library borrowing, pipelined {i}" for i in range(3)]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock, \
            psycopg.connect(served_dsn) as lock_conn:
        lock_conn.execute("SELECT seq FROM audit_chain_head FOR UPDATE")
        sock.sendall(b"".join(request(q) for q in queries))
        wait_for_a_locked_append(served_dsn)
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # nothing is sent while the first record waits
        lock_conn.rollback()
        sock.settimeout(30)
        data = b""
        while data.count(b"HTTP/1.1 ") < len(queries):
            chunk = sock.recv(65536)
            assert chunk, data[-300:]
            data += chunk
        sock.sendall(request("library borrowing, after the held ones", close=True))
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answers = [json.loads(part.split(b"\r\n\r\n", 1)[1]) for part in data.split(b"HTTP/1.1 ")[1:]]
    assert data.count(b"HTTP/1.1 200 OK") == 4
    assert [a["query"] for a in answers] == [*queries, "library borrowing, after the held ones"]
    with psycopg.connect(served_dsn) as conn:
        recorded = {r[0] for r in conn.execute("SELECT request_id FROM audit_log WHERE request_id = ANY(%s)",
                                               ([a["request_id"] for a in answers],))}
    assert recorded == {a["request_id"] for a in answers}


def test_a_record_the_writer_never_took_is_given_up_at_its_deadline_and_answered_503(
        server: Server, served_dsn: str) -> None:  # noqa: F811
    """The chain head locked past WRITE_TIMEOUT: each worker's writer is stuck on the batch it took, the
    records queued behind it are given up at their deadline and answered 503 (the lock still held, no
    thread waiting for them meanwhile); the records being written are answered once the lock goes. No
    answer is a 200 without its record, and none that is a 503 has one."""
    from campus_search.audit.records import WRITE_TIMEOUT

    queries = [f"eduroam wifi setup, deadline {i}" for i in range(6)]
    with psycopg.connect(served_dsn) as lock_conn, ThreadPoolExecutor(len(queries)) as pool:
        lock_conn.execute("SELECT seq FROM audit_chain_head FOR UPDATE")
        started = time.monotonic()
        in_flight = [pool.submit(admin_search_any, server, q) for q in queries]
        wait_for_a_locked_append(served_dsn)
        given_up = []
        while time.monotonic() - started < WRITE_TIMEOUT + 5 and not given_up:
            given_up = [f.result() for f in in_flight if f.done()]
            time.sleep(0.1)
        assert given_up and {a.status_code for a in given_up} == {503}  # answered while the lock is held
        assert probe(server) == 200
        lock_conn.rollback()
        answers = [f.result(timeout=60) for f in in_flight]
    assert {a.status_code for a in answers} <= {200, 503} and 503 in {a.status_code for a in answers}
    ids = {a.headers["X-Request-ID"]: a.status_code for a in answers}
    with psycopg.connect(served_dsn) as conn:
        recorded = {r[0] for r in conn.execute("SELECT request_id FROM audit_log WHERE request_id = ANY(%s)",
                                               (list(ids),))}
    assert recorded == {rid for rid, status in ids.items() if status == 200}


def test_a_held_answer_whose_record_is_refused_is_a_503_and_counted_as_one(
        server: Server, served_dsn: str) -> None:  # noqa: F811
    """Only this user's records are refused (a constraint added for the test), so the held answer's
    alternative is what the client gets: the 503 with the app's headers, and the metrics say 503."""
    before = {s: counted(server, s) for s in ("200", "503")}
    with psycopg.connect(served_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE audit_log ADD CONSTRAINT refuse_held_user CHECK (user_id <> 'refused-user') "
                     "NOT VALID")
    try:
        refused = admin_search_any(server, "library borrowing and renewals", sub="refused-user")
        allowed = admin_search_any(server, "library borrowing and renewals")
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
    (from the audit writer thread) or when the loop finds its deadline passed and the hold agrees it can be
    sent without a wait (a record the writer is writing keeps it held), whichever comes first, and only
    once. A send counts as a busy thread until it is done, and so do held answers beyond HELD_PER_THREAD
    a thread."""
    from concurrent.futures import Future

    from test_slow_clients import _policy_worker

    from campus_search.ops.gunicorn_worker import HELD_PER_THREAD, _Held

    class Answer:
        def __init__(self, deadline: float, expires: bool = True) -> None:
            self.deadline, self.expires, self.ready_callback = deadline, expires, None

        def ready(self) -> bool:
            return False

        def expire(self) -> bool:
            return self.expires

        def when_ready(self, callback: Any) -> None:
            self.ready_callback = callback

    sent: list[Any] = []

    class Pool:
        def submit(self, fn: Any, conn: Any, held: Any) -> Future[Any]:
            assert conn is held.conn
            sent.append(held)
            return Future()

    def held(answer: Answer) -> Any:
        return _Held(None, object(), None, {}, answer, None)  # type: ignore[arg-type]

    worker, listener = _policy_worker(threads=2)
    with listener:
        worker.tpool, worker.pending_conns = Pool(), []
        now = time.monotonic()
        waiting, overdue, writing = held(Answer(now + 60)), held(Answer(now - 1)), held(Answer(now - 1, False))
        for h in (waiting, overdue, writing):
            worker._hold(h)
        assert not worker._busy(time.monotonic())  # held answers hold no thread
        worker.murder_pending()  # once per turn of the worker's event loop
        assert sent == [overdue]  # past its deadline and given up: sent (its 503), whatever happens now
        assert worker.sending == 1 and not worker._busy(time.monotonic())
        waiting.respiter.ready_callback()  # its record's outcome arrives
        overdue.respiter.ready_callback()  # ... and the overdue one's, late: not sent twice
        worker.murder_pending()
        assert sent == [overdue, waiting]  # the one being written stays held
        assert worker.sending == 2 and worker._busy(time.monotonic())  # two sends: both threads taken
        writing.respiter.expires = True  # its last deadline
        worker.murder_pending()
        assert sent == [overdue, waiting, writing]

        worker.sending, worker.held = 0, {}  # (this pool never finishes a send)
        for _ in range(HELD_PER_THREAD * 2):
            worker._hold(held(Answer(now + 60)))
        assert not worker._busy(time.monotonic())
        worker._hold(held(Answer(now + 60)))
        worker._hold(held(Answer(now + 60)))
        assert worker._busy(time.monotonic())  # held answers beyond 4 a thread slow the intake
