"""Retrieval: from a principal's query to ranked, permitted passages.

Owns a search's parameters (``params``) and answers (``results``), the searcher (``search``: dense
pgvector search and BM25 over the in-database inverted index, both under the visibility predicate),
rank fusion (``fusion``) and the final score (``ranking``), query-text normalisation (``querytext``),
query vectors (``query_vectors``), the permission-scoped result cache (``cache``, with
``cache_backends`` and ``generation``) and the BEIR evaluation that runs through the same code.

May import: the base modules (``config``, ``errors``, ``metrics``, ``breaker``), ``security.roles``,
``storage``, ``embedding``, ``ingest.metadata``. Never ``flask``, ``api`` or ``app``.
"""
