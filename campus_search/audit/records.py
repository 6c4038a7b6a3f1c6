"""Audit log (SPEC §3): every search and admin action, append-only, in a keyed hash chain.

Record ``n`` stores ``hash_n = HMAC-SHA256(chain_key, hash_{n-1} + "\\n" + payload_n)`` where
``payload_n`` is the canonical JSON of its fields (:meth:`AuditRecord.payload`). Keys derive from
``AUDIT_HMAC_KEY``: one for the chain, one for query hashes, so a query hash reveals nothing about the
chain key. The key never reaches the database: with write access alone, history cannot be rewritten
without :func:`verify` noticing at the first record touched.

Appending is a group commit. Request threads hand their record to the process's writer thread and
wait until it is durable; the writer takes every record queued at that moment and appends them in one
transaction: lock and read the single-row chain head, insert the records in order (a trigger checks
each extends the head and moves it), commit (one WAL flush). The head's row lock is the serialisation
point across threads, processes and replicas; batching means that lock and the flush are paid once per
batch, not once per search, so auditing does not cap throughput under load, and a single request waits
no longer than before.

A record the database refuses fails only its own request (a refused batch is retried record by
record); a request that gives up waiting (``WRITE_TIMEOUT``) before the writer took its record is
answered 503 and the record is dropped, never written later as a success. ``Auditor.close`` (from
``Services.close``) writes what is queued and stops the thread.

Admin changes to the index write their record inside the change's own transaction
(:func:`admin_change`, :meth:`Auditor.append_in`): the change and its record commit together or not at
all.

When a write fails (``AUDIT_FAILURE_MODE``): ``refuse`` (default) turns a successful search into a 503
without results and makes admin actions fail with 503 (an admin change is then rolled back); requests
that failed anyway keep their answer. In every mode the unwritten record goes to the error log, so
nothing disappears silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import psycopg
from flask import current_app, g, has_request_context, request
from werkzeug.exceptions import HTTPException

from campus_search.errors import CampusSearchError, ServiceUnavailable

log = logging.getLogger(__name__)

GENESIS = "0" * 64
TEXT_LIMIT = 2000  # per free-text field: a record stays small whatever a client sends
_FIELDS = ("seq", "recorded_at", "kind", "action", "request_id", "user_id", "role", "department", "query_hmac",
           "query_text", "filters", "target", "details", "result_count", "response_time_ms", "client_ip",
           "user_agent", "status", "success", "key_id")
_INSERT_HEAD = f"INSERT INTO audit_log ({', '.join(_FIELDS)}, prev_hash, hash)"
_ROW_PLACEHOLDERS = f"({', '.join(['%s'] * (len(_FIELDS) + 2))})"


class AuditUnavailable(ServiceUnavailable):
    code = "audit_unavailable"


def _derive(key: str, purpose: str) -> bytes:
    return hmac.new(key.encode(), f"campus-search/audit/{purpose}".encode(), hashlib.sha256).digest()


def _clean(value: Any, limit: int = TEXT_LIMIT) -> str | None:
    """Text as PostgreSQL will store it (no NUL, no lone surrogates), bounded, so what is hashed is
    exactly what is stored."""
    if value is None:
        return None
    text = str(value).replace("\x00", "\ufffd")
    return text.encode("utf-8", "replace").decode("utf-8")[:limit]


def canonical_json(value: Any) -> str | None:
    if value is None:
        return None
    return _clean(json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str),
                  TEXT_LIMIT * 4)


def normalise_query(query: str) -> str:
    """The form of a query that is hashed: the search's own normalisation (querytext.py: NFC,
    whitespace collapsed, case kept)."""
    from campus_search.retrieval.querytext import normalise_query as normalise

    return normalise(query)


@dataclass
class AuditRecord:
    """One audit record. ``seq``, ``prev_hash`` and ``hash`` are set when it is appended."""

    kind: str
    action: str
    success: bool
    recorded_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    request_id: str | None = None
    user_id: str | None = None
    role: str | None = None
    department: str | None = None
    query_hmac: str | None = None
    query_text: str | None = None
    filters: str | None = None
    target: str | None = None
    details: str | None = None
    result_count: int | None = None
    response_time_ms: float | None = None
    client_ip: str | None = None
    user_agent: str | None = None
    status: int | None = None
    key_id: str = ""
    seq: int | None = None
    prev_hash: str | None = None
    hash: str | None = None

    def payload(self) -> str:
        """Canonical JSON of every field but the two hashes (the bytes the chain HMAC covers)."""
        values = [getattr(self, name) for name in _FIELDS]
        values[1] = self.recorded_at.astimezone(dt.UTC).isoformat(timespec="microseconds")
        return json.dumps(values, ensure_ascii=False, separators=(",", ":"))

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["recorded_at"] = self.recorded_at.astimezone(dt.UTC).isoformat(timespec="microseconds")
        return out


MAX_BATCH = 256
WRITE_TIMEOUT = 10.0  # seconds a request waits for its record to be durable before giving up


class _Pending:
    """One record handed to the writer thread. Exactly one of two things happens to it: the writer
    claims it (then it is written or fails, and the requester waits for that outcome), or the requester
    gives up first (``WRITE_TIMEOUT``) and the writer drops it. So a request never answers 503 for a
    record that is then written after all."""

    __slots__ = ("record", "done", "error", "_state", "_lock")

    def __init__(self, record: AuditRecord) -> None:
        self.record = record
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._state = "queued"
        self._lock = threading.Lock()

    def claim(self) -> bool:
        """The writer takes the record; False if the requester gave up on it already."""
        with self._lock:
            if self._state == "abandoned":
                return False
            self._state = "claimed"
            return True

    def abandon(self) -> bool:
        """The requester gives up; False if the writer has the record already (it will finish it)."""
        with self._lock:
            if self._state == "claimed":
                return False
            self._state = "abandoned"
            return True


_STOP = object()  # queued by Auditor.close(): the writer thread ends
CLAIMED_WAIT = 60.0  # a claimed record's transaction ends well within this (pool and statement timeouts)


class Auditor:
    """Writes audit records for one process (uses the database's write pool) through one writer thread."""

    def __init__(self, db: Any, settings: Any) -> None:
        if not settings.audit_hmac_key:
            raise CampusSearchError("AUDIT_HMAC_KEY is not set")
        self.db = db
        self.settings = settings
        self._chain_key = _derive(settings.audit_hmac_key, "chain")
        self._query_key = _derive(settings.audit_hmac_key, "query")
        self.key_id = key_id(settings.audit_hmac_key)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        from campus_search.storage.db import prepare_threshold

        # (no database: an auditor used only to compute hashes, e.g. `audit hash-query`)
        self._pipeline = db is not None and prepare_threshold(settings, db.dsn) is not None
        self._writer_pid: int | None = None
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self._closed = False

    def query_hash(self, query: str) -> str:
        return hmac.new(self._query_key, normalise_query(query).encode("utf-8", "surrogatepass"),
                        hashlib.sha256).hexdigest()

    def chain_hash(self, prev_hash: str, record: AuditRecord) -> str:
        return hmac.new(self._chain_key, f"{prev_hash}\n{record.payload()}".encode(), hashlib.sha256).hexdigest()

    def append(self, record: AuditRecord) -> AuditRecord:
        """Write ``record`` at the end of the chain; returns once it is committed. Raises psycopg.Error or
        ServiceUnavailable (also when the writer does not confirm within WRITE_TIMEOUT)."""
        record.key_id = self.key_id
        if record.response_time_ms is not None:
            record.response_time_ms = round(float(record.response_time_ms), 3)
        pending = _Pending(record)
        self._ensure_writer()
        self._queue.put(pending)
        if not pending.done.wait(WRITE_TIMEOUT):
            if pending.abandon():  # never written now: the writer drops it
                raise AuditUnavailable("audit write timed out")
            # the writer is writing it: its outcome decides (the transaction is bounded by the pool's
            # and the database's timeouts)
            if not pending.done.wait(CLAIMED_WAIT):
                log.error("audit record %s: the write did not finish within %ss; it may still be stored",
                          record.request_id, WRITE_TIMEOUT + CLAIMED_WAIT)
                raise AuditUnavailable("audit write timed out")
        if pending.error is not None:
            # a fresh exception per request: one shared object would collect every waiter's traceback
            raise AuditUnavailable("audit record could not be written") from pending.error
        return record

    def _ensure_writer(self) -> None:
        """One daemon writer thread per process (a forked child starts its own, with a fresh queue)."""
        if self._writer_pid == os.getpid():
            return
        with self._writer_lock:
            if self._writer_pid == os.getpid():
                return
            if self._closed:
                raise AuditUnavailable("the audit writer is closed")
            self._queue = queue.SimpleQueue()
            self._writer = threading.Thread(target=self._run_writer, args=(self._queue,), name="audit-writer",
                                            daemon=True)
            self._writer.start()
            self._writer_pid = os.getpid()

    def close(self, timeout: float = 30.0) -> None:
        """Stop this process's writer thread after the records queued before this call (Services.close)."""
        with self._writer_lock:
            self._closed = True
            writer = self._writer if self._writer_pid == os.getpid() else None
            self._writer, self._writer_pid = None, None
            if writer is not None:
                self._queue.put(_STOP)
        if writer is not None:
            writer.join(timeout)

    def _run_writer(self, pending_queue: queue.SimpleQueue[Any]) -> None:
        stop = False
        while not stop:
            batch: list[_Pending] = []
            item = pending_queue.get()
            while True:
                if item is _STOP:
                    stop = True
                elif item.claim():  # a record its requester gave up on is dropped, never written late
                    batch.append(item)
                if stop or len(batch) >= MAX_BATCH:
                    break
                try:
                    item = pending_queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write_batch(batch)

    def _write_batch(self, batch: list[_Pending]) -> None:
        """Append a batch in one transaction. If that failed for a reason other than the database being
        unreachable (a record the database refuses, or one that cannot even be hashed), each record is
        retried alone, so one bad record fails only its own request."""
        try:
            self._append_batch([p.record for p in batch])
        except BaseException as exc:  # reported to the waiting requests; the thread carries on
            # the database unreachable or saturated: every record would fail alike, so no retries
            retry = len(batch) > 1 and not isinstance(exc, psycopg.OperationalError | ServiceUnavailable)
            if not retry:
                for p in batch:
                    p.error = exc
                    p.done.set()
                return
            for p in batch:
                try:
                    self._append_batch([p.record])
                except BaseException as one:  # noqa: BLE001 - this record's own failure
                    p.error = one
                p.done.set()
            return
        for p in batch:
            p.done.set()

    def _append_batch(self, records: list[AuditRecord]) -> None:
        # One WAL flush per batch. Pipelined on a direct connection (the head lock is held for less time);
        # behind pgbouncer's transaction pooling (prepared statements off), one statement at a time.
        with self.db.connection() as conn, (conn.pipeline() if self._pipeline else contextlib.nullcontext()):
            self._insert(conn, records)
            conn.commit()

    def _insert(self, conn: Any, records: list[AuditRecord]) -> None:
        """Lock the chain head and insert ``records`` after it, in the caller's transaction."""
        seq, prev = conn.execute("SELECT seq, hash FROM audit_chain_head FOR UPDATE").fetchone()
        rows = []
        for record in records:
            record.seq, record.prev_hash = int(seq) + 1, prev
            record.hash = self.chain_hash(prev, record)
            seq, prev = record.seq, record.hash
            rows.append([getattr(record, n) for n in _FIELDS] + [record.prev_hash, record.hash])
        # one multi-row INSERT: the database checks the chain and moves the head once per statement
        values = ", ".join([_ROW_PLACEHOLDERS] * len(rows))
        conn.execute(f"{_INSERT_HEAD} VALUES {values}", [v for row in rows for v in row])

    def append_in(self, conn: Any, record: AuditRecord) -> bool:
        """Write ``record`` inside the caller's open transaction, so it commits (or rolls back) with the
        change it describes. Call it last in the transaction: the chain head's lock is held to commit.

        With AUDIT_FAILURE_MODE=refuse a failure raises AuditUnavailable (the caller's transaction must
        then roll back: the change does not happen). With ``log`` the record goes to the error log, the
        transaction goes on (the failed insert is undone by a savepoint) and False is returned."""
        record.key_id = self.key_id
        if record.response_time_ms is not None:
            record.response_time_ms = round(float(record.response_time_ms), 3)
        try:
            with conn.transaction():  # a savepoint: a failed insert leaves the caller's change intact
                self._insert(conn, [record])
            return True
        except psycopg.OperationalError:
            raise  # the connection itself is gone: the change cannot commit either
        except psycopg.Error as exc:
            record.seq = record.prev_hash = record.hash = None
            self._log_unstored(record, exc)
            if self.refuse_on_failure:
                raise AuditUnavailable("the audit log is unavailable; nothing was changed",
                                       headers={"Retry-After": "5"}) from exc
            return False

    def write(self, record: AuditRecord) -> bool:
        """Append, or log the record as an error when that fails. Returns whether it was stored."""
        try:
            self.append(record)
            return True
        except Exception as exc:  # whatever failed, the record goes to the log and the failure is counted
            self._log_unstored(record, exc)
            return False

    @staticmethod
    def _log_unstored(record: AuditRecord, exc: BaseException) -> None:
        from campus_search import metrics

        metrics.audit_failure()
        cause = exc.__cause__ or exc
        log.error("audit record NOT stored (%s: %s); record follows: %s", exc.__class__.__name__,
                  cause.__class__.__name__, json.dumps(record.as_dict(), default=str, ensure_ascii=False))

    @property
    def refuse_on_failure(self) -> bool:
        return self.settings.audit_failure_mode == "refuse"


def key_id(key: str) -> str:
    """A short, non-secret fingerprint of an AUDIT_HMAC_KEY (tells 'other key' from 'tampered')."""
    return _derive(key, "key-id").hex()[:16]


def auditor_of(services: Any) -> Auditor:
    """The process's Auditor (``Services`` opens one per process with its pools, so request threads
    share it and its one writer thread)."""
    return services.ensure_open().auditor


# --- request context -------------------------------------------------------------------------------

def _request_fields(settings: Any) -> dict[str, Any]:
    from campus_search.security.proxies import client_ip

    if not has_request_context():
        return {"user_agent": "campus-search cli"}
    started = g.get("start_time")
    return {
        "request_id": g.get("request_id"),
        "client_ip": _clean(client_ip(request, settings), 64),
        "user_agent": _clean(request.headers.get("User-Agent"), 512),
        "response_time_ms": (time.perf_counter() - started) * 1000 if started else None,
    }


def _principal_fields(principal: Any) -> dict[str, Any]:
    if principal is None:
        return {}
    return {"user_id": _clean(principal.user_id, 256), "role": principal.role.name,
            "department": _clean("; ".join(principal.departments), 1000) or None}


def _search_body() -> dict[str, Any]:
    """The search request's JSON object, or {} when there is none to read: a body over the request
    limit (answered 413) is never read, so its record is built from what is known without it."""
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit is not None and request.content_length is not None and request.content_length > limit:
        return {}
    try:
        body = request.get_json(silent=True, cache=True)
    except HTTPException:  # e.g. a body without Content-Length that turns out larger than the limit
        return {}
    return body if isinstance(body, dict) else {}


def search_record(auditor: Auditor, response: Any) -> AuditRecord:
    """The audit record of the current ``POST /api/search`` request, from what the view left on ``g``
    (``search_params``, ``search_outcome``) and the response."""
    settings = auditor.settings
    params = g.get("search_params")
    body = _search_body()
    query = params.query if params is not None else body.get("query")
    filters = params.filters if params is not None else body.get("filters")
    details: dict[str, Any] = {}
    if params is not None:
        details.update(max_results=params.max_results, similarity_threshold=params.similarity_threshold)
    outcome = g.get("search_outcome")
    if outcome is not None:
        details["from_cache"] = bool(outcome.from_cache)
    if response.status_code >= 400:
        error = (response.get_json(silent=True) or {}).get("error") if response.is_json else None
        details["error"] = error.get("code") if isinstance(error, dict) else str(response.status_code)
    return AuditRecord(
        kind="search", action="search", success=response.status_code < 400, status=response.status_code,
        query_hmac=auditor.query_hash(query) if isinstance(query, str) else None,
        query_text=_clean(normalise_query(query)) if settings.audit_raw_queries and isinstance(query, str) else None,
        filters=canonical_json(filters) if isinstance(filters, Mapping) else None,
        details=canonical_json(details) if details else None,
        result_count=outcome.count if outcome is not None and response.status_code < 400 else None,
        **_principal_fields(g.get("principal")), **_request_fields(settings))


def audit_search_response(response: Any) -> Any:
    """``after_request`` hook of the search blueprint: one record per search, success or not.

    Runs for error responses too (Flask finalises handled errors through after_request), so 400s,
    401s, 403s and 429s are recorded. Fail closed: a successful answer whose record cannot be written
    becomes a 503 (with AUDIT_FAILURE_MODE=refuse)."""
    services = current_app.extensions["campus_search"].services
    auditor: Auditor | None = None
    stored = False
    try:
        auditor = auditor_of(services)
        stored = auditor.write(search_record(auditor, response))
    except Exception:  # never let auditing crash the request; the failure is loud instead
        log.exception("audit record could not be built")
    if stored or response.status_code >= 400:
        return response
    if auditor is not None and not auditor.refuse_on_failure:
        return response
    from campus_search.api.errors import error_response

    return error_response(503, AuditUnavailable.code, "the audit log is unavailable; results are withheld",
                          headers={"Retry-After": "5"})


# --- admin actions ---------------------------------------------------------------------------------

def _admin_record(services: Any, action: str, target: str | None, details: Mapping[str, Any] | None,
                  success: bool, status: int | None, principal: Any) -> AuditRecord:
    if principal is None and has_request_context():
        principal = g.get("principal")
    return AuditRecord(kind="admin", action=_clean(action, 100) or "unknown", success=success,
                       status=status if status is not None else (200 if success else None),
                       target=_clean(target, 1000), details=canonical_json(dict(details)) if details else None,
                       **_principal_fields(principal), **_request_fields(services.settings))


def record_admin_action(services: Any, action: str, *, target: str | None = None,
                        details: Mapping[str, Any] | None = None, success: bool = True, status: int | None = None,
                        principal: Any = None) -> AuditRecord:
    """Audit an admin action (``cache.clear``, ``explain`` ...) in its own transaction; the caller
    (``g.principal``) and request fields are filled in. Raises AuditUnavailable (503) if the record
    cannot be stored and AUDIT_FAILURE_MODE=refuse. Changes to the index record through
    :func:`admin_change` instead, in the change's own transaction."""
    auditor = auditor_of(services)
    record = _admin_record(services, action, target, details, success, status, principal)
    if not auditor.write(record) and auditor.refuse_on_failure:
        raise AuditUnavailable("the audit log is unavailable; the action was recorded in the error log only",
                               headers={"Retry-After": "5"})
    return record


@contextmanager
def admin_action(services: Any, action: str, *, target: str | None = None,
                 details: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """``with admin_action(services, "explain") as details: details["visible"] = ...``: records success
    after the block, or failure with the error code (and re-raises the original error). For actions
    that change nothing stored; a change to the index uses :func:`admin_change`."""
    info = dict(details or {})
    try:
        yield info
    except CampusSearchError as exc:
        record_failure(services, action, target, {**info, "error": exc.code}, exc.status)
        raise
    except Exception:
        record_failure(services, action, target, {**info, "error": "internal_error"}, 500)
        raise
    record_admin_action(services, action, target=target, details=info)


class AdminChange:
    """What :func:`admin_change` yields: ``details`` for the record, and :meth:`record_in` for the writer
    of the change to call inside its transaction."""

    def __init__(self, services: Any, action: str, target: str | None, details: Mapping[str, Any]) -> None:
        self.services, self.action, self.target = services, action, target
        self.details = dict(details)
        self.attempted = False

    def record_in(self, conn: Any, **details: Any) -> None:
        """Write the success record in ``conn``'s open transaction (last, just before it commits). With
        AUDIT_FAILURE_MODE=refuse an unwritable record raises AuditUnavailable, which rolls the change
        back: the change and its record commit together or not at all."""
        self.details.update(details)
        self.attempted = True
        record = _admin_record(self.services, self.action, self.target, self.details, True, 200, None)
        auditor_of(self.services).append_in(conn, record)


@contextmanager
def admin_change(services: Any, action: str, *, target: str | None = None,
                 details: Mapping[str, Any] | None = None) -> Iterator[AdminChange]:
    """An admin change to the index (``document.upsert``, ``document.metadata``, ``document.delete``)::

        with admin_change(services, "document.delete", target=doc_id) as change:
            ingester.delete([doc_id], audit=lambda conn, n: change.record_in(conn))

    The success record is written in the change's transaction; a failed change is recorded as a
    failure (with its error code) in a transaction of its own, and the original error re-raised."""
    change = AdminChange(services, action, target, details or {})
    try:
        yield change
    except AuditUnavailable:
        if not change.attempted:
            record_failure(services, action, target, {**change.details, "error": AuditUnavailable.code}, 503)
        raise  # (the record of a change rolled back for want of its record is in the error log already)
    except CampusSearchError as exc:
        record_failure(services, action, target, {**change.details, "error": exc.code}, exc.status)
        raise
    except Exception:
        record_failure(services, action, target, {**change.details, "error": "internal_error"}, 500)
        raise
    if not change.attempted:  # the writer made no transaction (nothing to change): record it on its own
        record_admin_action(services, action, target=target, details=change.details)


def record_failure(services: Any, action: str, target: str | None, info: dict[str, Any], status: int) -> None:
    with suppress(AuditUnavailable):  # logged already; the action's own error is the one to report
        record_admin_action(services, action, target=target, details=info, success=False, status=status)


# --- verification ----------------------------------------------------------------------------------

@dataclass
class VerifyReport:
    """Outcome of :func:`verify`: ``first_bad_seq`` pinpoints the first altered or missing record."""

    ok: bool = True
    records: int = 0
    first_bad_seq: int | None = None
    problem: str | None = None
    bad_records: int = 0
    last_seq: int = 0
    last_hash: str = GENESIS
    head_seq: int = 0
    head_hash: str = GENESIS

    def fail(self, seq: int, problem: str) -> None:
        self.bad_records += 1
        if self.ok:
            self.ok, self.first_bad_seq, self.problem = False, seq, problem

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def verify(conn: psycopg.Connection, key: str, *, anchor: tuple[int, str] | None = None,
           batch: int = 5000) -> VerifyReport:
    """Recompute the whole chain (streamed with a server-side cursor).

    Detects: an altered field or hash (HMAC mismatch at that record), a missing record (gap in
    ``seq``), a broken link (``prev_hash`` not the previous record's hash), records chained with
    another key, missing records at the end (behind the chain head), and -- with ``anchor`` (a
    ``(seq, hash)`` printed by an earlier verify and kept elsewhere) -- a rewritten or truncated log.
    """
    auditor = Auditor(None, _KeyOnly(key))
    report = VerifyReport()
    prev, expected = GENESIS, 1
    columns = (*_FIELDS, "prev_hash", "hash")
    fresh = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        # One snapshot for the records and the chain head: a server appending meanwhile (deploy/rehearse
        # verified under load) must not make the head look further on than the records read.
        if fresh:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        head = conn.execute("SELECT seq, hash FROM audit_chain_head").fetchone()
        cur = conn.cursor(name="audit_verify")
        cur.itersize = batch
        cur.execute(f"SELECT {', '.join(columns)} FROM audit_log ORDER BY seq")
        for row in cur:
            rec = AuditRecord(**dict(zip(columns, row, strict=True)))
            seq = int(rec.seq or 0)
            report.records += 1
            if seq != expected:
                report.fail(expected, f"record {expected} is missing" if seq == expected + 1
                            else f"records {expected} to {seq - 1} are missing")
            if rec.key_id != auditor.key_id:
                report.fail(seq, f"record {seq} was chained with another AUDIT_HMAC_KEY (key id {rec.key_id})")
            elif not hmac.compare_digest(str(rec.hash), auditor.chain_hash(str(rec.prev_hash), rec)):
                report.fail(seq, f"record {seq} was altered: its hash does not match its content")
            elif seq == expected and rec.prev_hash != prev:
                report.fail(seq, f"record {seq} does not link to record {seq - 1} (one of them was replaced)")
            if anchor and seq == anchor[0] and rec.hash != anchor[1]:
                report.fail(seq, f"record {seq} differs from the anchor given (history rewritten)")
            prev, expected = str(rec.hash), seq + 1
        cur.close()
        report.last_seq, report.last_hash = expected - 1, prev
    report.head_seq, report.head_hash = (int(head[0]), head[1]) if head else (0, GENESIS)
    if report.head_seq > report.last_seq:
        report.fail(report.last_seq + 1, f"records {report.last_seq + 1} to {report.head_seq} are missing at the "
                                         "end (the chain head is further on)")
    elif (report.head_seq, report.head_hash) != (report.last_seq, report.last_hash):
        report.fail(report.last_seq, "the chain head does not match the last record")
    if anchor and anchor[0] > report.last_seq:
        report.fail(report.last_seq + 1, f"anchored record {anchor[0]} is missing (log truncated)")
    return report


@dataclass(frozen=True)
class _KeyOnly:
    audit_hmac_key: str
    audit_failure_mode: str = "refuse"
