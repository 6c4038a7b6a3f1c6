"""Audit: the append-only, hash-chained record of every search and admin action (``records``: the
record, its chain and the writer; ``actions``: what a record says about a search or an admin action),
its verification (``verify``) and reading it back (``reports``). The web layer fills in the request
(``api.auditing``).

May import: the base modules, ``storage`` and ``retrieval.querytext`` (a query is hashed in the form the
search runs it). Never ``flask``, ``api`` or ``app``.
"""
