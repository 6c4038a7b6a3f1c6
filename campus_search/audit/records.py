"""Audit log (SPEC §3): every search and admin action, append-only, in a keyed hash chain. The record
and its hashes are :mod:`.chain`'s; this module is the writer that appends them.

Record ``n`` stores ``hash_n = HMAC-SHA256(chain_key, hash_{n-1} + "\\n" + payload_n)`` where
``payload_n`` is the canonical JSON of its fields (:meth:`AuditRecord.payload`). Keys derive from
``AUDIT_HMAC_KEY``: one for the chain, one for query hashes, so a query hash reveals nothing about the
chain key. The key never reaches the database: with write access alone, history cannot be rewritten
without :func:`verify` noticing at the first record touched.

Appending is a group commit. Request threads hand their record to the process's writer thread and
wait until it is committed (:meth:`Auditor.append`: :meth:`~Auditor.submit`, then :meth:`~Auditor.settle`;
under the gunicorn worker the answer waits instead, without a thread: ``ops/held.py``, with
``_Pending.when_done``); the writer takes every record queued at that moment and appends them in one
transaction: lock and read the single-row chain head, insert the records in order (a trigger checks
each extends the head and moves it), commit (one WAL record, flushed without being waited for: see
"Durability" below). The head's row lock is the serialisation
point across threads, processes and replicas; batching means that lock and the flush are paid once per
batch, not once per search, so auditing does not cap throughput under load, and a single request waits
no longer than before.

Durability: by default (``AUDIT_WAIT_FOR_FLUSH=true``) a search is answered only once its record's commit
is on disk. With ``AUDIT_WAIT_FOR_FLUSH=false`` it is answered once its record is committed (chained,
visible to ``audit show`` and ``audit verify``), but the batch's transaction commits with
``synchronous_commit = off`` (that transaction only), so requests do not wait for the WAL to reach disk;
PostgreSQL's WAL writer flushes it within 3 x ``wal_writer_delay`` (600 ms by default). A crash of the
application loses no answered search's record. A crash of PostgreSQL or of the machine within that window
can undo the last committed records together with the chain head (the chain stays whole and verifiable, it
is only shorter): each process keeps its last ``RECENT_RECORDS`` committed records in memory, and its next
append, finding the head behind the last record it committed, writes those records in full to the error
log (``_check_head``). Only a crash of the machine that also ends the application can lose them without
that log line. Admin changes always commit their record synchronously, in the change's own transaction.

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

import collections
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from campus_search.audit.chain import RECORD_COLUMNS, AuditRecord, ChainKeys
from campus_search.errors import CampusSearchError, ServiceUnavailable

log = logging.getLogger(__name__)

_INSERT_HEAD = f"INSERT INTO audit_log ({', '.join(RECORD_COLUMNS)}, prev_hash, hash)"
_ROW_PLACEHOLDERS = f"({', '.join(['%s'] * (len(RECORD_COLUMNS) + 2))})"


class AuditUnavailable(ServiceUnavailable):
    code = "audit_unavailable"


MAX_BATCH = 256
WRITE_TIMEOUT = 10.0  # seconds a request waits for the writer to take its record before giving up


class _Pending:
    """One record handed to the writer thread. Exactly one of two things happens to it: the writer
    claims it (then it is written or fails, and the requester waits for that outcome), or the requester
    gives up first (``WRITE_TIMEOUT``) and the writer drops it. So a request never answers 503 for a
    record that is then written after all."""

    __slots__ = ("record", "done", "error", "submitted", "_state", "_lock", "_callbacks")

    def __init__(self, record: AuditRecord) -> None:
        self.record = record
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.submitted = time.monotonic()
        self._state = "queued"
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once the outcome is known: at once if it is, else from the writer thread
        (:meth:`finish`). A callback must not block: it runs on the thread that writes every record."""
        with self._lock:
            if not self.done.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def finish(self) -> None:
        """The writer's last word on the record (written, or ``error`` set): wake the waiter and run the
        callbacks."""
        with self._lock:
            self.done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one callback's failure must not stop the writer or the others
                log.exception("audit completion callback failed")

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


#: With AUDIT_WAIT_FOR_FLUSH=false the audit batch's transaction commits without waiting for its WAL flush
#: (that transaction only).
ASYNC_COMMIT = "SET LOCAL synchronous_commit = off"
RECENT_RECORDS = 4096

_STOP = object()  # queued by Auditor.close(): the writer thread ends
CLAIMED_WAIT = 60.0  # a claimed record's transaction ends well within this (pool and statement timeouts)


class Auditor:
    """Writes audit records for one process (uses the database's write pool) through one writer thread."""

    def __init__(self, db: Any, settings: Any) -> None:
        if not settings.audit_hmac_key:
            raise CampusSearchError("AUDIT_HMAC_KEY is not set")
        self.db = db
        self.settings = settings
        self.keys = ChainKeys(settings.audit_hmac_key)
        self.key_id = self.keys.key_id
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        from campus_search.storage.db import prepare_threshold

        # (no database: an auditor used only to compute hashes, e.g. `audit hash-query`)
        self._pipeline = db is not None and prepare_threshold(settings, db.dsn) is not None
        self._writer_pid: int | None = None
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self._closed = False
        # records committed by this process whose WAL may not be on disk yet, kept to log them should the
        # database lose them (_check_head); the newest RECENT_RECORDS, far more than the WAL writer's delay
        self._recent: collections.deque[AuditRecord] = collections.deque(maxlen=RECENT_RECORDS)
        self._recent_lock = threading.Lock()
        self._last_seq = 0

    def query_hash(self, query: str) -> str:
        return self.keys.query_hash(query)

    def chain_hash(self, prev_hash: str, record: AuditRecord) -> str:
        return self.keys.chain_hash(prev_hash, record)

    def append(self, record: AuditRecord) -> AuditRecord:
        """Write ``record`` at the end of the chain; returns once it is committed. Raises psycopg.Error or
        ServiceUnavailable (also when the writer does not confirm within WRITE_TIMEOUT)."""
        self.settle(self.submit(record))
        return record

    def submit(self, record: AuditRecord) -> _Pending:
        """Hand ``record`` to this process's writer thread and return at once; :meth:`settle` waits for the
        outcome (``append`` is the two together). A server that holds the answer without a thread until
        then (``api/auditing.py``, ``ops/held.py``) waits with ``_Pending.when_done`` instead."""
        record.key_id = self.key_id
        if record.response_time_ms is not None:
            record.response_time_ms = round(float(record.response_time_ms), 3)
        pending = _Pending(record)
        self._ensure_writer()
        self._queue.put(pending)
        return pending

    def settle(self, pending: _Pending) -> None:
        """Wait for a submitted record's outcome: returns once it is committed; raises as :meth:`append`.
        The writer has until WRITE_TIMEOUT after the submission to take it (a record it has not taken by
        then is given up: never written later), then its transaction decides."""
        record = pending.record
        if not pending.done.wait(max(0.0, pending.submitted + WRITE_TIMEOUT - time.monotonic())):
            if pending.abandon():  # never written now: the writer drops it
                raise AuditUnavailable("audit write timed out")
            # the writer is writing it: its outcome decides (the transaction is bounded by the pool's
            # and the database's timeouts), until CLAIMED_WAIT after that
            if not pending.done.wait(max(0.0, pending.submitted + WRITE_TIMEOUT + CLAIMED_WAIT - time.monotonic())):
                log.error("audit record %s: the write did not finish within %ss; it may still be stored",
                          record.request_id, WRITE_TIMEOUT + CLAIMED_WAIT)
                raise AuditUnavailable("audit write timed out")
        if pending.error is not None:
            # a fresh exception per request: one shared object would collect every waiter's traceback
            raise AuditUnavailable("audit record could not be written") from pending.error

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
                    p.finish()
                return
            for p in batch:
                try:
                    self._append_batch([p.record])
                except BaseException as one:  # noqa: BLE001 - this record's own failure
                    p.error = one
                p.finish()
            return
        for p in batch:
            p.finish()

    def _append_batch(self, records: list[AuditRecord]) -> None:
        # Pipelined on a direct connection (the head lock is held for less time); behind pgbouncer's
        # transaction pooling (prepared statements off), one statement at a time. With
        # AUDIT_WAIT_FOR_FLUSH=false the batch commits without waiting for its WAL flush (for this
        # transaction only): the requests wait for the commit, not for the disk; a database crash can undo
        # the last moments of records, which the next append notices and logs in full (see the module
        # docstring, "Durability", and _check_head).
        #
        # Round trips on a direct connection: two. The head's SELECT ... FOR UPDATE is read at once (its
        # row is needed to chain the records); the INSERT and the COMMIT then go out together and the
        # pipeline's closing Sync waits for both (conn.commit() inside a pipeline would wait for its own
        # Sync, and the pipeline's exit for another). The batch is acknowledged only after that COMMIT is
        # answered, i.e. committed (and flushed, unless AUDIT_WAIT_FOR_FLUSH=false).
        with self.db.connection() as conn:
            if not self._pipeline:
                if not self.settings.audit_wait_for_flush:
                    conn.execute(ASYNC_COMMIT)
                self._insert(conn, records)
                conn.commit()
            else:
                with conn.pipeline():
                    if not self.settings.audit_wait_for_flush:
                        conn.execute(ASYNC_COMMIT)
                    self._insert(conn, records)
                    conn.execute("COMMIT")
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    raise psycopg.OperationalError("the audit batch's COMMIT did not end its transaction")
        with self._recent_lock:
            self._recent.extend(records)
            self._last_seq = max(self._last_seq, int(records[-1].seq or 0))

    def _check_head(self, head_seq: int) -> None:
        """Called with the chain head just locked. A head behind the last record this process committed
        means the database lost committed records (a crash within the WAL writer's delay, or a restore):
        the ones this process still holds are logged in full, so none disappears silently."""
        with self._recent_lock:
            if head_seq >= self._last_seq:
                return
            lost = [r for r in self._recent if int(r.seq or 0) > head_seq]
            last, self._last_seq = self._last_seq, head_seq
            self._recent.clear()
        log.error("audit chain head is at record %s but this process committed up to record %s: the database "
                  "lost committed audit records (a crash before their WAL reached disk, or a restore); %s of "
                  "them follow in full", head_seq, last, len(lost))
        for record in lost:
            lost_seq = record.seq
            record.seq = record.prev_hash = record.hash = None
            log.error("audit record LOST by the database (was record %s); record follows: %s", lost_seq,
                      json.dumps(record.as_dict(), default=str, ensure_ascii=False))

    def _insert(self, conn: Any, records: list[AuditRecord]) -> None:
        """Lock the chain head and insert ``records`` after it, in the caller's transaction."""
        seq, prev = conn.execute("SELECT seq, hash FROM audit_chain_head FOR UPDATE").fetchone()
        self._check_head(int(seq))
        rows = []
        for record in records:
            record.seq, record.prev_hash = int(seq) + 1, prev
            record.hash = self.chain_hash(prev, record)
            seq, prev = record.seq, record.hash
            rows.append([getattr(record, n) for n in RECORD_COLUMNS] + [record.prev_hash, record.hash])
        # one multi-row INSERT: the database checks the chain and moves the head once per statement
        values = ", ".join([_ROW_PLACEHOLDERS] * len(rows))
        conn.execute(f"{_INSERT_HEAD} VALUES {values}", [v for row in rows for v in row])

    def append_in(self, conn: Any, record: AuditRecord) -> bool:
        """Write ``record`` inside the caller's open transaction, so it commits (or rolls back) with the
        change it describes. Call it last in the transaction: the chain head's lock is held to commit.

        With AUDIT_FAILURE_MODE=refuse a failure raises AuditUnavailable (the caller's transaction must
        then roll back: the change does not happen). With ``log`` the record goes to the error log, the
        transaction goes on (the failed insert is undone by a savepoint) and False is returned."""
        return self.append_all_in(conn, [record])

    def append_all_in(self, conn: Any, records: list[AuditRecord]) -> bool:
        """:meth:`append_in` for several records at once: one lock of the chain head and one INSERT, so a
        change that many records describe holds the head no longer than one would. A database error
        that ends the connection (``psycopg.OperationalError``) is raised as it is."""
        if not records:
            return True
        for record in records:
            record.key_id = self.key_id
            if record.response_time_ms is not None:
                record.response_time_ms = round(float(record.response_time_ms), 3)
        try:
            with conn.transaction():  # a savepoint: a failed insert leaves the caller's change intact
                self._insert(conn, records)
            return True
        except psycopg.OperationalError:
            raise  # the connection itself is gone: the change cannot commit either
        except psycopg.Error as exc:
            for record in records:
                record.seq = record.prev_hash = record.hash = None
                self.log_unstored(record, exc)
            if self.refuse_on_failure:
                raise AuditUnavailable("the audit log is unavailable; nothing was changed",
                                       headers={"Retry-After": "5"}) from exc
            return False

    def write(self, record: AuditRecord) -> bool:
        """Append, or log the record as an error when that fails. Returns whether it was stored."""
        try:
            pending = self.submit(record)
        except Exception as exc:  # whatever failed, the record goes to the log and the failure is counted
            self.log_unstored(record, exc)
            return False
        return self.outcome(pending)

    def outcome(self, pending: _Pending) -> bool:
        """:meth:`settle`, the record logged as an error when it was not stored. Whether it was stored."""
        try:
            self.settle(pending)
            return True
        except Exception as exc:  # whatever failed, the record goes to the log and the failure is counted
            self.log_unstored(pending.record, exc)
            return False

    @staticmethod
    def log_unstored(record: AuditRecord, exc: BaseException) -> None:
        from campus_search import metrics

        metrics.audit_failure()
        cause = exc.__cause__ or exc
        log.error("audit record NOT stored (%s: %s); record follows: %s", exc.__class__.__name__,
                  cause.__class__.__name__, json.dumps(record.as_dict(), default=str, ensure_ascii=False),
                  extra={"request_id": record.request_id})  # also when logged outside the request (a held answer)

    @property
    def refuse_on_failure(self) -> bool:
        return self.settings.audit_failure_mode == "refuse"


def auditor_of(services: Any) -> Auditor:
    """The process's Auditor (``Services`` opens one per process with its pools, so request threads
    share it and its one writer thread)."""
    return services.ensure_open().auditor
