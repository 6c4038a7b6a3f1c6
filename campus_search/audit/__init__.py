"""Audit: the append-only, hash-chained record of every search and admin action, and its verification.

May import: the base modules and ``storage``. Never ``flask``, ``api`` or ``app``.
"""
