"""The brief's gunicorn command on loopback, bound directly (no nginx in front), against hostile clients.

Slow senders (half a request line, half a head, half a body), silent connections, clients that never
read or close, and more connections than a worker takes must not keep ``/health/live`` (or anyone) from
being answered; requests gunicorn refuses before Flask sees them (a URL over 4094 bytes, a 100 KB
header) are answered in the API's JSON error shape, not an HTML page.

Bounded: a few hundred sockets at most, every wait has a timeout, the server has a short
REQUEST_READ_TIMEOUT and a small per-worker connection limit (``GUNICORN_CMD_ARGS``, which gunicorn
reads besides the command line).
"""

from __future__ import annotations

import json
import selectors
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from test_gunicorn import Server, served_dsn  # noqa: F401  (a fixture, used by name)

READ_TIMEOUT = 3  # REQUEST_READ_TIMEOUT of the server under test, seconds
CONNECTIONS = 60  # gunicorn's worker_connections per worker (default 1000), kept small to reach it
PROBE_TIMEOUT = 2.0  # a probe that takes longer than this counts as not answered


@pytest.fixture(scope="module")
def server(served_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:  # noqa: F811
    srv = Server(served_dsn, tmp_path_factory.mktemp("slow-clients"), REQUEST_READ_TIMEOUT=str(READ_TIMEOUT),
                 GUNICORN_CMD_ARGS=f"--worker-connections {CONNECTIONS}")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def connect(srv: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=PROBE_TIMEOUT)
    return sock


def exchange(srv: Server, raw: bytes, timeout: float = PROBE_TIMEOUT) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` on a new connection and read the answer until the server closes it."""
    with connect(srv) as sock:
        sock.settimeout(timeout)
        sock.sendall(raw)
        return parse(read_all(sock))


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def probe(srv: Server) -> int:
    """GET /health/live on a fresh connection; its status, or 0 if not answered within PROBE_TIMEOUT."""
    try:
        status, _, body = exchange(srv, b"GET /health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    except OSError:
        return 0
    assert json.loads(body)["alive"] is True
    return status


def assert_json_error(response: tuple[int, dict[str, str], bytes], status: int, code: str) -> None:
    got, headers, body = response
    assert got == status, body[:300]
    assert headers["content-type"] == "application/json" and b"<html" not in body.lower()
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"]
    assert error["request_id"].startswith("req_") and headers["x-request-id"] == error["request_id"]


def test_slow_and_silent_clients_do_not_starve_the_server(server: Server) -> None:
    """More half-sent requests than the server has threads (2 workers x 2), clients that never read
    their answer nor close, and silent connections: /health/live still answers at once, and the slow
    senders get a 408 once REQUEST_READ_TIMEOUT has passed."""
    with ExitStack() as stack:
        def opened() -> socket.socket:
            return stack.enter_context(connect(server))

        slow = []
        for _ in range(8):  # the case: half a request line each
            sock = opened()
            sock.sendall(b"GET /health/live HTT")
            slow.append(sock)
        for _ in range(4):  # a whole request line, then headers that never end
            sock = opened()
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\nX-Slow: ")
            slow.append(sock)
        for _ in range(4):  # a search whose body never finishes arriving
            sock = opened()
            sock.sendall(b"POST /api/search HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"query\": ")
            slow.append(sock)
        for _ in range(8):  # a complete request, then never read the answer nor close
            opened().sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        silent = [opened() for _ in range(30)]
        time.sleep(0.5)  # let the workers take them all

        assert [probe(server) for _ in range(5)] == [200] * 5

        # Each slow sender is answered 408 and disconnected, READ_TIMEOUT after it connected.
        for sock in slow:
            sock.settimeout(READ_TIMEOUT + 5)
            assert_json_error(parse(read_all(sock)), 408, "request_timeout")
        for sock in silent:  # nothing sent, nothing answered: just closed
            sock.settimeout(READ_TIMEOUT + 5)
            assert read_all(sock) == b""


def test_more_connections_than_a_worker_takes(server: Server) -> None:
    """Twice the server's connection capacity in silent sockets: the longest-waiting ones are dropped
    to make room, so a new client is still served (without it, both workers stop accepting)."""
    with ExitStack() as stack:
        for _ in range(2 * 2 * CONNECTIONS):
            stack.enter_context(connect(server))
        time.sleep(0.5)
        assert [probe(server) for _ in range(5)] == [200] * 5


def test_requests_refused_outside_flask_are_json(server: Server) -> None:
    long_url = b"/health/live?q=" + b"a" * 5000  # over gunicorn's limit_request_line (4094)
    assert_json_error(exchange(server, b"GET " + long_url + b" HTTP/1.1\r\nHost: t\r\n\r\n"),
                      414, "request_uri_too_long")
    # A request line far longer still is refused as soon as the limit is passed, without its end.
    with connect(server) as sock:
        sock.sendall(b"GET /health/live?q=" + b"a" * 200_000)
        assert_json_error(parse(read_all(sock)), 414, "request_uri_too_long")

    token = b"Bearer " + b"x" * 100_000  # over limit_request_field_size (8190)
    assert_json_error(exchange(server, b"POST /api/search HTTP/1.1\r\nHost: t\r\nAuthorization: " + token
                               + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"),
                      431, "request_header_fields_too_large")
    assert_json_error(exchange(server, b"GET /health/live HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n"),
                      400, "bad_request")
    assert_json_error(exchange(server, b"\x16\x03\x01 not http\r\n\r\n"), 400, "bad_request")
    text = server.log_text()
    assert "xxxxxxxxxx" not in text  # the token's text is not echoed into the logs
    assert probe(server) == 200


def test_keep_alive_and_pipelined_requests_still_work(server: Server) -> None:
    """Requests read by the event loop: several on one connection, pipelined, and a small body sent in
    pieces, are all answered."""
    with connect(server) as sock:
        sock.settimeout(10)
        request = b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n"
        sock.sendall(request * 3 + b"GET /health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = read_all(sock)
    assert data.count(b"HTTP/1.1 200 OK") == 4 and data.count(b'"alive":true') == 4
    with connect(server) as sock:
        sock.settimeout(10)
        body = b'{"query": "library"}'
        sock.sendall(b"POST /api/search HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:5])
        time.sleep(0.3)
        sock.sendall(body[5:])
        status, _, answer = parse(read_all(sock))
    assert status == 401 and json.loads(answer)["error"]["code"] == "unauthorized"  # no token: the app answered


def test_the_workers_status_names_are_the_apps():
    """The worker names an error status as the app's responses do (werkzeug's table) without importing
    the web framework below the web layer: every 4xx and 5xx, including those Python spells otherwise."""
    from werkzeug.http import HTTP_STATUS_CODES

    from campus_search.ops.gunicorn_worker import status_name

    for status in range(400, 600):
        assert status_name(status) == HTTP_STATUS_CODES.get(status, "Error"), status


# ---- accepting: a burst of new connections goes to the workers with a thread free


def _policy_worker(threads: int = 2) -> tuple[Any, socket.socket]:
    """A BufferingThreadWorker as far as its accept policy needs one: its settings, a poller and a real
    listening socket (no process, no threads)."""
    from gunicorn.config import Config

    from campus_search.ops.gunicorn_worker import BufferingThreadWorker

    worker = BufferingThreadWorker.__new__(BufferingThreadWorker)
    worker.cfg = Config()
    worker.cfg.set("threads", threads)
    listener = socket.create_server(("127.0.0.1", 0))
    worker.sockets = [listener]
    worker.poller = selectors.DefaultSelector()
    worker._accepting = False
    worker.configure(read_timeout=READ_TIMEOUT, body_limit=64 * 1024)
    return worker, listener


def _listening(worker: Any, listener: socket.socket) -> bool:
    try:
        worker.poller.get_key(listener)
        return True
    except KeyError:
        return False


def test_a_busy_worker_leaves_new_connections_to_free_ones_for_a_moment() -> None:
    """gthread's workers accept whatever they can (gunicorn issue #3433): 32 connections opened at once
    landed 32/0/0/0 or 13/19/0/0 on four workers, and one worker's two threads served them all while the
    others idled. A worker whose threads are all taken -- by requests, or by connections it accepted a
    moment ago whose requests are still arriving -- now waits ACCEPT_DEFER before accepting another."""
    from campus_search.ops.gunicorn_worker import ACCEPT_DEFER, _Reading

    worker, listener = _policy_worker(threads=2)
    with listener:
        worker.set_accept_enabled(True)
        assert _listening(worker, listener)  # both threads free

        worker.in_threads = 2  # both threads taken
        worker._gate()
        assert not _listening(worker, listener)
        worker._busy_since = time.monotonic() - ACCEPT_DEFER  # ... for ACCEPT_DEFER now: one more may come
        worker._gate()
        assert _listening(worker, listener)

        worker.in_threads = 1  # a thread free again: listening; the busy spell ends once the loop waits so
        worker._gate()
        assert _listening(worker, listener)
        worker.wait_for_and_dispatch_events(0)
        assert worker._busy_since is None

        # busy, a thread free for a moment, busy again before the loop waits (a pipelined request): the
        # deferral is not restarted, and the loop wakes when it ends to listen again
        worker.in_threads = 2
        worker._gate()
        began = worker._busy_since
        worker.in_threads = 1
        worker._gate()
        worker.in_threads = 2
        worker._gate()
        assert not _listening(worker, listener) and worker._busy_since == began
        waited = time.monotonic()
        worker.wait_for_and_dispatch_events(5.0)  # gthread's loop waits up to 1 s; this one ACCEPT_DEFER
        assert time.monotonic() - waited < 1.0 and _listening(worker, listener)

        worker.in_threads = 0
        worker.wait_for_and_dispatch_events(0)  # free and listening: that busy spell is over
        # two connections accepted just now, their requests still arriving, count as taken threads
        now = time.monotonic()
        worker.reading = {object(): _Reading(b"", now + READ_TIMEOUT), object(): _Reading(b"", now + READ_TIMEOUT)}
        worker._gate()
        assert not _listening(worker, listener)
        # ... but only for ACCEPT_DEFER: a silent connection cannot keep a worker from accepting
        worker.reading = {object(): _Reading(b"", now - ACCEPT_DEFER + READ_TIMEOUT - 0.001) for _ in range(50)}
        worker._gate()
        assert _listening(worker, listener)

        worker.set_accept_enabled(False)  # gthread's own limit (worker_connections) still wins
        assert not _listening(worker, listener)
