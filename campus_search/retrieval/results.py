"""What a search answers: the ranked passages (:class:`Hit`), their JSON as the response carries it and
the result cache stores it (:func:`render_results`), and :class:`SearchOutcome` (fresh or from the cache)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def shown_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A result's metadata as the response shows it: ``last_reviewed`` as ISO text, ``groups`` a list."""
    reviewed = meta.get("last_reviewed")
    return {**meta, "last_reviewed": reviewed.isoformat() if reviewed else None,
            "groups": list(meta.get("groups") or ())}


@dataclass
class Hit:
    chunk_id: int
    document_id: str
    document_title: str
    section_title: str | None
    text: str
    page_number: int | None
    similarity: float
    relevance: float
    combined_score: float = 0.0
    bm25: float | None = None
    in_dense: bool = True  # among the dense top-k
    in_lexical: bool = False  # among the BM25 top-k
    #: metadata with native types (last_reviewed as datetime) for ranking
    raw_meta: dict[str, Any] = field(default_factory=dict, repr=False)
    _shown: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def metadata(self) -> dict[str, Any]:
        """The metadata as shown (:func:`shown_metadata`), made when first asked for: a search ranks ~80
        candidates and shows ten."""
        if self._shown is None:
            self._shown = shown_metadata(self.raw_meta)
        return self._shown

    def as_json(self) -> dict[str, Any]:
        return {
            "document_id": self.document_id,
            "document_title": self.document_title,
            "section_title": self.section_title,
            "text": self.text,
            "page_number": self.page_number,
            "metadata": self.metadata,
            "similarity": round(self.similarity, 4),
            "combined_score": round(self.combined_score, 4),
            "scores": {"relevance": round(self.relevance, 4),
                       **({"bm25": round(self.bm25, 4)} if self.bm25 is not None else {})},
        }


def render_results(hits: list[Hit]) -> str:
    """The response's ``results`` array as JSON text (also what the result cache stores)."""
    return json.dumps([h.as_json() for h in hits], ensure_ascii=False, separators=(",", ":"))


@dataclass
class SearchOutcome:
    """One answered search. From the cache it carries the already-rendered ``results`` JSON and their count
    instead of Hit objects (re-building and re-serialising them was most of a cache hit's cost)."""

    hits: list[Hit]
    from_cache: bool = False
    rendered: str | None = None
    count: int = -1
    #: a cache hit on an entry this same caller's earlier search stored (what non-admins may be told)
    stored_by_caller: bool = False

    def __post_init__(self) -> None:
        if self.count < 0:
            self.count = len(self.hits)

    def results_json(self) -> str:
        return self.rendered if self.rendered is not None else render_results(self.hits)
