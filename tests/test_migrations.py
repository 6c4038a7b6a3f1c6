"""Data-bearing migrations on a populated database: an archive made at schema 002 (documents and chunks,
no lexical index) is brought up to date by ``migrate`` -- the 003 backfill (terms, postings, document
frequencies, corpus statistics) and the 005 backfill (each posting's copy of its chunk's access columns)
must produce exactly what the triggers would have written, and BM25 search must work on the old rows."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from campus_search.storage.db import _migrations, migrate

MODEL, DIM = "all-MiniLM-L6-v2", 384
DOCS = [  # (external id, title, access, [(section, text)])
    ("guide", "Zanzibarite printer guide", ("IT Services", "public", 1, "Central Campus", 4),
     [("Setup", "Install the printer driver and connect to the campus print queue."),
      ("Credit", "Printing credit is topped up online; colour pages cost more than black and white."),
      (None, "")]),  # an empty chunk: no terms, length 0
    ("hr", "Annual leave policy", ("Human Resources", "department", 3, None, 2),
     [("Entitlement", "Staff are entitled to annual leave; leave leave leave requests go to the line manager.")]),
    ("vet", "Biosecurity at the vet hospital", ("Vet School", "department", 5, "Easter Bush", 5),
     [("Footwear", "Disinfect boots at every footbath before entering the large animal hospital.")]),
]


def _at_schema(dsn: str, last: int) -> None:
    """The database as an older release left it: migrations up to ``last`` only."""
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        for number, name, sql in _migrations():
            if number <= last:
                conn.execute(sql.replace("{dim}", str(DIM)).encode())
                conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (number, name))
        conn.execute("INSERT INTO index_state (model, dimension) VALUES (%s, %s)", (MODEL, DIM))


def _populate(dsn: str) -> None:
    rng = np.random.default_rng(2)
    with psycopg.connect(dsn) as conn:
        register_vector(conn)
        for ext, title, (dept, vis, clearance, campus, priority), chunks in DOCS:
            doc_id = conn.execute(
                "INSERT INTO documents (external_id, title, content_hash, department, visibility, clearance_level, "
                "campus, priority) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (ext, title, "h-" + ext, dept, vis, clearance, campus, priority)).fetchone()[0]
            for i, (section, text) in enumerate(chunks):
                v = rng.standard_normal(DIM).astype(np.float32)
                conn.execute(
                    "INSERT INTO chunks (document_id, chunk_index, section_title, text, content_hash, embedding, "
                    "department, visibility, clearance_level, campus, priority) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (doc_id, i, section, text, f"c-{ext}-{i}", v / np.linalg.norm(v), dept, vis, clearance,
                     campus, priority))


def test_backfills_bring_a_populated_schema_002_database_up_to_date(make_database: Any) -> None:
    dsn = make_database()
    _at_schema(dsn, 2)
    _populate(dsn)
    version = migrate(dsn, model=MODEL, dimension=DIM)
    assert version == max(n for n, _, _ in _migrations()) and version >= 5
    with psycopg.connect(dsn) as conn:
        chunks = conn.execute(
            "SELECT c.id, d.title, c.section_title, c.text, c.lexical_length, c.document_id "
            "FROM chunks c JOIN documents d ON d.id = c.document_id").fetchall()
        postings = conn.execute("SELECT term, chunk_id, tf, dl, document_id FROM lexical_postings").fetchall()
        # 017: the access copies are gone from chunks and postings (access lives on documents only)
        copies = conn.execute("SELECT table_name, column_name FROM information_schema.columns "
                              "WHERE table_name IN ('chunks', 'lexical_postings') AND column_name IN "
                              "('department', 'visibility', 'clearance_level', 'campus', 'priority', "
                              "'last_reviewed', 'groups')").fetchall()
        assert copies == []
        terms = dict(conn.execute("SELECT term, df FROM lexical_terms").fetchall())
        stats = conn.execute("SELECT chunks, total_length FROM lexical_stats").fetchone()
        expected_postings = set()
        lengths = {}
        for cid, title, section, text, length, *access in chunks:
            # the reference: PostgreSQL's english parser over title, section and text -- computed here,
            # not by the migration's own function
            lexemes = conn.execute(
                "SELECT lexeme, coalesce(array_length(positions, 1), 1) FROM unnest(to_tsvector('english', %s))",
                (f"{title}\n{section or ''}\n{text}",)).fetchall()
            lengths[cid] = sum(n for _, n in lexemes)
            assert length == lengths[cid]
            expected_postings |= {(term, cid, tf, lengths[cid], *access) for term, tf in lexemes}
    assert set(postings) == expected_postings  # 003: terms and tf; 017: the chunk's document
    assert len(postings) == len(expected_postings)
    assert terms == dict(Counter(p[0] for p in postings))
    assert stats == (len(chunks), sum(lengths.values()))
    empty = [cid for cid, _, section, text, *_ in chunks if text == ""]
    assert empty and lengths[empty[0]] > 0  # the empty chunk still carries its document title's terms
    titles_only = {p[1] for p in postings if p[0] == "zanzibarit"}
    assert len(titles_only) == 3  # the title word reaches all three of its document's chunks

    # The brought-up database searches like a fresh one, and new writes keep the statistics exact.
    from campus_search.retrieval.lexical import BM25, allowed_top_sql

    with psycopg.connect(dsn) as conn:
        top = allowed_top_sql("lex_scores", "d.clearance_level <= 1")
        hits = conn.execute(f"WITH {BM25().scored_cte()}, top AS ({top}) "
                            "SELECT t.id, d.clearance_level FROM top t JOIN chunks c ON c.id = t.id "
                            "JOIN documents d ON d.id = c.document_id",
                            {"qtext": "printing credit annual leave", "k": 40}).fetchall()
        scored = conn.execute(f"WITH {BM25().scored_cte()} SELECT count(*) FROM lex_scores",
                              {"qtext": "printing credit annual leave"}).fetchone()[0]
        assert hits and all(level <= 1 for _, level in hits)
        assert scored > len(hits)  # the leave policy (clearance 3) was scored, and cut by its document
        conn.execute("DELETE FROM documents WHERE external_id = 'hr'")
        after = conn.execute("SELECT chunks, total_length FROM lexical_corpus").fetchone()
        real = conn.execute("SELECT count(*), sum(lexical_length) FROM chunks").fetchone()
    assert after == real


def test_a_posting_is_in_two_b_trees_and_a_chunk_s_postings_are_one_run(make_database: Any) -> None:
    """Migration 021: the postings' key is (chunk_id, term) with tf and dl, and there is no other index but
    the impact order's. A chunk's exact-score probe and the delete of a chunk's postings use the key (an
    index-only probe); a term's whole list is read through the impact index."""
    dsn = make_database()
    migrate(dsn, model=MODEL, dimension=DIM)
    with psycopg.connect(dsn) as conn:
        register_vector(conn)
        doc = conn.execute("INSERT INTO documents (external_id, title, content_hash) VALUES ('g', 'Printer guide', "
                           "'h') RETURNING id").fetchone()[0]
        conn.execute("INSERT INTO chunks (document_id, chunk_index, text, content_hash, embedding) "
                     "VALUES (%s, 0, 'Install the printer driver.', 'c', %s)", (doc, np.ones(DIM, np.float32)))
        indexes = dict(conn.execute("SELECT indexname, indexdef FROM pg_indexes "
                                    "WHERE tablename = 'lexical_postings'").fetchall())
        assert set(indexes) == {"lexical_postings_pkey", "lexical_postings_impact"}
        assert "(chunk_id, term) INCLUDE (tf, dl)" in indexes["lexical_postings_pkey"]
        conn.execute("SET enable_seqscan = off")  # a 3-document table: ask which index serves, not whether
        chunk = conn.execute("SELECT min(chunk_id) FROM lexical_postings WHERE term = 'printer'").fetchone()[0]
        probe = conn.execute("EXPLAIN SELECT tf, dl FROM lexical_postings WHERE term = 'printer' AND chunk_id = %s",
                             (chunk,)).fetchall()
        assert "Index Only Scan using lexical_postings_pkey" in probe[0][0]
        per_chunk = conn.execute("EXPLAIN DELETE FROM lexical_postings WHERE chunk_id = %s", (chunk,)).fetchall()
        assert any("lexical_postings_pkey" in row[0] for row in per_chunk)
        whole = conn.execute("EXPLAIN SELECT chunk_id, tf FROM lexical_postings WHERE term = 'printer'").fetchall()
        assert any("lexical_postings_impact" in row[0] for row in whole)


def test_documents_are_vacuumed_once_one_percent_is_dead(make_database: Any) -> None:
    """Migration 022: every search evaluates its rule on ``documents``, and a metadata change leaves a dead
    version of each changed document (its access columns are indexed); autovacuum takes the table at 1 %
    (+ 500 rows) dead, not PostgreSQL's 20 %: the thresholds are the table's own, whatever the server's."""
    dsn = make_database()
    migrate(dsn, model=MODEL, dimension=DIM)
    with psycopg.connect(dsn) as conn:
        options = conn.execute("SELECT reloptions FROM pg_class WHERE oid = 'documents'::regclass").fetchone()[0]
    assert set(options or []) >= {"autovacuum_vacuum_scale_factor=0.01", "autovacuum_vacuum_threshold=500",
                                  "autovacuum_analyze_scale_factor=0.01", "autovacuum_analyze_threshold=500"}
