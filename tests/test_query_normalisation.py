"""One normalisation of query text (querytext.py), applied once before the cache key and the search
(issue 11): a query typed with combining accents (NFD) is searched as the precomposed text (NFC) the
index holds, and shares its cache entry only because the search treats the two alike."""

from __future__ import annotations

import unicodedata
from typing import Any

from campus_search.app import create_app
from campus_search.ingest.chunking import Block
from campus_search.ingest.metadata import AccessMetadata
from campus_search.ingest.sources import ParsedDocument
from campus_search.retrieval.params import SearchParams
from campus_search.security.roles import DEFAULT_ROLES, Principal

DOCS = {
    "careers": ("Careers service", "The careers service reviews your résumé and cover letter in a café "
                "session every Tuesday."),
    "library": ("Library loans", "Borrow up to forty books and renew them online before the due date."),
    "parking": ("Parking permits", "Staff parking permits are renewed every August at the estates office."),
}
NFC = "résumé café"
NFD = unicodedata.normalize("NFD", NFC)


def test_nfd_and_nfc_queries_are_one_query(settings_factory: Any, services_factory: Any, token: Any) -> None:
    assert NFC != NFD
    services = services_factory(settings_factory())
    services.ingester.ingest([ParsedDocument(external_id=k, title=t, blocks=[Block(x)], source=k)
                              for k, (t, x) in DOCS.items()], AccessMetadata())
    client = create_app(services).test_client()
    auth = {"Authorization": token("admin")}  # admins see the BM25 score and the cache flag
    body = {"config": {"similarity_threshold": -1, "max_results": 3}}

    first = client.post("/api/search", json={"query": "  " + NFD + " ", **body}, headers=auth).get_json()
    assert first["from_cache"] is False and first["query"] == NFC
    top = first["results"][0]
    assert top["document_id"] == "careers" and top["scores"]["bm25"] > 0  # the accented terms matched

    second = client.post("/api/search", json={"query": NFC, **body}, headers=auth).get_json()
    assert second["from_cache"] is True and second["results"] == first["results"]

    # the same for every caller of the searcher, not only the API
    student = Principal("s", DEFAULT_ROLES["student"])
    nfd_hits = services.searcher.search(student, SearchParams(NFD, similarity_threshold=-1))
    nfc_hits = services.searcher.search(student, SearchParams(NFC, similarity_threshold=-1))
    assert [(h.chunk_id, h.bm25) for h in nfd_hits] == [(h.chunk_id, h.bm25) for h in nfc_hits]


def test_the_cache_key_the_audit_hash_and_the_query_vector_see_one_form(settings_factory: Any,
                                                                          embedder: Any) -> None:
    """querytext.normalise_query is the one normalisation: the audit log's query hash, the result
    cache's key (through SearchParams) and the searcher's query-vector key agree for two spellings of
    one query, and no other module defines a normalisation of query text (issue 15)."""
    import ast
    from pathlib import Path

    from campus_search.audit.records import Auditor
    from campus_search.retrieval.cache import ResultCache
    from campus_search.retrieval.cache_backends import LocalBackend
    from campus_search.retrieval.generation import GenerationTracker
    from campus_search.retrieval.search import Searcher

    typed, stored = "  " + NFD + "\t cv ", NFC + " cv"
    settings = settings_factory()
    auditor = Auditor(None, settings)  # a key-only auditor: hashes, never writes
    assert auditor.query_hash(typed) == auditor.query_hash(stored)

    cache = ResultCache(settings, LocalBackend(1 << 20), GenerationTracker(lambda: "g", 60.0))
    student = Principal("s", DEFAULT_ROLES["student"])
    assert cache.key(student, SearchParams(typed), "g") == cache.key(student, SearchParams(stored), "g")

    searcher = Searcher(None, embedder)  # type: ignore[arg-type]  (embedding only: no database needed)
    vector = searcher.embed_query(typed)
    assert searcher.query_vectors.get(stored) is vector  # kept under the normalised text, embedded once

    package = Path(__file__).resolve().parent.parent / "campus_search"
    definers = sorted(str(path.relative_to(package)) for path in package.rglob("*.py")
                      for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                      if isinstance(node, ast.FunctionDef) and "normali" in node.name and "query" in node.name)
    assert definers == ["retrieval/querytext.py"]
