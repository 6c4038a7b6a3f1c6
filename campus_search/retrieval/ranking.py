"""The final score (docs/ranking.md)::

    combined_score = relevance
                     + 0.03 * (priority - 3)                         # priority 1..5 -> -0.06..+0.06
                     + campus_bonus  (user campus == document campus: Central Campus / King's
                                      Buildings +0.10, Easter Bush / Western General +0.05)
                     + 0.02 * max(0, 1 - age_days / 730)              # reviewed recently -> up to +0.02

``relevance`` is the cosine similarity for dense retrieval, the fused score (fusion.py) for hybrid.

A search computes it inside its statement (:func:`business_score_sql`), so that only the page leaves
PostgreSQL (search.py); :func:`business_score` is the same rule in Python, the reference the SQL form is
tested against (tests/test_ranking_sql.py). Both do the same float8 arithmetic in the same order, so they give
the same bits: the age is the exact interval in seconds (``extract(epoch ...)`` is exact, then rounded
once to float8, as Python's ``total_seconds()``), and a term that does not apply is not added at all.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from campus_search.security.roles import CAMPUS_BONUS, Principal

PRIORITY_WEIGHT = 0.03
FRESHNESS_WEIGHT = 0.02
FRESHNESS_DAYS = 730


def business_score(relevance: float, meta: Mapping[str, Any], user: Principal,
                   now: dt.datetime | None = None) -> float:
    score = relevance + PRIORITY_WEIGHT * (int(meta.get("priority") or 3) - 3)
    campus = meta.get("campus")
    if campus and user.campus and campus == user.campus:
        score += CAMPUS_BONUS.get(campus, 0.0)
    reviewed = meta.get("last_reviewed")
    if isinstance(reviewed, dt.datetime):
        now = now or dt.datetime.now(dt.UTC).replace(tzinfo=None)
        age = max(0.0, (now - reviewed).total_seconds() / 86400)
        score += FRESHNESS_WEIGHT * max(0.0, 1.0 - age / FRESHNESS_DAYS)
    return score


def business_score_sql(relevance: str, alias: str, user: Principal, now: dt.datetime) -> tuple[str, dict[str, Any]]:
    """:func:`business_score` as an SQL expression: ``relevance`` (an SQL expression) and the document
    columns ``priority`` (never NULL: 1..5, migration 001), ``campus`` and ``last_reviewed`` of ``alias``;
    ``now`` a naive UTC timestamp. The expression and its parameters (named ``rank_*``)."""
    score = f"({relevance}) + %(rank_priority_weight)s::float8 * ({alias}.priority - 3)::float8"
    params: dict[str, Any] = {"rank_priority_weight": PRIORITY_WEIGHT, "rank_now": now,
                              "rank_freshness_weight": FRESHNESS_WEIGHT, "rank_freshness_days": float(FRESHNESS_DAYS)}
    if user.campus:  # the only campus that can match (a row that does not adds 0, which changes no float8)
        score = (f"({score}) + CASE WHEN {alias}.campus = %(rank_campus)s THEN %(rank_campus_bonus)s::float8 "
                 f"ELSE 0::float8 END")
        params.update(rank_campus=user.campus, rank_campus_bonus=CAMPUS_BONUS.get(user.campus, 0.0))
    age = (f"greatest(0::float8, extract(epoch FROM (%(rank_now)s::timestamp - {alias}.last_reviewed))::float8 "
           f"/ 86400::float8)")
    score = (f"CASE WHEN {alias}.last_reviewed IS NULL THEN {score} ELSE ({score}) + %(rank_freshness_weight)s::float8 "
             f"* greatest(0::float8, 1::float8 - {age} / %(rank_freshness_days)s::float8) END")
    return score, params
