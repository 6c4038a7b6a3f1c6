"""BM25 over the in-database inverted index (migration 003_lexical_bm25.sql).

    bm25(q, c) = sum over terms t of q:  qtf(t) * idf(t) * tf(t,c) * (k1 + 1)
                                          / (tf(t,c) + k1 * (1 - b + b * len(c) / avglen))
    idf(t)     = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

Terms are PostgreSQL full-text lexemes (``english``: stemmed, stop words removed) of the chunk's
document title, section title and text. N, df and avglen are corpus-wide and exact: base tables plus the
delta rows writers insert (migration 013), folded by
:func:`campus_search.storage.index_state.compact_lexical` without changing any sum.
Candidates are restricted by the same visibility predicate and filters as dense retrieval, applied to
their documents before the top-k cut (:func:`allowed_top_sql`), so a restricted user still gets a full
page.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_K1 = 0.9
DEFAULT_B = 0.4


@dataclass(frozen=True)
class BM25:
    k1: float = DEFAULT_K1
    b: float = DEFAULT_B

    def scored_cte(self) -> str:
        """CTEs ``lex_query``, ``lex_df``, ``lex_weights``, ``lex_scores`` (chunk_id, document_id, score)
        for the query text in ``%(qtext)s``: every chunk containing a query term, scored. The visibility
        rule is not applied here: access lives on the chunk's document (migration 017), and the caller
        cuts the list by walking it best first and probing each candidate's document
        (:func:`allowed_top_sql`), so a restricted user still gets a full page.

        Postings are fetched per query term through the (term, chunk_id) primary key, index-only (tf, dl
        and document_id are carried in it; the LATERAL join makes that the only plan), so the cost grows
        with the postings of the query's terms, not with the corpus. Corpus statistics are single-row
        scalar subqueries, evaluated once."""
        n = "(SELECT greatest(chunks, 1)::float8 FROM lexical_corpus)"
        avgdl = "(SELECT greatest(total_length, 1)::float8 / greatest(chunks, 1) FROM lexical_corpus)"
        # float8 literals: a bare 0.4 is numeric in PostgreSQL, and numeric arithmetic per posting is slow
        k1, b = f"{self.k1:.6f}::float8", f"{self.b:.6f}::float8"
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
            SELECT t.term, t.qtf * ln(1 + ({n} - t.df + 0.5::float8) / (t.df + 0.5::float8)) AS w
            FROM lex_df t WHERE t.df > 0),
        lex_scores AS MATERIALIZED (
            SELECT p.chunk_id, min(p.document_id) AS document_id,
                   sum(w.w * p.tf * ({k1} + 1) / (p.tf + {k1} * (1 - {b} + {b} * p.dl / {avgdl}))) AS score
            FROM lex_weights w
            CROSS JOIN LATERAL (SELECT p.chunk_id, p.document_id, p.tf, p.dl FROM lexical_postings p
                                WHERE p.term = w.term) p
            GROUP BY p.chunk_id)"""


def allowed_top_sql(scores: str, where: str, limit: str = "%(k)s") -> str:
    """The best ``limit`` rows of CTE ``scores`` (chunk_id, document_id, score) whose document satisfies
    ``where`` (a predicate on alias ``d``: the visibility rule and the client's filters).

    The list is walked best first and each candidate's document is probed by primary key until the page
    is full: a broad principal probes about ``limit`` documents, a restricted one about ``limit / share``.
    ``OFFSET 0`` keeps PostgreSQL from pushing the test below the sort (which would probe every scored
    chunk), and the scalar subquery keeps the probe a per-row index lookup whatever the statistics say."""
    return (f"SELECT s.chunk_id AS id FROM (SELECT chunk_id, document_id, score FROM {scores} "
            f"ORDER BY score DESC, chunk_id OFFSET 0) s "
            f"WHERE (SELECT {where} FROM documents d WHERE d.id = s.document_id) "
            f"LIMIT {limit}")
