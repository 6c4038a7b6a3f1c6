"""Verification of the audit log: the whole chain recomputed, and the first altered, missing or
re-keyed record named (``campus-search audit verify``)."""

from __future__ import annotations

import dataclasses
import hmac
from dataclasses import dataclass
from typing import Any

import psycopg

from campus_search.audit.chain import GENESIS, RECORD_COLUMNS, AuditRecord, ChainKeys


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
    keys = ChainKeys(key)
    report = VerifyReport()
    prev, expected = GENESIS, 1
    columns = (*RECORD_COLUMNS, "prev_hash", "hash")
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
            if rec.key_id != keys.key_id:
                report.fail(seq, f"record {seq} was chained with another AUDIT_HMAC_KEY (key id {rec.key_id})")
            elif not hmac.compare_digest(str(rec.hash), keys.chain_hash(str(rec.prev_hash), rec)):
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
