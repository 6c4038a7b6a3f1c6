"""Audit: the append-only, hash-chained record of every search and admin action. ``chain``: the record,
its payload and its keyed hashes; ``records``: the writer that appends them (group commit); ``actions``:
what a record says about a search or an admin action; ``verify``: the chain recomputed; ``reports``: the
log read back. The web layer fills in the request (``api.auditing``).

May import: the base modules, ``storage`` and ``retrieval.querytext`` (a query is hashed in the form the
search runs it). Never ``flask``, ``api`` or ``app``.
"""
