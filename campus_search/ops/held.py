"""Answers held without a thread until their audit record is committed.

A search is answered only once its audit record is committed -- by default, on disk (docs/security.md,
"Durability"). Waited for in the request's thread, that commit holds one of a worker's few threads (two
in the brief's gunicorn command) for its round trip and its WAL flush. When the disk stalls (0.1-3 s at
a time on the benchmark machine, docs/performance.md), every thread of every worker ends up waiting for a
flush: the cores idle while requests queue, and ``/health/live`` waits behind them.

So the gunicorn worker (:mod:`campus_search.ops.gunicorn_worker`) offers to hold answers itself: it sets
:data:`HOLD_KEY` in the WSGI environ. The search's audit hook (``api/auditing.py``) then hands the record
to the writer thread without waiting, and leaves a :class:`AuditHold` under :data:`HELD_KEY`; the app's
WSGI entry point (:class:`HoldAnswers`) returns a :class:`HeldAnswer` in place of the response. The
worker frees the thread; once the record's outcome is known (:meth:`HeldAnswer.when_ready`, called from
the audit writer thread) or its deadline has passed, it writes the answer from a thread again: the
response as built if the record was stored, else its alternative (with ``AUDIT_FAILURE_MODE=refuse``, the
503 that withholds the results). Nothing reaches the client before the record's outcome is known, as
before; only the waiting moved out of the thread.

A server that does not set :data:`HOLD_KEY` (another WSGI server, the test client, or the worker's own
TLS, HTTP/2 and PROXY-protocol paths, which run gunicorn's request handling) never sees a held answer:
the audit hook waits for the outcome in the request's thread, as before. Iterating a :class:`HeldAnswer`
also waits for the outcome, bounded as ``Auditor.settle`` bounds it.

The deadline (:meth:`AuditHold.expire`): WRITE_TIMEOUT after the record was handed over, a record the
writer has not taken is given up (never written later) and the answer is sent (the 503, with
``AUDIT_FAILURE_MODE=refuse``); a record it is writing keeps the answer held -- still without a thread --
until its transaction ends or CLAIMED_WAIT more has passed. A thread that sends an answer therefore never
waits for the audit log. Framework-free (plain WSGI).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from campus_search.audit.records import CLAIMED_WAIT, WRITE_TIMEOUT, Auditor

log = logging.getLogger(__name__)

#: Set (True) by a server that can hold an answer without a thread (:class:`HeldAnswer`'s protocol).
HOLD_KEY = "campus_search.hold_answers"
#: Where the app leaves the :class:`AuditHold` of the request's answer.
HELD_KEY = "campus_search.held"

#: Headers of the response as built that do not describe its alternative's body.
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding", "etag"})


class AuditHold:
    """What a held answer waits for: its audit record's outcome. ``alternative`` (status line, headers,
    body) is sent instead of the response when the record was not stored (None: the response stands
    either way, as ``AUDIT_FAILURE_MODE=log`` and failed requests have it)."""

    def __init__(self, auditor: Auditor, pending: Any, alternative: tuple[str, list[tuple[str, str]], bytes] | None
                 ) -> None:
        self.auditor = auditor
        self.pending = pending
        self.alternative = alternative
        #: when a server that holds the answer resumes it whatever happened (monotonic seconds): the writer
        #: then has given up the record unless it is writing it (Auditor.settle)
        self.deadline = pending.submitted + WRITE_TIMEOUT
        self._finals: list[Callable[[int], None]] = []
        self._stored: bool | None = None
        self._lock = threading.Lock()

    def ready(self) -> bool:
        return bool(self.pending.done.is_set())

    def expire(self) -> bool:
        """Called once :attr:`deadline` has passed: True when the answer can be sent without waiting (the
        outcome is known, the record was given up before the writer took it, or the writer has had
        CLAIMED_WAIT more), else False with the deadline moved to that last point."""
        if self.ready():
            return True
        last = self.pending.submitted + WRITE_TIMEOUT + CLAIMED_WAIT
        if time.monotonic() >= last or self.pending.abandon():
            return True
        self.deadline = last
        return False

    def when_ready(self, callback: Callable[[], None]) -> None:
        """``callback()`` once the outcome is known: at once, or later from the audit writer thread."""
        self.pending.when_done(callback)

    def stored(self) -> bool:
        """Whether the record was stored; waits for the outcome (Auditor.outcome: a record not stored is
        logged in full, once)."""
        with self._lock:
            if self._stored is None:
                self._stored = self.auditor.outcome(self.pending)
            return self._stored

    def after(self, callback: Callable[[int], None]) -> None:
        """``callback(status)`` with the status actually sent, once it is (metrics, the access log)."""
        self._finals.append(callback)

    def sent(self, status: int) -> None:
        finals, self._finals = self._finals, []
        for callback in finals:
            try:
                callback(status)
            except Exception:  # accounting must never break an answer
                log.debug("held answer callback failed", exc_info=True)

    def drop(self) -> None:
        """The answer will not be sent (after :meth:`sent`, nothing is left to drop)."""
        if self._finals:
            log.debug("a held answer was dropped before it was sent")
        self._finals = []


class HeldAnswer:
    """A WSGI response body that sends its status, headers and body once its hold is settled."""

    def __init__(self, hold: AuditHold, start_response: Callable[..., Any], status: str,
                 headers: list[tuple[str, str]], body: list[bytes]) -> None:
        self.hold = hold
        self._start_response = start_response
        self._response = (status, headers, body)

    # --- what the gunicorn worker uses (duck-typed: it imports nothing from here)

    @property
    def deadline(self) -> float:
        return self.hold.deadline

    def ready(self) -> bool:
        return self.hold.ready()

    def expire(self) -> bool:
        return self.hold.expire()

    def when_ready(self, callback: Callable[[], None]) -> None:
        self.hold.when_ready(callback)

    # --- WSGI

    def __iter__(self) -> Iterator[bytes]:
        status, headers, body = self._response
        if not self.hold.stored() and self.hold.alternative is not None:
            status, extra, alternative = self.hold.alternative
            headers = [(k, v) for k, v in headers if k.lower() not in _BODY_HEADERS and
                       k.lower() not in {x.lower() for x, _ in extra}]
            headers += [*extra, ("Content-Length", str(len(alternative)))]
            body = [alternative]
        self._start_response(status, headers)
        self.hold.sent(int(status.split(" ", 1)[0]))
        yield from body

    def close(self) -> None:
        self.hold.drop()  # sent, or never to be (the server gave up on the connection): nothing waits now


class HoldAnswers:
    """WSGI middleware around the app: when the server holds answers (:data:`HOLD_KEY`) and the app left
    a hold for this request (:data:`HELD_KEY`), the response is kept (status, headers, body) and a
    :class:`HeldAnswer` returned instead; every other request passes straight through."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not environ.get(HOLD_KEY):
            return self.app(environ, start_response)
        kept: list[Any] = []

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            if environ.get(HELD_KEY) is None:
                return start_response(status, headers, exc_info)
            kept[:] = [status, list(headers)]
            return _no_write

        body = self.app(environ, start)
        hold = environ.get(HELD_KEY)
        if hold is None:
            return body
        try:  # read while the hold is in the environ: an app that starts its response late is kept too
            chunks = [bytes(chunk) for chunk in body]
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
            environ.pop(HELD_KEY, None)
        if not kept:
            raise RuntimeError("the app left a held answer but started no response")
        return HeldAnswer(hold, start_response, kept[0], kept[1], chunks)


def _no_write(data: bytes) -> None:
    raise RuntimeError("a held answer's body is returned, never written through start_response's write()")
