"""The searcher: candidates from PostgreSQL, fused and ranked there, one page returned. The API, the
health check and ``campus-search eval`` all call :class:`Searcher`. Its parameters are params.py's, its
answers results.py's, the final score ranking.py's, its query vectors query_vectors.py's.

Candidates come from PostgreSQL with the visibility rule (``security.roles.visible_sql``) and the
client's filters inside the same statement as the vector search, using pgvector 0.8's iterative HNSW
scan so a restrictive rule still fills the page. Access metadata lives on the chunk's document only
(migration 017): the rule is a predicate on ``documents`` (alias ``d``), reached by ``document_id``.

The dense plan is chosen per query from the share of chunks the principal's rule and filters admit
(counted, bounded, and cached per rule for ``FRACTION_TTL`` seconds): at most ``exact_max_fraction``
(``DENSE_EXACT_FRACTION``) and the top k come from an exact scan of the allowed chunks, reached through
the documents' access index and then by ``document_id`` (exact, and cheaper than walking the graph past
hidden neighbours); above it, from the HNSW index with an iterative scan, each candidate's document
probed by primary key (``hnsw.ef_search``, ``hnsw.iterative_scan``, ``hnsw.max_scan_tuples`` set with
``SET LOCAL`` in the search transaction, so they end with it and are safe behind pgbouncer's transaction
pooling). Either way the visibility rule is inside the same ``WHERE``; a stale share only picks the
slower plan, never a different answer: an HNSW list that comes back short is redone exactly.

A hybrid search is one statement. On a large corpus (``LEXICAL_BESIDE_MIN_CHUNKS``) its two halves run on
two connections at once, in one snapshot (``Searcher.search_beside``): the search's transaction exports
its snapshot, the BM25 pool runs on a second connection that imports it (while the query is embedded and
the dense top k found), and the search's transaction returns the union's chunks with both scores, under
the rule once more (``hybrid_candidates``).

Ranking: ranking.py (docs/ranking.md), inside the statement that finds the candidates
(:meth:`Searcher.ranked_page`): fusion, the similarity threshold, the final score and the cut run in SQL
and only the page's rows read their text. ``relevance`` is the cosine similarity for dense retrieval;
``similarity`` in the response is always the raw cosine similarity and ``similarity_threshold`` applies
to it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import psycopg

from campus_search.embedding.base import Embedder
from campus_search.errors import ServiceUnavailable
from campus_search.expiring import ExpiringLRU
from campus_search.retrieval.fusion import FusionConfig, fuse, fusion_sql
from campus_search.retrieval.lexical import BM25, allowed_top_sql, document_mask
from campus_search.retrieval.params import SearchParams
from campus_search.retrieval.query_vectors import QueryEmbeddingCache, QueryVectors
from campus_search.retrieval.querytext import normalise_query
from campus_search.retrieval.ranking import FRESHNESS_WEIGHT, PRIORITY_WEIGHT, business_score_sql
from campus_search.retrieval.results import Hit
from campus_search.security.access import METADATA_FIELDS, columns
from campus_search.security.roles import Principal, visible_sql
from campus_search.storage.db import Database, autocommit

CANDIDATE_FLOOR = 40  # candidates fetched beyond max_results so business terms can re-order them

#: Filters on names people type ("It services", "king's buildings") match whatever the letter case. They
#: only narrow: the visibility rule (security.roles.visible_sql) still compares the token's departments
#: with the document's exactly, so a filter's spelling can never widen what anyone sees.
CASE_INSENSITIVE_FILTERS = frozenset({"department", "campus"})


def filter_sql(filters: Mapping[str, Any], alias: str = "d") -> tuple[str, dict[str, Any]]:
    clauses, params = [], {}
    ops = {"department": "=", "campus": "=", "visibility": "=", "min_priority": ">=",
           "clearance_level": "<=", "last_reviewed_after": ">="}
    columns = {"min_priority": "priority", "last_reviewed_after": "last_reviewed"}
    for name, value in filters.items():
        column = f"{alias}.{columns.get(name, name)}"
        if name in CASE_INSENSITIVE_FILTERS:
            clauses.append(f"lower({column}) = lower(%(f_{name})s)")
        else:
            clauses.append(f"{column} {ops[name]} %(f_{name})s")
        params[f"f_{name}"] = value
    return " AND ".join(clauses), params


#: A candidate row: the chunk and its document, then the metadata columns (security.access declares them).
_HEAD = ("id", "external_id", "title", "section_title", "text", "page_number")
_COLUMNS = f"c.id, d.external_id, d.title, c.section_title, c.text, c.page_number, {columns('d')}"
_N = len(_HEAD) + len(METADATA_FIELDS)
#: What a page is ranked from: a candidate row without its text, which only the page's rows read
#: (:func:`_page_sql`). A chunk's text is the widest column and stored compressed; reading and sending it
#: for every candidate (~65 of them for a 10-result page) cost about a third of SciFact's statement.
_RANK_COLUMNS = f"c.id, d.external_id, d.title, c.section_title, c.page_number, {columns('d')}"


#: Seconds a principal's visible share (the dense plan's input) is reused before it is counted again.
FRACTION_TTL = 60.0
#: hnsw.max_scan_tuples: how far an iterative scan may walk before it gives up (then the exact scan runs).
MAX_SCAN_TUPLES = 20_000
#: hnsw.ef_search grows with the corpus: at least one per EF_CHUNKS_PER_CANDIDATE chunks (400 at 1M, where
#: it gives dense recall@10 0.975 against 0.938 at 200: docs/performance.md), at most pgvector's 1000.
#: HNSW_EF_SEARCH is the floor (40 by default, the candidates of a 10-result page: below 100,000 chunks the
#: page's k decides; 100 there cost 0.5 ms of PostgreSQL CPU a search for 0.993 against 0.992 dense
#: recall@10 on SciFact, docs/performance.md).
EF_CHUNKS_PER_CANDIDATE = 2500
EF_SEARCH_MAX = 1000
#: The BM25 read (lexical.py: bounded_cte, or whole_cte on a small index) filters by the allowed documents'
#: ids when a rule admits at most this share of the documents (at least LEXICAL_DOCS_MIN, at most
#: LEXICAL_DOCS_MAX of them); the ids are cached per rule for LEXICAL_ACCESS_TTL seconds
#: (Searcher.lexical_access).
LEXICAL_NARROW_FRACTION = 0.1
LEXICAL_DOCS_MIN = 1000
LEXICAL_DOCS_MAX = 50_000
LEXICAL_ACCESS_TTL = 30.0
#: Threads per process that run hybrid searches' BM25 statements (Searcher.start_lexical): at most this
#: many run at once, the rest queue (each holds a pooled connection while it runs).
LEXICAL_THREADS = 8
#: ... and only on a corpus of at least this many chunks: below it BM25 takes a few milliseconds and the
#: hand-over costs more CPU than it saves (SciFact's 4,369 chunks, bench_peer.py: 14.1 -> 16.3 ms of
#: worker CPU a request, 86 -> 78 requests/s, for 0.6 ms at concurrency 1).
LEXICAL_BESIDE_MIN_CHUNKS = 100_000
#: Seconds the BM25 thread waits for a second pooled connection (time to open one). The search already
#: holds one, so when every connection is in use it would be waiting for itself: then it does not wait
#: (Database.connection's ``spare``) and the search runs BM25 in its own statement instead (same
#: snapshot, same answer; only not in parallel).
LEXICAL_CONNECTION_WAIT = 0.5
#: Seconds a split search waits for its BM25 half before running BM25 itself. A BM25 statement takes
#: tens of milliseconds at a million chunks; a longer wait means it is queued behind others: in this
#: process's threads, or for a server connection behind pgbouncer, whose server pool the process cannot
#: see and where the searches holding server connections may be the ones waiting.
LEXICAL_RESULT_WAIT = 1.0
#: An exported snapshot's identifier (pg_export_snapshot): written into SET TRANSACTION SNAPSHOT, which
#: takes no parameter, so it is checked first.
_SNAPSHOT_ID = re.compile(r"[0-9A-F]+-[0-9A-F]+(-[0-9]+)?")


class SharedSnapshot:
    """A search transaction's exported snapshot, handed to its BM25 half (``Searcher.search_beside``).

    The half *claims* it once it has imported the snapshot; the search *abandons* it when the half has
    not claimed it by the time the dense half is done (queued behind other halves in this process, or
    for a server connection behind pgbouncer): one or the other, never both, so a search never waits for
    a half that has not started, and an abandoned half does not run its statement."""

    def __init__(self, snapshot_id: str) -> None:
        if not _SNAPSHOT_ID.fullmatch(snapshot_id):
            raise ValueError(f"not a snapshot identifier: {snapshot_id!r}")
        self.id = snapshot_id
        self._lock = threading.Lock()
        self._state = ""  # "", "claimed" or "abandoned"

    def claim(self) -> bool:
        """The BM25 half, after importing: True to go on, False when the search went on without it."""
        with self._lock:
            if not self._state:
                self._state = "claimed"
            return self._state == "claimed"

    def abandon(self) -> bool:
        """The search: True when the half had not claimed the snapshot (now it never will)."""
        with self._lock:
            if not self._state:
                self._state = "abandoned"
            return self._state == "abandoned"


#: The search transaction's settings in one statement (``SET LOCAL`` cannot take parameters nor share a
#: pipelined statement): the statement timeout, the HNSW scan's settings and the plan cache mode.
SEARCH_SETTINGS_SQL = ("SELECT set_config('statement_timeout', %(timeout)s, true), "
                       "set_config('hnsw.ef_search', %(ef_search)s, true), "
                       "set_config('hnsw.iterative_scan', %(iterative_scan)s, true), "
                       "set_config('hnsw.max_scan_tuples', %(max_scan_tuples)s, true), "
                       "set_config('plan_cache_mode', %(plan_cache_mode)s, true)")
#: A search statement's shape is fixed by its text (materialised CTEs, primary-key probes as scalar
#: subqueries, ``OFFSET 0`` fences), so planning it again for every execution buys nothing and costs
#: about a quarter of its PostgreSQL CPU at SciFact's size (1.4 of 5.6 ms). PostgreSQL's own choice
#: (``auto``: a prepared statement's generic plan once it is estimated no dearer than the custom ones)
#: flips with the estimates, so a search statement on the HNSW plan is told to use its generic plan. One
#: with the exact dense plan keeps ``auto``: the join it starts from (the documents the rule admits) is
#: chosen from the rule's actual values. Only prepared statements have a generic plan: behind pgbouncer's
#: transaction pooling (prepared statements off) every statement is planned when it runs.
GENERIC_PLAN, AUTO_PLAN = "force_generic_plan", "auto"


class Searcher:
    def __init__(self, db: Database, embedder: Embedder, *, ef_search: int = 40,
                 fusion: FusionConfig | None = None, bm25: BM25 | None = None,
                 query_vectors: QueryVectors | None = None, exact_max_fraction: float = 0.03,
                 lexical_narrow_fraction: float = LEXICAL_NARROW_FRACTION) -> None:
        self.db = db
        self.embedder = embedder
        self.ef_search = int(ef_search)
        self.exact_max_fraction = float(exact_max_fraction)
        self.fusion = fusion or FusionConfig()
        self.bm25 = bm25 or BM25()
        #: where query vectors are kept (query_vectors.py: this process's LRU unless given one)
        self.query_vectors: QueryVectors = query_vectors if query_vectors is not None else QueryEmbeddingCache()
        self.iterative_scan = "relaxed_order"  # pgvector 0.8: keep scanning the index until the page is full
        self._fractions: ExpiringLRU[str, float] = ExpiringLRU(4096)  # visible share per rule
        self._corpus_chunks = 0  # the chunks table's size when a visible share was last counted
        self._corpus_documents = 0  # the documents table's size when an allowed set was last read
        self._lexical_chunks = 0  # the chunks BM25 counts (lexical_corpus) when an access answer was last read
        self.lexical_narrow_fraction = float(lexical_narrow_fraction)
        #: per rule: how the BM25 read tests access, and a narrow rule's allowed documents (lexical_access)
        # 64 rules: an entry is a bitmap of one bit per document id (125 KB at a million documents)
        self._lexical_access: ExpiringLRU[str, tuple[str, bytes | None]] = ExpiringLRU(64)
        #: runs a hybrid search's BM25 statement beside the query's embedding (start_lexical);
        #: made in the process that uses it (a pool forked with its threads' state would never run them)
        self._runner: tuple[int, ThreadPoolExecutor] | None = None
        self._runner_lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        """The retrieval configuration, reported next to evaluation metrics."""
        out: dict[str, Any] = {"retrieval": "dense" if self.fusion.method == "dense" else "hybrid",
                               "model": self.embedder.model_name,
                               "query_embedding": getattr(self.embedder, "query_graph", None),
                               **self.fusion.describe()}
        if self.fusion.method != "dense":
            out.update({"bm25_k1": self.bm25.k1, "bm25_b": self.bm25.b, "bm25_cut_df": self.bm25.cut_df,
                        "bm25_depth": self.bm25.depth, "bm25_scan": self.bm25.scan,
                        "bm25_whole_chunks": self.bm25.whole_chunks})
        out.update({"ef_search": self.ef_search, "iterative_scan": self.iterative_scan,
                    "dense_exact_fraction": self.exact_max_fraction,
                    "priority_weight": PRIORITY_WEIGHT, "freshness_weight": FRESHNESS_WEIGHT})
        return out

    def embed_query(self, query: str) -> np.ndarray:
        key = normalise_query(query)  # params.query is in this form already; other callers' text may not be
        vector = self.query_vectors.get(key)
        if vector is None:
            vector = self.embedder.embed_query([key])[0]
            self.query_vectors.put(key, vector)
        return vector

    def search(self, user: Principal, params: SearchParams) -> list[Hit]:
        """The page: ``params.max_results`` hits at most, best first by the final score (ranking.py) among
        the candidates of at least ``params.similarity_threshold`` -- ranked inside the statement that
        finds the candidates (:meth:`ranked_page`)."""
        k = max(params.max_results, CANDIDATE_FLOOR)
        if self.fusion.method != "dense" and self._corpus_chunks >= LEXICAL_BESIDE_MIN_CHUNKS:
            return self.search_beside(user, params, k)
        vector = self.embed_query(params.query)
        exact = self.dense_plan(user, params.filters) == "exact"
        hits, in_dense = self.ranked_page(user, vector, params, k, exact=exact)
        if not exact and in_dense < k and self._allowed_at_least(user, params.filters, k):
            # A short dense list means either that fewer than k chunks are allowed, or that the index
            # scan gave up early under a restrictive rule (hnsw.max_scan_tuples). An exact scan settles
            # it, so a page is never short because hidden chunks crowded the index's neighbourhood.
            hits, _ = self.ranked_page(user, vector, params, k, exact=True)
        return hits

    def ranked_page(self, user: Principal, vector: np.ndarray, params: SearchParams, k: int, *,
                    exact: bool = False, pool: list[tuple[int, float, bool]] | None = None,
                    dense: list[int] | None = None, conn: psycopg.Connection | None = None) -> tuple[list[Hit], int]:
        """The page of one search and how many of its candidates were in the dense top k, from one
        statement: the candidates (:meth:`hybrid_candidates`, or :meth:`dense_candidates` for dense
        retrieval; ``exact``, ``pool``, ``dense`` and ``conn`` as there) without their text, fused
        (fusion.py, ``fusion_sql``) over all of them, cut at ``params.similarity_threshold``, ranked by
        the final score (ranking.py, ``business_score_sql``; ties to the higher similarity, then the lower
        chunk id) and cut at ``params.max_results``; only the page's rows read their text. The same page
        as ranking every candidate in Python with ``fuse`` and ``business_score``, which tests hold it to."""
        if self.fusion.method == "dense":
            sql, values = self._dense_statement(user, vector, params.filters, k, exact, _RANK_COLUMNS)
        else:
            sql, values = self._hybrid_statement(user, vector, params.query, params.filters, k, exact=exact,
                                                 pool=pool, dense=dense, select=_RANK_COLUMNS)
        fusion, fusion_params = fusion_sql(self.fusion, "x")
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)  # one "now" for every candidate's freshness
        business, business_params = business_score_sql("x.relevance", "x", user, now)
        values = {**values, **fusion_params, **business_params,
                  "rank_min_similarity": float(params.similarity_threshold), "rank_page": int(params.max_results)}
        sql = _page_sql(sql, fusion, business)
        rows = self._rows(sql, values, k, exact, conn)
        hits = []
        for row in rows:
            if row[0] is None:  # no candidate on the page: the one row carries the count alone
                continue
            hit = _candidate_hit(row)
            hit.relevance, hit.combined_score = float(row[_N + 4]), float(row[_N + 5])
            hits.append(hit)
        return hits, int(rows[0][-1]) if rows else 0

    def _rows(self, sql: str, values: Mapping[str, Any], k: int, exact: bool,
              conn: psycopg.Connection | None) -> list[tuple[Any, ...]]:
        """A candidate or page statement's rows: on ``conn`` (a split search's transaction) when given, else
        on a read connection with the search settings (:meth:`_fetch`)."""
        return conn.execute(sql, values).fetchall() if conn is not None else self._fetch(sql, values, k, exact=exact)

    def search_beside(self, user: Principal, params: SearchParams, k: int) -> list[Hit]:
        """A hybrid search's page with its two halves on two connections at once, in one snapshot.

        The search's transaction (REPEATABLE READ, read only) exports its snapshot; the BM25 pool
        (:meth:`lexical_pool`) starts on a thread of this process, on a second connection that imports
        it; meanwhile the query is embedded and the dense top k found in the search's transaction; last,
        that transaction returns the page ranked from the union's chunks with both scores
        (:meth:`ranked_page`, :meth:`hybrid_candidates`), the rule applied to every row once more. Every
        statement reads the same snapshot, so a document rewritten or re-permissioned meanwhile is seen
        whole, before or after, by both halves. When the second connection cannot be had at once (every
        pooled connection busy), the BM25 half has not imported the snapshot by the time the dense half is
        done (queued: :class:`SharedSnapshot`) or has not answered within ``LEXICAL_RESULT_WAIT`` seconds, or
        the snapshot cannot be imported (another server), BM25 runs inside the last statement instead: the
        same answer."""
        filters = params.filters
        exact = self.dense_plan(user, filters) == "exact"  # both cached per rule: no connection held below
        self.lexical_access(user, filters)
        where, where_params = _where(user, filters)
        with self.db.connection(read=True) as conn:
            shared = SharedSnapshot(self._export_snapshot(conn, k, exact))
            lexical = self.start_lexical(user, params.query, filters, k, snapshot=shared)
            try:
                vector = self.embed_query(params.query)
                values = {"q": vector, "k": k, **where_params}

                def dense_ids(exact_scan: bool) -> list[int]:
                    row = conn.execute(f"SELECT array_agg(id) FROM ({_dense_sql(where, exact_scan)}) t",
                                       values).fetchone()
                    return list(row[0] or []) if row else []

                dense = dense_ids(exact)
                if not exact and len(dense) < k and self._allowed_at_least(user, filters, k, conn=conn):
                    # short: as in search(), an exact scan settles it (planned as the exact plan is)
                    conn.execute("SELECT set_config('plan_cache_mode', %s, true)", (AUTO_PLAN,))
                    dense = dense_ids(True)
            except BaseException:
                shared.abandon()  # the search failed (the model, the dense statement): no BM25 half for it
                lexical.cancel()
                raise
            pool: list[tuple[int, float, bool]] | None = None
            if shared.abandon():  # the BM25 half has not started: not waited for, BM25 in the statement below
                lexical.cancel()
            else:
                try:
                    pool = lexical.result(timeout=LEXICAL_RESULT_WAIT)
                except (TimeoutError, ServiceUnavailable, psycopg.errors.InvalidParameterValue,
                        psycopg.errors.ObjectNotInPrerequisiteState):
                    pool = None  # no second connection, too slow, or not on this server: BM25 below
            return self.ranked_page(user, vector, params, k, pool=pool, dense=dense, conn=conn)[0]

    def _export_snapshot(self, conn: psycopg.Connection, k: int, exact: bool = False) -> str:
        """Make ``conn``'s new transaction a read-only REPEATABLE READ one with the search settings, and
        export its snapshot (one round trip on a direct connection)."""
        row = _one_trip(conn, [(_READ_ONLY_REPEATABLE, None), (SEARCH_SETTINGS_SQL, self._settings(k, exact)),
                               (SPLIT_EXPORT_SQL, None)]).fetchone()
        return str(row[0]) if row else ""

    def start_lexical(self, user: Principal, query: str, filters: Mapping[str, Any], k: int,
                      snapshot: SharedSnapshot | None = None) -> Future[list[tuple[int, float, bool]]]:
        """:meth:`lexical_pool` on a thread of this process, now; its rows (or its error) come from the
        returned future's ``result()``."""
        with self._runner_lock:
            if self._runner is None or self._runner[0] != os.getpid():
                self._runner = (os.getpid(), ThreadPoolExecutor(max_workers=LEXICAL_THREADS,
                                                                thread_name_prefix="search-bm25"))
            runner = self._runner[1]
        return runner.submit(self.lexical_pool, user, query, filters, k, snapshot)

    def lexical_pool(self, user: Principal, query: str, filters: Mapping[str, Any], k: int,
                     snapshot: SharedSnapshot | None = None) -> list[tuple[int, float, bool]]:
        """The BM25 half of a hybrid search, one statement: ``(chunk_id, exact BM25 score, in the top k)``
        for the pool of candidates (lexical.py, ``BM25.bounded_cte``; ``whole_cte`` on a small index) whose
        document satisfied the rule and filters when it ran. Ids and scores only: the statement that returns
        chunks (:meth:`hybrid_candidates`) applies the rule again, so a document hidden since cannot surface.

        ``snapshot``: an exported snapshot (:meth:`search_beside`) the statement reads, on a connection
        had within ``LEXICAL_CONNECTION_WAIT`` seconds or not at all (ServiceUnavailable); no rows, and no
        statement, when the search went on without this half (:meth:`SharedSnapshot.claim`)."""
        lexical, lex_params = self.lexical_sql(user, filters)
        sql = f"WITH {lexical} {_POOL_ROWS}"
        return [(int(r[0]), float(r[1]), bool(r[2]))
                for r in self._fetch(sql, {"k": k, "qtext": query, **lex_params}, k, snapshot=snapshot)]

    def dense_plan(self, user: Principal, filters: Mapping[str, Any]) -> str:
        """``exact`` when the rule and filters admit at most ``exact_max_fraction`` of the chunks, else
        ``hnsw``. Both plans apply the same rule inside the query; this only chooses the cheaper one."""
        if self.exact_max_fraction <= 0:
            return "hnsw"
        return "exact" if self.visible_fraction(user, filters) <= self.exact_max_fraction else "hnsw"

    def visible_fraction(self, user: Principal, filters: Mapping[str, Any]) -> float:
        """The share of chunks ``user`` may see under ``filters``, counted up to just past
        ``exact_max_fraction`` (so an admin's count stops early) and cached per rule for FRACTION_TTL s.
        Above the threshold the value returned is a lower bound."""
        where, params = _where(user, filters)
        key = _rule_key(where, params)
        cached = self._fractions.get(key)
        if cached is not None:
            return cached
        with self.db.connection(read=True) as conn:
            conn.execute(self.db.search_settings())
            total = _estimated_rows(conn, "chunks")
            self._corpus_chunks = total
            cap = int(total * self.exact_max_fraction) + 1
            allowed = conn.execute(f"SELECT count(*) FROM (SELECT 1 {_ALLOWED_CHUNKS} WHERE {where} "
                                   f"LIMIT %(cap)s) s", {"cap": cap, **params}).fetchone()
            seen = int(allowed[0]) if allowed else 0
        fraction = min(1.0, seen / total) if total > 0 else 0.0
        if seen >= cap:  # reltuples is an estimate: never let it put a large share under the threshold
            fraction = max(fraction, self.exact_max_fraction + 1e-9)
        self._fractions.put(key, fraction, self._fractions.clock() + FRACTION_TTL)
        return fraction

    def ef_search_for(self, k: int) -> int:
        """``hnsw.ef_search`` for a top-``k`` search: ``HNSW_EF_SEARCH``, raised with the corpus size (one
        candidate per EF_CHUNKS_PER_CANDIDATE chunks, as counted by the last ``visible_fraction``; at most
        EF_SEARCH_MAX), and never below k."""
        by_size = min(EF_SEARCH_MAX, self._corpus_chunks // EF_CHUNKS_PER_CANDIDATE)
        return max(self.ef_search, by_size, k)

    def lexical_access(self, user: Principal, filters: Mapping[str, Any]) -> tuple[str, bytes | None]:
        """How the BM25 read (lexical.py, ``BM25.bounded_cte`` or ``whole_cte``) tests access for this rule and
        these filters, cached per rule for ``LEXICAL_ACCESS_TTL`` seconds (the chunk count that chooses between
        the two reads, ``lexical_corpus``, is read with it):

        - ``("docs", mask)``: at most ``lexical_narrow_fraction`` of the documents (and never more than
          ``LEXICAL_DOCS_MAX``; at least ``LEXICAL_DOCS_MIN`` on a small corpus) are allowed: their ids as a
          bitmap (lexical.py, ``document_mask``; ~25 KB for 200,000 documents) the read tests each posting
          against with ``get_bit``;
        - ``("all", None)``: the rule and filters admit every document: no test in the read;
        - ``("probe", None)``: otherwise: each read posting's document is probed by primary key.

        A cached answer can be stale after a metadata change; it only ever *narrows* the candidates: the
        final cut (``allowed_top_sql``) and the returned rows are checked with the exact rule of this
        moment, so a stale set can leave a document that just became visible out (until the entry
        expires), never let one that just became hidden in."""
        where, params = _where(user, filters)
        key = _rule_key(where, params)
        cached = self._lexical_access.get(key)
        if cached is not None:
            return cached
        with self.db.connection(read=True) as conn:
            conn.execute(self.db.search_settings())
            total = _estimated_rows(conn, "documents")
            self._corpus_documents = total
            # how BM25 reads (lexical_sql): the exact count BM25's statistics keep (N), not an estimate
            row = conn.execute("SELECT chunks FROM lexical_corpus").fetchone()
            self._lexical_chunks = int(row[0]) if row and row[0] is not None else 0
            cap = min(LEXICAL_DOCS_MAX, max(LEXICAL_DOCS_MIN, int(total * self.lexical_narrow_fraction)))
            ids = [int(r[0]) for r in conn.execute(f"SELECT d.id FROM documents d WHERE {where} LIMIT %(cap)s",
                                                   {"cap": cap + 1, **params}).fetchall()]
            if len(ids) <= cap:
                answer: tuple[str, bytes | None] = ("docs", document_mask(ids))
            else:
                everything = conn.execute(f"SELECT NOT EXISTS (SELECT 1 FROM documents d WHERE ({where}) IS NOT TRUE)",
                                          params).fetchone()
                answer = ("all", None) if everything and everything[0] else ("probe", None)
        self._lexical_access.put(key, answer, self._lexical_access.clock() + LEXICAL_ACCESS_TTL)
        return answer

    def lexical_sql(self, user: Principal, filters: Mapping[str, Any],
                    access: tuple[str, bytes | None] | None = None) -> tuple[str, dict[str, Any]]:
        """The BM25 half of the hybrid statement: CTEs ending in ``lex_scores`` (chunk_id, document_id,
        score: the exactly scored pool) and ``lex_top`` (id: the best ``%(k)s`` of it whose document
        satisfies the rule and filters, probed now), and their parameters (besides ``qtext`` and ``k``).
        ``access``: :meth:`lexical_access`'s answer, when the caller has it already."""
        where, params = _where(user, filters)
        mode, docs = access or self.lexical_access(user, filters)
        if docs is not None:
            params = {**params, "lex_docs": docs}
        if self.bm25.reads_whole(self._lexical_chunks):  # a small index: every posting, summed (whole_cte)
            ctes = self.bm25.whole_cte(mode, where)
        else:
            depth = None
            if docs is not None:
                # a narrow rule reads fewer allowed postings per common term, about BM25.scan scanned (depth_for)
                depth = self.bm25.depth_for(int.from_bytes(docs, "little").bit_count() / max(1, self._corpus_documents))
            ctes = self.bm25.bounded_cte(mode, where, depth=depth)
        return f"{ctes}, lex_top AS MATERIALIZED ({allowed_top_sql('lex_scores', where)})", params

    def _allowed_at_least(self, user: Principal, filters: Mapping[str, Any], k: int,
                          conn: psycopg.Connection | None = None) -> bool:
        """Whether at least k chunks pass the rule and filters (cheap: stops counting at k); on ``conn``
        (a search transaction's) when given."""
        where, params = _where(user, filters)
        sql = f"SELECT count(*) FROM (SELECT 1 {_ALLOWED_CHUNKS} WHERE {where} LIMIT %(k)s) s"
        if conn is not None:
            row = conn.execute(sql, {"k": k, **params}).fetchone()
        else:
            with self.db.connection(read=True) as own:
                own.execute(self.db.search_settings())
                row = own.execute(sql, {"k": k, **params}).fetchone()
        return bool(row and row[0] >= k)

    def _settings(self, k: int, exact: bool = False) -> dict[str, str]:
        """SEARCH_SETTINGS_SQL's values for a top-``k`` search (``exact``: its dense half is the exact plan)."""
        return {"timeout": str(int(self.db.settings.db_statement_timeout_ms)),
                "ef_search": str(self.ef_search_for(k)), "iterative_scan": self.iterative_scan,
                "max_scan_tuples": str(MAX_SCAN_TUPLES), "plan_cache_mode": AUTO_PLAN if exact else GENERIC_PLAN}

    def _fetch(self, sql: str, params: Mapping[str, Any], k: int,
               snapshot: SharedSnapshot | None = None, exact: bool = False) -> list[tuple[Any, ...]]:
        """Run a candidate query on a read connection, with the search timeout and this searcher's HNSW
        settings, all transaction-local (``set_config(..., true)`` = ``SET LOCAL``: they end with the
        transaction; pgbouncer-safe).

        On a direct connection the settings and the query go out together in one pipeline, in autocommit
        mode: one round trip, and one transaction without ``BEGIN`` or ``COMMIT`` -- the extended protocol
        runs what precedes a ``Sync`` in one transaction, which the ``Sync`` ends (with the settings). That
        saved 0.2 ms of client and 0.3 ms of PostgreSQL CPU a search against the explicit transaction.
        Behind pgbouncer's transaction pooling (prepared statements off, like the audit writer) one
        statement at a time, in the pool's transaction.

        ``snapshot``: first import that exported snapshot (a read-only REPEATABLE READ transaction), on a
        connection had within ``LEXICAL_CONNECTION_WAIT`` seconds, and claim it; nothing more when the
        search it belongs to went on without it. ``exact``: ``sql`` holds the exact dense plan (the plan
        cache mode, SEARCH_SETTINGS_SQL)."""
        wait = LEXICAL_CONNECTION_WAIT if snapshot is not None else None
        with self.db.connection(read=True, spare=wait) as conn:
            statements = [(SEARCH_SETTINGS_SQL, self._settings(k, exact)), (sql, params)]
            if snapshot is not None:
                _one_trip(conn, [(_READ_ONLY_REPEATABLE, None), (f"SET TRANSACTION SNAPSHOT '{snapshot.id}'", None)])
                if not snapshot.claim():
                    return []
            elif conn.prepare_threshold is not None:  # a direct connection
                return _implicit_trip(conn, statements).fetchall()
            return _one_trip(conn, statements, commit=True).fetchall()

    def hybrid_candidates(self, user: Principal, vector: np.ndarray, query: str, filters: Mapping[str, Any],
                          k: int, *, exact: bool = False, pool: list[tuple[int, float, bool]] | None = None,
                          dense: list[int] | None = None, conn: psycopg.Connection | None = None) -> list[Hit]:
        """Top-k dense and top-k BM25 chunks (both under the visibility rule and filters), each with its
        exact cosine and BM25 score, fused into ``relevance`` (fusion.py).

        One statement, one snapshot: the BM25 pool, the dense top k and the union's chunks with both
        scores. :meth:`search_beside` hands over what it found already, in the same snapshot: the BM25
        pool's rows (``pool``, :meth:`lexical_pool`) and the dense top k's ids (``dense``), and its
        transaction (``conn``); this statement does the rest. A dense candidate outside the BM25 pool gets
        its exact BM25 score by primary-key probes, and the rule is applied once more to every row
        returned, so neither list -- nor a handed-over one read in another snapshot -- can surface a hidden
        chunk."""
        sql, values = self._hybrid_statement(user, vector, query, filters, k, exact=exact, pool=pool, dense=dense)
        rows = self._rows(sql, values, k, exact, conn)
        rows.sort(key=lambda r: r[0])  # by chunk id: a tie in rank (rrf) goes to the lower id, as in ranked_page
        hits = [_candidate_hit(row) for row in rows]
        relevance = fuse([h.similarity for h in hits], [h.bm25 or 0.0 for h in hits], [h.in_dense for h in hits],
                         [h.in_lexical for h in hits], self.fusion)
        for hit, rel in zip(hits, relevance, strict=True):
            hit.relevance = rel
        return hits

    def _hybrid_statement(self, user: Principal, vector: np.ndarray, query: str, filters: Mapping[str, Any],
                          k: int, *, exact: bool = False, pool: list[tuple[int, float, bool]] | None = None,
                          dense: list[int] | None = None, select: str = _COLUMNS) -> tuple[str, dict[str, Any]]:
        """:meth:`hybrid_candidates`' statement and its values; ``select`` the chunk and document columns
        its rows start with (then ``similarity``, ``bm25``, ``in_dense``, ``in_lex``)."""
        where, params = _where(user, filters)
        exact_bm25 = self.bm25.exact_score_sql("c.id")
        read_join = ""
        if pool is None:
            access = self.lexical_access(user, filters)
            lex_ctes, lex_params = self.lexical_sql(user, filters, access)
            pool_source = f"{lex_ctes}, ls AS ({_POOL_ROWS})"
            # every list read to its end (lex_whole): a chunk read for some term has its exact score already;
            # and unless the read was narrowed to a cached allowed set (access "docs", which may not hold a
            # document allowed since), every allowed chunk holding a query term was read: one not read
            # scores 0 (the dense half admits allowed chunks only)
            read_join = "LEFT JOIN lex_ranked lr ON lr.chunk_id = c.id "
            unread = "0::float8" if access[0] != "docs" else exact_bm25
            exact_bm25 = (f"CASE WHEN (SELECT whole FROM lex_whole) THEN coalesce(lr.lb, {unread}) "
                          f"ELSE {exact_bm25} END")
        else:
            pool_source = (f"{self.bm25.weights_cte()}, ls AS (SELECT * FROM unnest(%(ls_ids)s::bigint[], "
                           f"%(ls_scores)s::float8[], %(ls_top)s::bool[]) AS t(chunk_id, score, in_lex))")
            lex_params = {"ls_ids": [p[0] for p in pool], "ls_scores": [p[1] for p in pool],
                          "ls_top": [p[2] for p in pool]}
        if dense is None:
            dense_source = f"dense AS MATERIALIZED ({_dense_sql(where, exact)})"
        else:
            dense_source = "dense AS MATERIALIZED (SELECT unnest(%(dense_ids)s::bigint[]) AS id)"
            lex_params["dense_ids"] = dense
        sql = (f"WITH {dense_source}, {pool_source}, "
               f"cand AS (SELECT id FROM dense UNION SELECT chunk_id FROM ls WHERE in_lex) "
               f"SELECT {select}, 1 - (c.embedding <=> %(q)s) AS similarity, "
               f"  coalesce(ls.score, {exact_bm25}) AS bm25, "
               f"  c.id IN (SELECT id FROM dense) AS in_dense, coalesce(ls.in_lex, false) AS in_lex "
               f"FROM cand JOIN chunks c ON c.id = cand.id JOIN documents d ON d.id = c.document_id "
               f"LEFT JOIN ls ON ls.chunk_id = c.id {read_join}"
               # Defence in depth: both lists were cut under the rule; it is applied once more to the rows
               # returned, so no later change to either list's statement can surface a hidden chunk.
               f"WHERE {where}")
        return sql, {"q": vector, "k": k, "qtext": query, **params, **lex_params}

    def dense_candidates(self, user: Principal, vector: np.ndarray, filters: Mapping[str, Any],
                         k: int, *, exact: bool = False) -> list[Hit]:
        """The dense top k under the rule and filters, nearest first, each with its cosine similarity."""
        sql, values = self._dense_statement(user, vector, filters, k, exact)
        return [_hit(row, float(row[_N])) for row in self._fetch(sql, values, k, exact=exact)]

    def _dense_statement(self, user: Principal, vector: np.ndarray, filters: Mapping[str, Any], k: int,
                         exact: bool, select: str = _COLUMNS) -> tuple[str, dict[str, Any]]:
        """:meth:`dense_candidates`' statement and its values; its rows as :meth:`_hybrid_statement`'s (no BM25
        score, every row in the dense list and none in the lexical one)."""
        where, params = _where(user, filters)
        nearest = _dense_sql(where, exact, "c.id, c.embedding <=> %(q)s AS distance")
        sql = (f"WITH candidates AS MATERIALIZED ({nearest}) "
               f"SELECT {select}, 1 - cand.distance AS similarity, NULL::float8 AS bm25, true AS in_dense, "
               f"false AS in_lex FROM candidates cand "
               f"JOIN chunks c ON c.id = cand.id JOIN documents d ON d.id = c.document_id "
               f"ORDER BY cand.distance, c.id")
        return sql, {"q": vector, "k": k, **params}


_READ_ONLY_REPEATABLE = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
#: A split search's transaction exports its snapshot (row[0]) and runs without parallel workers: the second
#: core is its BM25 half's.
#: A parallel worker for the exact dense scan (a narrow principal at 1M chunks) competed with that half:
#: the student's split search took 38-42 ms at p50 with it, 32-34 without (docs/performance.md).
SPLIT_EXPORT_SQL = "SELECT pg_export_snapshot(), set_config('max_parallel_workers_per_gather', '0', true)"


def _one_trip(conn: psycopg.Connection, statements: Sequence[tuple[str, Mapping[str, Any] | None]],
              commit: bool = False) -> psycopg.Cursor[Any]:
    """Run ``statements`` in order on ``conn`` and return the last one's cursor: on a direct connection in
    one pipeline, one round trip (with the ``COMMIT`` when ``commit``); behind pgbouncer's transaction
    pooling (prepared statements off, like the audit writer) one statement at a time, the transaction
    committed when the caller's connection block ends."""
    if conn.prepare_threshold is None:
        for sql, args in statements:
            cur = conn.execute(sql, args)
        return cur
    with conn.pipeline():
        for sql, args in statements:
            cur = conn.execute(sql, args)
        if commit:
            conn.commit()
    return cur


def _implicit_trip(conn: psycopg.Connection, statements: Sequence[tuple[str, Mapping[str, Any] | None]]
                   ) -> psycopg.Cursor[Any]:
    """Run ``statements`` in one pipeline on ``conn`` (a direct connection, idle) in autocommit mode and
    return the last one's cursor: one round trip, and one transaction that the pipeline's ``Sync`` ends --
    so transaction-local settings (``set_config(..., true)``) hold for the statements after them and end
    with it, with no ``BEGIN`` or ``COMMIT`` sent. The connection goes back to the pool in transaction mode."""
    with autocommit(conn), conn.pipeline():
        for sql, args in statements:
            cur = conn.execute(sql, args)
    return cur


def _rule_key(where: str, params: Mapping[str, Any]) -> str:
    """A cache key for a compiled rule and its parameter values."""
    return where + "\x00" + json.dumps(params, sort_keys=True, default=str)


def _estimated_rows(conn: Any, table: str) -> int:
    """The planner's row estimate of ``table`` (``chunks`` or ``documents``), or an exact count when the
    table was never analysed (-1) or was last analysed empty (0: the migrations analyse their new tables;
    rows loaded since count from the next analyse on); the callers cache what they derive from it."""
    row = conn.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", (table,)).fetchone()
    total = int(row[0]) if row else -1
    if total <= 0:
        counted = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        total = int(counted[0]) if counted else 0
    return total


#: The BM25 pool's rows (chunk_id, score, in_lex: among the best k allowed), after lexical_sql's CTEs.
_POOL_ROWS = "SELECT s.chunk_id, s.score, s.chunk_id IN (SELECT id FROM lex_top) AS in_lex FROM lex_scores s"

#: The chunks of the documents a predicate on ``d`` admits (the exact plan and the counts).
_ALLOWED_CHUNKS = "FROM documents d JOIN chunks c ON c.document_id = d.id"


def _dense_sql(where: str, exact: bool, select: str = "c.id") -> str:
    """The top ``%(k)s`` chunks by cosine distance to ``%(q)s`` whose document satisfies ``where`` (a
    predicate on ``d``).

    exact: the allowed documents through their access index, their chunks by ``document_id``, every
    distance computed (``+ 0`` hides the operator from the planner, so no HNSW index is used): always the
    true top k. HNSW: the index's iterative scan over all chunks, each candidate's document probed by
    primary key (a scalar subquery: a per-row lookup the planner cannot turn into a join that would
    lose the index order), until k pass."""
    if exact:
        return f"SELECT {select} {_ALLOWED_CHUNKS} WHERE {where} ORDER BY (c.embedding <=> %(q)s) + 0 LIMIT %(k)s"
    return (f"SELECT {select} FROM chunks c WHERE (SELECT {where} FROM documents d WHERE d.id = c.document_id) "
            f"ORDER BY c.embedding <=> %(q)s LIMIT %(k)s")


def _where(user: Principal, filters: Mapping[str, Any], alias: str = "d") -> tuple[str, dict[str, Any]]:
    """The visibility rule AND the client's filters, over a ``documents`` row (alias ``d``)."""
    vis, vis_params = visible_sql(user, alias)
    flt, flt_params = filter_sql(filters, alias)
    return vis + (f" AND {flt}" if flt else ""), {**vis_params, **flt_params}


def _page_sql(candidates: str, fusion: str, business: str) -> str:
    """The page statement (:meth:`Searcher.ranked_page`) around a candidate statement whose rows are
    ``_RANK_COLUMNS``, ``similarity``, ``bm25``, ``in_dense`` and ``in_lex``. ``fusion`` and ``business`` are
    SQL expressions over alias ``x`` (fusion.py's ``fusion_sql``: window functions over every candidate;
    ranking.py's ``business_score_sql`` of ``x.relevance``). Rows: ``_COLUMNS`` (the text read for the page's
    rows only), ``similarity``, ``bm25``, ``in_dense``, ``in_lex``, ``relevance``, ``combined``, and last the
    number of candidates in the dense list; always at least one row (all NULL but that count when no
    candidate reaches the similarity threshold). The candidate statement is a materialised CTE, planned as
    it is alone."""
    return (f"WITH cands AS MATERIALIZED ({candidates}), "
            f"fused AS (SELECT x.*, {fusion} AS relevance FROM cands x), "
            f"page AS MATERIALIZED (SELECT x.*, {business} AS combined FROM fused x "
            f"WHERE x.similarity >= %(rank_min_similarity)s::float8 "
            f"ORDER BY combined DESC, x.similarity DESC, x.id LIMIT %(rank_page)s) "
            f"SELECT p.id, p.external_id, p.title, p.section_title, c.text, p.page_number, {columns('p')}, "
            f"p.similarity, p.bm25, p.in_dense, p.in_lex, p.relevance, p.combined, n.dense "
            f"FROM (SELECT count(*) FILTER (WHERE in_dense) AS dense FROM cands) n "
            f"LEFT JOIN (page p JOIN chunks c ON c.id = p.id) ON true "
            f"ORDER BY p.combined DESC, p.similarity DESC, p.id")


def _candidate_hit(row: tuple[Any, ...]) -> Hit:
    """A hit from a row of :meth:`Searcher._hybrid_statement`, ``_dense_statement`` or the page statement:
    ``_COLUMNS``, then ``similarity``, ``bm25`` (NULL for dense retrieval), ``in_dense`` and ``in_lex``."""
    hit = _hit(row, float(row[_N]))
    hit.bm25 = None if row[_N + 1] is None else float(row[_N + 1])
    hit.in_dense, hit.in_lexical = bool(row[_N + 2]), bool(row[_N + 3])
    return hit


def _hit(row: tuple[Any, ...], similarity: float) -> Hit:
    chunk_id, ext_id, title, section, text, page = row[:len(_HEAD)]
    return Hit(chunk_id=chunk_id, document_id=ext_id, document_title=title, section_title=section, text=text,
               page_number=page, similarity=similarity, relevance=similarity,
               raw_meta=dict(zip(METADATA_FIELDS, row[len(_HEAD):_N], strict=True)))
