"""Storage of the chunk vectors (migration 016): the vector stays in the chunk row, so the exact dense
plan reads one heap tuple per allowed row instead of a TOAST lookup per distance."""

from __future__ import annotations

from typing import Any

import numpy as np
from conftest import make_settings

from campus_search.services import Services


def test_vectors_of_realistic_chunks_stay_in_the_row(make_database: Any, embedder: Any, tmp_path: Any) -> None:
    services = Services(make_settings(make_database(), tmp_path), embedder=embedder).ensure_open()
    try:
        rng = np.random.default_rng(3)
        words = [f"word{i}" for i in range(3000)]
        with services.db.connection() as conn:
            doc = conn.execute("INSERT INTO documents (external_id, title, content_hash) VALUES ('d', 'T', 'h') "
                               "RETURNING id").fetchone()[0]
            for i in range(20):  # prose-sized chunks, many distinct terms: the row is over the toast target
                text = " ".join(rng.choice(words, 160))
                v = rng.standard_normal(384).astype(np.float32)
                conn.execute("INSERT INTO chunks (document_id, chunk_index, text, content_hash, embedding) "
                             "VALUES (%s, %s, %s, %s, %s)",
                             (doc, i, text, f"c{i}", v / np.linalg.norm(v)))
            rows = conn.execute("SELECT pg_column_toast_chunk_id(embedding) IS NULL, "
                                "pg_column_toast_chunk_id(lexical) IS NOT NULL, pg_column_size(text) "
                                "+ pg_column_size(lexical) + pg_column_size(embedding) FROM chunks").fetchall()
        assert all(size > 2100 for _, _, size in rows)  # the toaster had to move something out
        assert all(inline for inline, _, _ in rows)  # ... and it was not the vector
        assert all(lexical_out for _, lexical_out, _ in rows)
    finally:
        services.close()
