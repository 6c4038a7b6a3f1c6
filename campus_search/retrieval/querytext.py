"""The one normalisation of query text, applied once when a search's parameters are made
(:class:`~campus_search.retrieval.search.SearchParams`): Unicode NFC (an accented letter typed precomposed or as
letter + combining mark is the same text, and PostgreSQL's full-text parser, which BM25 uses, only
matches the stored NFC form) and runs of whitespace collapsed to one space. The result cache's key,
retrieval (dense and BM25) and the audit log's query hash all see this form, so two queries share a
cached answer exactly when the search would treat them alike."""

from __future__ import annotations

import unicodedata


def normalise_query(query: str) -> str:
    return " ".join(unicodedata.normalize("NFC", query).split())
