"""Fusion of the dense and lexical candidate lists into one relevance score in [0, 1].

``convex`` (default; tuned on SciFact train, see bench/README.md)::

    relevance = alpha * norm(cosine) + (1 - alpha) * norm(bm25)

where ``norm`` is min-max normalisation over the union of both candidate lists of this query (a
candidate missing from a list still has an exact score: cosine and BM25 are computed for every
candidate). ``rrf`` (reciprocal rank fusion) is also available::

    relevance = (1/(k + rank_dense) + 1/(k + rank_lexical)) * (k + 1) / 2

scaled so a candidate ranked first in both lists scores 1.

A search computes this inside its statement (:func:`fusion_sql`, over every candidate row, so only the
page leaves PostgreSQL: search.py); :func:`fuse` is the same rule in Python, the reference the SQL form is
tested against (tests/test_ranking_sql.py). Both do the same float8 arithmetic in the same order, so they give
the same bits. A tie in rank (``rrf``) goes to the lower chunk id in SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

METHODS = ("convex", "rrf", "dense", "lexical")


@dataclass(frozen=True)
class FusionConfig:
    method: str = "convex"
    alpha: float = 0.6  # weight of the dense score (convex)
    rrf_k: int = 60

    def describe(self) -> dict[str, object]:
        if self.method == "convex":
            return {"fusion": "convex", "alpha": self.alpha}
        if self.method == "rrf":
            return {"fusion": "rrf", "rrf_k": self.rrf_k}
        return {"fusion": self.method}


def _minmax_sql(column: str) -> str:
    """:func:`_minmax` of ``column`` over every row of the query (window functions over ``()``)."""
    lo, hi = f"min({column}) OVER ()", f"max({column}) OVER ()"
    return (f"CASE WHEN {hi} - {lo} < 1e-12::float8 THEN CASE WHEN {hi} > 0 THEN 1::float8 ELSE 0::float8 END "
            f"ELSE ({column} - {lo}) / ({hi} - {lo}) END")


def _rank_sql(alias: str, column: str, member: str) -> str:
    """A member row's rank by ``column`` (best first, ties to the lower id) among the rows where ``member``."""
    return f"row_number() OVER (PARTITION BY {alias}.{member} ORDER BY {alias}.{column} DESC, {alias}.id)"


def fusion_sql(config: FusionConfig, alias: str = "x") -> tuple[str, dict[str, float]]:
    """:func:`fuse` as an SQL expression over the candidate rows ``alias`` (columns ``id``, ``similarity``,
    ``bm25``, ``in_dense``, ``in_lex``; every candidate of the query in one row set), and its parameters."""
    cos, bm25 = f"{alias}.similarity", f"{alias}.bm25"
    if config.method == "dense":
        return cos, {}
    if config.method == "lexical":
        return _minmax_sql(bm25), {}
    if config.method == "rrf":
        k = int(config.rrf_k)
        def share(column: str, member: str) -> str:
            return (f"CASE WHEN {alias}.{member} THEN 1::float8 / ({k} + {_rank_sql(alias, column, member)})::float8 "
                    f"ELSE 0::float8 END")
        return (f"(({share('similarity', 'in_dense')}) + ({share('bm25', 'in_lex')})) * {k + 1}::float8 / 2::float8",
                {})
    if config.method != "convex":
        raise ValueError(f"unknown fusion method {config.method!r}")
    return (f"%(fusion_a)s::float8 * ({_minmax_sql(cos)}) + %(fusion_b)s::float8 * ({_minmax_sql(bm25)})",
            {"fusion_a": float(config.alpha), "fusion_b": 1 - float(config.alpha)})


def _minmax(values: Sequence[float]) -> list[float]:
    if not values:
        return []
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        return [1.0 if hi > 0 else 0.0 for _ in values]
    return [(v - lo) / (hi - lo) for v in values]


def _ranks(values: Sequence[float], members: Sequence[bool]) -> list[float | None]:
    order = sorted((i for i, m in enumerate(members) if m), key=lambda i: -values[i])
    ranks: list[float | None] = [None] * len(values)
    for r, i in enumerate(order, 1):
        ranks[i] = r
    return ranks


def fuse(cosines: Sequence[float], bm25: Sequence[float], in_dense: Sequence[bool], in_lexical: Sequence[bool],
         config: FusionConfig) -> list[float]:
    """Relevance per candidate (same order as the inputs)."""
    n = len(cosines)
    if n == 0:
        return []
    if config.method == "dense":
        return list(cosines)
    if config.method == "lexical":
        return _minmax(bm25)
    if config.method == "rrf":
        k = config.rrf_k
        def share(rank: float | None) -> float:
            return 1 / (k + rank) if rank is not None else 0.0

        rd, rl = _ranks(cosines, in_dense), _ranks(bm25, in_lexical)
        return [(share(rd[i]) + share(rl[i])) * (k + 1) / 2 for i in range(n)]
    nd, nl = _minmax(cosines), _minmax(bm25)
    a = config.alpha
    return [a * nd[i] + (1 - a) * nl[i] for i in range(n)]
