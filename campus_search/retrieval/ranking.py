"""The final score (docs/ranking.md)::

    combined_score = relevance
                     + 0.03 * (priority - 3)                         # priority 1..5 -> -0.06..+0.06
                     + campus_bonus  (user campus == document campus: Central Campus / King's
                                      Buildings +0.10, Easter Bush / Western General +0.05)
                     + 0.02 * max(0, 1 - age_days / 730)              # reviewed recently -> up to +0.02

``relevance`` is the cosine similarity for dense retrieval, the fused score (fusion.py) for hybrid.
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
