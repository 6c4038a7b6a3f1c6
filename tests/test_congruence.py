"""Congruence: permission-filtered retrieval in PostgreSQL + pgvector against an exact reference.

A corpus of 4,000 chunks with mixed clearance, department, visibility and groups (one document in ten is
group-visible, shared with one to three of 60 course/committee groups); vectors from the real model
(paragraphs of the bundled demo corpus embedded once, mixed per chunk so the corpus is clustered the way
real text is -- no external data set, so this always runs), loaded by bulk COPY; and a smaller corpus
written through the ``Ingester`` (chunking, embedding and the triggers, as production writes). For
many random users (including ones who may see under 5% -- down to 0.5% -- of the corpus) and queries,
the service's candidates are compared with an exact allowed-only search done in numpy over the same
stored vectors, with the rule evaluated by the plain-Python reference ``is_visible``:

- every returned chunk is allowed, on the dense and on the lexical (BM25) path -- each compared with the
  exact allowed-only top k (numpy over the stored vectors; the BM25 scores of every chunk, filtered by
  the reference rule);
- a page is never short: ``min(k, allowed)`` candidates, and a search returns
  ``min(max_results, allowed chunks above the threshold)`` results;
- recall@10 against the exact search is >= 0.95, overall, for the most restricted users, and for users
  who see under 5% of the corpus and part of it only through their groups.

With fresh statistics PostgreSQL answers the most selective rules with an exact scan (btree + sort);
the same checks also run with the planner steered onto the HNSW index, where only pgvector 0.8's
iterative scan keeps pages full -- and a control shows that without it they come back short
(pgvector issues #259, #719).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_settings

from campus_search.retrieval.fusion import FusionConfig
from campus_search.retrieval.params import SearchParams
from campus_search.retrieval.ranking import business_score
from campus_search.retrieval.search import Searcher
from campus_search.security.access import COPY_TYPES, METADATA_FIELDS, columns
from campus_search.security.roles import DEFAULT_ROLES, Principal, build_roles, is_visible
from campus_search.services import Services
from campus_search.storage.db import Database

DEMO_CORPUS = Path(__file__).resolve().parent.parent / "campus_search" / "demo_corpus"
N_DOCS, CHUNKS_PER_DOC, N_TOPICS = 1000, 4, 160
DEPARTMENTS = {"Medicine": 0.35, "Informatics": 0.25, "Library": 0.15, "Estates": 0.1, "Human Resources": 0.08,
               "Finance": 0.04, "Vet School": 0.02, "Chaplaincy": 0.01}
CAMPUSES = ("Central Campus", "King's Buildings", "Easter Bush", "Western General")
GROUPS = tuple(f"course-{i:02d}" for i in range(40)) + tuple(f"committee-{i:02d}" for i in range(20))


def random_access(pick: random.Random) -> dict[str, Any]:
    """A document's access: 10% public, 10% shared with 1-3 groups, the rest department-visible."""
    r = pick.random()
    return {"department": pick.choices(list(DEPARTMENTS), weights=list(DEPARTMENTS.values()))[0],
            "visibility": "public" if r < 0.1 else "group" if r < 0.2 else "department",
            "clearance_level": pick.choices([1, 2, 3, 4, 5], weights=[15, 15, 30, 25, 15])[0],
            "groups": sorted(pick.sample(GROUPS, pick.randint(1, 3))) if 0.1 <= r < 0.2 else []}


def stored_meta(rows: list[Any]) -> list[dict[str, Any]]:
    """Rows of (id, embedding, *the declared metadata columns) -> metadata dicts for the reference rule."""
    return [dict(zip(METADATA_FIELDS, r[2:], strict=True)) for r in rows]


def read_back(services: Services) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """The stored chunks, planner statistics fresh: ids, their vectors (row-aligned) and their documents'
    metadata dicts (access lives on the document, migration 017)."""
    with services.db.connection() as conn:
        conn.execute("ANALYZE documents, chunks")
        rows = conn.execute(f"SELECT c.id, c.embedding, {columns('d')} FROM chunks c "
                            "JOIN documents d ON d.id = c.document_id ORDER BY c.id").fetchall()
    ids = np.array([r[0] for r in rows])
    vectors = np.stack([np.asarray(r[1].to_numpy(), dtype=np.float32) for r in rows])
    return ids, vectors, stored_meta(rows)


@dataclass
class Corpus:
    services: Services
    ids: np.ndarray  # chunk ids, row-aligned with vectors
    vectors: np.ndarray
    meta: list[dict[str, Any]]
    queries: list[tuple[str, np.ndarray]]


def demo_texts() -> tuple[list[str], list[str]]:
    """(paragraphs, headings) of the bundled demo corpus, front matter removed: real university prose."""
    paragraphs, headings = [], []
    for path in sorted(DEMO_CORPUS.glob("*.md")):
        if path.name == "README.md":
            continue
        text = path.read_text(encoding="utf-8")
        if text.startswith("---"):
            text = text.split("---", 2)[2]
        for block in re.split(r"\n\s*\n", text):
            body = []
            for line in (ln.strip() for ln in block.splitlines() if ln.strip()):
                if line.startswith("#"):
                    headings.append(line.lstrip("#").strip())
                else:
                    body.append(line)
            if body:
                paragraphs.append(" ".join(" ".join(body).split()))
    return paragraphs, headings


def topic_texts(rng: random.Random, n: int) -> list[str]:
    """n topic texts: demo paragraphs, and (past those) recombinations of two paragraphs' sentences."""
    paragraphs, _ = demo_texts()
    out = paragraphs[:n]
    while len(out) < n:
        a, b = rng.sample(paragraphs, 2)
        sa, sb = re.split(r"(?<=[.!?]) ", a), re.split(r"(?<=[.!?]) ", b)
        out.append(" ".join(sa[: max(1, len(sa) // 2)] + sb[len(sb) // 2:]))
    return out


@pytest.fixture(scope="module")
def corpus(make_database: Any, embedder: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    rng = np.random.default_rng(20261129)
    pick = random.Random(7)
    titles = topic_texts(pick, N_TOPICS)
    topics = embedder.embed(titles)
    settings = make_settings(make_database(), tmp_path_factory.mktemp("congruence"))
    services = Services(settings, embedder=embedder).ensure_open()
    docs, chunks = [], []
    for d in range(N_DOCS):
        meta = {**random_access(pick),
                "campus": pick.choice(CAMPUSES), "priority": pick.randint(1, 5),
                "last_reviewed": dt.datetime(2022, 1, 1) + dt.timedelta(days=pick.randint(0, 900))}
        docs.append(meta)
        for c in range(CHUNKS_PER_DOC):
            a, b = rng.integers(0, N_TOPICS, 2)
            v = topics[a] + 0.6 * topics[b] + 0.5 * rng.standard_normal(topics.shape[1]) / np.sqrt(topics.shape[1])
            chunks.append((d, c, (v / np.linalg.norm(v)).astype(np.float32), f"{titles[a]} {titles[b]}"))
    with services.db.connection() as conn:
        conn.execute("SET LOCAL statement_timeout = 0")  # a bulk load on a busy 2-core machine
        # the column lists of the access declaration (security.access), as ingestion's COPY uses them
        with conn.cursor().copy(f"COPY documents (external_id, title, content_hash, {columns()}) "
                                "FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["text", "text", "text", *COPY_TYPES])
            for d, m in enumerate(docs):
                copy.write_row((f"doc-{d}", f"Document {d}", f"h{d}", *(m[n] for n in METADATA_FIELDS)))
        doc_ids = dict(conn.execute("SELECT external_id, id FROM documents").fetchall())
        with conn.cursor().copy("COPY chunks (document_id, chunk_index, text, content_hash, embedding) "
                                "FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "int4", "text", "text", "vector"])
            for d, c, v, text in chunks:
                copy.write_row((doc_ids[f"doc-{d}"], c, text, f"c{d}-{c}", v))
        conn.execute("UPDATE index_state SET generation = generation + 1")
    ids, vectors, meta = read_back(services)
    texts = random.Random(11).sample(demo_texts()[1], 30)  # section headings: how users phrase questions
    real = list(zip(texts, embedder.embed(texts), strict=True))
    synthetic = []
    for i in range(30):  # queries near a topic, as a user paraphrasing a title would be
        v = topics[i * 5] + 0.4 * rng.standard_normal(topics.shape[1]) / np.sqrt(topics.shape[1])
        synthetic.append((titles[i * 5], (v / np.linalg.norm(v)).astype(np.float32)))
    yield Corpus(services, ids, vectors, meta, real + synthetic)
    services.close()


ROLES = build_roles()


def principal_pool(rng: random.Random) -> list[tuple[Principal, dict[str, Any]]]:
    """Random users and filters, plus the most restricted cases on purpose."""
    depts = list(DEPARTMENTS)
    out: list[tuple[Principal, dict[str, Any]]] = [
        (Principal("anon", ROLES["anonymous"]), {}),
        (Principal("stu", ROLES["student"], ("Medicine",)), {}),
        (Principal("stu2", ROLES["student"]), {"campus": "easter BUSH"}),  # filters ignore letter case
        (Principal("chap", ROLES["staff"], ("Chaplaincy",)), {"visibility": "department"}),
        (Principal("chap2", ROLES["staff"], ("Chaplaincy",)), {"department": "chaplaincy"}),
        # a filter's spelling never widens the rule: the token's department must match exactly
        (Principal("chap3", ROLES["staff"], ("chaplaincy",)), {"department": "Chaplaincy"}),
        (Principal("vet", ROLES["staff"], ("Vet School",)), {"min_priority": 4}),
        (Principal("hr", ROLES["staff"], ("Human Resources",)), {"clearance_level": 1}),
        (Principal("nodept", ROLES["staff"]), {}),
        (Principal("root", ROLES["admin"]), {}),
        # group ACLs: members only (students, staff, academics alike), admins see every group's documents
        (Principal("g1", ROLES["student"], groups=("course-07",)), {}),
        (Principal("g2", ROLES["student"], groups=("course-03", "committee-11")), {"visibility": "group"}),
        (Principal("g3", ROLES["academic"]), {"visibility": "group"}),  # no groups: no group documents
        (Principal("g4", ROLES["academic"], groups=("committee-02",)), {"visibility": "group"}),
        (Principal("g5", ROLES["staff"], ("Medicine",), groups=("course-19",)), {}),
        (Principal("g6", ROLES["admin"]), {"visibility": "group"}),
        (Principal("g7", ROLES["student"], groups=tuple(GROUPS[:30])), {"visibility": "group"}),
    ]
    for i in range(36):
        role = rng.choice(list(DEFAULT_ROLES.values()))
        own = tuple(rng.sample(depts, rng.randint(0, 2)))
        groups = tuple(rng.sample(GROUPS, rng.choice([0, 0, 1, 2, 4])))
        filters: dict[str, Any] = {}
        r = rng.random()
        if r < 0.15:
            filters["campus"] = rng.choice(CAMPUSES)
        elif r < 0.3:
            filters["department"] = rng.choice(depts)
        elif r < 0.4:
            filters["min_priority"] = rng.randint(2, 5)
        elif r < 0.5:
            filters["clearance_level"] = rng.randint(1, role.clearance)
        elif r < 0.55:
            filters["last_reviewed_after"] = dt.datetime(2023, 6, 1)
        elif r < 0.62:
            filters["visibility"] = rng.choice(["group", "public"])
        out.append((Principal(f"user{i}", role, own, groups=groups), filters))
    return out


def passes_filters(m: dict[str, Any], filters: dict[str, Any]) -> bool:
    """Plain-Python reference of the client filters (search.filter_sql)."""
    checks = {"department": lambda v: (m["department"] or "").lower() == v.lower(),
              "campus": lambda v: (m["campus"] or "").lower() == v.lower(),
              "visibility": lambda v: m["visibility"] == v, "min_priority": lambda v: m["priority"] >= v,
              "clearance_level": lambda v: m["clearance_level"] <= v,
              "last_reviewed_after": lambda v: m["last_reviewed"] is not None and m["last_reviewed"] >= v}
    return all(checks[name](value) for name, value in filters.items())


def allowed_mask(corpus: Corpus, user: Principal, filters: dict[str, Any]) -> np.ndarray:
    return np.array([is_visible(m, user) and passes_filters(m, filters) for m in corpus.meta])


class _VectorIndexOnly(Database):
    """Sessions in which the planner can only order by distance through the HNSW index."""

    def _configure(self, conn: Any) -> None:
        super()._configure(conn)
        conn.execute("SET enable_sort = off; SET enable_seqscan = off; SET enable_bitmapscan = off")
        conn.commit()


@pytest.fixture(params=["planner", "hnsw"])
def searcher(request: pytest.FixtureRequest, corpus: Corpus) -> Iterator[Searcher]:
    if request.param == "planner":
        yield corpus.services.searcher
        return
    db = _VectorIndexOnly(corpus.services.settings, corpus.services.dsn)
    db.open()
    try:
        yield Searcher(db, corpus.services.embedder, ef_search=corpus.services.settings.hnsw_ef_search)
    finally:
        db.close()


def test_filtered_dense_search_is_congruent_with_exact_search(corpus: Corpus, searcher: Searcher) -> None:
    rng = random.Random(42)
    recalls: list[float] = []
    restricted: list[float] = []
    through_groups: list[float] = []  # users who see < 5% and some of it only as a group's member
    fractions = []
    for user, filters in principal_pool(rng):
        mask = allowed_mask(corpus, user, filters)
        fraction = mask.mean()
        fractions.append(fraction)
        by_groups = any(ok and m["visibility"] == "group" for ok, m in zip(mask, corpus.meta, strict=True)) \
            and user.role.group_scope == "member"
        allowed_ids = set(corpus.ids[mask].tolist())
        for _text, q in rng.sample(corpus.queries, 4):
            sims = corpus.vectors[mask] @ q
            for k in (10, 40):
                got = searcher.dense_candidates(user, q, filters, k)
                ids = [h.chunk_id for h in got]
                assert set(ids) <= allowed_ids, (user, filters, set(ids) - allowed_ids)  # nothing hidden leaks
                assert len(ids) == len(set(ids)) == min(k, int(mask.sum())), (user, filters, k)  # never short
                if k == 10 and mask.sum():
                    exact = corpus.ids[mask][np.argsort(-sims, kind="stable")[:10]]
                    recall = len(set(ids) & set(exact.tolist())) / len(exact)
                    recalls.append(recall)
                    if fraction < 0.05:
                        restricted.append(recall)
                        if by_groups:
                            through_groups.append(recall)
                    # similarities reported are the exact cosine of the stored vectors
                    exact_sim = {int(i): float(s) for i, s in zip(corpus.ids[mask], sims, strict=True)}
                    for h in got:
                        assert h.similarity == pytest.approx(exact_sim[h.chunk_id], abs=1e-4)
    assert min(fractions) < 0.01 and sum(f < 0.05 for f in fractions) >= 6  # the hard cases are really there
    assert np.mean(recalls) >= 0.95, np.mean(recalls)
    assert np.mean(restricted) >= 0.95, np.mean(restricted)
    assert len(through_groups) >= 20 and np.mean(through_groups) >= 0.95, (len(through_groups), through_groups)
    assert len(recalls) >= 150


def test_control_without_iterative_scan_pages_come_back_short(corpus: Corpus) -> None:
    """The failure the checks above would catch: a post-filtered HNSW scan drops restricted pages."""
    db = _VectorIndexOnly(corpus.services.settings, corpus.services.dsn)
    db.open()
    try:
        user = Principal("anon", ROLES["anonymous"])
        where = ("(SELECT d.clearance_level <= 1 AND d.visibility = 'public' FROM documents d "
                 "WHERE d.id = c.document_id)")
        params: dict[str, Any] = {}
        with db.connection(read=True) as conn:
            conn.execute("SET LOCAL hnsw.iterative_scan = off")
            rows = conn.execute(f"SELECT c.id FROM chunks c WHERE {where} ORDER BY c.embedding <=> %(q)s LIMIT 40",
                                {"q": corpus.queries[0][1], **params}).fetchall()
    finally:
        db.close()
    assert allowed_mask(corpus, user, {}).sum() >= 40 and len(rows) < 20


def test_search_pages_are_full_and_allowed(corpus: Corpus) -> None:
    """The production search path (hybrid retrieval + ranking): every result allowed, and exactly
    min(max_results, allowed chunks above the threshold) of them."""
    rng = random.Random(99)
    searcher = corpus.services.searcher
    by_id = {int(i): m for i, m in zip(corpus.ids, corpus.meta, strict=True)}
    short_pages = 0
    for user, filters in principal_pool(rng)[:30]:
        mask = allowed_mask(corpus, user, filters)
        for text, q in rng.sample(corpus.queries, 3):
            threshold = rng.choice([-1.0, 0.3, 0.45])
            max_results = rng.choice([5, 10, 20])
            searcher.query_vectors.put(" ".join(text.split()), q.copy())  # the query's vector, as used above
            hits = searcher.search(user, SearchParams(text, filters, max_results, threshold))
            for h in hits:
                assert is_visible(by_id[h.chunk_id], user) and passes_filters(by_id[h.chunk_id], filters)
                assert h.similarity >= threshold
            sims = corpus.vectors[mask] @ q
            low = min(max_results, int((sims >= threshold + 1e-4).sum()))
            high = min(max_results, int((sims >= threshold - 1e-4).sum()))
            assert low <= len(hits) <= high, (user, filters, threshold, len(hits), low, high)
            short_pages += high < max_results
    assert short_pages >= 5  # some pages were limited by what the user may see, and were exactly that


def test_api_results_obey_the_rule(corpus: Corpus, token: Any) -> None:
    from campus_search.app import create_app

    client = create_app(corpus.services).test_client()
    for role, depts in (("student", []), ("professional_services", ["Chaplaincy"]), ("academic_staff", [])):
        r = client.post("/api/search", json={"query": corpus.queries[0][0],
                                             "config": {"max_results": 50, "similarity_threshold": -1}},
                        headers={"Authorization": token(role, departments=depts)})
        assert r.status_code == 200
        user = Principal("u", ROLES[{"professional_services": "staff", "academic_staff": "academic"}.get(role, role)],
                         tuple(depts))
        body = r.get_json()
        assert body["count"] == min(user.role.max_results, 50)
        for hit in body["results"]:
            assert is_visible(hit["metadata"], user)


def test_api_group_members_see_their_groups_and_never_share_a_cached_page(corpus: Corpus, token: Any) -> None:
    """Over the API with the groups claim: each member sees exactly a full page of their own groups'
    documents, the document's groups shown; a student without groups and an academic who is in none of
    them see none. The same query by principals with other groups, asked twice (the second round from the
    result cache), never hands one member's page to another."""
    from campus_search.app import create_app

    client = create_app(corpus.services).test_client()
    flt = {"visibility": "group"}
    reach = {g: sum(g in m["groups"] and m["clearance_level"] <= 2 for m in corpus.meta) for g in GROUPS}
    a, b, c = sorted(GROUPS, key=lambda g: (-reach[g], g))[:3]  # groups with documents a student may see
    asked = [("student", (a,)), ("student", (b, c)), ("student", ()), ("academic_staff", ()), ("student", (c, b))]
    for _round in range(2):
        for i, (role, groups) in enumerate(asked):
            r = client.post("/api/search", json={"query": corpus.queries[1][0], "filters": flt,
                                                 "config": {"max_results": 20, "similarity_threshold": -1}},
                            headers={"Authorization": token(role, sub=f"g{i}", groups=list(groups))})
            assert r.status_code == 200, r.get_json()
            user = Principal("u", ROLES["academic" if role == "academic_staff" else role], groups=groups)
            mask = allowed_mask(corpus, user, flt)
            body = r.get_json()
            assert body["count"] == min(20, int(mask.sum())), (role, groups, _round)
            assert (body["count"] > 0) == bool(groups), (role, groups)
            for hit in body["results"]:
                assert is_visible(hit["metadata"], user)
                assert set(hit["metadata"]["groups"]) & set(groups)


def test_index_scan_that_stops_early_falls_back_to_exact(corpus: Corpus) -> None:
    """Belt and braces for large corpora: if the HNSW scan gives up before the page is full (here forced by
    turning the iterative scan off), the search re-runs exactly, so the page is still full and allowed."""
    db = _VectorIndexOnly(corpus.services.settings, corpus.services.dsn)
    db.open()
    try:
        # exact_max_fraction 0: the HNSW plan for everyone, so the fallback (not the plan) fills the page
        searcher = Searcher(db, corpus.services.embedder, ef_search=corpus.services.settings.hnsw_ef_search,
                            exact_max_fraction=0)
        searcher.iterative_scan = "off"
        user = Principal("anon", ROLES["anonymous"])
        mask = allowed_mask(corpus, user, {})
        allowed_ids = set(corpus.ids[mask].tolist())
        dense_only = Searcher(db, corpus.services.embedder, ef_search=corpus.services.settings.hnsw_ef_search,
                              fusion=FusionConfig(method="dense"), exact_max_fraction=0)
        dense_only.iterative_scan = "off"
        allowed_meta = [m for m, ok in zip(corpus.meta, mask, strict=True) if ok]
        for text, q in corpus.queries[:5]:
            assert len(searcher.dense_candidates(user, q, {}, 40)) < 20  # the raw index scan comes back short
            hits = searcher.search(user, SearchParams(query=text, max_results=20, similarity_threshold=-1.0))
            assert len(hits) == min(20, int(mask.sum()))
            assert {h.chunk_id for h in hits} <= allowed_ids
            # ... and the fallback's page is the true one: the exact 40 nearest allowed chunks (numpy),
            # re-ranked by the business score, top 20 -- not merely some 20 allowed chunks.
            dense_only.query_vectors.put(" ".join(text.split()), q.copy())
            got = dense_only.search(user, SearchParams(query=text, max_results=20, similarity_threshold=-1.0))
            sims = corpus.vectors[mask] @ q
            nearest = np.argsort(-sims, kind="stable")[:40]
            ranked = sorted(nearest, key=lambda i: (-business_score(float(sims[i]), allowed_meta[i], user),
                                                    -float(sims[i]), int(corpus.ids[mask][i])))
            expected = [int(corpus.ids[mask][i]) for i in ranked[:20]]
            assert [h.chunk_id for h in got] == expected
    finally:
        db.close()


def _candidates(searcher: Searcher, user: Principal, q: np.ndarray, text: str, filters: dict[str, Any], k: int,
                exact: bool) -> list[Any]:
    """Every candidate of a search, each with its relevance fused in Python (``fuse``)."""
    if searcher.fusion.method == "dense":
        return searcher.dense_candidates(user, q, filters, k, exact=exact)
    return searcher.hybrid_candidates(user, q, text, filters, k, exact=exact)


@pytest.mark.parametrize("method", ["convex", "rrf", "lexical", "dense"])
def test_the_page_ranked_in_the_statement_is_the_python_ranking_of_every_candidate(corpus: Corpus,
                                                                                    method: str) -> None:
    """A search ranks inside its statement and reads only the page's rows (Searcher.ranked_page). Its page
    is the one the Python rules make of every candidate: the candidates (hybrid_candidates, fused in Python
    by ``fuse``; dense_candidates), those at or above the similarity threshold, ranked by ``business_score``
    (users on each campus and on none; documents of every priority, campus and review date), ties to the
    higher similarity and then the lower id, cut at max_results -- the same chunks in the same order with
    the same scores, for both dense plans, narrow rules and filters, thresholds that cut the page short."""
    rng = random.Random(23)
    searcher = Searcher(corpus.services.db, corpus.services.embedder, exact_max_fraction=0.03,
                        fusion=FusionConfig(method=method))
    pages = short = 0
    for user, filters in principal_pool(rng)[:14]:
        user = dataclasses.replace(user, campus=rng.choice((*CAMPUSES, None)))
        exact = searcher.dense_plan(user, filters) == "exact"
        for text, q in rng.sample(corpus.queries, 2):
            searcher.query_vectors.put(" ".join(text.split()), q.copy())
            for max_results, threshold in ((10, 0.2), (7, -1.0), (60, 0.3)):
                got = searcher.search(user, SearchParams(text, filters, max_results, threshold))
                k = max(max_results, 40)
                cands = _candidates(searcher, user, q, text, filters, k, exact)
                if not exact and sum(h.in_dense for h in cands) < k and searcher._allowed_at_least(user, filters, k):
                    cands = _candidates(searcher, user, q, text, filters, k, True)
                now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
                ranked = sorted((h for h in cands if h.similarity >= threshold),
                                key=lambda h: (-business_score(h.relevance, h.raw_meta, user, now), -h.similarity,
                                               h.chunk_id))[:max_results]
                assert [h.chunk_id for h in got] == [h.chunk_id for h in ranked], (method, user, filters, text)
                for g, r in zip(got, ranked, strict=True):
                    assert (g.similarity, g.relevance, g.bm25, g.in_dense, g.in_lexical, g.text, g.raw_meta) == \
                        (r.similarity, r.relevance, r.bm25, r.in_dense, r.in_lexical, r.text, r.raw_meta)
                    # the same rule; only "now" moved on by the oracle's milliseconds
                    assert g.combined_score == pytest.approx(business_score(r.relevance, r.raw_meta, user, now),
                                                             abs=1e-9)
                pages += 1
                short += len(got) < max_results
    assert pages == 14 * 2 * 3 and short >= 5  # thresholds and narrow rules really cut some pages short


def test_dense_plan_follows_the_visible_fraction(corpus: Corpus) -> None:
    """The plan is chosen from the share of chunks the rule and filters admit: exact at or below the
    threshold, HNSW above it; the share is the true one (numpy reference) where it decides."""
    searcher = Searcher(corpus.services.db, corpus.services.embedder, exact_max_fraction=0.03)
    plans = {"exact": 0, "hnsw": 0}
    for user, filters in principal_pool(random.Random(5)):
        share = float(allowed_mask(corpus, user, filters).mean())
        fraction = searcher.visible_fraction(user, filters)
        if share <= 0.03:
            assert fraction == pytest.approx(share, abs=1e-9), (user, filters)
        else:
            assert fraction > 0.03, (user, filters, share, fraction)
        if abs(share - 0.03) > 0.002:  # reltuples is exact here (ANALYZE), margin only for safety
            plan = searcher.dense_plan(user, filters)
            assert plan == ("exact" if share <= 0.03 else "hnsw"), (user, filters, share)
            plans[plan] += 1
    assert plans["exact"] >= 5 and plans["hnsw"] >= 10  # both plans really chosen
    # search() runs the chosen plan: one candidate query, exact for the restricted user, HNSW for admin
    calls: list[bool] = []

    class Recording(Searcher):
        def ranked_page(self, *args: Any, exact: bool = False, **kwargs: Any) -> Any:
            calls.append(exact)
            return super().ranked_page(*args, exact=exact, **kwargs)

    recording = Recording(corpus.services.db, corpus.services.embedder, exact_max_fraction=0.03)
    text, q = corpus.queries[0]
    recording.query_vectors.put(" ".join(text.split()), q.copy())
    recording.search(Principal("anon", ROLES["anonymous"]), SearchParams(text, {}, 10, -1.0))
    recording.search(Principal("root", ROLES["admin"]), SearchParams(text, {}, 10, -1.0))
    assert calls == [True, False]
    # 0 turns the exact plan off; 1 makes every plan exact
    anon = Principal("anon", ROLES["anonymous"])
    assert Searcher(corpus.services.db, corpus.services.embedder, exact_max_fraction=0).dense_plan(anon, {}) == "hnsw"
    root = Principal("root", ROLES["admin"])
    assert Searcher(corpus.services.db, corpus.services.embedder, exact_max_fraction=1).dense_plan(root, {}) == "exact"


def test_visible_fraction_is_cached_per_rule_then_recounted(corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    """The share is counted once per rule and reused for FRACTION_TTL seconds (a search does not pay for the
    count), then counted again: here a rule whose share changes while cached."""
    import campus_search.retrieval.search as search_module

    searcher = Searcher(corpus.services.db, corpus.services.embedder, exact_max_fraction=0.5)
    user = Principal("chap", ROLES["staff"], ("Chaplaincy",))
    before = searcher.visible_fraction(user, {})
    with corpus.services.db.connection() as conn:  # a change the cache has not seen, undone below
        moved = conn.execute("UPDATE documents SET department = 'Chaplaincy' WHERE id IN "
                             "(SELECT id FROM documents WHERE department = 'Medicine' AND visibility = 'department' "
                             "AND clearance_level <= 2 ORDER BY id LIMIT 50) RETURNING id").fetchall()
    try:
        assert searcher.visible_fraction(user, {}) == before  # cached
        clock = time.monotonic
        monkeypatch.setattr(time, "monotonic", lambda: clock() + search_module.FRACTION_TTL + 1)
        assert len(moved) == 50
        assert searcher.visible_fraction(user, {}) == pytest.approx(before + 50 * CHUNKS_PER_DOC / len(corpus.ids))
    finally:
        with corpus.services.db.connection() as conn:
            conn.execute("UPDATE documents SET department = 'Medicine' WHERE id = ANY(%s)", ([r[0] for r in moved],))


@pytest.mark.parametrize("fraction", [0.0, 0.03, 1.0])
def test_both_dense_plans_give_full_pages_of_allowed_chunks_and_exact_recall(corpus: Corpus, fraction: float) -> None:
    """Whichever plan the share picks (all HNSW, by share, all exact): every search page is full and only
    of allowed chunks, on the dense and the hybrid path; the plan's dense top 10 has recall >= 0.95 against
    the exact allowed-only top 10 (numpy), overall and for users who see under 5 %; the exact plan is exact."""
    rng = random.Random(17)
    by_id = {int(i): m for i, m in zip(corpus.ids, corpus.meta, strict=True)}
    dense = Searcher(corpus.services.db, corpus.services.embedder, exact_max_fraction=fraction,
                     fusion=FusionConfig(method="dense"))
    hybrid = Searcher(corpus.services.db, corpus.services.embedder, exact_max_fraction=fraction)
    recalls, restricted = [], []
    for user, filters in principal_pool(rng):
        mask = allowed_mask(corpus, user, filters)
        plan = dense.dense_plan(user, filters)
        for text, q in rng.sample(corpus.queries, 3):
            for s in (dense, hybrid):
                s.query_vectors.put(" ".join(text.split()), q.copy())
                hits = s.search(user, SearchParams(text, filters, 20, -1.0))
                assert len(hits) == min(20, int(mask.sum())), (user, filters, plan)
                assert all(is_visible(by_id[h.chunk_id], user) and passes_filters(by_id[h.chunk_id], filters)
                           for h in hits), (user, filters, plan)
            if not mask.sum():
                continue
            got = [h.chunk_id for h in dense.dense_candidates(user, q, filters, 40, exact=plan == "exact")[:10]]
            sims = corpus.vectors[mask] @ q
            exact = corpus.ids[mask][np.argsort(-sims, kind="stable")[:10]].tolist()
            recall = len(set(got) & set(exact)) / len(exact)
            if plan == "exact":
                assert set(got) == set(exact), (user, filters)
            recalls.append(recall)
            if mask.mean() < 0.05:
                restricted.append(recall)
    assert np.mean(recalls) >= 0.95 and np.mean(restricted) >= 0.95, (np.mean(recalls), np.mean(restricted))


def _lexical_ids(hits: list[Any]) -> list[int]:
    return [h.chunk_id for h in sorted((h for h in hits if h.in_lexical), key=lambda h: (-h.bm25, h.chunk_id))]


def assert_lexical_congruent(corpus: Corpus, searcher: Searcher, pool: list[tuple[Principal, dict[str, Any]]],
                             texts: list[str], k: int = 20) -> int:
    """The BM25 half of hybrid retrieval against an exact allowed-only reference: the BM25 score of every
    matching chunk (a superuser's search: IDF and lengths are corpus-wide, the same for everyone), kept
    only where the plain-Python rule allows, top k. Returns how many comparisons had matches."""
    compared = 0
    for text in texts:
        vector = corpus.services.embedder.embed([text])[0]
        with corpus.services.db.connection(read=True) as conn:  # every chunk's score, no rule at all
            scores = {int(c): float(s) for c, s in conn.execute(
                f"WITH {searcher.bm25.scored_cte()} SELECT chunk_id, score FROM lex_scores",
                {"qtext": text}).fetchall()}
        by_id = {int(i): m for i, m in zip(corpus.ids, corpus.meta, strict=True)}
        for user, filters in pool:
            got = searcher.hybrid_candidates(user, vector, text, filters, k)
            allowed = [(s, c) for c, s in scores.items() if is_visible(by_id[c], user)
                       and passes_filters(by_id[c], filters)]
            expected = [c for s, c in sorted(allowed, key=lambda sc: (-sc[0], sc[1]))[:k]]
            ids = _lexical_ids(got)
            assert all(is_visible(by_id[h.chunk_id], user) and passes_filters(by_id[h.chunk_id], filters)
                       for h in got), (user, filters)  # dense and lexical: nothing hidden leaks
            assert ids == expected, (user, filters, text)  # never short, never another chunk
            for h in got:
                if h.in_lexical:
                    assert h.bm25 == pytest.approx(scores[h.chunk_id], abs=1e-6)
            compared += bool(expected)
    return compared


def test_lexical_path_is_congruent_with_exact_allowed_only_bm25(corpus: Corpus) -> None:
    pool = principal_pool(random.Random(5))[:20]
    texts = [text for text, _ in corpus.queries[:30:6]]  # real phrasings (section headings)
    assert assert_lexical_congruent(corpus, corpus.services.searcher, pool, texts) >= 50


# --- the same rule through the production write path (Ingester) ----------------------------------------

N_INGESTED = 240


@pytest.fixture(scope="module")
def ingested(make_database: Any, embedder: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    """A corpus written by ``Ingester`` (parsing, chunking, embedding with the real model, the triggers)."""
    from campus_search.ingest.metadata import AccessMetadata
    from campus_search.ingest.sources import Block, ParsedDocument

    pick = random.Random(17)
    paragraphs, headings = demo_texts()
    settings = make_settings(make_database(), tmp_path_factory.mktemp("congruence-ingest"))
    services = Services(settings, embedder=embedder).ensure_open()
    docs = []
    for d in range(N_INGESTED):
        meta = {**random_access(pick),
                "campus": pick.choice(CAMPUSES), "priority": pick.randint(1, 5),
                "last_reviewed": (dt.datetime(2022, 1, 1) + dt.timedelta(days=pick.randint(0, 900))).isoformat()}
        docs.append(ParsedDocument(external_id=f"ing-{d}", title=pick.choice(headings), source=f"ing-{d}",
                                   blocks=[Block(paragraphs[(d * 7) % len(paragraphs)])], metadata=meta))
    report = services.ingester.ingest(docs, AccessMetadata())
    assert report.failed == 0 and report.added == N_INGESTED
    ids, vectors, meta_rows = read_back(services)
    texts = random.Random(3).sample(headings, 12)
    yield Corpus(services, ids, vectors, meta_rows, list(zip(texts, embedder.embed(texts), strict=True)))
    services.close()


def test_ingested_corpus_dense_and_lexical_paths_are_congruent(ingested: Corpus) -> None:
    """Through Ingester: every dense page is exactly the allowed-only top k of the stored vectors, and
    the lexical half is exactly the allowed-only BM25 top k."""
    pool = principal_pool(random.Random(23))
    searcher = ingested.services.searcher
    for user, filters in pool:
        mask = allowed_mask(ingested, user, filters)
        allowed_ids = set(ingested.ids[mask].tolist())
        for _text, q in ingested.queries[:4]:
            got = searcher.dense_candidates(user, q, filters, 10)
            assert {h.chunk_id for h in got} <= allowed_ids, (user, filters)
            sims = ingested.vectors[mask] @ q
            exact = ingested.ids[mask][np.argsort(-sims, kind="stable")[:10]].tolist()
            assert {h.chunk_id for h in got} == set(exact), (user, filters)
    assert assert_lexical_congruent(ingested, searcher, pool[:15], [t for t, _ in ingested.queries[4:8]], k=10) >= 20
