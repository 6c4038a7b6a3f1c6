"""BM25 over the in-database inverted index (migration 003_lexical_bm25.sql).

    bm25(q, c) = sum over terms t of q:  qtf(t) * idf(t) * tf(t,c) * (k1 + 1)
                                          / (tf(t,c) + k1 * (1 - b + b * len(c) / avglen))
    idf(t)     = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

Terms are PostgreSQL full-text lexemes (``english``: stemmed, stop words removed) of the chunk's
document title, section title and text. N, df and avglen are corpus-wide and exact (kept by triggers).
Candidates are restricted by the same visibility predicate and filters as dense retrieval before the
top-k cut, so a restricted user still gets a full page.
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
        """CTEs ``lex_query``, ``lex_stats``, ``lex_weights``, ``lex_scores`` (chunk_id, score) for
        the query text in ``%(qtext)s``; unfiltered (callers join chunks and apply the rule)."""
        return f"""
        lex_query AS (
            SELECT u.lexeme AS term, coalesce(array_length(u.positions, 1), 1) AS qtf
            FROM unnest(to_tsvector('english'::regconfig, %(qtext)s)) u),
        lex_stats AS (
            SELECT greatest(chunks, 1)::float8 AS n,
                   greatest(total_length, 1)::float8 / greatest(chunks, 1) AS avgdl FROM lexical_stats),
        lex_weights AS (
            SELECT q.term, q.qtf * ln(1 + (s.n - t.df + 0.5) / (t.df + 0.5)) AS w
            FROM lex_query q JOIN lexical_terms t ON t.term = q.term CROSS JOIN lex_stats s),
        lex_scores AS (
            SELECT p.chunk_id,
                   sum(w.w * p.tf * {self.k1 + 1:.6f}
                       / (p.tf + {self.k1:.6f} * (1 - {self.b:.6f} + {self.b:.6f} * p.dl / s.avgdl))) AS score
            FROM lexical_postings p JOIN lex_weights w ON w.term = p.term CROSS JOIN lex_stats s
            GROUP BY p.chunk_id)"""
