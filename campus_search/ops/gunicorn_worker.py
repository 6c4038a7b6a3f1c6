"""gunicorn's gthread worker, hardened against slow and idle clients when it binds the port itself.

gunicorn's ``gthread`` worker hands a connection to one of its few threads as soon as the first byte
arrives, and the thread then blocks until the request head is complete. Eight sockets that send half a
request line therefore hold every thread of a 2x2 server, and ``/health/live`` waits behind them for as
long as they like. nginx in the production stack buffers requests, but ``campus-search serve`` and the
brief's ``gunicorn ... --worker-class gthread`` bind the port directly.

:class:`BufferingThreadWorker` keeps gthread's threads and event loop but gives a thread only to a
request that has fully arrived:

- The request head, and a body of up to ``MAX_REQUEST_BYTES`` with a ``Content-Length``, are read by
  the worker's event loop (non-blocking, no thread). A client gets ``REQUEST_READ_TIMEOUT`` seconds
  from its first byte (or from connecting) to send them; then it is answered ``408`` (nothing if it
  sent nothing) and disconnected. A head larger than gunicorn's own limits is answered ``431``.
- Larger or chunked bodies, and ``Expect: 100-continue`` requests, are read by the thread, as are
  responses written: each socket read or write waits at most ``REQUEST_READ_TIMEOUT``.
- A worker whose threads are all taken (by requests, or by connections it accepted a moment ago whose
  requests are still arriving) accepts another connection only ``ACCEPT_DEFER`` (20 ms) after it became
  busy or last accepted. gthread's workers otherwise accept whatever they can (gunicorn issue #3433): 32
  keep-alive clients connecting at once landed 32/0/0/0 or 13/19/0/0 on four workers, one worker's two
  threads served them all while the others idled, and the machine ran 74 % busy. With the deferral they
  land 8/8/8/8 (docs/performance.md). A busy worker still accepts, one connection per ``ACCEPT_DEFER``.
- When a worker holds ``worker_connections`` connections (gunicorn's setting, default 1000), the
  connection that has waited longest without a complete request is closed to make room for the new
  one, so idle sockets cannot keep new clients (or the probes) out.
- Closing a connection the client does not close itself (gunicorn lingers up to 2 s to drain it)
  never blocks the event loop.
- gunicorn's own error answers (414 request line too long, 431 header too large, 400 malformed) use
  the API's JSON error shape instead of an HTML page.
- An answer that waits for something outside the worker -- a search's audit record being committed
  and flushed -- waits without a thread (:mod:`campus_search.ops.held`): the app is told it may hand
  such an answer back unfinished, the thread goes on to the next request, and the answer is written
  from a thread again once its record's outcome is known (or its deadline, the audit's 10 s, has
  passed). A stalled disk no longer takes every thread, and ``/health/live`` with them.

The brief's command names ``--worker-class gthread`` on the command line, which overrides any
configuration file, so the ``post_fork`` hook (:mod:`campus_search.ops.gunicorn_hooks`) adopts the freshly
forked gthread worker into this subclass with :func:`adopt` before it starts serving.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import selectors
import socket
import threading
import time
from datetime import datetime
from functools import partial
from http import HTTPStatus
from typing import Any

from gunicorn import http, util
from gunicorn.http import wsgi
from gunicorn.workers.gthread import ThreadWorker

from campus_search.ops.held import HOLD_KEY
from campus_search.ops.logs import new_request_id

log = logging.getLogger("campus_search.ops.server")

#: gunicorn's defaults when a limit is set to 0 (unlimited): never buffer without a bound.
_DEFAULT_FIELDS, _DEFAULT_FIELD_SIZE, _DEFAULT_LINE = 100, 8190, 4094
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)
_NEEDS_THREAD = re.compile(rb"\r\n(?:transfer-encoding|expect)[ \t]*:", re.IGNORECASE)
#: Fixed messages per status: gunicorn's own texts quote the client's input back.
_MESSAGES = {
    400: "malformed HTTP request",
    403: "request forbidden",
    408: "the request was not received in time",
    414: "request line (method, URL and version) too long",
    417: "expectation failed",
    431: "request header fields too large",
    500: "internal error",
    501: "unsupported transfer coding",
}


#: Where Python's status phrases differ from the names the app's errors use (werkzeug's), the app's: this
#: module stays free of the web framework (tests/test_architecture.py), and a test compares the two.
_STATUS_NAMES = {414: "Request URI Too Long", 418: "I'm a teapot", 449: "Retry With",
                 511: "Network Authentication Failed"}


def status_name(status: int) -> str:
    """The reason phrase for ``status``, as the app's own error responses spell it."""
    if status in _STATUS_NAMES:
        return _STATUS_NAMES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def json_error(status: int, message: str | None = None) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response in the API's error shape."""
    request_id = new_request_id()
    name = status_name(status)
    code = "internal_error" if status == 500 else name.lower().replace(" ", "_")  # as the app says it
    body = json.dumps({"error": {"code": code,
                                 "message": message or _MESSAGES.get(status, name.lower()),
                                 "request_id": request_id}}).encode()
    head = (f"HTTP/1.1 {status} {name}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-ID: {request_id}\r\nCache-Control: no-store\r\n"
            "X-Content-Type-Options: nosniff\r\n\r\n")
    return head.encode("latin-1") + body


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """Drop-in for ``gunicorn.util.write_error``: the same answer as JSON, without the client's input."""
    util.write_nonblock(sock, json_error(int(status_int)))


class _Reading:
    """A connection whose request is still arriving, watched by the event loop."""

    __slots__ = ("buffer", "deadline")

    def __init__(self, data: bytes, deadline: float) -> None:
        self.buffer = bytearray(data)
        self.deadline = deadline


class _Held:
    """A request whose answer waits, without a thread, for its hold (ops/held.py)."""

    __slots__ = ("req", "conn", "resp", "environ", "respiter", "started", "released")

    def __init__(self, req: Any, conn: Any, resp: Any, environ: dict[str, Any], respiter: Any,
                 started: datetime) -> None:
        self.req, self.conn, self.resp, self.environ = req, conn, resp, environ
        self.respiter, self.started = respiter, started
        self.released = False  # handed to a thread to be sent (BufferingThreadWorker._release)


#: Answers a worker holds for their audit records (ops/held.py) per thread before the surplus counts as busy
#: threads (``_busy``): 8 for two threads, the connections one of four workers serves at 32.
HELD_PER_THREAD = 4

#: Seconds a busy worker (every thread taken) waits before it accepts another connection, so that a burst
#: of new connections goes to the workers with a thread free instead of to whichever woke first.
ACCEPT_DEFER = 0.02


class BufferingThreadWorker(ThreadWorker):
    """gthread with requests read by the event loop; see the module docstring."""

    read_timeout = 10.0
    body_limit = 64 * 1024
    alive: bool  # gunicorn's Worker sets it

    def configure(self, read_timeout: float, body_limit: int) -> None:
        self.read_timeout = float(read_timeout)
        self.body_limit = int(body_limit)
        cfg = self.cfg
        line = cfg.limit_request_line if cfg.limit_request_line > 0 else _DEFAULT_LINE
        fields = cfg.limit_request_fields if cfg.limit_request_fields > 0 else _DEFAULT_FIELDS
        size = cfg.limit_request_field_size if cfg.limit_request_field_size > 0 else _DEFAULT_FIELD_SIZE
        #: the largest head gunicorn's parser accepts (request line + fields + blank line)
        self.head_limit = line + 2 + fields * (size + 2) + 2
        #: connections whose request is still arriving, oldest first (dicts keep insertion order)
        self.reading: dict[Any, _Reading] = {}
        #: connections being closed: we sent FIN and drain what the client still sends, until its FIN
        self.lingering: dict[Any, float] = {}
        self.line_limit = line
        # TLS, HTTP/2 and the PROXY protocol need gunicorn's own first read: those stay as they were.
        self.buffering = not cfg.is_ssl and cfg.proxy_protocol in ("off", None, False) \
            and getattr(cfg, "http2_cleartext", "off") in ("off", None, False)
        #: requests handed to the thread pool and not finished (queued or running)
        self.in_threads = 0
        #: connections whose answer is held until its audit record's outcome is known (ops/held.py), and the
        #: held answers being sent by a thread (counted by _busy; changed under _held_lock)
        self.held: dict[Any, _Held] = {}
        self.sending = 0
        self._held_lock = threading.Lock()
        self._want_accept = False  # what gthread's loop asks (fewer than worker_connections)
        self._busy_since: float | None = None  # since when (or the last accept) this worker has been busy

    # ---- accepting: with a thread free, else one connection per ACCEPT_DEFER

    def _busy(self, now: float) -> bool:
        """Every thread taken, counting the requests in its threads (running or queued) and the connections
        it accepted within ACCEPT_DEFER whose request is still arriving (most clients send at once)."""
        fresh, since = 0, now - ACCEPT_DEFER + self.read_timeout  # a _Reading's deadline is its start + timeout
        for state in reversed(self.reading.values()):  # newest first; older ones no longer count
            if state.deadline < since:
                break
            fresh += 1
        # answers held for their audit records hold no thread, but beyond HELD_PER_THREAD a thread each
        # they count as busy: a stalled audit log slows the intake of new connections
        held = max(0, len(self.held) - HELD_PER_THREAD * self.cfg.threads)
        return self.in_threads + self.sending + fresh + held >= self.cfg.threads

    def set_accept_enabled(self, enabled: bool) -> None:
        self._want_accept = enabled
        self._gate()

    def _gate(self) -> None:
        """Listen while gthread's loop wants to (worker_connections) and a thread is free, or while busy
        once ACCEPT_DEFER has passed since the worker became busy or last accepted. The busy spell ends
        only when the loop waits with the listener registered and a thread free
        (:meth:`wait_for_and_dispatch_events`): a count that dips and rises again between two waits (a
        request finishing as a pipelined one is dispatched) does not restart the deferral."""
        now = time.monotonic()
        if not self._busy(now):
            free = True
        else:
            if self._busy_since is None:
                self._busy_since = now
            free = now - self._busy_since >= ACCEPT_DEFER
        super().set_accept_enabled(self._want_accept and free)

    def accept(self, listener: Any) -> None:
        super().accept(listener)
        now = time.monotonic()
        if self._busy(now):  # accepted while busy: the next one waits ACCEPT_DEFER
            self._busy_since = now
            self._gate()

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self._accepting and not self._busy(time.monotonic()):
            self._busy_since = None  # listening with a thread free: the busy spell is over
        elif self._busy_since is not None and self._want_accept and not self._accepting:
            # wake when the deferral ends, to listen again even if nothing else happens meanwhile
            timeout = max(0.0, min(timeout, self._busy_since + ACCEPT_DEFER - time.monotonic()))
        super().wait_for_and_dispatch_events(timeout)
        self._gate()

    # ---- the one way into the thread pool

    def enqueue_req(self, conn: Any) -> None:
        """Called by gthread for a new connection, a kept-alive one that became readable, and one
        with bytes read ahead. Only a complete request goes to a thread; others are read first."""
        # Everything here runs on the event loop's thread (accept, poller and finish callbacks).
        if getattr(conn, "request_arrived", False) or not self._buffers(conn):
            conn.request_arrived = False
            self.in_threads += 1
            super().enqueue_req(conn)
            self._gate()
            return
        ahead = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        state = _Reading(ahead, time.monotonic() + self.read_timeout)
        conn.sock.setblocking(False)
        if self._act(conn, state):
            return
        self.reading[conn] = state
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
        self._make_room()
        if conn in self.reading and not state.buffer:
            self._on_readable(conn, conn.sock)  # a new client has usually sent its request already

    def _buffers(self, conn: Any) -> bool:
        return self.buffering and not conn.is_http2

    def _on_readable(self, conn: Any, _sock: Any) -> None:
        try:
            self._read_some(conn)
        except Exception:  # never let one connection take the worker's event loop down
            log.exception("error reading a request; closing the connection")
            self._stop_reading(conn)
            self._close(conn)

    def _read_some(self, conn: Any) -> None:
        state = self.reading.get(conn)
        if state is None:
            return
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away before finishing its request
            self._stop_reading(conn)
            self._close(conn)
            return
        state.buffer += data
        if self._verdict(state.buffer) is not None:
            self._stop_reading(conn)
            self._act(conn, state)

    def _act(self, conn: Any, state: _Reading) -> bool:
        """Dispatch or refuse the request if enough of it has arrived; False to keep reading.
        The connection must not be registered with the poller (it may be closed here)."""
        verdict = self._verdict(state.buffer)
        if verdict is None:
            return False
        if verdict == 200:
            self._dispatch(conn, bytes(state.buffer))
        else:
            self._refuse(conn, verdict)
        return True

    def _verdict(self, buf: bytearray) -> int | None:
        """None: wait for more; 200: hand to a thread; else the status to refuse it with."""
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > self.line_limit + 2 and buf.find(b"\r\n", 0, self.line_limit + 2) < 0:
                return 414  # what gunicorn's parser would say, without waiting for the rest
            if len(buf) > self.head_limit:
                return 431
            if b"\n\n" in buf:  # bare line feeds: gunicorn's parser refuses those with a 400
                return 200
            return None
        head = bytes(buf[:end + 2])
        if not _NEEDS_THREAD.search(head):
            lengths = _CONTENT_LENGTH.findall(head)
            if len(lengths) == 1 and lengths[0].strip().isdigit():
                length = int(lengths[0].strip())
                if length <= self.body_limit and len(buf) < end + 4 + length:
                    return None  # a small body still arriving: keep reading without a thread
        return 200

    def _dispatch(self, conn: Any, data: bytes) -> None:
        conn.sock.setblocking(True)
        if conn.parser is None:  # what TConn.init() does for plain HTTP/1.x
            conn.initialized = True
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(data)
        conn.request_arrived = True
        self.enqueue_req(conn)

    def _stop_reading(self, conn: Any) -> None:
        if self.reading.pop(conn, None) is not None:
            self._unwatch(conn.sock)

    def _unwatch(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(sock)

    def _refuse(self, conn: Any, status: int) -> None:
        with contextlib.suppress(OSError):
            conn.sock.send(json_error(status))  # non-blocking: what fits in the socket buffer, at once
        self.log.info("refused a request from %s: %s", conn.client[0] if conn.client else "?", status)
        self.nr_conns -= 1
        self._linger(conn)  # a plain close with unread bytes would reset the connection, losing the answer

    def _make_room(self) -> None:
        """At the connection limit, drop the connection that has waited longest for a request."""
        while self.nr_conns >= self.worker_connections:
            if self.keepalived_conns:
                self.murder_keepalived(force=False)
                if self.nr_conns < self.worker_connections:
                    return
                oldest = self.keepalived_conns.popleft()
                self._unwatch(oldest.sock)
                self.nr_conns -= 1
                oldest.close()
            elif self.reading:
                oldest = next(iter(self.reading))
                self._stop_reading(oldest)
                self._close(oldest)
            else:
                return

    # ---- expiry (gthread calls murder_pending once per loop turn, also while shutting down)

    def murder_pending(self) -> None:
        super().murder_pending()
        self._expire_held()
        now = time.monotonic()
        while self.reading:
            conn, state = next(iter(self.reading.items()))
            if state.deadline > now:
                break
            self._stop_reading(conn)
            if state.buffer:  # a request started but not finished in time
                self._refuse(conn, 408)
            else:  # connected and said nothing
                self._close(conn)
        while self.lingering:
            conn, deadline = next(iter(self.lingering.items()))
            if deadline > now:
                break
            self._finish_close(conn)

    # ---- closing without blocking the event loop

    def _close(self, conn: Any) -> None:
        self.nr_conns -= 1
        conn.close()

    def finish_request(self, conn: Any, fs: Any) -> None:
        """gthread's, except that a connection not kept alive is closed by lingering in the event loop
        (RFC 9112 section 9.6, like ``util.close_graceful``) instead of a blocking drain of up to 2 s."""
        self.in_threads -= 1
        self._gate()
        result = None
        try:
            result = fs.result() if not fs.cancelled() else False
        except Exception:
            result = False
        if isinstance(result, _Held):
            self._hold(result)
            return
        if result is False:
            self.nr_conns -= 1
            self._linger(conn)
            return
        super().finish_request(conn, fs)

    def _linger(self, conn: Any) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_linger_readable, conn))
        except (OSError, ValueError, KeyError):
            util.close(conn.sock)
            return
        self.lingering[conn] = time.monotonic() + 2.0

    def _on_linger_readable(self, conn: Any, _sock: Any) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._finish_close(conn)

    def _finish_close(self, conn: Any) -> None:
        self.lingering.pop(conn, None)
        self._unwatch(conn.sock)
        util.close(conn.sock)

    # ---- in the thread: a complete request; reads and writes still bounded

    def handle(self, conn: Any) -> Any:
        if self._buffers(conn) and conn.parser is not None:
            conn.sock.settimeout(self.read_timeout)
            return self._handle_buffered(conn)
        return super().handle(conn)

    def _handle_buffered(self, conn: Any, held: _Held | None = None) -> Any:
        """A complete request, in a thread; or, with ``held``, a held answer now to be sent
        (:meth:`_release`): its hold's outcome is known, or is settled here (the deadline passed)."""
        req = held.req if held is not None else None
        try:
            if held is not None:
                return self._keepalive_after(conn, self._respond(req, conn, held.resp, held.environ,
                                                                 held.respiter, held.started))
            req = next(conn.parser)
            if not req:
                return False
            answer = self._serve(req, conn)
            if isinstance(answer, _Held):
                return answer  # the thread is free; finish_request waits for the answer's hold
            return self._keepalive_after(conn, answer)
        except (http.errors.NoMoreData, StopIteration):
            return False
        except TimeoutError:
            self.log.debug("client too slow reading or sending; closing")
            return False
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
            return False
        except Exception as e:
            self.handle_error(req, conn.sock, conn.client, e)
            return False

    # ---- answers held without a thread (ops/held.py)

    def _serve(self, req: Any, conn: Any) -> bool | _Held:
        """gthread's ``handle_request`` (gunicorn 27) in two halves: the app is called with HOLD_KEY set;
        an answer it hands back not ready yet (ops/held.py, a search waiting for its audit record) is
        returned as a :class:`_Held` and sent later by :meth:`_handle_buffered`, in a thread again."""
        environ: dict[str, Any] = {}
        resp = None
        try:
            self.cfg.pre_request(self, req)
            started = datetime.now()
            resp, environ = wsgi.create(req, conn.sock, conn.client, conn.server, self.cfg)
            environ["wsgi.multithread"] = True
            environ[HOLD_KEY] = True
            self.nr += 1
            if self.nr >= self.max_requests:
                if self.alive:
                    self.log.info("Autorestarting worker after current request.")
                    self.alive = False
                resp.force_close()
            if not self.alive or not self.cfg.keepalive or len(self.keepalived_conns) >= self.max_keepalived:
                resp.force_close()
            respiter = self.wsgi(environ, resp.start_response)
            if callable(getattr(respiter, "when_ready", None)) and not respiter.ready():
                return _Held(req, conn, resp, environ, respiter, started)  # post_request: once it is sent
        except BaseException:
            with contextlib.suppress(Exception):
                self.cfg.post_request(self, req, environ, resp)
            raise
        return self._respond(req, conn, resp, environ, respiter, started)

    def _respond(self, req: Any, conn: Any, resp: Any, environ: dict[str, Any], respiter: Any,
                 started: datetime) -> bool:
        """The second half of gthread's ``handle_request``: write the answer, log it, keep-alive or not."""
        try:
            try:
                if isinstance(respiter, environ["wsgi.file_wrapper"]):
                    resp.write_file(respiter)
                else:
                    for item in respiter:
                        resp.write(item)
                resp.close()
            finally:
                self.log.access(resp, req, environ, datetime.now() - started)
                if hasattr(respiter, "close"):
                    respiter.close()
            if resp.should_close():
                self.log.debug("Closing connection.")
                return False
        except OSError:
            raise
        except (Exception, SystemExit):
            if resp and resp.headers_sent:
                self.log.exception("Error handling request")
                util.close_graceful(conn.sock)
                raise StopIteration() from None
            raise
        finally:
            try:
                self.cfg.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")
        return True

    def _hold(self, held: _Held) -> None:
        """On the event loop: the connection waits, without a thread, for its answer's hold (or deadline)."""
        self.held[held.conn] = held
        held.respiter.when_ready(partial(self._release, held))

    def _release(self, held: _Held) -> None:
        """The hold is settled (called from the audit writer thread) or expired (the event loop): a thread
        sends the answer -- submitted from here, not through the event loop, one hand-over fewer. Once
        only, whichever comes first; the send counts as a busy thread (``sending``) until it is done."""
        with self._held_lock:
            if held.released:
                return
            held.released = True
            self.sending += 1
        try:
            fs = self.tpool.submit(self._handle_buffered, held.conn, held)
        except Exception:  # the pool is shut down (past the graceful timeout), or no thread could start
            if not getattr(self.tpool, "_shutdown", False):
                log.exception("a held answer could not be handed to a thread; closing its connection")
            self.method_queue.defer(self._held_dropped, held)
            return
        fs.add_done_callback(lambda fut: self.method_queue.defer(self._held_sent, held, fut))

    def _held_sent(self, held: _Held, fs: Any) -> None:
        """On the event loop: a held answer was sent; the connection goes on as any other's."""
        self.held.pop(held.conn, None)
        with self._held_lock:
            self.sending -= 1
        self.in_threads += 1  # finish_request counts the thread that sent it as finished
        self.finish_request(held.conn, fs)

    def _held_dropped(self, held: _Held) -> None:
        with self._held_lock:
            self.sending -= 1
        if self.held.pop(held.conn, None) is not None:
            self._close(held.conn)

    def _expire_held(self) -> None:
        """Past its deadline, an answer is sent if that needs no wait for the audit log (its record given
        up: the 503); a record being written keeps it held, without a thread, until ops/held.py's last
        deadline."""
        now = time.monotonic()
        for held in [h for h in self.held.values() if h.respiter.deadline <= now and not h.released]:
            if held.respiter.expire():
                self._release(held)

    def run(self) -> None:
        try:
            super().run()
        finally:
            for conn in list(self.lingering):
                self._finish_close(conn)


def adopt(worker: Any, *, read_timeout: float, body_limit: int) -> bool:
    """Turn gunicorn's stock gthread worker (just forked, not yet serving) into a
    :class:`BufferingThreadWorker`, and make gunicorn's error pages JSON. False for other worker
    classes, which are left alone."""
    if type(worker) is ThreadWorker:
        worker.__class__ = BufferingThreadWorker
    if not isinstance(worker, BufferingThreadWorker):
        log.warning("worker class %s is not gthread: slow clients are not guarded against here "
                    "(put nginx in front)", type(worker).__name__)
        return False
    worker.configure(read_timeout, body_limit)
    log.debug("worker reads requests in its event loop (REQUEST_READ_TIMEOUT %ss)", read_timeout)
    util.write_error = write_json_error  # this worker process only; gunicorn calls util.write_error(...)
    return True
