"""Ingestion: files and corpora in, chunks with their access metadata and vectors out.

Owns reading files safely (``fileguard``), formats and parsers, metadata files and the access-metadata
write rule (``metadata``), chunking, the text rules every writer shares, precomputed vectors, the
ingestion pipeline and folder sync, and the stored documents read back (``catalog``).

May import: the base modules, ``security.roles``, ``storage``, ``embedding``. Never ``flask``, ``api``,
``app`` or ``retrieval``.
"""
