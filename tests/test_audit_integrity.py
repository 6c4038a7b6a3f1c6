"""The audit log's guarantees where they used to leak (issues 10, 11, 16): an admin change and its record
commit together or not at all; refused admin calls (404, 400) and oversize searches are recorded; the
writer thread hands out one auditor, stops on close, isolates a bad record, and never writes late a
record whose request was already answered 503."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from auditing import break_audit_writes, by_request, rows

from campus_search.audit import records as audit
from campus_search.audit.chain import AuditRecord
from campus_search.audit.records import Auditor, AuditUnavailable, auditor_of
from campus_search.audit.verify import verify

DOC = "it-staff-password-management.md"


def stored(services: Any, doc_id: str) -> tuple[Any, ...] | None:
    with psycopg.connect(services.dsn) as conn:
        return conn.execute("SELECT d.clearance_level, (SELECT string_agg(c.text, ' ' ORDER BY c.chunk_index) "
                            "FROM chunks c WHERE c.document_id = d.id) "
                            "FROM documents d WHERE external_id = %s", (doc_id,)).fetchone()


# --- admin change + record: together or not at all ------------------------------------------------

def _search(client: Any, auth: str) -> dict[str, Any]:
    r = client.post("/api/search", json={"query": "password reset", "config": {"similarity_threshold": -1}},
                    headers={"Authorization": auth})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


API_DOC = "api-guide"  # a document the admin API owns (file-synced ones are changed through their file)
ACTIONS: dict[str, Callable[[Any, dict[str, str]], Any]] = {
    "put-new": lambda c, h: c.put("/api/admin/documents/new-guide", headers=h,
                                  json={"text": "# Parking\n\nPermits are renewed in August.", "format": "markdown",
                                        "metadata": {"visibility": "public"}}),
    "put-changed": lambda c, h: c.put(f"/api/admin/documents/{API_DOC}", headers=h,
                                      json={"text": "# Printing\n\nColour pages cost twenty pence.",
                                            "format": "markdown"}),
    "patch": lambda c, h: c.patch(f"/api/admin/documents/{DOC}", json={"metadata": {"clearance_level": 5}},
                                  headers=h),
    "delete": lambda c, h: c.delete(f"/api/admin/documents/{DOC}", headers=h),
    "cache-clear": lambda c, h: c.post("/api/admin/cache/clear", headers=h),
}


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_admin_change_does_not_happen_when_its_record_cannot_be_written(
        audited: Any, token: Any, action: str, caplog: pytest.LogCaptureFixture) -> None:
    client, services = audited()
    admin = {"Authorization": token("it_administrator", sub="admin-1")}
    student = token("student", sub="s1")
    created = client.put(f"/api/admin/documents/{API_DOC}", headers=admin,
                         json={"text": "# Printing\n\nBlack and white pages cost five pence.", "format": "markdown",
                               "metadata": {"visibility": "public"}})
    assert created.status_code == 201, created.get_json()
    _search(client, student)  # a cached answer, for the cache clear
    docs = (DOC, API_DOC, "new-guide")
    before = {d: stored(services, d) for d in docs}
    break_audit_writes(services)
    with caplog.at_level(logging.ERROR, logger="campus_search.audit.records"):
        r = ACTIONS[action](client, admin)
    assert r.status_code == 503, r.get_json()
    assert r.get_json()["error"]["code"] == "audit_unavailable"
    # nothing changed: the 503 tells the truth
    assert {d: stored(services, d) for d in docs} == before
    # not silent: the record of the refused change is in the error log
    assert any("audit record NOT stored" in rec.getMessage() and r.headers["X-Request-ID"] in rec.getMessage()
               for rec in caplog.records)
    break_audit_writes(services, broken=False)
    assert [r["action"] for r in rows(services, "kind = 'admin'")] == ["document.upsert"]  # the setup's
    if action == "cache-clear":
        assert _search(client, student)["from_cache"] is True  # the cached answer is still there
    with psycopg.connect(services.dsn) as conn:
        assert verify(conn, services.settings.audit_hmac_key).ok

    # the same action with the audit log working: done, and recorded once with its outcome
    r = ACTIONS[action](client, admin)
    assert r.status_code in (200, 201), r.get_json()
    rec = by_request(services, r)
    assert (rec["kind"], rec["success"], rec["status"], rec["user_id"]) == ("admin", True, 200, "admin-1")
    if action.startswith("put"):
        assert json.loads(rec["details"])["status"] == r.get_json()["status"]
    after = {d: stored(services, d) for d in docs}
    changed = {"put-new": "new-guide", "put-changed": API_DOC, "patch": DOC, "delete": DOC}.get(action)
    assert [d for d in docs if after[d] != before[d]] == ([changed] if changed else [])


def test_log_mode_applies_the_change_and_logs_the_record(audited: Any, token: Any,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    client, services = audited(audit_failure_mode="log")
    break_audit_writes(services)
    with caplog.at_level(logging.ERROR, logger="campus_search.audit.records"):
        r = client.patch(f"/api/admin/documents/{DOC}", json={"metadata": {"clearance_level": 4}},
                         headers={"Authorization": token("admin")})
    assert r.status_code == 200 and stored(services, DOC)[0] == 4  # type: ignore[index]
    assert any("audit record NOT stored" in rec.getMessage() for rec in caplog.records)


# --- refused admin calls and oversize searches are recorded ----------------------------------------

def test_explain_refusals_are_audited(audited: Any, token: Any) -> None:
    client, services = audited()
    admin = {"Authorization": token("admin", sub="root1")}
    missing = client.get("/api/admin/explain", query_string={"document_id": "no-such-doc", "role": "staff"},
                         headers=admin)
    assert missing.status_code == 404
    rec = by_request(services, missing)
    assert (rec["action"], rec["target"], rec["success"], rec["status"], rec["user_id"]) == (
        "explain", "no-such-doc", False, 404, "root1")
    assert json.loads(rec["details"]) == {"sub": "(hypothetical user)", "role": "staff", "error": "not_found"}
    bad = client.get("/api/admin/explain", query_string={"document_id": DOC, "colour": "red"}, headers=admin)
    assert bad.status_code == 400
    assert (by_request(services, bad)["status"], by_request(services, bad)["success"]) == (400, False)
    ok = client.get("/api/admin/explain", query_string={"document_id": DOC, "role": "student"}, headers=admin)
    assert ok.status_code == 200 and json.loads(by_request(services, ok)["details"])["visible"] is False


def test_oversize_search_is_recorded_without_an_error(audited: Any, token: Any,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    client, services = audited()
    limit = services.settings.max_request_bytes
    body = json.dumps({"query": "x" * (limit + 10)})
    with caplog.at_level(logging.ERROR):
        r = client.post("/api/search", data=body, content_type="application/json",
                        headers={"Authorization": token("student", sub="big")})
    assert r.status_code == 413
    rec = by_request(services, r)
    assert (rec["status"], rec["success"], rec["user_id"], rec["query_hmac"]) == (413, False, "big", None)
    assert json.loads(rec["details"])["error"] == "payload_too_large"
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text


# --- the writer thread ----------------------------------------------------------------------------

def _record(request_id: str, **fields: Any) -> AuditRecord:
    return AuditRecord(kind="admin", action="test", success=True, request_id=request_id, **fields)


def _blocked_by(dsn: str, pid: int, n: int = 1) -> None:
    deadline = time.monotonic() + 60
    with psycopg.connect(dsn, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                           (pid,)).fetchone()[0] < n:
            assert time.monotonic() < deadline
            time.sleep(0.02)


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_concurrent_first_use_gets_one_auditor(settings_factory: Any, embedder: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The auditor is opened with the process's other components (Services.ensure_open): two request
    threads that are the first to need it get one Auditor, so one writer thread and one chain."""
    from campus_search.services import Services

    services = Services(settings_factory(), embedder=embedder)  # built, not yet opened in this process
    first_building, second_asking = threading.Event(), threading.Event()
    built: list[Auditor] = []
    real_init = Auditor.__init__
    real_open = services.ensure_open

    def slow_init(self: Auditor, *args: Any, **kwargs: Any) -> None:
        first_building.set()
        second_asking.wait(10)  # the first creation is still under way when the other thread asks
        real_init(self, *args, **kwargs)
        built.append(self)

    def ensure_open() -> Any:
        if threading.current_thread().name == "second":
            second_asking.set()
        return real_open()

    monkeypatch.setattr(Auditor, "__init__", slow_init)
    monkeypatch.setattr(services, "ensure_open", ensure_open)
    got: dict[str, Auditor] = {}
    threads = [threading.Thread(target=lambda n=n: got.__setitem__(n, auditor_of(services)), name=n)
               for n in ("first", "second")]
    try:
        threads[0].start()
        assert first_building.wait(30)
        threads[1].start()
        for t in threads:
            t.join(30)
        assert len(built) == 1 and got["first"] is got["second"] is services.auditor
    finally:
        services.close()


def test_close_stops_the_writer_thread(settings_factory: Any, embedder: Any) -> None:
    from campus_search.services import Services

    services = Services(settings_factory(), embedder=embedder).ensure_open()
    before = {t for t in threading.enumerate() if t.name == "audit-writer"}
    auditor_of(services).append(_record("r-close"))
    writers = {t for t in threading.enumerate() if t.name == "audit-writer"} - before
    assert len(writers) == 1
    services.close()
    (writer,) = writers
    writer.join(30)
    assert not writer.is_alive()
    assert [r["request_id"] for r in rows(services)] == ["r-close"]


def test_one_bad_record_fails_only_itself(settings_factory: Any, services_factory: Any) -> None:
    services = services_factory(settings_factory())
    auditor = auditor_of(services)
    outcome: dict[str, BaseException | None] = {}

    def append(record: AuditRecord) -> None:
        try:
            auditor.append(record)
            outcome[str(record.request_id)] = None
        except AuditUnavailable as exc:
            outcome[str(record.request_id)] = exc

    with psycopg.connect(services.dsn) as holder:  # hold the chain head: the writer waits on batch 1
        holder.execute("SELECT 1 FROM audit_chain_head FOR UPDATE")
        first = threading.Thread(target=append, args=(_record("good-1"),))
        first.start()
        _blocked_by(services.dsn, holder.info.backend_pid)
        # four records queue up behind it and will be taken as one batch: two the database refuses or
        # that cannot be hashed, two good ones
        rest = [threading.Thread(target=append, args=(r,)) for r in
                (_record("good-2"), _record("bad", status=2 ** 40), _record("unhashable", role=object()),
                 _record("good-3"))]
        for t in rest:
            t.start()
        _until(lambda: auditor._queue.qsize() == 4)
        holder.rollback()
    for t in [first, *rest]:
        t.join(60)
    assert outcome["bad"] is not None and outcome["unhashable"] is not None
    assert {k: v for k, v in outcome.items() if k not in ("bad", "unhashable")} == {
        "good-1": None, "good-2": None, "good-3": None}
    assert sorted(r["request_id"] for r in rows(services)) == ["good-1", "good-2", "good-3"]
    with psycopg.connect(services.dsn) as conn:
        assert verify(conn, services.settings.audit_hmac_key).ok


def test_a_timed_out_record_is_never_written_later(settings_factory: Any, services_factory: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    services = services_factory(settings_factory())
    auditor = auditor_of(services)
    with psycopg.connect(services.dsn) as holder:
        holder.execute("SELECT 1 FROM audit_chain_head FOR UPDATE")
        first = threading.Thread(target=auditor.append, args=(_record("written"),))
        first.start()
        _blocked_by(services.dsn, holder.info.backend_pid)  # the writer is busy with "written"
        monkeypatch.setattr(audit, "WRITE_TIMEOUT", 0.2)
        with pytest.raises(AuditUnavailable):  # its request is answered 503 ...
            auditor.append(_record("given-up"))
        monkeypatch.setattr(audit, "WRITE_TIMEOUT", 30.0)
        holder.rollback()
    first.join(60)
    auditor.append(_record("after"))
    # ... so it is not in the log as if it had succeeded
    assert [r["request_id"] for r in rows(services)] == ["written", "after"]
