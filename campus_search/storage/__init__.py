"""Storage: PostgreSQL + pgvector and what keeps it.

Owns the pooled database manager and its SQL migrations, read replicas and the read-your-writes
fence, the index's state and size (``index_state``), the embedded PostgreSQL and Redis used when none
is configured, and backup/restore.

May import: the base modules (``config``, ``errors``, ``metrics``, ``breaker``). Never ``flask``,
``api``, ``app`` or the components above it.
"""
