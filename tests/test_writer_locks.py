"""Writers never deadlock: a batch that has written document A's chunks (its statistics changes
included) and then writes document X, against an admin PUT / PATCH / DELETE of X (issue 11: the
statistics row used to be taken after the document row by one writer and before it by the other).
The batch follows Ingester._flush step by step (rows locked up front, then A, then X); the admin write
is started only once the batch is inside its transaction, and the batch goes on only once the admin
write is blocked behind it, so the test does not depend on timing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from campus_search.ingest.chunking import Block
from campus_search.ingest.metadata import AccessMetadata
from campus_search.ingest.pipeline import IngestReport, _content_hash, _Pending
from campus_search.ingest.sources import ParsedDocument
from campus_search.security.access import METADATA_FIELDS, columns


def _doc(ext_id: str, text: str) -> ParsedDocument:
    return ParsedDocument(external_id=ext_id, title=ext_id.title(), blocks=[Block(text)], source=f"test:{ext_id}")


def _prepared(ingester: Any, doc: ParsedDocument) -> tuple[_Pending, dict[str, Any]]:
    """A batch's decision to replace the stored document ``doc`` (as Ingester._flush prepares it)."""
    pending = _Pending(doc, {}, _content_hash(doc, ingester.embedder.model_name))
    with ingester.db.connection() as conn:  # the row as the batch read it (Ingester._resolve)
        pending.existing = conn.execute(
            f"SELECT external_id, id, content_hash, {columns()}, source, pinned FROM documents "
            "WHERE external_id = %s", (doc.external_id,)).fetchone()
    pending.meta = AccessMetadata.from_row(pending.existing[3:3 + len(METADATA_FIELDS)])
    ingester._prepare_chunks([pending], IngestReport())
    return pending, ingester._vectors_for([pending], IngestReport())


def _wait_until_blocked_by(dsn: str, pid: int) -> None:
    """Return once some backend waits for a lock held by backend ``pid`` (bounded: fails, never hangs)."""
    deadline = time.monotonic() + 120
    with psycopg.connect(dsn, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                           (pid,)).fetchone()[0] == 0:
            assert time.monotonic() < deadline, "the second writer never queued behind the first"
            time.sleep(0.02)


WRITERS: dict[str, Callable[[Any], Any]] = {
    "put": lambda ing: ing.ingest([_doc("x", "The admin API replaced this text about library fines.")]),
    "patch": lambda ing: ing.update_metadata("x", {"clearance_level": 3}),
    "delete": lambda ing: ing.delete(["x"]),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_batch_holding_statistics_and_admin_write_of_same_document_do_not_deadlock(
        settings_factory: Any, services_factory: Any, writer: str) -> None:
    services = services_factory(settings_factory())
    ingester = services.ingester
    assert ingester.ingest([_doc("a", "Parking permits for staff."), _doc("x", "Exam timetables.")],
                           {"visibility": "public"}).added == 2
    pa, va = _prepared(ingester, _doc("a", "Parking permits for staff and students, renewed yearly."))
    px, vx = _prepared(ingester, _doc("x", "Exam timetables are published in March."))
    errors: list[BaseException] = []
    outcome: list[Any] = []
    with services.db.connection() as batch:  # the CLI batch's transaction
        batch.execute("SET deadlock_timeout = '100ms'")
        assert ingester._still_current(batch, [pa, px], IngestReport()) == {id(pa), id(px)}
        ingester._replace(batch, pa, va)  # document A's chunks and their statistics

        def admin() -> None:
            try:
                outcome.append(WRITERS[writer](ingester))
            except BaseException as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)

        thread = threading.Thread(target=admin)
        thread.start()
        _wait_until_blocked_by(services.dsn, batch.info.backend_pid)
        try:
            ingester._replace(batch, px, vx)  # the batch's next document is X
        except psycopg.errors.DeadlockDetected as exc:
            errors.append(exc)
            batch.rollback()
    thread.join(120)
    assert not thread.is_alive()
    assert not errors, errors
    with services.db.connection() as conn:
        row = conn.execute("SELECT d.clearance_level, string_agg(c.text, ' ') FROM documents d "
                           "JOIN chunks c ON c.document_id = d.id WHERE d.external_id = 'x' "
                           "GROUP BY d.clearance_level").fetchone()
        stats = conn.execute("SELECT chunks, total_length FROM lexical_corpus").fetchone()  # base + deltas
        expected = conn.execute("SELECT count(*), coalesce(sum(lexical_length), 0) FROM chunks").fetchone()
    assert stats == expected  # both writers' changes counted exactly once
    # the admin write queued behind the batch, so it ran last and its effect is what remains; a PUT
    # decided on a read taken before the batch changed X, so it is refused loudly (never an overwrite
    # of what it did not see)
    if writer == "put":
        (report,) = outcome
        assert report.failed == 1 and "another writer changed document 'x'" in report.errors[0], report.errors
        assert row is not None and "March" in row[1]
    elif writer == "patch":
        assert row is not None and row[0] == 3 and "March" in row[1]
    else:
        assert row is None
