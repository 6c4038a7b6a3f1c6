"""The index's one-row state (``index_state``: generation, model, vector dimension), its size as the
admin statistics, health and the command line read them, and the upkeep of its BM25 statistics."""

from __future__ import annotations

from typing import Any


def index_summary(conn: Any) -> dict[str, Any]:
    """Documents, chunks, generation, model and dimension of the index ``conn`` reads."""
    docs, chunks = conn.execute("SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM chunks)").fetchone()
    state = conn.execute("SELECT generation, model, dimension FROM index_state").fetchone()
    generation, model, dimension = state if state else (0, None, None)
    return {"documents": int(docs), "chunks": int(chunks), "generation": int(generation), "model": model,
            "dimension": dimension}


def indexed_model(conn: Any) -> str | None:
    """The embedding model whose vectors the index holds (None: no index_state row)."""
    row = conn.execute("SELECT model FROM index_state").fetchone()
    return None if row is None else str(row[0])


def indexed_departments(conn: Any, limit: int) -> list[str]:
    """Up to ``limit`` departments of the indexed documents, in order."""
    rows = conn.execute("SELECT DISTINCT department FROM documents WHERE department IS NOT NULL "
                        "ORDER BY 1 LIMIT %s", (limit,)).fetchall()
    return [r[0] for r in rows]


def chunk_count(conn: Any) -> int:
    """The exact number of chunks, from the statistics row the chunk triggers keep in the same
    transaction as every chunk change plus the writers' not yet compacted deltas (``lexical_corpus``,
    migrations 003 and 013): a few rows read, where count(*) would scan the whole index."""
    return int(conn.execute("SELECT chunks FROM lexical_corpus").fetchone()[0])


def compact_lexical(conn: Any) -> int:
    """Fold the statistics deltas writers left into the base tables (migration 013), in ``conn``'s
    transaction. Returns the number of terms folded, or -1 when another compactor holds the lock (its
    work covers these deltas or the next call will). Sums are unchanged, so searches never notice."""
    row = conn.execute("SELECT cs_lexical_compact()").fetchone()
    return int(row[0]) if row and row[0] is not None else 0
