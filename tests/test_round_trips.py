"""Round trips of one uncached search (issue 14), counted on real PostgreSQL and Redis: the index
generation tag is read in one statement without an explicit transaction, a miss does not read it a
second time before the search when the lookup has just read it, the result cache and the shared
query vectors share their Redis round trips (one read, one write), the search itself is one round trip
without BEGIN or COMMIT, and an audit batch is two round trips (the chain head, then INSERT and COMMIT
together)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import psycopg
import redis.connection
from psycopg import pq

from campus_search.app import create_app
from campus_search.audit.records import Auditor, AuditRecord
from campus_search.ingest.metadata import AccessMetadata
from campus_search.ingest.sources import Block, ParsedDocument
from campus_search.retrieval.generation import read_generation
from campus_search.services import Services

QUERY = {"query": "eduroam wifi connection", "config": {"similarity_threshold": -1.0}}


def _app(services: Any) -> Any:
    services.ingester.ingest([ParsedDocument(external_id="wifi", title="Eduroam wifi setup", blocks=[Block(
        "Connect your laptop to the eduroam wifi network with your university username.")], metadata={},
        source="wifi")], AccessMetadata())
    app = create_app(services)
    app.config["TESTING"] = True
    return app.test_client()


def _frontend_messages(conn: psycopg.Connection, action: Callable[[], Any]) -> list[str]:
    """What the client sent while ``action`` ran on ``conn`` (libpq's protocol trace)."""
    with tempfile.NamedTemporaryFile("w+") as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            action()
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        return [line for line in trace.read().splitlines() if line.startswith("F\t")]


def test_the_generation_tag_is_read_in_one_query_without_begin_or_commit(settings_factory: Any,
                                                                        services_factory: Any) -> None:
    services = services_factory(settings_factory(db_pool_min_size=1, db_pool_max_size=1))
    db = services.db
    with db.write_pool.connection() as conn:  # the pool's one connection: read_statement gets it next
        pass
    tag: list[str] = []
    sent = _frontend_messages(conn, lambda: tag.append(read_generation(db)))
    assert len(sent) == 1 and "\tQuery\t" in sent[0] and "index_state" in sent[0], sent
    assert tag[0].count(":") >= 3
    assert conn.autocommit is False  # handed back as the pool hands connections out
    with db.connection() as again:  # and the next user still gets a transaction
        again.execute("SELECT 1")
        assert again.info.transaction_status == pq.TransactionStatus.INTRANS


def test_a_search_is_one_round_trip_without_begin_or_commit(settings_factory: Any, services_factory: Any) -> None:
    """On a direct connection the search's settings and its statement go out in one pipeline in autocommit
    mode: one Sync (the one wait for the server), no BEGIN, no COMMIT; the settings still apply to the
    statement (the transaction the Sync ends) and end with it."""
    from campus_search.retrieval.params import SearchParams
    from campus_search.security.auth import principal_from_claims

    services = services_factory(settings_factory(db_pool_min_size=1, db_pool_max_size=1,
                                                 db_statement_timeout_ms=4321, db_prepare_threshold="5"))
    _app(services)
    services.ingester.ingest([ParsedDocument(external_id=f"note{i}", title=f"Note {i}", blocks=[Block(
        f"Campus note number {i} about rooms and timetables.")], metadata={}, source=f"note{i}") for i in range(40)],
        AccessMetadata())  # more chunks than a search's candidates: no short list to settle with a count
    searcher = services.searcher
    user = principal_from_claims({"sub": "a", "role": "admin"}, services.settings)
    searcher.search(user, SearchParams(query="eduroam wifi"))  # the plan's inputs counted and cached
    with services.db.write_pool.connection() as conn:  # the pool's one connection: the search gets it next
        pass
    hits: list[Any] = []
    sent = _frontend_messages(conn, lambda: hits.extend(searcher.search(user, SearchParams(query="wifi laptop"))))
    assert hits and hits[0].document_id == "wifi"
    assert sum("\tSync" in line for line in sent) == 1, sent
    assert not [line for line in sent if "BEGIN" in line or "COMMIT" in line], sent
    assert conn.autocommit is False and conn.info.transaction_status == pq.TransactionStatus.IDLE
    # the statement ran under the search's settings, which ended with it
    seen = searcher._fetch("SELECT current_setting('statement_timeout')", {}, 1)
    assert seen == [("4321ms",)]
    with services.db.connection() as again:
        assert again.execute("SHOW statement_timeout").fetchone() != ("4321ms",)


def test_a_miss_uses_the_tag_its_lookup_just_read(settings_factory: Any, services_factory: Any, token: Any) -> None:
    services = services_factory(settings_factory(cache_generation_check=60.0))
    client = _app(services)
    tracker = services.cache.generation
    reads: list[str] = []
    original = tracker._read

    def counted() -> str:
        reads.append(original())
        return reads[-1]

    tracker._read = counted
    tracker.invalidate()  # the memo is stale: the lookup reads the tag
    auth = {"Authorization": token("student", sub="s1")}
    first = client.post("/api/search", json=QUERY, headers=auth).get_json()
    assert first["from_cache"] is False
    assert len(reads) == 2, reads  # the lookup's read brackets the search's start; one more after it
    reads.clear()
    other = client.post("/api/search", json={**QUERY, "query": "wifi username"}, headers=auth).get_json()
    assert other["from_cache"] is False
    assert len(reads) == 2, reads  # memo fresh: the lookup reads nothing, so one read before, one after
    again = client.post("/api/search", json=QUERY, headers=auth).get_json()
    assert again["from_cache"] is True and again["results"] == first["results"]  # stored under that tag


def test_an_uncached_search_reads_redis_once_and_writes_once(settings_factory: Any, services_factory: Any,
                                                             redis_server: Any, redis_prefix: str, token: Any,
                                                             embedder: Any, monkeypatch: Any) -> None:
    settings = settings_factory(redis_url=redis_server.url, redis_key_prefix=redis_prefix)
    services = services_factory(settings)
    client = _app(services)
    sent: list[bytes] = []
    send = redis.connection.AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
        parts = [command] if isinstance(command, bytes | bytearray) else list(command)
        sent.append(b"".join(bytes(p) for p in parts))
        return send(self, command, *args, **kwargs)

    services.cache.backend.client.ping()  # connected: the handshake is not the search's
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    auth = {"Authorization": token("student", sub="s1")}
    first = client.post("/api/search", json=QUERY, headers=auth).get_json()
    assert first["from_cache"] is False and first["results"]
    assert len(sent) == 2, sent  # MGET result + vector; one pipeline: SET vector, SET result
    assert sent[0].startswith(b"*3\r\n$4\r\nMGET") and sent[1].count(b"SET") == 2
    stored = redis_server.client().keys(redis_prefix + "emb:*")
    assert len(stored) == 1
    np.testing.assert_array_equal(np.frombuffer(redis_server.client().get(stored[0]), dtype=np.float32),
                                  embedder.embed_query([QUERY["query"]])[0])

    # Another process (empty local LRU) with a result miss finds the vector in the lookup's MGET: it
    # embeds nothing and asks Redis for nothing else before writing its result.
    other = Services(settings, embedder=embedder).ensure_open()
    try:
        calls: list[Any] = []
        original = other.searcher.embedder.embed_query
        monkeypatch.setattr(other.searcher.embedder, "embed_query",  # this Services' wrapper, not the shared model
                            lambda texts, *a, **k: calls.append(texts) or original(texts, *a, **k))
        other.cache.backend.client.ping()
        sent.clear()
        body = _app_without_ingest(other).post("/api/search", json={**QUERY, "config": {"max_results": 3}},
                                               headers=auth).get_json()
        assert body["from_cache"] is False and body["results"][0] == first["results"][0]
        assert calls == [] and len(sent) == 2 and sent[1].count(b"SET") == 1, sent
    finally:
        other.close()


def _app_without_ingest(services: Any) -> Any:
    app = create_app(services)
    app.config["TESTING"] = True
    return app.test_client()


def test_an_audit_batch_is_two_round_trips_and_committed_when_acknowledged(settings_factory: Any,
                                                                         services_factory: Any) -> None:
    # a direct connection (as the embedded cluster's): pipelined; behind pgbouncer one statement at a time
    services = services_factory(settings_factory(db_pool_min_size=1, db_pool_max_size=1, db_prepare_threshold="5"))
    assert services.settings.audit_wait_for_flush is True  # the default: COMMIT answered = flushed
    with services.db.write_pool.connection() as conn:  # the pool's one connection: the writer gets it
        pass
    auditor = Auditor(services.db, services.settings)
    record = AuditRecord(kind="search", action="search", success=True, status=200, request_id="r-1",
                         user_id="u1", role="student", result_count=3)
    try:
        auditor.append(AuditRecord(kind="search", action="search", success=True, status=200,
                                   request_id="r-0", user_id="u1", role="student", result_count=1))
        sent = _frontend_messages(conn, lambda: auditor.append(record))
    finally:
        auditor.close()
    # each Sync is a point where the client waits for the server: the head read, then INSERT + COMMIT
    assert sum("\tSync" in line for line in sent) == 2, sent
    assert any("COMMIT" in line for line in sent)
    assert conn.info.transaction_status == pq.TransactionStatus.IDLE
    with psycopg.connect(services.dsn) as other:  # visible to another session once append returned
        assert other.execute("SELECT count(*) FROM audit_log WHERE request_id = 'r-1'").fetchone() == (1,)
