"""The per-request path without needless waits (issue 14): the audit batch commits without waiting for
its WAL flush (that transaction only) and a record the database later loses is logged in full; a search
is one pipelined round trip whose settings end with its transaction; the pool hands out a healthy idle
connection without a query and still replaces one the server ended."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from campus_search.audit.records import Auditor, AuditRecord
from campus_search.audit.verify import verify
from campus_search.expiring import ExpiringLRU
from campus_search.retrieval.params import SearchParams
from campus_search.security.auth import principal_from_claims

PROBE = """
CREATE TABLE commit_probe (setting text NOT NULL);
CREATE FUNCTION commit_probe() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO commit_probe VALUES (current_setting('synchronous_commit'));
    RETURN NULL;
END $$;
CREATE TRIGGER commit_probe AFTER INSERT ON audit_log FOR EACH STATEMENT EXECUTE FUNCTION commit_probe();
"""


def _record(request_id: str) -> AuditRecord:
    return AuditRecord(kind="search", action="search", success=True, status=200, request_id=request_id,
                       user_id="u1", role="student", result_count=3)


def test_audit_batches_wait_for_the_flush_by_default(settings_factory: Any, services_factory: Any) -> None:
    services = services_factory(settings_factory(db_pool_min_size=1, db_pool_max_size=1))
    assert services.settings.audit_wait_for_flush is True
    with psycopg.connect(services.dsn, autocommit=True) as admin:
        admin.execute(PROBE)
    auditor = Auditor(services.db, services.settings)
    try:
        auditor.append(_record("r-1"))
    finally:
        auditor.close()
    with psycopg.connect(services.dsn) as conn:
        assert [r[0] for r in conn.execute("SELECT setting FROM commit_probe")] == ["on"]


def test_audit_batch_commits_without_waiting_for_the_flush_in_its_own_transaction_only(
        settings_factory: Any, services_factory: Any) -> None:
    services = services_factory(settings_factory(db_pool_min_size=1, db_pool_max_size=1,
                                                 audit_wait_for_flush=False))
    with psycopg.connect(services.dsn, autocommit=True) as admin:
        admin.execute(PROBE)
    auditor = Auditor(services.db, services.settings)
    try:
        auditor.append(_record("r-1"))
        with services.db.connection() as conn:  # the pool's only connection: the batch's setting is gone
            assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
            auditor.append_in(conn, _record("admin-change"))  # an admin change's record: synchronous
    finally:
        auditor.close()
    with psycopg.connect(services.dsn) as conn:
        assert [r[0] for r in conn.execute("SELECT setting FROM commit_probe")] == ["off", "on"]
        # committed (visible to any reader) when append returned
        assert [r[0] for r in conn.execute("SELECT request_id FROM audit_log ORDER BY seq")] == ["r-1",
                                                                                              "admin-change"]


def test_records_the_database_lost_are_logged_in_full_by_the_next_append(
        settings_factory: Any, services_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    services = services_factory(settings_factory(audit_wait_for_flush=False))
    auditor = Auditor(services.db, services.settings)
    try:
        first = auditor.append(_record("kept-1"))
        auditor.append(_record("lost-2"))
        auditor.append(_record("lost-3"))
        # What a crash within the WAL writer's delay leaves behind: the last two commits undone, records and
        # chain head alike (done here with the append-only triggers off, as only a superuser can).
        with psycopg.connect(services.dsn) as conn:
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute("DELETE FROM audit_log WHERE seq > 1")
            conn.execute("UPDATE audit_chain_head SET seq = 1, hash = %s", (first.hash,))
        with caplog.at_level(logging.ERROR, logger="campus_search.audit.records"):
            after = auditor.append(_record("after-4"))
            again = auditor.append(_record("after-5"))
    finally:
        auditor.close()
    assert (after.seq, again.seq) == (2, 3)  # the chain goes on from what the database kept
    lost = [r.getMessage() for r in caplog.records if "LOST" in r.getMessage()]
    assert len(lost) == 2, [r.getMessage() for r in caplog.records]
    assert [json.loads(m.split("record follows: ", 1)[1])["request_id"] for m in lost] == ["lost-2", "lost-3"]
    assert "(was record 2)" in lost[0] and "(was record 3)" in lost[1]
    assert any("lost committed audit records" in r.getMessage() for r in caplog.records)
    with psycopg.connect(services.dsn) as conn:
        assert verify(conn, services.settings.audit_hmac_key).ok


def test_search_settings_end_with_its_transaction(settings_factory: Any, services_factory: Any) -> None:
    services = services_factory(settings_factory(db_pool_min_size=1, db_pool_max_size=1, hnsw_ef_search=77))
    user = principal_from_claims({"sub": "a", "role": "admin"}, services.settings)
    services.searcher.search(user, SearchParams(query="exam timetable"))
    with services.db.connection() as conn:  # the pool's only connection, the one the search used
        assert conn.execute("SELECT current_setting('hnsw.ef_search', true), "
                            "current_setting('statement_timeout')").fetchone() in {(None, "0"), ("40", "0")}


def test_ef_search_grows_with_the_corpus_and_reaches_the_server(settings_factory: Any, services_factory: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """hnsw.ef_search is HNSW_EF_SEARCH, raised to one candidate per 2,500 chunks of the corpus (400 at a
    million, where 100 loses dense recall), as PostgreSQL's row estimate of ``chunks`` says."""
    from campus_search.retrieval import search as search_module

    services = services_factory(settings_factory(db_pool_min_size=1, db_pool_max_size=1, hnsw_ef_search=100))
    searcher, user = services.searcher, principal_from_claims({"sub": "a", "role": "admin"}, services.settings)
    # the value the search transaction set, kept in a session setting so it can be read after the COMMIT
    monkeypatch.setattr(search_module, "SEARCH_SETTINGS_SQL", search_module.SEARCH_SETTINGS_SQL
                        + ", set_config('campus_search.seen_ef', %(ef_search)s, false)")

    def ef_used() -> int:
        searcher._fractions = ExpiringLRU(16)  # count the visible share (and the corpus) again
        searcher.search(user, SearchParams(query="exam timetable"))
        with services.db.connection() as conn:  # the pool's only connection, the one the search used
            return int(conn.execute("SELECT current_setting('campus_search.seen_ef')").fetchone()[0])

    assert ef_used() == 100  # a small corpus: the setting decides
    with psycopg.connect(services.dsn, autocommit=True) as conn:  # what a million chunks looks like to the planner
        conn.execute("UPDATE pg_class SET reltuples = 1000000 WHERE oid = 'chunks'::regclass")
    assert ef_used() == 400
    with psycopg.connect(services.dsn, autocommit=True) as conn:
        conn.execute("UPDATE pg_class SET reltuples = 50000000 WHERE oid = 'chunks'::regclass")
    assert ef_used() == 1000  # pgvector's maximum


def test_by_default_a_small_corpus_searches_the_graph_with_the_page_s_candidates(
        settings_factory: Any, services_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """HNSW_EF_SEARCH's default is the candidates of a 10-result page (CANDIDATE_FLOOR): below 100,000
    chunks the graph is searched with ef_search 40 (dense recall@10 0.98-0.99 against exact,
    docs/performance.md), not more."""
    from campus_search.retrieval import search as search_module

    services = services_factory(settings_factory(db_pool_min_size=1, db_pool_max_size=1))
    searcher, user = services.searcher, principal_from_claims({"sub": "a", "role": "admin"}, services.settings)
    monkeypatch.setattr(search_module, "SEARCH_SETTINGS_SQL", search_module.SEARCH_SETTINGS_SQL
                        + ", set_config('campus_search.seen_ef', %(ef_search)s, false)")
    searcher.search(user, SearchParams(query="exam timetable"))
    with services.db.connection() as conn:
        seen = int(conn.execute("SELECT current_setting('campus_search.seen_ef')").fetchone()[0])
    assert seen == search_module.CANDIDATE_FLOOR == 40


def test_ef_search_for_a_top_k() -> None:
    from campus_search.retrieval.search import Searcher

    searcher = Searcher.__new__(Searcher)
    searcher.ef_search, searcher._corpus_chunks = 100, 0
    assert searcher.ef_search_for(40) == 100 and searcher.ef_search_for(300) == 300  # never below k
    searcher._corpus_chunks = 600_000
    assert searcher.ef_search_for(40) == 240
    searcher.ef_search = 500
    assert searcher.ef_search_for(40) == 500  # HNSW_EF_SEARCH is the floor


def _wait_gone(dsn: str, pid: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(200):
            if conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() == (0,):
                return
            time.sleep(0.05)
    raise AssertionError(f"backend {pid} did not end")


def test_pool_hands_out_a_healthy_connection_without_a_query_and_replaces_one_the_server_ended(
        settings_factory: Any, services_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    services = services_factory(settings_factory(db_pool_min_size=1, db_pool_max_size=1))
    full_checks: list[int] = []
    original = ConnectionPool.check_connection

    def counted(conn: Any) -> None:
        full_checks.append(1)
        original(conn)

    monkeypatch.setattr(ConnectionPool, "check_connection", staticmethod(counted))
    with services.db.connection() as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    with services.db.connection() as conn:
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == first
    assert full_checks == []  # idle, nothing to read: handed out without a round trip

    with psycopg.connect(services.dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (first,))
    _wait_gone(services.dsn, first)
    with services.db.connection() as conn:  # the ended connection is noticed and replaced, not handed out
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] != first
    assert full_checks == [1]
