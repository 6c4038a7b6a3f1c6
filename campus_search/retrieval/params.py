"""The parameters of one search, checked: :class:`SearchParams` (the query normalised once, here, by
:mod:`~campus_search.retrieval.querytext`) and :func:`validate_filters`, which refuses a malformed filter
(BadRequest, 400) and a clearance filter above the caller's (Forbidden, 403). The API turns a request
body into these; the cache keys on them and the searcher runs them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from campus_search.errors import BadRequest, Forbidden
from campus_search.ingest.metadata import parse_datetime
from campus_search.retrieval.querytext import normalise_query
from campus_search.security.access import VISIBILITIES
from campus_search.security.roles import Principal

FILTERS = ("department", "campus", "min_priority", "clearance_level", "visibility", "last_reviewed_after")


@dataclass(frozen=True)
class SearchParams:
    """One search. ``query`` is normalised here, once (querytext.py), for every caller: the cache key
    and retrieval both use this form."""

    query: str
    filters: Mapping[str, Any] = field(default_factory=dict)
    max_results: int = 10
    similarity_threshold: float = 0.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "query", normalise_query(self.query))


def validate_filters(raw: Any, user: Principal) -> dict[str, Any]:
    """Check types and names of client filters; they only ever narrow what the user may see."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise BadRequest("filters must be an object")
    unknown = sorted(set(raw) - set(FILTERS))
    if unknown:
        raise BadRequest(f"unknown filters: {', '.join(unknown)}", details={"allowed": list(FILTERS)})
    out: dict[str, Any] = {}
    for name in ("department", "campus"):
        value = raw.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip() or len(value) > 200:
            raise BadRequest(f"filters.{name} must be a non-empty string")
        if any(ord(ch) < 32 for ch in value):
            raise BadRequest(f"filters.{name} must not contain control characters")
        out[name] = value.strip()
    if raw.get("visibility") is not None:
        if raw["visibility"] not in VISIBILITIES:
            raise BadRequest(f"filters.visibility must be one of {', '.join(map(repr, VISIBILITIES))}")
        out["visibility"] = raw["visibility"]
    for name in ("min_priority", "clearance_level"):
        value = raw.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
            raise BadRequest(f"filters.{name} must be an integer from 1 to 5")
        out[name] = value
    if out.get("clearance_level", 0) > user.clearance:
        raise Forbidden(f"clearance level {out['clearance_level']} is above your clearance ({user.clearance})")
    if raw.get("last_reviewed_after") is not None:
        out["last_reviewed_after"] = parse_datetime(raw["last_reviewed_after"], "filters.last_reviewed_after",
                                                    "request")
    return out
