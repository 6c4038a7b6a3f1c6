"""BM25 over the in-database inverted index (migrations 003, 013, 017, 018).

    bm25(q, c) = sum over terms t of q:  qtf(t) * idf(t) * tf(t,c) * (k1 + 1)
                                          / (tf(t,c) + k1 * (1 - b + b * len(c) / avglen))
    idf(t)     = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

Terms are PostgreSQL full-text lexemes (``english``: stemmed, stop words removed) of the chunk's
document title, section title and text. N, df and avglen are corpus-wide and exact: base tables plus the
delta rows writers insert (migration 013), folded by
:func:`campus_search.storage.index_state.compact_lexical` without changing any sum.

**Bounded reading (migration 018, issue 14).** Scoring every posting of every query term costs as much
as the terms' document frequencies, i.e. grows with the corpus. So a query term is read in one of two
ways (:meth:`BM25.bounded_cte`):

- a term with at most :attr:`BM25.cut_df` postings is read completely (exact, and cheap at that size);
- a *common* term (more postings) is read in *impact order* through ``lexical_postings_impact`` on
  ``(term, key DESC)``, ``key = tf / (tf + C1 + C2 * dl)`` (:data:`IMPACT_KEY`: BM25's tf saturation at
  k1 0.9, b 0.4 and a reference length of 100 terms), keeping only postings whose document the principal
  may see, and stops after ``max(depth, k)`` of them. A narrow rule's read (``docs`` below: the depth of
  :meth:`BM25.depth_for`) spends that depth by weight: the query's most weighted common term reads
  ``depth`` allowed postings, each other common term ``ceil(depth * w(t) / w_max)`` (never fewer than k).
  An unread posting of term t can add at most ``w(t)`` times a saturation to a score, so the depth goes
  where a missed posting would cost most; on the million chunks this halved a student's BM25 time with
  the same agreement with exhaustive BM25 (docs/performance.md, "A narrow read spent by weight").

The access test in the read is chosen per rule (``access``): ``all`` -- the rule and filters admit every
document, no test; ``docs`` -- a narrow principal: one bit per document id (:func:`document_mask`, a
``bytea`` parameter ``%(lex_docs)s``: bit ``id`` set when the document is allowed; fetched once per rule
and cached by the searcher), tested with ``get_bit``; ``probe`` -- each read posting's document probed by
primary key. (The mask replaced a constant ``document_id = ANY('{...}')``: hashed too, but the planner
estimates such an array's selectivity element by element, and for a staff member's ~10,000 allowed
documents at 1M chunks planning alone took ~10 ms a search.) None of these decides what is returned: the pool is walked
best first and each candidate not probed already is probed with the exact rule of this moment (and the
final cut, :func:`allowed_top_sql`, probes again), so a stale cached set can only leave a newly visible
document out, never let a hidden one in nor crowd allowed ones out of the pool.

Every read posting is scored exactly with the statistics of this moment. A candidate (a chunk in any
read list) has an exact partial score ``lb`` (the terms it was read for) and an upper bound ``ub = lb +
sum over the cut terms it was not read for of that term's bound``; the best ``pool`` allowed candidates by
``lb`` are rescored exactly (one primary-key probe per cut term they were not read for) and ranked.

Why a cut is safe, and how much it can miss: a cut term's list that ended before ``depth`` allowed
postings was read completely (its bound is 0). Otherwise, with ``G`` the smallest key read and ``r = G /
(1 - G)``, every unread allowed posting has ``key <= G``, so its exact contribution is at most::

    w(t) * (k1 + 1) * max(r C1 / (r C1 + k1 (1 - b)),  r C2 / (r C2 + k1 b / avgdl))

for *any* current k1, b and avgdl (tf <= r (C1 + C2 dl) on the unread side; the saturation is increasing
in tf and monotone in dl). An allowed chunk outside the pool scores at most ``lex_cut.bound``
(``lex_cut.cut``: some term's list was not read to its end); when the k-th exact score reaches it, the
top k is exactly exhaustive BM25's. When every query term has at most ``cut_df`` postings nothing is cut
and the top k *is* exhaustive BM25's top k over the allowed chunks; then (``lex_whole``) every read chunk's
partial score is its exact score, the pool is the page itself (k, nothing rescored) and the hybrid
statement takes a dense candidate's BM25 score from ``lex_ranked`` instead of probing its postings.

**Small indexes** (:meth:`BM25.whole_cte`). On an index of at most ``whole_chunks`` chunks
(``BM25_WHOLE_CHUNKS``) no posting list is long, and the bounded read's bookkeeping -- the common terms'
bounds, the bit set of the terms each chunk was read for, the pool and its rescoring -- costs more than the
postings it saves. PostgreSQL CPU a search, in-process, 200 SciFact questions (docs/performance.md): on 4,369
chunks 4.4 against 5.1 ms, on SciFact's 11,404 10.9 against 12.7 (admin; a student 9.5 against 12.0); on
100,000 synthetic chunks 51.9 against 13.1 -- so the default, 15,000 chunks, is about where the two cross.
Below it every posting of every query term is read and summed, which is exhaustive BM25 (never less exact
than the bounded read), and the page is walked best first under the exact rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_K1 = 0.9
DEFAULT_B = 0.4
DEFAULT_DEPTH = 500  # allowed postings read per common query term, in impact order
DEFAULT_POOL = 300  # allowed candidates rescored exactly (at least 2k), the best by their exact partial score
DEFAULT_CUT_DF = 1000  # a term with more postings than this is read in impact order and cut
DEFAULT_SCAN = 20_000  # postings a narrow rule's read of its most weighted common term scans, about (depth_for)
DEFAULT_WHOLE_CHUNKS = 15_000  # an index of at most this many chunks reads every posting whole (whole_cte)

# The impact order of migration 018's index. The expression must stay textually equivalent to the index's
# (PostgreSQL matches index expressions structurally): C1 = k1 (1 - b), C2 = k1 b / 100 at k1 0.9, b 0.4.
IMPACT_C1 = 0.54
IMPACT_C2 = 0.0036
IMPACT_KEY = "(p.tf::float8 / (p.tf + 0.54::float8 + 0.0036::float8 * p.dl))"

#: How the read tests access (see the module docstring).
ACCESS_MODES = ("all", "docs", "probe")


def document_mask(ids: Iterable[int]) -> bytes:
    """The allowed documents as a bitmap for ``get_bit``: bit ``id`` (byte ``id // 8``, bit ``id % 8``
    counted from the least significant) is set for each id; as long as the largest id needs."""
    ids = list(ids)
    mask = bytearray(max(ids) // 8 + 1 if ids else 1)
    for i in ids:
        if i < 0:
            raise ValueError(f"document ids are positive, not {i}")
        mask[i // 8] |= 1 << (i % 8)
    return bytes(mask)


def mask_ids(mask: bytes) -> list[int]:
    """The ids whose bit :func:`document_mask` set, ascending."""
    return [8 * n + b for n, byte in enumerate(mask) if byte for b in range(8) if byte >> b & 1]


#: Posting ``p``'s document is in the allowed set ``%(lex_docs)s`` (:func:`document_mask`). A document beyond
#: the mask's last byte is not in the set (the CASE: get_bit would raise on it).
_IN_DOCS = ("CASE WHEN p.document_id < 8 * octet_length(%(lex_docs)s::bytea) "
            "THEN get_bit(%(lex_docs)s::bytea, p.document_id) = 1 ELSE false END")


def _probe(where: str, document: str) -> str:
    """A scalar subquery: the predicate ``where`` (on alias ``d``) for the document ``document`` (by PK)."""
    return f"(SELECT {where} FROM documents d WHERE d.id = {document})"


@dataclass(frozen=True)
class BM25:
    k1: float = DEFAULT_K1
    b: float = DEFAULT_B
    depth: int = DEFAULT_DEPTH
    pool: int = DEFAULT_POOL
    cut_df: int = DEFAULT_CUT_DF
    scan: int = DEFAULT_SCAN
    whole_chunks: int = DEFAULT_WHOLE_CHUNKS

    def reads_whole(self, chunks: int) -> bool:
        """Whether an index of ``chunks`` chunks is read by :meth:`whole_cte` rather than :meth:`bounded_cte`:
        when it is known (> 0) and at most :attr:`whole_chunks`. No posting list is then longer than
        ``chunks``, and reading every one costs less than the bounded read's bookkeeping (module
        docstring, "Small indexes")."""
        return 0 < chunks <= self.whole_chunks

    def depth_for(self, share: float) -> int:
        """The read depth for a rule that admits ``share`` of the documents: :attr:`depth`, lowered so that
        reading it scans about :attr:`scan` postings of a common term (``scan * share`` allowed ones), for
        a narrow rule whose allowed postings are sparse in each list. That is the query's most weighted
        common term's depth; ``bounded_cte`` gives the others less, by weight. Never below 1; the read
        itself never goes below the page size k (``bounded_cte``), so a page is never short for it."""
        if share <= 0:
            return self.depth
        return max(1, min(self.depth, round(self.scan * share)))

    def _consts(self) -> tuple[str, str, str, str]:
        n = "(SELECT greatest(chunks, 1)::float8 FROM lexical_corpus)"
        avgdl = "(SELECT greatest(total_length, 1)::float8 / greatest(chunks, 1) FROM lexical_corpus)"
        # float8 literals: a bare 0.4 is numeric in PostgreSQL, and numeric arithmetic per posting is slow
        return n, avgdl, f"{self.k1:.6f}::float8", f"{self.b:.6f}::float8"

    def weights_cte(self) -> str:
        """CTEs ``lex_query``, ``lex_df``, ``lex_weights`` and ``lex_avgdl`` for ``%(qtext)s``: what
        :meth:`exact_score_sql` needs."""
        n, avgdl, _, _ = self._consts()
        return f"""
        lex_query AS (
            SELECT u.lexeme AS term, coalesce(array_length(u.positions, 1), 1) AS qtf
            FROM unnest(to_tsvector('english'::regconfig, %(qtext)s)) u),
        lex_df AS MATERIALIZED (
            SELECT q.term, q.qtf,
                   coalesce((SELECT t.df FROM lexical_terms t WHERE t.term = q.term), 0)
                   + coalesce((SELECT sum(d.delta) FROM lexical_term_deltas d WHERE d.term = q.term), 0) AS df
            FROM lex_query q),
        lex_weights AS MATERIALIZED (
            SELECT t.term, t.df, t.qtf * ln(1 + ({n} - t.df + 0.5::float8) / (t.df + 0.5::float8)) AS w,
                   (row_number() OVER (ORDER BY t.term) - 1)::int AS idx
            FROM lex_df t WHERE t.df > 0),
        lex_avgdl AS MATERIALIZED (SELECT {avgdl} AS avgdl)"""

    def _saturation(self, tf: str, dl: str) -> str:
        _, _, k1, b = self._consts()
        return f"({tf} * ({k1} + 1) / ({tf} + {k1} * (1 - {b} + {b} * {dl} / (SELECT avgdl FROM lex_avgdl))))"

    def exact_score_sql(self, chunk: str) -> str:
        """A scalar subquery: the exact BM25 score of chunk id ``chunk`` (0 when no query term occurs in it),
        by one primary-key probe per query term. Needs the CTEs of :meth:`scored_cte`, :meth:`bounded_cte` or
        :meth:`whole_cte`."""
        return (f"(SELECT coalesce(sum(lw.w * {self._saturation('lp.tf', 'lp.dl')}), 0) FROM lex_weights lw "
                f"CROSS JOIN LATERAL (SELECT p.tf, p.dl FROM lexical_postings p "
                f"WHERE p.term = lw.term AND p.chunk_id = {chunk}) lp)")

    def scored_cte(self) -> str:
        """CTEs ending in ``lex_scores`` (chunk_id, document_id, score): *every* chunk containing a query
        term of ``%(qtext)s``, scored, no rule applied. Exhaustive BM25: the reference the bounded read is
        checked against (tests, benchmarks); its cost grows with the terms' document frequencies."""
        return f"""{self.weights_cte()},
        lex_scores AS MATERIALIZED (
            SELECT p.chunk_id, min(p.document_id) AS document_id, sum(w.w * {self._saturation('p.tf', 'p.dl')}) AS score
            FROM lex_weights w
            CROSS JOIN LATERAL (SELECT p.chunk_id, p.document_id, p.tf, p.dl FROM lexical_postings p
                                WHERE p.term = w.term) p
            GROUP BY p.chunk_id)"""

    def whole_cte(self, access: str, where: str, k: str = "%(k)s") -> str:
        """:meth:`bounded_cte`'s CTEs for a small index: every posting of every query term read and summed,
        the allowed ones only when the rule's allowed documents are given (``access`` ``docs``, the
        ``lex_docs`` mask), and the page walked best first with the exact rule probed per candidate.
        ``lex_scores`` is then the best ``k`` allowed chunks with their exhaustive BM25 scores, ``lex_ranked``
        every read chunk's exact score (``lb``), ``lex_whole`` true and ``lex_cut`` the best score left off
        the page (nothing cut): what :meth:`bounded_cte` gives when it cuts nothing, without its bounds, bit
        sets and rescoring."""
        if access not in ACCESS_MODES:
            raise ValueError(f"access must be one of {ACCESS_MODES}, not {access!r}")
        in_docs = f" WHERE {_IN_DOCS}" if access == "docs" else ""
        return f"""{self.weights_cte()},
        lex_ranked AS MATERIALIZED (  -- every posting of every query term: each read chunk's exact score
            SELECT p.chunk_id, min(p.document_id) AS document_id, sum(w.w * {self._saturation('p.tf', 'p.dl')}) AS lb
            FROM lex_weights w JOIN lexical_postings p ON p.term = w.term{in_docs}
            GROUP BY p.chunk_id),
        lex_whole AS MATERIALIZED (SELECT true AS whole),
        lex_scores AS MATERIALIZED (  -- the page: best first, allowed by the exact rule now
            SELECT x.chunk_id, x.document_id, x.lb AS score
            FROM (SELECT * FROM lex_ranked ORDER BY lb DESC, chunk_id OFFSET 0) x
            WHERE {_probe(where, 'x.document_id')}
            LIMIT {k}),
        lex_cut AS (  -- tests and benchmarks: no allowed chunk outside the page scores above this
            SELECT (SELECT coalesce(max(x.lb), 0) FROM lex_ranked x
                    WHERE NOT EXISTS (SELECT 1 FROM lex_scores l WHERE l.chunk_id = x.chunk_id)
                      AND {_probe(where, 'x.document_id')}) AS bound, false AS cut)"""

    def bounded_cte(self, access: str, where: str, k: str = "%(k)s", depth: int | None = None) -> str:
        """CTEs ending in ``lex_scores`` (chunk_id, document_id, score): exact BM25 scores of a pool of
        candidates that holds the best ``k`` chunks whose document satisfies ``where`` (a predicate on
        alias ``d``) -- exactly when no query term has more than ``cut_df`` postings, else up to the bound
        ``lex_cut`` (bound) reports (module docstring). ``access`` is how the read tests access
        (:data:`ACCESS_MODES`); ``docs`` needs the parameter ``lex_docs``, the allowed documents'
        :func:`document_mask`. ``depth``: a narrow read's allowed postings for the query's most weighted
        common term, the others in proportion to their weight (module docstring; default: :attr:`depth`
        for every common term; see :meth:`depth_for`); the pool rescored exactly shrinks in proportion to
        ``depth`` (never below 2k). The pool only narrows the candidates: the caller cuts it with the exact
        rule (:func:`allowed_top_sql`)."""
        if access not in ACCESS_MODES:
            raise ValueError(f"access must be one of {ACCESS_MODES}, not {access!r}")
        _, _, k1, b = self._consts()
        # allowed postings read of common term w (lex_weights w), never fewer than one page
        if depth is None:
            reads = f"greatest({int(self.depth)}, {k})"
        else:  # a narrow read: the most weighted common term reads depth, the others in proportion to weight
            reads = (f"greatest(ceil({int(depth)} * w.w / (SELECT max(m.w) FROM lex_weights m "
                     f"WHERE m.df > {int(self.cut_df)}))::int, {k})")
        # a lowered depth (depth_for) reads fewer candidates: the pool rescored shrinks with it
        rescored = self.pool if depth is None else max(1, round(self.pool * min(depth, self.depth) / self.depth))
        # every list read to its end (no cut term left a bound): each read chunk's partial score is exact, so
        # the best k allowed are the whole answer and nothing needs rescoring; else the pool
        pool = f"CASE WHEN (SELECT whole FROM lex_whole) THEN {k} ELSE greatest(2 * ({k}), {int(rescored)}) END"
        cut = f"w.df > {int(self.cut_df)}"
        # rare terms: read whole; filtered by the allowed set when there is one (one bit a posting), else not
        rare_filter = f" AND {_IN_DOCS}" if access == "docs" else ""
        # common terms: read in impact order, allowed postings only, until depth of them
        cut_filter = {"all": "", "docs": f" AND {_IN_DOCS}",
                      "probe": f" AND {_probe(where, 'p.document_id')}"}[access]
        # known: the row's document was probed with the exact rule in this statement (common terms' rows in
        # probe mode); every other row is probed as the pool is walked, so a stale cached answer (all, or
        # the allowed set) only ever narrows what is read, never admits a document hidden since
        cut_known = "true" if access == "probe" else "false"
        r = "(r.g / (1 - r.g))"
        # the bound on one unread allowed posting's saturation, for the current k1, b and avgdl
        bound = (f"greatest({r} * {IMPACT_C1}::float8 / ({r} * {IMPACT_C1}::float8 + {k1} * (1 - {b})), "
                 f"{r} * {IMPACT_C2}::float8 / ({r} * {IMPACT_C2}::float8 "
                 f"+ {k1} * {b} / (SELECT avgdl FROM lex_avgdl)))")
        allowed = f"(x.known OR {_probe(where, 'x.document_id')})"
        # candidate x was not read for cut term ct: its bit, for the first 63 terms; beyond, looked up
        unread = ("CASE WHEN ct.idx < 63 THEN x.seen & (1::int8 << ct.idx) = 0 ELSE NOT EXISTS "
                  "(SELECT 1 FROM lex_read r WHERE r.term = ct.term AND r.chunk_id = x.chunk_id) END")
        # Only the common terms' rows are kept (lex_read: their bounds, the bits of the terms each chunk was
        # read for, and the lookup beyond the 63rd term all concern cut terms only); the rare terms'
        # postings go straight into lex_ranked's sums: materialising ~2,000 rows a query cost more than
        # reading them (docs/performance.md, "A fused attention, rare postings summed as read").
        return f"""{self.weights_cte()},
        lex_read AS MATERIALIZED (  -- the common terms' rows, each term's best allowed ones by impact
            SELECT w.term, w.idx, r.chunk_id, r.document_id, r.key, r.known,
                   w.w * {self._saturation('r.tf', 'r.dl')} AS part
            FROM lex_weights w
            CROSS JOIN LATERAL (
                SELECT p.chunk_id, p.document_id, p.tf, p.dl, {IMPACT_KEY} AS key, {cut_known} AS known
                FROM lexical_postings p WHERE p.term = w.term AND {cut}{cut_filter}
                ORDER BY {IMPACT_KEY} DESC LIMIT {reads}) r),
        lex_bound AS MATERIALIZED (
            SELECT w.term, CASE WHEN NOT ({cut}) OR coalesce(r.n, 0) < {reads} THEN 0::float8
                                ELSE w.w * ({k1} + 1) * {bound} END AS ub
            FROM lex_weights w
            LEFT JOIN (SELECT r.term, count(*) AS n, min(r.key) AS g FROM lex_read r GROUP BY r.term) r
                   ON r.term = w.term),
        lex_ranked AS MATERIALIZED (  -- seen: a bit per cut query term (the first 63) the chunk was read for
            SELECT r.chunk_id, min(r.document_id) AS document_id, bool_or(r.known) AS known, sum(r.part) AS lb,
                   bit_or(r.bit) AS seen
            FROM (SELECT p.chunk_id, p.document_id, false AS known, w.w * {self._saturation('p.tf', 'p.dl')} AS part,
                         0::int8 AS bit
                  FROM lex_weights w JOIN lexical_postings p ON p.term = w.term
                  WHERE NOT ({cut}){rare_filter}
                  UNION ALL
                  SELECT chunk_id, document_id, known, part,
                         CASE WHEN idx < 63 THEN 1::int8 << idx ELSE 0::int8 END
                  FROM lex_read) r
            GROUP BY r.chunk_id),
        lex_cut_terms AS MATERIALIZED (  -- the terms some allowed chunk may score in without being read for
            SELECT lw.term, lw.idx, lw.w, cb.ub FROM lex_bound cb JOIN lex_weights lw ON lw.term = cb.term
            WHERE cb.ub > 0),
        lex_whole AS MATERIALIZED (  -- no cut term left a bound: lex_ranked's partial scores are exact
            SELECT NOT EXISTS (SELECT 1 FROM lex_cut_terms) AS whole),
        lex_pool AS MATERIALIZED (  -- best first by the exact partial score, allowed by the exact rule now
            SELECT x.chunk_id, x.document_id, x.lb, x.seen
            FROM (SELECT * FROM lex_ranked ORDER BY lb DESC, chunk_id OFFSET 0) x WHERE {allowed}
            LIMIT {pool}),
        lex_scores AS MATERIALIZED (  -- read parts are exact; probe only the cut terms a chunk was not read for
            SELECT x.chunk_id, x.document_id, x.lb + CASE WHEN (SELECT whole FROM lex_whole) THEN 0::float8 ELSE (
                       SELECT coalesce(sum(ct.w * {self._saturation('lp.tf', 'lp.dl')}), 0)
                       FROM lex_cut_terms ct
                       CROSS JOIN LATERAL (SELECT p.tf, p.dl FROM lexical_postings p
                                           WHERE p.term = ct.term AND p.chunk_id = x.chunk_id) lp
                       WHERE {unread}) END AS score
            FROM lex_pool x),
        lex_cut AS (  -- tests and benchmarks: no allowed chunk outside the pool scores above this
            SELECT greatest(
                (SELECT coalesce(max(x.lb + (SELECT coalesce(sum(ct.ub), 0) FROM lex_cut_terms ct WHERE {unread})), 0)
                 FROM lex_ranked x
                 WHERE NOT EXISTS (SELECT 1 FROM lex_pool l WHERE l.chunk_id = x.chunk_id) AND {allowed}),
                (SELECT coalesce(sum(ub), 0) FROM lex_bound)) AS bound,
                (SELECT coalesce(sum(ub), 0) > 0 FROM lex_bound) AS cut)"""


def allowed_top_sql(scores: str, where: str, limit: str = "%(k)s") -> str:
    """The best ``limit`` rows of CTE ``scores`` (chunk_id, document_id, score) whose document satisfies
    ``where`` (a predicate on alias ``d``: the visibility rule and the client's filters).

    The list is walked best first and each candidate's document is probed by primary key until the page
    is full: a broad principal probes about ``limit`` documents, a restricted one about ``limit / share``.
    ``OFFSET 0`` keeps PostgreSQL from pushing the test below the sort (which would probe every scored
    chunk), and the scalar subquery keeps the probe a per-row index lookup whatever the statistics say."""
    return (f"SELECT s.chunk_id AS id FROM (SELECT chunk_id, document_id, score FROM {scores} "
            f"ORDER BY score DESC, chunk_id OFFSET 0) s "
            f"WHERE {_probe(where, 's.document_id')} "
            f"LIMIT {limit}")
