-- Access by reference (issue 14): a document's access and filter metadata lives on its `documents` row
-- only. Retrieval reaches it through the chunk's (or posting's) document_id, which never changes.
--
-- Until now every chunk row and every lexical posting carried a copy of the seven metadata columns, so the
-- vector scan and the BM25 scan could filter on their own rows. Measured at 100,000 chunks
-- (bench/bench_scale.py, docs/performance.md): the copies made the postings 77 % of the disk (22 KB a
-- chunk: ~290 bytes a posting, the copies twice, in the heap and in the covering key), and a metadata
-- change of 5,000 chunks took 41-48 s: the chunk rows' update was not HOT (their access columns are
-- indexed), so every new row version was re-inserted into the HNSW graph (~11 s), and ~390,000 postings
-- were rewritten (~25 s). At a million chunks a department-wide change took minutes.
--
-- Now a metadata change updates documents rows only (one per document, ~5-50 chunks each): no chunk,
-- vector index entry or posting is touched, so it is fast and, being one UPDATE in one transaction,
-- never seen half-applied. Retrieval applies the rule to `documents` (alias d): the exact dense plan
-- walks the allowed documents by their access index and their chunks by document_id; the HNSW plan and
-- the BM25 cut probe a candidate's document by primary key.

-- The postings' copy of groups is kept by these; there is nothing to copy any more.
DROP TRIGGER IF EXISTS chunks_x_groups_inserted ON chunks;
DROP TRIGGER IF EXISTS chunks_x_groups_updated ON chunks;
DROP FUNCTION IF EXISTS cs_postings_groups_inserted();
DROP FUNCTION IF EXISTS cs_postings_groups_updated();

-- Lean postings: (term, chunk, its document, tf, chunk length). Rebuilt rather than altered, so the
-- dropped columns' space is returned now (ALTER TABLE DROP COLUMN only hides them).
CREATE TABLE lexical_postings_lean (
    term         text    NOT NULL,
    chunk_id     bigint  NOT NULL REFERENCES chunks (id) ON DELETE CASCADE,
    document_id  bigint  NOT NULL,   -- the chunk's document: the access rule is checked there
    tf           integer NOT NULL,
    dl           integer NOT NULL
);
INSERT INTO lexical_postings_lean (term, chunk_id, document_id, tf, dl)
    SELECT p.term, p.chunk_id, c.document_id, p.tf, p.dl
    FROM lexical_postings p JOIN chunks c ON c.id = p.chunk_id
    ORDER BY p.term, p.chunk_id;
DROP TABLE lexical_postings;  -- its triggers and indexes go with it
ALTER TABLE lexical_postings_lean RENAME TO lexical_postings;
ALTER TABLE lexical_postings RENAME CONSTRAINT lexical_postings_lean_chunk_id_fkey TO lexical_postings_chunk_id_fkey;
-- A term's postings are one index-only range scan: (tf, dl) to score, document_id to check access.
ALTER TABLE lexical_postings ADD CONSTRAINT lexical_postings_pkey PRIMARY KEY (term, chunk_id)
    INCLUDE (tf, dl, document_id);
CREATE INDEX lexical_postings_chunk ON lexical_postings (chunk_id);

-- Document frequencies follow the postings as before (migration 013: delta rows, never a shared row).
CREATE TRIGGER postings_inserted AFTER INSERT ON lexical_postings REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cs_postings_inserted();
CREATE TRIGGER postings_deleted AFTER DELETE ON lexical_postings REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cs_postings_deleted();

CREATE OR REPLACE FUNCTION cs_chunks_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO lexical_postings (term, chunk_id, document_id, tf, dl)
        SELECT u.lexeme, n.id, n.document_id, coalesce(array_length(u.positions, 1), 1), n.lexical_length
        FROM new_rows n, unnest(n.lexical) u;
    INSERT INTO lexical_stats_deltas (chunks, total_length)
        SELECT count(*), coalesce(sum(lexical_length), 0) FROM new_rows HAVING count(*) > 0;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION cs_chunks_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- text changed: re-create the chunk's postings (a chunk never changes document: see chunks_document_fixed)
    DELETE FROM lexical_postings p USING new_rows n, old_rows o
        WHERE p.chunk_id = n.id AND o.id = n.id AND n.lexical IS DISTINCT FROM o.lexical;
    INSERT INTO lexical_postings (term, chunk_id, document_id, tf, dl)
        SELECT u.lexeme, n.id, n.document_id, coalesce(array_length(u.positions, 1), 1), n.lexical_length
        FROM new_rows n JOIN old_rows o ON o.id = n.id, unnest(n.lexical) u
        WHERE n.lexical IS DISTINCT FROM o.lexical;
    INSERT INTO lexical_stats_deltas (chunks, total_length)
        SELECT 0, sum(n.lexical_length - o.lexical_length)
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.lexical IS DISTINCT FROM o.lexical
        HAVING coalesce(sum(n.lexical_length - o.lexical_length), 0) <> 0;
    RETURN NULL;
END $$;

-- The postings' document_id is the chunk's: a chunk is never moved to another document (ingestion
-- replaces a document's chunks; nothing updates document_id), and the database refuses it if tried.
CREATE FUNCTION cs_chunks_document_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a chunk cannot move to another document (chunk %)', OLD.id
        USING ERRCODE = 'check_violation';
END $$;
CREATE TRIGGER chunks_document_fixed BEFORE UPDATE OF document_id ON chunks
    FOR EACH ROW WHEN (NEW.document_id IS DISTINCT FROM OLD.document_id)
    EXECUTE FUNCTION cs_chunks_document_fixed();

-- The chunks lose their copies and the indexes over them; the HNSW graph is untouched by a metadata
-- change from now on.
DROP INDEX IF EXISTS chunks_access;
DROP INDEX IF EXISTS chunks_access_cover;
DROP INDEX IF EXISTS chunks_groups;
ALTER TABLE chunks
    DROP COLUMN department,
    DROP COLUMN visibility,
    DROP COLUMN clearance_level,
    DROP COLUMN campus,
    DROP COLUMN priority,
    DROP COLUMN last_reviewed,
    DROP COLUMN groups;

-- The rule's predicate on documents: the ceiling and audience columns (an exact plan walks the allowed
-- documents by it), and the group clause by a GIN index over group-visible documents only.
CREATE INDEX documents_access ON documents (clearance_level, visibility, department);
CREATE INDEX documents_groups ON documents USING gin (groups) WHERE visibility = 'group';

ANALYZE documents;
ANALYZE chunks;
ANALYZE lexical_postings;
