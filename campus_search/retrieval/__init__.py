"""Retrieval: from a principal's query to ranked, permitted passages.

Owns the searcher (dense pgvector search and BM25 over the in-database inverted index, both under the
visibility predicate), rank fusion and the final score, query-text normalisation, the permission-scoped
result cache and the BEIR evaluation that runs through the same code.

May import: the base modules (``config``, ``errors``, ``metrics``, ``breaker``), ``security.roles``,
``storage``, ``embedding``, ``ingest.metadata``. Never ``flask``, ``api`` or ``app``.
"""
