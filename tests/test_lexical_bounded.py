"""Bounded BM25 (migration 018, issue 14): common terms read in impact order, allowed postings only, and
cut; rare terms read whole. Checked against exhaustive BM25 over the same postings and the exact rule:

- below the cut (every query term has at most ``cut_df`` postings) the lexical top k IS exhaustive BM25's
  top k over the allowed chunks, for every principal and every way the read tests access;
- above it every pooled score is exact, no allowed chunk outside the pool scores above the reported bound,
  and where the bound certifies it the top k is exhaustive BM25's;
- never a hidden chunk and never a short page, also when a narrow rule's cached allowed-document set is
  stale after a tightening;
- the common terms' lists are read through the impact index and the read stops early.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import pytest

from campus_search.retrieval import search as search_module
from campus_search.retrieval.lexical import BM25, document_mask, mask_ids
from campus_search.retrieval.search import Searcher, _where
from campus_search.security.roles import DEFAULT_ROLES, Principal, superuser

VOCAB = ["ledger", "audit", "invoice", "grant", "budget", "laptop", "network", "printer", "library", "thesis",
         "ethics", "visa", "housing", "parking", "timetable", "exam", "tutor", "module", "credit", "loan"]
DEPARTMENTS = ("Finance", "Library", "Estates", "Medicine")
ADMIN = superuser()
STAFF = Principal("t1", DEFAULT_ROLES["staff"], departments=("Finance",))
STUDENT = Principal("s1", DEFAULT_ROLES["student"])
USERS = (ADMIN, STAFF, STUDENT)


def _insert(services: Any, rng: random.Random, n_docs: int, prefix: str) -> None:
    """Documents of 3 chunks of Zipf-distributed words (some very common, some rare), access spread so a
    student sees a small share; inserted through SQL, the triggers keep the postings."""
    weights = [1 / (i + 1) for i in range(len(VOCAB))]
    vec = "[" + ",".join("0.05" for _ in range(services.embedder.dimension)) + "]"
    with services.db.connection() as conn:
        for d in range(n_docs):
            doc_id = conn.execute(
                "INSERT INTO documents (external_id, title, source, content_hash, department, visibility, "
                "clearance_level, campus, priority) VALUES (%s, '', 'test', %s, %s, %s, %s, NULL, 3) RETURNING id",
                (f"{prefix}{d}", f"{prefix}{d}", rng.choice(DEPARTMENTS),
                 "public" if rng.random() < 0.2 else "department", rng.choice((1, 2, 3, 4)))).fetchone()[0]
            for i in range(3):
                text = " ".join(rng.choices(VOCAB, weights=weights, k=rng.randint(3, 30)))
                conn.execute("INSERT INTO chunks (document_id, chunk_index, text, content_hash, embedding) "
                             "VALUES (%s, %s, %s, %s, %s)", (doc_id, i, text, f"{prefix}{d}:{i}", vec))
        conn.execute("ANALYZE lexical_postings")
        conn.execute("ANALYZE documents")


@pytest.fixture
def corpus(settings_factory: Any, services_factory: Any) -> Any:
    services = services_factory(settings_factory())
    _insert(services, random.Random(14), 80, "d")
    return services


def _searcher(services: Any, bm25: BM25, whole: bool = False) -> Searcher:
    """A searcher with ``bm25``: its bounded read (whole_chunks 0; this corpus is small enough for the whole
    read otherwise), or with ``whole`` the small index's read of every posting (BM25.whole_cte)."""
    bm25 = dataclasses.replace(bm25, whole_chunks=10_000 if whole else 0)
    return Searcher(services.db, services.embedder, bm25=bm25,
                    lexical_narrow_fraction=search_module.LEXICAL_NARROW_FRACTION)


def _queries(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.sample(VOCAB[:12], rng.randint(1, 4))) for _ in range(n)]


def _allowed(services: Any, user: Principal) -> set[int]:
    where, params = _where(user, {})
    with services.db.connection(read=True) as conn:
        return {int(r[0]) for r in conn.execute(
            f"SELECT c.id FROM documents d JOIN chunks c ON c.document_id = d.id WHERE {where}", params).fetchall()}


def _exhaustive(services: Any, bm25: BM25, qtext: str) -> dict[int, float]:
    """Every chunk's exhaustive BM25 score (no rule): the reference."""
    with services.db.connection(read=True) as conn:
        return {int(c): float(s) for c, s in conn.execute(
            f"WITH {bm25.scored_cte()} SELECT chunk_id, score FROM lex_scores", {"qtext": qtext}).fetchall()}


def _bounded(searcher: Searcher, user: Principal, qtext: str, k: int
             ) -> tuple[list[tuple[int, float]], dict[int, float], float, bool]:
    """The production BM25 half (Searcher.lexical_sql): its top k, its exactly scored pool, the bound on
    any allowed chunk outside the pool, and whether some term's list was cut."""
    ctes, params = searcher.lexical_sql(user, {})
    args = {"qtext": qtext, "k": k, **params}
    with searcher.db.connection(read=True) as conn:
        top = [(int(c), float(s)) for c, s in conn.execute(
            f"WITH {ctes} SELECT s.chunk_id, s.score FROM lex_top t JOIN lex_scores s ON s.chunk_id = t.id "
            f"ORDER BY s.score DESC, s.chunk_id", args).fetchall()]
        pool = {int(c): float(s) for c, s in conn.execute(
            f"WITH {ctes} SELECT chunk_id, score FROM lex_scores", args).fetchall()}
        bound, cut = conn.execute(f"WITH {ctes} SELECT bound, cut FROM lex_cut", args).fetchone()
    return top, pool, float(bound), bool(cut)


def _check(services: Any, searcher: Searcher, user: Principal, qtext: str, k: int) -> tuple[bool, bool]:
    """Asserts the contract for one query; returns (a term was cut, the top k is certified exact)."""
    allowed = _allowed(services, user)
    full = {c: s for c, s in _exhaustive(services, searcher.bm25, qtext).items() if c in allowed}
    top, pool, bound, cut = _bounded(searcher, user, qtext, k)
    assert {c for c, _ in top} <= allowed, (qtext, user.user_id)  # never a hidden chunk
    assert len(top) == min(k, len(full)), (qtext, user.user_id)  # never a short page
    for cid, score in pool.items():  # every pooled score is exhaustive BM25's (rescoring)
        if cid in full:
            assert score == pytest.approx(full[cid], rel=1e-9, abs=1e-12), (qtext, cid)
    outside = [s for c, s in full.items() if c not in pool]
    assert all(s <= bound + 1e-9 for s in outside), (qtext, user.user_id, max(outside), bound)  # soundness
    expected = sorted(full.items(), key=lambda cs: (-cs[1], cs[0]))[:k]
    certified = len(top) < k or top[-1][1] >= bound
    if not cut:  # every list read to its end: nothing to certify, the top k is exhaustive BM25's
        assert certified, (qtext, user.user_id)
        assert len(pool) == len(top), (qtext, user.user_id)  # and nothing is rescored beyond the page
    if certified:
        assert [s for _, s in top] == pytest.approx([s for _, s in expected], rel=1e-9, abs=1e-12), qtext
        assert {c for c, _ in top} == {c for c, _ in expected}, (qtext, user.user_id)
    return cut, certified


@pytest.fixture(params=["docs", "probe"])
def access_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``docs``: every rule of this small corpus is narrow (LEXICAL_DOCS_MIN). ``probe``: none is (the
    admin's rule then admits every document: ``all``)."""
    if request.param == "probe":
        monkeypatch.setattr(search_module, "LEXICAL_DOCS_MIN", 0)
        monkeypatch.setattr(search_module, "LEXICAL_NARROW_FRACTION", 0.0)
    return str(request.param)


def test_access_mode_follows_the_rule(corpus: Any, access_mode: str) -> None:
    searcher = Searcher(corpus.db, corpus.embedder, lexical_narrow_fraction=search_module.LEXICAL_NARROW_FRACTION)
    with corpus.db.connection(read=True) as conn:
        for user in USERS:
            where, params = _where(user, {})
            ids = sorted(int(r[0]) for r in conn.execute(f"SELECT d.id FROM documents d WHERE {where}", params))
            mode, docs = searcher.lexical_access(user, {})
            if access_mode == "docs":
                assert mode == "docs" and docs is not None and mask_ids(docs) == ids
            else:
                assert (mode, docs) == (("all", None) if user is ADMIN else ("probe", None))
        # cached per rule AND filter values: two departments' filters share the SQL text, not the set
        for department in ("Finance", "Library", "Finance"):
            where, params = _where(STAFF, {"department": department})
            ids = sorted(int(r[0]) for r in conn.execute(f"SELECT d.id FROM documents d WHERE {where}", params))
            assert ids and searcher.lexical_access(STAFF, {"department": department}) == (
                ("docs", document_mask(ids)) if access_mode == "docs" else ("probe", None))


@pytest.mark.parametrize("whole", [False, True], ids=["bounded", "whole"])
def test_below_the_cut_it_is_exhaustive_bm25(corpus: Any, access_mode: str, whole: bool) -> None:
    """Every term under cut_df: the top k is exhaustive BM25's over the allowed chunks, whatever the access
    test; a pool barely larger than the page makes a hidden chunk in it cost a place on the page."""
    searcher = _searcher(corpus, BM25(pool=10), whole)
    for user in USERS:
        for qtext in _queries(random.Random(3), 15):
            assert _check(corpus, searcher, user, qtext, 5) == (False, True)


def test_above_the_cut_scores_are_exact_and_the_bound_holds(corpus: Any, access_mode: str) -> None:
    searcher = _searcher(corpus, BM25(depth=12, pool=10, cut_df=20))
    cuts = certified_cuts = 0
    for user in USERS:
        for qtext in _queries(random.Random(3), 25):
            cut, certified = _check(corpus, searcher, user, qtext, 5)
            cuts += cut
            certified_cuts += cut and certified
    assert cuts >= 30  # the read depth really cut most lists (240 chunks, 20 words)
    assert certified_cuts >= 5  # and the bound certified some of those cuts as exact
    # other k1, b than the index's constants: the bound is for the current parameters
    for params in ((1.5, 0.9), (0.3, 0.1)):
        other = _searcher(corpus, BM25(*params, depth=12, pool=10, cut_df=20))
        for qtext in _queries(random.Random(4), 8):
            _check(corpus, other, ADMIN, qtext, 5)


@pytest.mark.parametrize("whole", [False, True], ids=["bounded", "whole"])
def test_hybrid_lexical_half_is_full_allowed_and_exactly_scored(corpus: Any, access_mode: str,
                                                                whole: bool) -> None:
    searcher = _searcher(corpus, BM25(depth=4, pool=10, cut_df=20), whole)
    vector = np.full(corpus.embedder.dimension, 0.05, dtype=np.float32)
    for user in (STAFF, STUDENT):
        allowed = _allowed(corpus, user)
        for qtext in ("ledger audit", "invoice grant budget", "laptop"):
            full = {c: s for c, s in _exhaustive(corpus, searcher.bm25, qtext).items() if c in allowed}
            hits = searcher.hybrid_candidates(user, vector, qtext, {}, 10)
            assert {h.chunk_id for h in hits} <= allowed, qtext  # nothing hidden, dense or lexical
            assert sum(h.in_lexical for h in hits) == min(10, len(full)), qtext  # a full lexical list
            for h in hits:  # dense candidates outside the lexical pool are scored exactly too
                assert h.bm25 == pytest.approx(full.get(h.chunk_id, 0.0), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("whole", [False, True], ids=["bounded", "whole"])
def test_a_stale_allowed_set_never_admits_a_document_that_became_hidden(corpus: Any, whole: bool) -> None:
    """A student's allowed-document set is cached; then documents the student could see become hidden
    (no generation bump, the cache still holds them). The lexical half stays allowed-only and full; the
    set only narrowed the read. A document that became visible is missed until the entry expires."""
    searcher = _searcher(corpus, BM25(pool=10), whole)
    qtext = "ledger audit invoice"
    before, _, _, _ = _bounded(searcher, STUDENT, qtext, 5)
    mode, docs = searcher.lexical_access(STUDENT, {})
    assert mode == "docs" and len(before) == 5
    with corpus.db.connection() as conn:
        hidden_docs = [int(r[0]) for r in conn.execute(
            "SELECT DISTINCT document_id FROM chunks WHERE id = ANY(%s)", ([c for c, _ in before[:3]],))]
        conn.execute("UPDATE documents SET visibility = 'department', department = 'Estates', updated_at = now() "
                     "WHERE id = ANY(%s)", (hidden_docs,))
    assert searcher.lexical_access(STUDENT, {}) == (mode, docs)  # still the stale set
    assert set(hidden_docs) <= set(mask_ids(docs))  # ... which holds them
    _check(corpus, searcher, STUDENT, qtext, 5)  # allowed only, full, exact
    vector = np.full(corpus.embedder.dimension, 0.05, dtype=np.float32)
    hits = searcher.hybrid_candidates(STUDENT, vector, qtext, {}, 5)
    allowed = _allowed(corpus, STUDENT)
    assert {h.chunk_id for h in hits} <= allowed
    assert sum(h.in_lexical for h in hits) == 5

    # a loosening is seen once the entry expires (LEXICAL_ACCESS_TTL), never a tightening missed
    with corpus.db.connection() as conn:
        conn.execute("UPDATE documents SET visibility = 'public', clearance_level = 1 WHERE id = ANY(%s)",
                     (hidden_docs,))
    searcher._lexical_access.clock = lambda: float("inf")  # every entry expired
    assert set(mask_ids(searcher.lexical_access(STUDENT, {})[1] or b"")) >= set(hidden_docs)
    _check(corpus, searcher, STUDENT, qtext, 5)


def test_common_terms_are_read_through_the_impact_index_and_stop_early(corpus: Any) -> None:
    """The read's order must be migration 018's index expression (or every list is sorted in full), and
    for a narrow rule the read of a common term stops after ``depth`` allowed postings (the most weighted
    common term; the others after fewer, by weight)."""
    _read_stops_after(corpus, BM25(depth=5, cut_df=20), 5)


def test_a_narrow_rule_reads_fewer_postings_of_a_common_term(corpus: Any) -> None:
    """BM25.depth_for: for a rule admitting a share s of the documents the read of a common term stops
    after about scan * s allowed postings (scanning about ``scan``), not ``depth``; never below the page.
    The contract (allowed only, exact scores, a sound bound, a full page) holds at that depth."""
    with corpus.db.connection(read=True) as conn:
        where, params = _where(STUDENT, {})
        allowed, total = conn.execute(f"SELECT count(*) FILTER (WHERE {where}), count(*) FROM documents d",
                                      params).fetchone()
    share = allowed / total
    bm25 = BM25(depth=12, pool=10, cut_df=20, scan=round(8 / share))
    assert bm25.depth_for(share) == 8 and bm25.depth_for(1.0) == 12 and bm25.depth_for(1e-9) == 1
    _read_stops_after(corpus, bm25, 8)
    searcher = _searcher(corpus, bm25)  # the pool rescored shrinks with the depth: 10 * 8 / 12 -> 7
    ctes, params = searcher.lexical_sql(STUDENT, {})
    with corpus.db.connection(read=True) as conn:
        pooled = conn.execute(f"WITH {ctes} SELECT count(*) FROM lex_scores",
                              {"qtext": "ledger audit", "k": 2, **params}).fetchone()[0]
    assert pooled == 7
    searcher = _searcher(corpus, BM25(depth=12, pool=10, cut_df=20, scan=1))  # depth 1: reads k
    for user in (STAFF, STUDENT):
        for qtext in _queries(random.Random(5), 12):
            _check(corpus, searcher, user, qtext, 5)


def _weighted_reads(corpus: Any, bm25: BM25, qtext: str, depth: int, k: int) -> dict[str, int]:
    """What a narrow read keeps of each common term of ``qtext``: ``depth`` for the most weighted,
    ``ceil(depth * w / w_max)`` for the others, never fewer than k (computed here from the weights, in
    Python, independently of the statement)."""
    import math

    where, params = _where(STUDENT, {})
    with corpus.db.connection(read=True) as conn:
        weights = {str(t): float(w) for t, w, df in conn.execute(
            f"WITH {bm25.weights_cte()} SELECT term, w, df FROM lex_weights", {"qtext": qtext}).fetchall()
            if df > bm25.cut_df}
        allowed = {str(t): int(n) for t, n in conn.execute(
            f"SELECT p.term, count(*) FROM lexical_postings p JOIN documents d ON d.id = p.document_id "
            f"WHERE p.term = ANY(%(terms)s) AND {where} GROUP BY p.term", {"terms": list(weights), **params})}
    top = max(weights.values())
    # (a list with fewer allowed postings than that is read to its end)
    return {t: min(max(math.ceil(depth * w / top - 1e-9), k), allowed.get(t, 0)) for t, w in weights.items()}


def _read_stops_after(corpus: Any, bm25: BM25, depth: int, qtext: str = "ledger audit") -> dict[str, int]:
    """A student's read of the common terms of ``qtext`` keeps, through the impact index and without
    reading any list to its end, ``depth`` allowed postings of the most weighted term and fewer of the
    others by weight (:func:`_weighted_reads`); returns what it kept of each term."""
    import psycopg

    with psycopg.connect(corpus.dsn, autocommit=True) as conn:  # as autovacuum keeps a live corpus
        conn.execute("VACUUM ANALYZE lexical_postings")
    searcher = _searcher(corpus, bm25)
    ctes, params = searcher.lexical_sql(STUDENT, {})
    assert searcher.lexical_access(STUDENT, {})[0] == "docs"
    terms = qtext.split()
    with corpus.db.connection(read=True) as conn:
        df = sum(int(r[0]) for r in conn.execute(
            "SELECT df FROM lexical_df WHERE term = ANY(%s)", (terms,)).fetchall())
        plan = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) WITH {ctes} SELECT id FROM lex_top",
                            {"qtext": qtext, "k": 5, **params}).fetchone()[0][0]["Plan"]
        kept_by_term = {str(t): int(n) for t, n in conn.execute(
            f"WITH {ctes} SELECT term, count(*) FROM lex_read GROUP BY term",
            {"qtext": qtext, "k": 5, **params}).fetchall()}
    nodes, stack = [], [plan]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.get("Plans", []))
    # the common terms' ordered reads (a rare term's whole list may come by any scan)
    impact = [n for n in nodes if n.get("Index Name") == "lexical_postings_impact" and "Bitmap" not in n["Node Type"]]
    assert impact and all(n["Node Type"] == "Index Only Scan" for n in impact)
    assert not any("p.tf" in str(n.get("Sort Key", "")) for n in nodes)  # no sort of a term's list
    read = sum((n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"] for n in impact)
    kept = sum(n["Actual Rows"] * n["Actual Loops"] for n in impact)
    assert df > 40 and 0 < read < df  # stopped before the end of the lists
    expected = _weighted_reads(corpus, bm25, qtext, depth, 5)
    assert kept_by_term == expected and kept == sum(expected.values())
    return kept_by_term


def test_a_narrow_read_gives_a_less_weighted_common_term_fewer_postings(corpus: Any) -> None:
    """A narrow rule's read depth goes to the query's most weighted common term in full and to the others
    by weight: a term in nearly every chunk (low weight) is read less deep than a rarer one. The contract
    (allowed only, exact scores, a sound bound, a full page) holds with it."""
    bm25 = BM25(depth=8, pool=12, cut_df=20)
    with corpus.db.connection(read=True) as conn:
        df = dict(conn.execute("SELECT term, df FROM lexical_df WHERE term IN ('ledger', 'librari')"))
    assert df["ledger"] > 2 * df["librari"] > 2 * 20  # both common, ledger by far the commoner (lighter)
    kept = _read_stops_after(corpus, bm25, 8, "ledger librari")
    assert kept["librari"] == 8 and 5 <= kept["ledger"] < 8
    searcher = _searcher(corpus, bm25)
    for qtext in ("ledger library", "ledger audit invoice", "library thesis ledger", "audit grant"):
        _check(corpus, searcher, STUDENT, qtext, 5)


def test_document_mask_holds_exactly_its_ids() -> None:
    ids = [0, 1, 7, 8, 9, 63, 64, 1000, 200_003]
    mask = document_mask(ids)
    assert mask_ids(mask) == ids and len(mask) == 200_003 // 8 + 1
    assert mask_ids(document_mask([])) == [] and mask_ids(document_mask([5, 5])) == [5]
    with pytest.raises(ValueError):
        document_mask([-1])


def test_a_document_newer_than_the_cached_set_is_left_out_without_error(corpus: Any) -> None:
    """A narrow rule's allowed set is a bitmap as long as the largest id it held. A public document added
    after it was cached has an id beyond its end: the read leaves it out (the cached set only narrows),
    with no error, and finds it once the entry expires."""
    searcher = _searcher(corpus, BM25(pool=10, cut_df=5))
    qtext = "zymurgy ledger"
    assert searcher.lexical_access(STUDENT, {})[0] == "docs"  # cached now
    with corpus.db.connection() as conn:
        last = conn.execute("SELECT max(id) FROM documents").fetchone()[0]
        conn.execute("SELECT setval(pg_get_serial_sequence('documents', 'id'), %s)", (last + 64,))
    _insert(corpus, random.Random(5), 1, "new")
    with corpus.db.connection() as conn:
        new = conn.execute("SELECT d.id, array_agg(c.id) FROM documents d JOIN chunks c ON c.document_id = d.id "
                           "WHERE d.external_id = 'new0' GROUP BY d.id").fetchone()
        conn.execute("UPDATE documents SET visibility = 'public', clearance_level = 1 WHERE id = %s", (new[0],))
        conn.execute("UPDATE chunks SET text = text || ' zymurgy' WHERE document_id = %s", (new[0],))
    assert new[0] >= 8 * len(searcher.lexical_access(STUDENT, {})[1] or b"")  # beyond the cached bitmap
    top, _, _, _ = _bounded(searcher, STUDENT, qtext, 5)
    assert not {c for c, _ in top} & set(new[1])
    searcher._lexical_access.clock = lambda: float("inf")  # the entry expires
    top, _, _, _ = _bounded(searcher, STUDENT, qtext, 5)
    assert {c for c, _ in top} & set(new[1])


def test_a_query_of_more_than_63_terms_scores_each_pooled_chunk_exactly_once(corpus: Any) -> None:
    """Which terms a candidate was read for is a bit per term for the first 63 (alphabetically); a cut term
    beyond those must still not be added twice to a chunk that was read for it."""
    words = [f"aaword{i:03d}" for i in range(70)]  # sort before every VOCAB word: the VOCAB terms get idx >= 70
    vec = "[" + ",".join("0.05" for _ in range(corpus.embedder.dimension)) + "]"
    with corpus.db.connection() as conn:
        doc_id = conn.execute(
            "INSERT INTO documents (external_id, title, source, content_hash, department, visibility, "
            "clearance_level, campus, priority) VALUES ('many', '', 'test', 'many', 'Finance', 'public', 1, NULL, 3) "
            "RETURNING id").fetchone()[0]
        conn.execute("INSERT INTO chunks (document_id, chunk_index, text, content_hash, embedding) "
                     "VALUES (%s, 0, %s, 'many:0', %s)", (doc_id, " ".join(words + ["ledger", "audit"]), vec))
    searcher = _searcher(corpus, BM25(depth=4, pool=30, cut_df=20))
    for qtext in (" ".join(words + ["ledger", "audit"]), " ".join(words[:64] + ["invoice", "ledger"])):
        cut, _ = _check(corpus, searcher, ADMIN, qtext, 5)
        assert cut  # the common VOCAB terms were cut: their bits are beyond the 63 tracked


@pytest.mark.parametrize("whole", [False, True], ids=["bounded", "whole"])
def test_a_dense_candidate_outside_every_read_list_is_scored_exactly(corpus: Any, monkeypatch: pytest.MonkeyPatch,
                                                                      whole: bool) -> None:
    """When no query term's list was cut, the hybrid statement takes a dense candidate's BM25 score from
    the read lists, and one no list held contains no query term (0, not probed) -- unless the read was
    narrowed to a cached allowed set (``docs``), which may not hold a document allowed since: that
    candidate is probed, so its score stays exact."""
    searcher = _searcher(corpus, BM25(pool=10), whole)  # cut_df 1000: no list of this corpus is cut
    qtext = "zymurgy"  # only the late document holds it
    assert searcher.lexical_access(STUDENT, {})[0] == "docs"  # cached now
    monkeypatch.setattr(search_module, "LEXICAL_DOCS_MIN", 0)  # no other rule is narrow
    searcher.lexical_narrow_fraction = 0.0
    assert searcher.lexical_access(ADMIN, {})[0] == "all" and searcher.lexical_access(STAFF, {})[0] == "probe"
    with corpus.db.connection() as conn:
        last = conn.execute("SELECT max(id) FROM documents").fetchone()[0]
        conn.execute("SELECT setval(pg_get_serial_sequence('documents', 'id'), %s)", (last + 64,))
    _insert(corpus, random.Random(6), 1, "late")
    vector = np.zeros(corpus.embedder.dimension, dtype=np.float32)
    vector[0] = 1.0  # its chunks' own direction: the dense half's nearest
    with corpus.db.connection() as conn:
        new = conn.execute("SELECT d.id, array_agg(c.id) FROM documents d JOIN chunks c ON c.document_id = d.id "
                           "WHERE d.external_id = 'late0' GROUP BY d.id").fetchone()
        conn.execute("UPDATE documents SET visibility = 'public', clearance_level = 1 WHERE id = %s", (new[0],))
        conn.execute("UPDATE chunks SET text = text || ' zymurgy', embedding = %s WHERE document_id = %s",
                     (vector, new[0]))
    assert new[0] >= 8 * len(searcher.lexical_access(STUDENT, {})[1] or b"")  # not in the cached set
    full = _exhaustive(corpus, searcher.bm25, qtext)
    for user in (STUDENT, STAFF, ADMIN):
        hits = searcher.hybrid_candidates(user, vector, qtext, {}, 5)
        late = [h for h in hits if h.chunk_id in new[1]]
        assert late and all(h.in_dense and full[h.chunk_id] > 0 for h in late), user.user_id
        assert any(full.get(h.chunk_id, 0.0) == 0.0 for h in hits), user.user_id  # some hold no query term
        for h in hits:
            assert h.bm25 == pytest.approx(full.get(h.chunk_id, 0.0), rel=1e-9, abs=1e-12), (user.user_id, h.chunk_id)


def test_a_small_index_reads_every_posting_and_a_larger_one_the_bounded_way(corpus: Any) -> None:
    """BM25_WHOLE_CHUNKS: up to that many chunks (this corpus: 240) the BM25 half reads every posting of
    every query term (no impact-ordered read, bounds or rescoring: ``lex_read``), above it the bounded read;
    both give exhaustive BM25's top k over the allowed chunks here (nothing is cut at cut_df 1000)."""
    qtext = "ledger audit invoice"
    tops = {}
    for whole_chunks, reads_whole in ((20_000, True), (240, True), (239, False), (0, False)):
        searcher = Searcher(corpus.db, corpus.embedder, bm25=BM25(pool=10, whole_chunks=whole_chunks),
                            lexical_narrow_fraction=search_module.LEXICAL_NARROW_FRACTION)
        for user in USERS:
            ctes, _ = searcher.lexical_sql(user, {})
            assert ("lex_read" not in ctes) == reads_whole, (whole_chunks, user.user_id)
            tops[whole_chunks, user.user_id] = _check(corpus, searcher, user, qtext, 5)
    assert all(v == (False, True) for v in tops.values()), tops
    # before the corpus was ever counted (0 chunks known) the bounded read is the one used
    assert not BM25().reads_whole(0) and BM25().reads_whole(1) and not BM25(whole_chunks=0).reads_whole(1)
