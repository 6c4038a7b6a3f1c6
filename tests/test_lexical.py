"""BM25 inside PostgreSQL: scores match a plain-Python BM25, statistics stay exact under change,
exact-term queries find what dense search misses, and the visibility rule holds on the lexical path."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest

from campus_search.ingest.chunking import Block
from campus_search.ingest.metadata import AccessMetadata
from campus_search.ingest.sources import ParsedDocument
from campus_search.retrieval.fusion import FusionConfig
from campus_search.retrieval.lexical import BM25
from campus_search.retrieval.params import SearchParams
from campus_search.retrieval.query_vectors import QueryEmbeddingCache
from campus_search.security.roles import DEFAULT_ROLES, Principal, superuser

DOCS = [
    ("ease", "EASE account activation", "Activate your EASE account before your first login. EASE is the "
     "University's single sign-on. Form XQ-7731 requests a replacement EASE token."),
    ("wifi", "Wireless network", "Connect laptops and phones to eduroam with your University login. The "
     "wireless network covers every campus building."),
    ("library", "Library loans", "Borrow up to forty books. Renew loans online before the due date to avoid "
     "fines. Inter-library loans take a week."),
    ("ethics", "Ethics review", "Research involving human participants needs ethics approval before data "
     "collection starts. Submit the ethics form with your protocol."),
    ("secret", "Confidential incident playbook", "Playbook ZR-9042 covers the response to a confirmed data "
     "breach. Restricted to IT Services staff."),
]


def _doc(ext_id: str, title: str, text: str, **meta: Any) -> ParsedDocument:
    return ParsedDocument(external_id=ext_id, title=title, blocks=[Block(text)], metadata=meta, source=ext_id)


@pytest.fixture
def small(settings_factory: Any, services_factory: Any) -> Any:
    services = services_factory(settings_factory())
    docs = [_doc(*d) for d in DOCS[:4]]
    docs.append(_doc(*DOCS[4], department="IT Services", visibility="department", clearance_level=3))
    report = services.ingester.ingest(docs, AccessMetadata())
    assert report.added == 5
    return services


def _stats_consistent(services: Any) -> None:
    with services.db.connection() as conn:
        expected_df = dict(conn.execute(
            "SELECT u.lexeme, count(*) FROM chunks c, unnest(c.lexical) u GROUP BY u.lexeme").fetchall())
        stored_df = dict(conn.execute("SELECT term, df FROM lexical_df").fetchall())
        n, total = conn.execute("SELECT count(*), coalesce(sum(lexical_length), 0) FROM chunks").fetchone()
        stats = conn.execute("SELECT chunks, total_length FROM lexical_corpus").fetchone()
        postings = conn.execute("SELECT count(*) FROM lexical_postings").fetchone()[0]
        expected_postings = conn.execute("SELECT count(*) FROM chunks c, unnest(c.lexical) u").fetchone()[0]
        # every posting carries exactly its chunk's document and length
        stale = conn.execute(
            "SELECT count(*) FROM lexical_postings p JOIN chunks c ON c.id = p.chunk_id "
            "WHERE (p.document_id, p.dl) IS DISTINCT FROM (c.document_id, c.lexical_length)").fetchone()[0]
    assert stored_df == expected_df
    assert stats == (n, total)
    assert postings == expected_postings
    assert stale == 0


def _python_bm25(services: Any, query: str, k1: float, b: float) -> dict[int, float]:
    """Reference BM25, independent of the code under test: each chunk's terms are extracted here from its
    raw columns -- document title, section title and text, as docs/ranking.md defines them -- by
    PostgreSQL's english parser, not read from ``chunks.lexical``, the postings or the statistics tables."""
    with services.db.connection() as conn:
        q_terms = Counter(dict(conn.execute(
            "SELECT lexeme, coalesce(array_length(positions, 1), 1) FROM unnest(to_tsvector('english', %s))",
            (query,)).fetchall()))
        docs = {}
        for chunk_id, title, section, text in conn.execute(
                "SELECT c.id, d.title, c.section_title, c.text FROM chunks c JOIN documents d ON d.id = c.document_id"
        ).fetchall():
            lexemes = conn.execute(
                "SELECT lexeme, coalesce(array_length(positions, 1), 1) FROM unnest(to_tsvector('english', %s))",
                (f"{title}\n{section or ''}\n{text}",)).fetchall()
            docs[chunk_id] = {t: int(f) for t, f in lexemes}
    n = len(docs)
    avgdl = sum(sum(d.values()) for d in docs.values()) / n
    df = Counter(t for d in docs.values() for t in d)
    scores = {}
    for cid, tf in docs.items():
        dl = sum(tf.values())
        s = 0.0
        for t, qtf in q_terms.items():
            if t in tf:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                s += qtf * idf * tf[t] * (k1 + 1) / (tf[t] + k1 * (1 - b + b * dl / avgdl))
        if s > 0:
            scores[cid] = s
    return scores


def _add_empty_chunk(services: Any, ext_id: str, section: str) -> int:
    """A chunk with no text of its own (any writer may store one): its terms are its titles'."""
    with services.db.connection() as conn:
        return int(conn.execute(
            "INSERT INTO chunks (document_id, chunk_index, section_title, text, content_hash, embedding) "
            "SELECT c.document_id, 99, %s, '', 'empty', c.embedding "
            "FROM chunks c JOIN documents d ON d.id = c.document_id "
            "WHERE d.external_id = %s AND c.chunk_index = 0 RETURNING id", (section, ext_id)).fetchone()[0])


def _scores_match_reference(services: Any, query: str, k1: float = 0.9, b: float = 0.4) -> dict[int, float]:
    expected = _python_bm25(services, query, k1, b)
    assert expected
    searcher = services.searcher
    searcher.bm25 = BM25(k1, b)
    hits = searcher.hybrid_candidates(superuser(), searcher.embed_query(query), query, {}, 10)
    got = {h.chunk_id: h.bm25 for h in hits if h.bm25}
    assert got.keys() == expected.keys()
    for cid, score in expected.items():
        assert got[cid] == pytest.approx(score, rel=1e-9)
    return expected


@pytest.mark.parametrize("k1,b", [(0.9, 0.4), (1.2, 0.75)])
def test_sql_bm25_equals_reference(small: Any, k1: float, b: float) -> None:
    empty = _add_empty_chunk(small, "library", "Opening hours")
    _stats_consistent(small)
    expected = _scores_match_reference(
        small, "renew library loans before the due date to avoid fines, opening hours", k1, b)
    assert empty in expected  # found by its document and section titles alone


def test_exact_term_found_by_lexical_when_dense_misses(small: Any) -> None:
    searcher = small.searcher
    query = "XQ-7731"
    vector = searcher.embed_query(query)
    dense = searcher.dense_candidates(superuser(), vector, {}, 5)
    hybrid = searcher.hybrid_candidates(superuser(), vector, query, {}, 5)
    lexical_top = max(hybrid, key=lambda h: h.bm25 or 0)
    assert lexical_top.document_id == "ease"
    searcher.fusion = FusionConfig("convex", alpha=0.5)
    top = searcher.search(superuser(), SearchParams(query=query, max_results=1, similarity_threshold=-1))
    assert top[0].document_id == "ease"
    # the point of the lexical path: on a bare code, dense similarity is weak evidence
    assert dense[0].similarity < 0.5


def test_lexical_path_obeys_visibility(small: Any) -> None:
    query = "ZR-9042 data breach playbook"
    student = Principal("s1", DEFAULT_ROLES["student"])
    staff_other = Principal("t1", DEFAULT_ROLES["staff"], departments=("Library",))
    staff_it = Principal("t2", DEFAULT_ROLES["staff"], departments=("IT Services",))
    params = SearchParams(query=query, max_results=5, similarity_threshold=-1)
    for user in (student, staff_other):
        assert all(h.document_id != "secret" for h in small.searcher.search(user, params))
    assert small.searcher.search(staff_it, params)[0].document_id == "secret"


def test_lying_posting_never_surfaces_a_hidden_chunk(small: Any, token: Any, bm25_read: str) -> None:
    """Defence in depth: the restricted playbook's postings are made to lie about their document (as a
    hand edit could leave them), naming a public document, so the BM25 cut admits them. The chunk row
    still belongs to the IT Services document at clearance 3, so nobody else may see it -- by either
    path."""
    from campus_search.app import create_app

    query = "ZR-9042 data breach playbook"
    with small.db.connection() as conn:
        stale = conn.execute(
            "UPDATE lexical_postings p SET document_id = (SELECT id FROM documents WHERE external_id = 'ease') "
            "FROM chunks c JOIN documents d ON d.id = c.document_id "
            "WHERE p.chunk_id = c.id AND d.external_id = 'secret'").rowcount
    assert stale > 0
    student = Principal("s1", DEFAULT_ROLES["student"])
    staff_other = Principal("t1", DEFAULT_ROLES["staff"], departments=("Library",))
    params = SearchParams(query=query, max_results=5, similarity_threshold=-1)
    vector = small.searcher.embed_query(query)
    for user in (student, staff_other):
        assert all(h.document_id != "secret" for h in small.searcher.search(user, params))
        candidates = small.searcher.hybrid_candidates(user, vector, query, {}, 40)
        assert candidates and all(h.document_id != "secret" for h in candidates)
    client = create_app(small).test_client()
    r = client.post("/api/search", json={"query": query, "config": {"similarity_threshold": -1}},
                    headers={"Authorization": token("student")})
    assert r.status_code == 200 and r.get_json()["count"] > 0
    assert all(h["document_id"] != "secret" for h in r.get_json()["results"])
    # the rightful reader still finds it first
    staff_it = Principal("t2", DEFAULT_ROLES["staff"], departments=("IT Services",))
    assert small.searcher.search(staff_it, params)[0].document_id == "secret"


def test_a_bm25_pool_read_before_a_change_never_surfaces_a_now_hidden_chunk(small: Any, bm25_read: str) -> None:
    """The statement that returns chunks (Searcher.hybrid_candidates) can be handed a BM25 pool read by
    another statement. A pool read for the restricted playbook's rightful reader, handed to a student's
    search as if the student's own read had seen it, still cannot surface the playbook: the statement that
    returns chunks applies the student's rule to every row."""
    query = "ZR-9042 data breach playbook"
    staff_it = Principal("t2", DEFAULT_ROLES["staff"], departments=("IT Services",))
    pool = small.searcher.lexical_pool(staff_it, query, {}, 40)
    with small.db.connection() as conn:
        secret = {r[0] for r in conn.execute("SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id "
                                             "WHERE d.external_id = 'secret'").fetchall()}
    assert any(chunk in secret and top for chunk, _, top in pool)  # the stale pool does name it, in the top k
    student = Principal("s1", DEFAULT_ROLES["student"])
    vector = small.searcher.embed_query(query)
    hits = small.searcher.hybrid_candidates(student, vector, query, {}, 40, pool=pool)
    assert hits and not {h.chunk_id for h in hits} & secret
    assert {h.chunk_id for h in small.searcher.hybrid_candidates(staff_it, vector, query, {}, 40, pool=pool)} & secret


def _as_large_corpus(monkeypatch: pytest.MonkeyPatch, searcher: Any) -> None:
    """As on a large corpus: hybrid searches split (LEXICAL_BESIDE_MIN_CHUNKS) and BM25 is read the bounded
    way (BM25_WHOLE_CHUNKS 0), as both are at 100,000 chunks and more."""
    import dataclasses

    from campus_search.retrieval import search as search_module

    monkeypatch.setattr(search_module, "LEXICAL_BESIDE_MIN_CHUNKS", 0)
    monkeypatch.setattr(searcher, "bm25", dataclasses.replace(searcher.bm25, whole_chunks=0))


@pytest.fixture(params=["bounded", "whole"])
def bm25_read(request: pytest.FixtureRequest, small: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """The BM25 read of ``small``'s searcher: the bounded one (BM25_WHOLE_CHUNKS 0, as on a large index) or
    every posting (a small index's, the default here)."""
    import dataclasses

    whole_chunks = 0 if request.param == "bounded" else 1_000_000
    monkeypatch.setattr(small.searcher, "bm25", dataclasses.replace(small.searcher.bm25, whole_chunks=whole_chunks))
    return str(request.param)


def test_bm25_runs_while_the_query_is_embedded(small: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a large corpus a hybrid search starts its BM25 statement on a connection of its own before it
    embeds the query: an embedder that waits for that statement to finish returns (it would wait in vain,
    and fail, if the statement ran only after the embedding). Handing the pool and the dense list over
    changes nothing: the candidates are those of the one statement that reads both itself. On a small
    corpus it runs in line."""
    import threading

    searcher = small.searcher
    started: list[int] = []
    original_start = searcher.start_lexical
    monkeypatch.setattr(searcher, "start_lexical", lambda *a, **kw: started.append(1) or original_start(*a, **kw))
    searcher.search(Principal("s1", DEFAULT_ROLES["student"]), SearchParams(query="library", max_results=5))
    assert not started  # 5 chunks: BM25 in line, no hand-over
    _as_large_corpus(monkeypatch, searcher)
    finished, embedded = threading.Event(), threading.Event()
    original_pool, original_embed = searcher.lexical_pool, searcher.embedder.embed_query

    def pool(*args: Any) -> Any:
        rows = original_pool(*args)
        finished.set()
        return rows

    def embed(texts: list[str]) -> Any:
        assert finished.wait(10), "the BM25 statement had not run by the time the query was embedded"
        embedded.set()
        return original_embed(texts)

    query = "EASE password reset"
    student = Principal("s1", DEFAULT_ROLES["student"])
    params = SearchParams(query=query, max_results=5, similarity_threshold=-1)
    searcher.lexical_pool, searcher.embedder.embed_query = pool, embed
    try:
        hits = searcher.search(student, params)
    finally:
        searcher.lexical_pool, searcher.embedder.embed_query = original_pool, original_embed
    assert embedded.is_set() and hits
    vector = searcher.embed_query(query)
    own = searcher.hybrid_candidates(student, vector, query, {}, 40)
    dense = [h.chunk_id for h in searcher.dense_candidates(student, vector, {}, 40, exact=True)]
    given = searcher.hybrid_candidates(student, vector, query, {}, 40,
                                       pool=searcher.lexical_pool(student, query, {}, 40), dense=dense)
    key = sorted((h.chunk_id, h.bm25, h.relevance, h.in_dense, h.in_lexical) for h in own)
    assert key == sorted((h.chunk_id, h.bm25, h.relevance, h.in_dense, h.in_lexical) for h in given)
    monkeypatch.undo()  # the same search on a small corpus: one statement, the same answer
    assert [(h.chunk_id, h.combined_score) for h in hits] == \
        [(h.chunk_id, h.combined_score) for h in searcher.search(student, params)]


def test_both_halves_of_a_split_hybrid_search_read_one_snapshot(small: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a large corpus the BM25 half runs on a second connection while the first finds the dense top k
    and returns the chunks. Both read the snapshot the search's transaction exported: a document deleted
    after the search began, before its BM25 statement ran, is still in that statement's pool -- found by
    BM25 as by the dense half, as a search begun a moment earlier finds it -- never half there."""
    import threading

    from campus_search.retrieval import search as search_module

    searcher = small.searcher
    _as_large_corpus(monkeypatch, searcher)
    query = "XQ-7731 replacement EASE token"
    params = SearchParams(query=query, max_results=5, similarity_threshold=-1)
    before = searcher.search(superuser(), params)
    assert before[0].document_id == "ease" and before[0].in_lexical and before[0].in_dense
    deleted, claimed = threading.Event(), threading.Event()
    original_pool, original_embed = searcher.lexical_pool, searcher.embedder.embed_query
    original_claim = search_module.SharedSnapshot.claim

    def claim(shared: Any) -> bool:
        went_on = original_claim(shared)
        claimed.set()
        return went_on

    def pool(*args: Any) -> Any:
        assert deleted.wait(10)
        return original_pool(*args)

    def embed(texts: list[str]) -> Any:  # after the snapshot's export, before the BM25 statement runs
        assert small.ingester.delete(["ease"]) == 1
        deleted.set()
        assert claimed.wait(10)  # the BM25 half imported the snapshot (after the delete) and goes on
        return original_embed(texts)

    monkeypatch.setattr(search_module.SharedSnapshot, "claim", claim)

    monkeypatch.setattr(searcher, "query_vectors", QueryEmbeddingCache())  # so the query is embedded again
    searcher.lexical_pool, searcher.embedder.embed_query = pool, embed
    try:
        during = searcher.search(superuser(), params)
    finally:
        searcher.lexical_pool, searcher.embedder.embed_query = original_pool, original_embed
    assert deleted.is_set()
    assert [(h.chunk_id, h.in_lexical, h.in_dense, h.bm25) for h in during] == \
        [(h.chunk_id, h.in_lexical, h.in_dense, h.bm25) for h in before]
    assert all(h.document_id != "ease" for h in searcher.search(superuser(), params))  # and gone now


def test_a_split_search_without_a_second_connection_runs_bm25_itself(small: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """When the pool has no second connection to spare at once (every one held by a search), the BM25
    half is not waited for: the search runs it in its own last statement and answers the same."""
    from campus_search.errors import ServiceUnavailable

    searcher = small.searcher
    query = "EASE password reset"
    student = Principal("s1", DEFAULT_ROLES["student"])
    params = SearchParams(query=query, max_results=5, similarity_threshold=-1)
    inline = searcher.search(student, params)
    _as_large_corpus(monkeypatch, searcher)
    original = small.db.connection

    def connection(**kw: Any) -> Any:
        if kw.get("spare") is not None:
            raise ServiceUnavailable("database busy, try again shortly")
        return original(**kw)

    monkeypatch.setattr(small.db, "connection", connection)
    busy = searcher.search(student, params)
    assert [(h.chunk_id, h.combined_score, h.in_lexical) for h in busy] == \
        [(h.chunk_id, h.combined_score, h.in_lexical) for h in inline]


def test_a_split_search_leaves_the_second_core_to_its_bm25_half(small: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A split search's own transaction (the dense half, the final statement) runs without parallel workers,
    which would compete with its BM25 half for the other core; the setting ends with the transaction."""
    searcher = small.searcher
    _as_large_corpus(monkeypatch, searcher)
    seen: list[str] = []
    original = searcher.ranked_page

    def final(*args: Any, **kwargs: Any) -> Any:
        conn = kwargs.get("conn")
        if conn is not None:  # the split search's last statement, in its own transaction
            seen.extend(conn.execute("SELECT current_setting('max_parallel_workers_per_gather'), "
                                     "current_setting('plan_cache_mode')").fetchone())
        return original(*args, **kwargs)

    monkeypatch.setattr(searcher, "ranked_page", final)
    student = Principal("s1", DEFAULT_ROLES["student"])
    for plan in ("exact", "hnsw"):  # a narrow rule's exact dense scan (the one a parallel worker would join)
        monkeypatch.setattr(searcher, "dense_plan", lambda user, filters, plan=plan: plan)
        assert searcher.search(student, SearchParams(query="EASE password reset", max_results=5,
                                                     similarity_threshold=-1))
    # ... and its statements are planned as any search's (test_a_search_statement_runs_its_generic_plan...)
    assert seen == ["0", "auto", "0", "force_generic_plan"]
    with small.db.connection(read=True) as conn:
        assert conn.execute("SELECT current_setting('max_parallel_workers_per_gather')").fetchone()[0] != "0"


def test_the_bm25_threads_belong_to_the_process_that_uses_them(small: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gunicorn worker forked from a master that searched must not reuse the master's thread pool (its
    threads do not exist in the child): the pool is made again in a process with another pid."""
    import os

    searcher = small.searcher
    student = Principal("s1", DEFAULT_ROLES["student"])
    searcher.start_lexical(student, "EASE", {}, 40).result(timeout=30)
    first = searcher._runner
    searcher.start_lexical(student, "EASE", {}, 40).result(timeout=30)
    assert searcher._runner is first  # one pool per process
    real = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real + 1)
    assert searcher.start_lexical(student, "EASE", {}, 40).result(timeout=30) is not None
    assert searcher._runner is not first and searcher._runner[0] == real + 1


def test_metadata_change_applies_to_lexical_path_at_once(small: Any) -> None:
    query = "XQ-7731 replacement EASE token"
    student = Principal("s1", DEFAULT_ROLES["student"])
    params = SearchParams(query=query, max_results=5, similarity_threshold=-1)
    assert small.searcher.search(student, params)[0].document_id == "ease"
    small.ingester.ingest([_doc("ease", DOCS[0][1], DOCS[0][2], department="IT Services",
                                visibility="department", clearance_level=3)], AccessMetadata())
    _stats_consistent(small)
    student_hits = small.searcher.search(student, params)
    assert all(h.document_id != "ease" for h in student_hits)
    hits = small.searcher.hybrid_candidates(student, small.searcher.embed_query(query), query, {}, 10)
    assert all(h.document_id != "ease" for h in hits)  # neither list, not even as a BM25-only candidate
    it_staff = Principal("t", DEFAULT_ROLES["staff"], departments=("IT Services",))
    assert small.searcher.search(it_staff, params)[0].document_id == "ease"


def test_filters_apply_to_lexical_candidates(small: Any) -> None:
    small.ingester.ingest([_doc("wifi", DOCS[1][1], DOCS[1][2], campus="Easter Bush", priority=5)],
                          AccessMetadata())
    query = "eduroam wireless network login"
    vector = small.searcher.embed_query(query)
    for filters, expected in (({"campus": "Easter Bush"}, {"wifi"}), ({"min_priority": 4}, {"wifi"}),
                              ({"campus": "Central Campus"}, set())):
        hits = small.searcher.hybrid_candidates(superuser(), vector, query, filters, 10)
        assert {h.document_id for h in hits} == expected


def test_statistics_exact_after_add_change_delete(small: Any) -> None:
    _stats_consistent(small)
    ingester = small.ingester
    ingester.ingest([_doc("new", "Printing", "Print from any University printer with your card. Printing "
                          "credit tops up online.")], AccessMetadata())
    _stats_consistent(small)
    ingester.ingest([_doc("library", "Library loans", "Borrow up to sixty books now. Renewals are automatic.")],
                    AccessMetadata())
    _stats_consistent(small)
    # metadata-only change leaves the lexical index as it was
    ingester.ingest([_doc("wifi", DOCS[1][1], DOCS[1][2], priority=5)], AccessMetadata())
    _stats_consistent(small)
    assert ingester.delete(["ease", "new"]) == 2
    _stats_consistent(small)
    with small.db.connection() as conn:
        assert conn.execute("SELECT count(*) FROM lexical_df WHERE term = 'xq-7731'").fetchone()[0] == 0
    # an in-place text edit by any writer keeps postings right too
    with small.db.connection() as conn:
        conn.execute("UPDATE chunks SET text = text || ' Quantum cryptography seminar.' "
                     "WHERE document_id = (SELECT id FROM documents WHERE external_id = 'ethics')")
    _stats_consistent(small)
    # chunks deleted directly (not by their document) take their postings with them (migration 019: the
    # chunk trigger, not a foreign key, removes them); a chunk cannot change document; TRUNCATE is refused
    import psycopg

    with small.db.connection() as conn:
        assert conn.execute("DELETE FROM chunks WHERE document_id = "
                            "(SELECT id FROM documents WHERE external_id = 'library')").rowcount > 0
    _stats_consistent(small)
    with small.db.connection() as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE chunks SET document_id = (SELECT min(id) FROM documents) WHERE document_id = "
                     "(SELECT max(id) FROM documents) AND document_id <> (SELECT min(id) FROM documents)")
    for statement in ("TRUNCATE chunks", "TRUNCATE documents CASCADE"):
        with small.db.connection() as conn, pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute(statement)
    _stats_consistent(small)


def test_concurrent_writers_do_not_deadlock(small: Any) -> None:
    """Two transactions each writing several documents with overlapping terms (as two ingests do) never
    cross locks on the statistics (they only insert deltas, migration 013)."""
    import threading

    import psycopg
    from pgvector.psycopg import register_vector

    vector = small.embedder.embed(["x"])[0]

    def add(conn: Any, ext: str, text: str) -> None:
        doc = conn.execute("INSERT INTO documents (external_id, title, content_hash) VALUES (%s, %s, 'h') "
                           "RETURNING id", (ext, ext)).fetchone()[0]
        conn.execute("INSERT INTO chunks (document_id, chunk_index, text, content_hash, embedding) "
                     "VALUES (%s, 0, %s, 'h', %s)", (doc, text, vector))

    a = psycopg.connect(small.dsn)
    b = psycopg.connect(small.dsn)
    for conn in (a, b):
        register_vector(conn)
        conn.execute("SET deadlock_timeout = '100ms'")
    errors: list[BaseException] = []
    try:
        add(a, "a1", "apples bananas")  # A holds the statistics row and the terms it wrote

        def second() -> None:
            try:
                add(b, "b1", "cherries dates")  # B must queue here, holding nothing A will need
                add(b, "b2", "apples")
                b.commit()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                b.rollback()

        t = threading.Thread(target=second)
        t.start()
        t.join(0.5)
        add(a, "a2", "cherries dates bananas")  # A now needs the terms B would otherwise have locked
        a.commit()
        t.join(30)
        assert not t.is_alive() and not errors, errors
    finally:
        a.close()
        b.close()
    _stats_consistent(small)


def _writer(dsn: str) -> Any:
    import psycopg
    from pgvector.psycopg import register_vector

    conn = psycopg.connect(dsn)
    register_vector(conn)
    conn.execute("SET lock_timeout = '3s'")  # a writer that had to queue fails here instead of hanging
    return conn


def _add(conn: Any, vector: Any, ext: str, text: str) -> None:
    doc = conn.execute("INSERT INTO documents (external_id, title, content_hash) VALUES (%s, %s, 'h') "
                       "RETURNING id", (ext, ext)).fetchone()[0]
    conn.execute("INSERT INTO chunks (document_id, chunk_index, text, content_hash, embedding) "
                 "VALUES (%s, 0, %s, 'h', %s)", (doc, text, vector))


def test_concurrent_writers_run_side_by_side(small: Any) -> None:
    """Scale-out ingestion: while one writer's transaction is open with chunks that share terms with
    another's, the other writes, deletes and commits without waiting (no shared counter row), and the
    statistics are exact after both, before and after compaction."""
    from campus_search.storage.index_state import compact_lexical as compact

    vector = small.embedder.embed(["x"])[0]
    a, b = _writer(small.dsn), _writer(small.dsn)
    try:
        _add(a, vector, "a1", "EASE account activation apples bananas")  # A holds its transaction open
        _add(b, vector, "b1", "EASE account renewal apples cherries")    # same terms: no wait
        b.execute("DELETE FROM documents WHERE external_id = 'library'")  # a delete too
        b.commit()
        with small.db.connection() as conn:  # a compactor does not wait for A either
            assert compact(conn) > 0
        a.commit()
    finally:
        a.close()
        b.close()
    _stats_consistent(small)
    with small.db.connection() as conn:
        assert conn.execute("SELECT count(*) FROM lexical_term_deltas").fetchone()[0] > 0  # A's, not folded yet
    _scores_match_reference(small, "EASE account apples renewal")  # search reads base + deltas
    with small.db.connection() as conn:
        compact(conn)
        assert conn.execute("SELECT count(*) FROM lexical_term_deltas").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM lexical_stats_deltas").fetchone()[0] == 0
    _stats_consistent(small)


def test_compaction_is_skipped_while_another_runs_and_changes_no_sum(small: Any) -> None:
    import psycopg

    from campus_search.storage.index_state import compact_lexical as compact

    small.ingester.ingest([_doc("new", "Printing", "Print from any University printer.")], AccessMetadata())
    with small.db.connection() as conn:  # leave deltas behind, as an interrupted compaction would
        conn.execute("INSERT INTO lexical_term_deltas VALUES ('printer', 0)")
    with psycopg.connect(small.dsn) as other:
        other.execute("SELECT pg_advisory_xact_lock(7450114)")  # a compactor at work elsewhere
        with small.db.connection() as conn:
            assert compact(conn) == -1
        other.rollback()
    _stats_consistent(small)
    with small.db.connection() as conn:
        assert compact(conn) >= 0
        assert conn.execute("SELECT count(*) FROM lexical_term_deltas").fetchone()[0] == 0
    _stats_consistent(small)


def test_a_spare_connection_is_never_waited_for_while_every_one_is_in_use(small: Any) -> None:
    """The BM25 half asks for a second connection while its search holds one (Database.connection's
    ``spare``). With every pooled connection in use it must not wait -- those searches may be waiting
    for their own BM25 halves -- but be told "busy" at once; with one idle, or room to open one, it gets it."""
    import threading

    from campus_search.errors import ServiceUnavailable

    pool = small.db.write_pool
    held = [pool.getconn(timeout=10) for _ in range(pool.max_size - 1)]
    try:
        with small.db.connection(read=True, spare=30) as conn:  # the last one: room to open it, or idle
            assert conn.execute("SELECT 1").fetchone() == (1,)
            outcome: list[BaseException | None] = []

            def second() -> None:
                try:
                    with small.db.connection(read=True, spare=30):
                        outcome.append(None)
                except BaseException as exc:  # noqa: BLE001 - recorded and asserted below
                    outcome.append(exc)

            thread = threading.Thread(target=second, daemon=True)
            thread.start()
            thread.join(10)
            assert not thread.is_alive(), "waited for a connection in use"
            assert isinstance(outcome[0], ServiceUnavailable)
    finally:
        for conn in held:
            pool.putconn(conn)


def test_a_split_search_never_waits_for_a_bm25_half_that_has_not_started(small: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A BM25 half that has not imported the search's snapshot by the time the dense half is done (queued
    behind other searches' halves in this process, or for a server connection behind pgbouncer, where the
    searches holding server connections may be the ones waiting) is not waited for at all: the search
    runs BM25 itself and answers the same, and the half, when it does start, runs no statement. One that
    has started is waited for LEXICAL_RESULT_WAIT seconds at most."""
    import threading
    import time

    from campus_search.retrieval import search as search_module

    searcher = small.searcher
    query = "EASE password reset"
    student = Principal("s1", DEFAULT_ROLES["student"])
    params = SearchParams(query=query, max_results=5, similarity_threshold=-1)
    inline = [(h.chunk_id, h.combined_score, h.in_lexical) for h in searcher.search(student, params)]
    _as_large_corpus(monkeypatch, searcher)
    release = threading.Event()
    ran: list[Any] = []
    original_pool, original_claim = searcher.lexical_pool, search_module.SharedSnapshot.claim

    def search_in_a_thread() -> list[Any]:
        answers: list[Any] = []
        thread = threading.Thread(target=lambda: answers.append(searcher.search(student, params)), daemon=True)
        thread.start()
        thread.join(10)
        release.set()
        assert answers, "the search waited for its BM25 half"
        return [(h.chunk_id, h.combined_score, h.in_lexical) for h in answers[0]]

    def queued(*args: Any) -> Any:
        release.wait(60)
        try:
            rows = original_pool(*args)
        except Exception as exc:  # noqa: BLE001 - the snapshot is gone when the search has ended
            ran.append(exc)
            raise
        ran.append(rows)
        return rows

    monkeypatch.setattr(search_module, "LEXICAL_RESULT_WAIT", 60.0)  # not this: never waited at all
    monkeypatch.setattr(searcher, "lexical_pool", queued)
    assert search_in_a_thread() == inline
    for _ in range(200):
        if ran:
            break
        time.sleep(0.05)
    # it started after the search went on: abandoned (no statement), or the snapshot already gone
    assert len(ran) == 1 and (ran[0] == [] or isinstance(ran[0], Exception))

    claimed = threading.Event()
    original_embed = searcher.embedder.embed_query

    def slow(shared: Any) -> bool:  # imported and claimed, then slow
        went_on = original_claim(shared)
        claimed.set()
        release.wait(60)
        return went_on

    def embed(texts: list[str]) -> Any:  # the dense half starts once the BM25 half has claimed
        assert claimed.wait(10)
        return original_embed(texts)

    release.clear()
    monkeypatch.setattr(searcher, "lexical_pool", original_pool)
    monkeypatch.setattr(search_module.SharedSnapshot, "claim", slow)
    monkeypatch.setattr(search_module, "LEXICAL_RESULT_WAIT", 0.05)
    monkeypatch.setattr(searcher, "query_vectors", QueryEmbeddingCache())  # so the query is embedded again
    monkeypatch.setattr(searcher.embedder, "embed_query", embed)
    assert search_in_a_thread() == inline


def test_a_search_statement_runs_its_generic_plan_unless_its_dense_half_is_exact(settings_factory: Any,
                                                                                services_factory: Any) -> None:
    """A prepared search statement on the HNSW plan is planned once (its generic plan), not again for every
    execution as PostgreSQL's ``auto`` would for the hybrid statement; one whose dense half is the exact
    plan is left to ``auto`` (custom plans first: the rule's actual values pick its join)."""
    # prepared statements as on the embedded cluster (a configured URL may lead to pgbouncer: off there)
    services = services_factory(settings_factory(db_pool_min_size=1, db_pool_max_size=1, db_prepare_threshold="5"))
    assert services.ingester.ingest([_doc(*d) for d in DOCS[:4]], AccessMetadata()).added == 4
    searcher, admin = services.searcher, superuser("planner")
    words = ["ease", "wireless", "library", "ethics", "loans", "login", "campus", "form", "books"]

    def plans(marker: str) -> dict[str, tuple[int, int]]:
        """The prepared hybrid statements of the connection: (generic plans, custom plans) run."""
        for word in words:  # psycopg prepares a statement at its 5th execution; the rest run prepared
            searcher.search(admin, SearchParams(f"{word} {marker}"))
        with services.db.connection() as conn:  # the pool's only connection, the one the searches used
            return {str(s): (int(g), int(c)) for s, g, c in conn.execute(
                "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements "
                "WHERE statement LIKE %s", ("%lex_ranked%",)).fetchall()}

    assert searcher.dense_plan(admin, {}) == "hnsw"
    hnsw = list(plans("hnsw").values())
    assert len(hnsw) == 1 and hnsw[0][0] >= 4 and hnsw[0][1] == 0, hnsw
    searcher.dense_plan = lambda user, filters: "exact"  # type: ignore[method-assign]  # another statement
    exact = [p for s, p in plans("exact").items() if ") + 0" in s]
    assert len(exact) == 1 and exact[0][1] >= 1, exact
