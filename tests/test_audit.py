"""Audit log (SPEC §3): one record per search (success or failure) and per admin action, keyed query
hashes, an append-only table, a hash chain whose verification pinpoints tampering, and what happens
when the audit write fails."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from typing import Any

import psycopg
import pytest
from auditing import break_audit_writes, by_request, rows

from campus_search.api.auditing import request_context
from campus_search.app import create_app
from campus_search.audit.actions import admin_action, record_admin_action
from campus_search.audit.chain import AuditRecord
from campus_search.audit.records import Auditor, AuditUnavailable
from campus_search.audit.verify import verify
from campus_search.cli.main import main
from campus_search.errors import NotFound
from campus_search.security.auth import principal_from_claims
from campus_search.storage.db import Database

QUERY = "How do I reset   a staff password?"
UA = {"User-Agent": "campus-portal/1.0"}


def expected_query_hash(key: str, query: str) -> str:
    derived = hmac.new(key.encode(), b"campus-search/audit/query", hashlib.sha256).digest()
    return hmac.new(derived, " ".join(query.split()).encode(), hashlib.sha256).hexdigest()


def test_every_search_is_recorded(audited: Any, token: Any) -> None:
    client, services = audited()
    key = services.settings.audit_hmac_key
    staff = token("professional_services", sub="staff123", departments=["IT Services", "Library"])
    ok = client.post("/api/search", json={"query": QUERY, "filters": {"department": "IT Services"},
                                          "config": {"max_results": 4}},
                     headers={"Authorization": staff, **UA})
    assert ok.status_code == 200 and ok.get_json()["count"] > 0
    rec = by_request(services, ok)
    assert rec["kind"] == rec["action"] == "search" and rec["success"] is True and rec["status"] == 200
    assert (rec["user_id"], rec["role"], rec["department"]) == ("staff123", "staff", "IT Services; Library")
    assert rec["query_hmac"] == expected_query_hash(key, QUERY) and rec["query_text"] is None
    assert QUERY not in json.dumps(rec, default=str) and "reset" not in json.dumps(rec, default=str)
    assert json.loads(rec["filters"]) == {"department": "IT Services"}
    assert rec["result_count"] == ok.get_json()["count"]
    assert json.loads(rec["details"]) == {"max_results": 4, "similarity_threshold": 0.2, "from_cache": False}
    assert rec["client_ip"] == "127.0.0.1" and rec["user_agent"] == "campus-portal/1.0"
    assert rec["response_time_ms"] > 0 and rec["recorded_at"] is not None

    over = client.post("/api/search", json={"query": "secrets", "filters": {"clearance_level": 5}},
                       headers={"Authorization": token("student", sub="s9")})
    rec = by_request(services, over)
    assert (over.status_code, rec["status"], rec["success"], rec["user_id"]) == (403, 403, False, "s9")
    assert json.loads(rec["filters"]) == {"clearance_level": 5}  # the attempt is visible in the log
    assert json.loads(rec["details"]) == {"error": "forbidden"} and rec["result_count"] is None

    bad = client.post("/api/search", json={"query": "x", "filters": {"colour": "red"}},
                      headers={"Authorization": staff})
    rec = by_request(services, bad)
    assert (rec["status"], rec["success"], json.loads(rec["details"])["error"]) == (400, False, "bad_request")

    anonymous = client.post("/api/search", json={"query": "x"})
    rec = by_request(services, anonymous)
    assert (rec["status"], rec["user_id"], rec["role"]) == (401, None, None)
    assert rec["query_hmac"] == expected_query_hash(key, "x")

    garbage = client.post("/api/search", data=b"\xff{not json", headers={"Authorization": staff})
    rec = by_request(services, garbage)
    assert rec["status"] == 400 and rec["query_hmac"] is None

    assert len(rows(services)) == 5
    with psycopg.connect(services.dsn) as conn:
        assert verify(conn, key).ok


def test_raw_query_only_when_enabled(audited: Any, token: Any) -> None:
    client, services = audited(audit_raw_queries=True)
    r = client.post("/api/search", json={"query": QUERY}, headers={"Authorization": token("student")})
    assert by_request(services, r)["query_text"] == "How do I reset a staff password?"


def test_hash_query_command_finds_the_record(audited: Any, token: Any, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    client, services = audited()
    r = client.post("/api/search", json={"query": QUERY}, headers={"Authorization": token("student")})
    monkeypatch.setenv("AUDIT_HMAC_KEY", services.settings.audit_hmac_key)
    monkeypatch.setenv("DATA_DIR", services.settings.data_dir)
    assert main(["audit", "hash-query", "  How do I reset a staff   password? "]) == 0
    assert capsys.readouterr().out.strip() == by_request(services, r)["query_hmac"]


def test_admin_actions_are_recorded(audited: Any, token: Any) -> None:
    client, services = audited()
    r = client.get("/api/admin/explain", query_string={"document_id": "it-staff-password-management.md",
                                                       "role": "student"},
                   headers={"Authorization": token("it_administrator", sub="root1"), **UA})
    assert r.status_code == 200
    rec = rows(services, "kind = 'admin'")[-1]
    assert (rec["action"], rec["target"], rec["user_id"], rec["role"]) == (
        "explain", "it-staff-password-management.md", "root1", "admin")
    assert json.loads(rec["details"]) == {"sub": "(hypothetical user)", "role": "student", "visible": False}
    assert rec["request_id"] == r.headers["X-Request-ID"] and rec["user_agent"] == "campus-portal/1.0"

    app = create_app(services)
    with app.test_request_context("/api/admin/documents/x", method="DELETE"):
        from flask import g

        g.principal = principal_from_claims({"sub": "root2", "role": "it_administrator"}, services.settings)
        context = request_context(services.settings)  # the caller: g.principal
        with admin_action(services, "document.delete", target="doc-1", context=context) as details:
            details["chunks_deleted"] = 3
        with pytest.raises(NotFound), admin_action(services, "document.delete", target="doc-2", context=context):
            raise NotFound("no such document")
    record_admin_action(services, "cache.clear", details={"keys_removed": 12})  # from the CLI: no request
    recs = rows(services, "kind = 'admin' AND action <> 'explain'")
    assert [(r["action"], r["target"], r["success"], r["status"], r["user_id"]) for r in recs] == [
        ("document.delete", "doc-1", True, 200, "root2"), ("document.delete", "doc-2", False, 404, "root2"),
        ("cache.clear", None, True, 200, None)]
    assert json.loads(recs[0]["details"]) == {"chunks_deleted": 3}
    assert json.loads(recs[1]["details"]) == {"error": "not_found"}
    assert recs[2]["user_agent"] == "campus-search cli"
    with psycopg.connect(services.dsn) as conn:
        assert verify(conn, services.settings.audit_hmac_key).records == 4


def test_concurrent_appends_from_several_processes_form_one_chain(settings_factory: Any,
                                                                  services_factory: Any) -> None:
    services = services_factory(settings_factory())
    # two pools = two processes' worth of connections, four threads each
    dbs = [Database(services.settings, services.dsn) for _ in range(2)]
    for db in dbs:
        db.open()
    try:
        auditors = [Auditor(db, services.settings) for db in dbs]

        def work(auditor: Auditor, n: int) -> None:
            for i in range(15):
                auditor.append(AuditRecord(kind="search", action="search", success=True, user_id=f"u{n}-{i}"))

        threads = [threading.Thread(target=work, args=(auditors[n % 2], n)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for db in dbs:
            db.close()
    recs = rows(services)
    assert [r["seq"] for r in recs] == list(range(1, 121))
    assert len({r["user_id"] for r in recs}) == 120
    with psycopg.connect(services.dsn) as conn:
        report = verify(conn, services.settings.audit_hmac_key)
    assert report.ok and report.records == report.head_seq == 120


def test_database_keeps_the_log_append_only(audited: Any, token: Any) -> None:
    client, services = audited()
    for _ in range(3):
        client.post("/api/search", json={"query": "q"}, headers={"Authorization": token("student")})
    with psycopg.connect(services.dsn, autocommit=True) as conn:
        for sql in ("UPDATE audit_log SET user_id = 'nobody' WHERE seq = 2", "DELETE FROM audit_log WHERE seq = 3",
                    "TRUNCATE audit_log", "DELETE FROM audit_chain_head",
                    "UPDATE audit_chain_head SET seq = 1",
                    # forward by hand (to append after a forged hash) is refused too
                    "UPDATE audit_chain_head SET seq = seq + 1000, hash = repeat('f', 64)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql)
        last = conn.execute("SELECT * FROM audit_log WHERE seq = 3").fetchone()
        with pytest.raises(psycopg.errors.SerializationFailure):  # a record that does not extend the head
            conn.execute("INSERT INTO audit_log SELECT * FROM audit_log WHERE seq = 3")
        assert last is not None
        assert conn.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 3


# --- tampering -------------------------------------------------------------------------------------

def chain_of(services: Any, n: int = 10) -> Auditor:
    auditor = Auditor(services.db, services.settings)
    for i in range(1, n + 1):
        auditor.append(AuditRecord(kind="search", action="search", success=True, user_id=f"user{i}",
                                   query_hmac=auditor.query_hash(f"query {i}"), result_count=i,
                                   response_time_ms=1.5 * i, filters='{"department":"Library"}'))
    return auditor


def tamper(services: Any, *sql: str) -> None:
    """What an intruder with the table owner's rights can do: switch the triggers off, edit, switch on."""
    with psycopg.connect(services.dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # triggers off for this session
        for statement in sql:
            conn.execute(statement)


TAMPERING = {
    "field edited": (["UPDATE audit_log SET user_id = 'someone-else' WHERE seq = 4"], 4, "altered"),
    "count edited": (["UPDATE audit_log SET result_count = 0 WHERE seq = 7"], 7, "altered"),
    "timestamp edited": (["UPDATE audit_log SET recorded_at = recorded_at - interval '1 day' WHERE seq = 2"],
                         2, "altered"),
    "record deleted": (["DELETE FROM audit_log WHERE seq = 5"], 5, "record 5 is missing"),
    "records deleted": (["DELETE FROM audit_log WHERE seq IN (5, 6)"], 5, "records 5 to 6 are missing"),
    "hash replaced": (["UPDATE audit_log SET hash = encode(sha256(payload_text::bytea), 'hex') FROM "
                       "(SELECT 'forged' AS payload_text) f WHERE seq = 6"], 6, "altered"),
    "link replaced": (["UPDATE audit_log SET prev_hash = repeat('a', 64) WHERE seq = 8"], 8, "altered"),
    "records swapped": (["UPDATE audit_log SET seq = 1000 WHERE seq = 3", "UPDATE audit_log SET seq = 3 WHERE seq = 9",
                         "UPDATE audit_log SET seq = 9 WHERE seq = 1000"], 3, "altered"),
    "tail cut": (["DELETE FROM audit_log WHERE seq > 8"], 9, "missing at the end"),
}


@pytest.mark.parametrize("kind", list(TAMPERING))
def test_tampering_is_pinpointed(settings_factory: Any, services_factory: Any, kind: str,
                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    services = services_factory(settings_factory())
    chain_of(services)
    with psycopg.connect(services.dsn) as conn:
        assert verify(conn, services.settings.audit_hmac_key).ok
    statements, seq, words = TAMPERING[kind]
    tamper(services, *statements)
    with psycopg.connect(services.dsn) as conn:
        report = verify(conn, services.settings.audit_hmac_key)
    assert not report.ok
    assert report.first_bad_seq == seq, report
    assert words in (report.problem or "")
    # the command says the same, with exit status 1
    monkeypatch.setenv("DATABASE_URL", services.dsn)
    monkeypatch.setenv("AUDIT_HMAC_KEY", services.settings.audit_hmac_key)
    monkeypatch.setenv("DATA_DIR", services.settings.data_dir)
    assert main(["audit", "verify"]) == 1
    assert f"first bad record {seq}" in capsys.readouterr().err


def test_truncation_with_head_rolled_back_needs_an_anchor(settings_factory: Any, services_factory: Any,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    services = services_factory(settings_factory())
    chain_of(services)
    monkeypatch.setenv("DATABASE_URL", services.dsn)
    monkeypatch.setenv("AUDIT_HMAC_KEY", services.settings.audit_hmac_key)
    monkeypatch.setenv("DATA_DIR", services.settings.data_dir)
    assert main(["audit", "verify"]) == 0
    anchor = capsys.readouterr().out.strip().rsplit(" ", 1)[-1]
    assert anchor.startswith("10:")
    # the perfect cut: last records deleted and the head moved back to a hash the intruder can read
    tamper(services, "DELETE FROM audit_log WHERE seq > 7",
           "UPDATE audit_chain_head SET (seq, hash) = (SELECT seq, hash FROM audit_log WHERE seq = 7)")
    assert main(["audit", "verify"]) == 0  # indistinguishable from a shorter log ...
    capsys.readouterr()
    assert main(["audit", "verify", "--anchor", anchor]) == 1  # ... unless an anchor was kept elsewhere
    assert "anchored record 10 is missing" in capsys.readouterr().err
    assert main(["audit", "verify", "--json", "--anchor", anchor]) == 1
    assert json.loads(capsys.readouterr().out)["first_bad_seq"] == 8


def test_verify_with_another_key_says_so(settings_factory: Any, services_factory: Any) -> None:
    services = services_factory(settings_factory())
    chain_of(services, 3)
    with psycopg.connect(services.dsn) as conn:
        report = verify(conn, "another-key-" + "z" * 40)
    assert report.first_bad_seq == 1 and "another AUDIT_HMAC_KEY" in (report.problem or "")


# --- when the audit write fails ---------------------------------------------------------------------

@pytest.mark.parametrize("held", [False, True], ids=["waited-in-thread", "held-by-server"])
def test_search_fails_closed_when_audit_cannot_be_written(audited: Any, token: Any,
                                                          caplog: pytest.LogCaptureFixture, held: bool) -> None:
    """Both ways a server can wait for the record: in the request's thread, or holding the answer without
    one (ops/held.py: the app returns a held answer, iterated here by the test client as by any server):
    the 503 withholds the results, with the app's headers, and is what the request metrics count."""
    from campus_search import metrics
    from campus_search.ops.held import HOLD_KEY

    client, services = audited()
    auth = token("professional_services", departments=["IT Services"])
    body = {"query": "password reset procedures", "config": {"similarity_threshold": -1}}
    environ = {HOLD_KEY: True} if held else {}

    def counted(status: str) -> float:
        return metrics.REQUESTS.labels("POST", metrics.endpoint_label("search.search_documents"), status)._value.get()

    before = {s: counted(s) for s in ("200", "503")}
    break_audit_writes(services)
    with caplog.at_level(logging.ERROR, logger="campus_search.audit.records"):
        r = client.post("/api/search", json=body, headers={"Authorization": auth}, environ_overrides=environ)
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert r.headers["Content-Length"] == str(len(r.get_data())) and r.headers["Cache-Control"] == "no-store"
    assert {s: counted(s) - before[s] for s in before} == {"200": 0, "503": 1}
    assert r.get_json() == {"error": {"code": "audit_unavailable", "request_id": r.headers["X-Request-ID"],
                                      "message": "the audit log is unavailable; results are withheld"}}
    assert "No space left" not in r.get_data(as_text=True)
    logged = [rec.getMessage() for rec in caplog.records if "audit record NOT stored" in rec.getMessage()]
    assert len(logged) == 1 and r.headers["X-Request-ID"] in logged[0]  # not silent: the record is in the log
    # a request that failed anyway keeps its own answer
    assert client.post("/api/search", json={"query": "x", "filters": {"bad": 1}},
                       headers={"Authorization": auth}).status_code == 400
    with pytest.raises(AuditUnavailable):
        record_admin_action(services, "cache.clear")
    break_audit_writes(services, broken=False)
    r = client.post("/api/search", json=body, headers={"Authorization": auth}, environ_overrides=environ)
    assert r.status_code == 200 and r.get_json()["count"] > 0
    assert {s: counted(s) - before[s] for s in before} == {"200": 1, "503": 1}
    with psycopg.connect(services.dsn) as conn:
        report = verify(conn, services.settings.audit_hmac_key)
    assert report.ok and report.records == 1  # failed writes left no hole in the chain


def test_log_mode_serves_and_logs(audited: Any, token: Any, caplog: pytest.LogCaptureFixture) -> None:
    from campus_search import metrics

    def failures() -> float:
        rows_ = metrics.samples(["vector_search_audit_write_failures_total"])
        return sum(v for _, v in rows_.get("vector_search_audit_write_failures_total", []))

    client, services = audited(audit_failure_mode="log")
    break_audit_writes(services)
    before = failures()
    with caplog.at_level(logging.ERROR, logger="campus_search.audit.records"):
        r = client.post("/api/search", json={"query": "password"}, headers={"Authorization": token("student")})
    assert r.status_code == 200
    assert failures() == before + 1  # operators see it on /metrics too
    assert any(r.headers["X-Request-ID"] in rec.getMessage() for rec in caplog.records)
    assert rows(services) == []


def test_rate_limited_searches_are_recorded(audited: Any, token: Any) -> None:
    client, services = audited(rate_limits_enabled=True, rate_limit_per_minute=1)
    auth = token("student", sub="eager")
    first = client.post("/api/search", json={"query": "exams"}, headers={"Authorization": auth})
    second = client.post("/api/search", json={"query": "exams"}, headers={"Authorization": auth})
    assert (first.status_code, second.status_code) == (200, 429)
    rec = by_request(services, second)
    assert (rec["status"], rec["success"], rec["user_id"]) == (429, False, "eager")
    assert json.loads(rec["details"])["error"] == "rate_limited"


def test_verify_reads_records_and_head_from_one_snapshot(settings_factory: Any, services_factory: Any) -> None:
    """A record appended while verify runs (a server under load; deploy/rehearse found it) must not be
    reported as 'missing at the end': verify sees the log and its head as of one moment."""
    services = services_factory(settings_factory())
    auditor = Auditor(services.db, services.settings)
    for i in range(3):
        auditor.append(AuditRecord(kind="search", action="search", success=True, user_id=f"before-{i}"))

    appended: list[bool] = []

    def append_once() -> None:
        if not appended:
            appended.append(True)
            auditor.append(AuditRecord(kind="search", action="search", success=True, user_id="during"))

    class Rows:
        """verify's cursor; once verify has read every record, another writer appends one."""

        def __init__(self, cur: Any) -> None:
            object.__setattr__(self, "_cur", cur)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._cur, name)

        def __setattr__(self, name: str, value: Any) -> None:
            setattr(self._cur, name, value)

        def __enter__(self) -> Any:
            self._cur.__enter__()
            return self

        def __exit__(self, *exc: Any) -> Any:
            return self._cur.__exit__(*exc)

        def __iter__(self) -> Any:
            yield from self._cur
            append_once()

    class AppendDuringVerify:
        def __init__(self, conn: psycopg.Connection) -> None:
            self.conn = conn

        def cursor(self, *args: Any, **kwargs: Any) -> Any:
            return Rows(self.conn.cursor(*args, **kwargs))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.conn, name)

    with psycopg.connect(services.dsn) as conn:
        proxy = AppendDuringVerify(conn)
        report = verify(proxy, services.settings.audit_hmac_key)  # type: ignore[arg-type]
    assert appended
    assert report.ok, report.as_dict()
    assert report.records == report.head_seq == 3
    with psycopg.connect(services.dsn) as conn:
        assert verify(conn, services.settings.audit_hmac_key).records == 4
