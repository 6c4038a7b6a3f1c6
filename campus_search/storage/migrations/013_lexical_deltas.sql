-- Ingestion that scales out: writers no longer update shared counter rows.
--
-- Until now every statement that changed chunks updated the single lexical_stats row and upserted one
-- lexical_terms row per term (document frequencies), and migrations 007/010 made every writer take the
-- stats row first to avoid deadlocks. So concurrent ingests (several `campus-search ingest` processes,
-- an admin PUT during a sync) ran one transaction at a time, whatever the hardware.
--
-- Now a writer only INSERTs: its postings, and the changes it makes to the statistics as delta rows
-- (lexical_term_deltas: term, +/- count; lexical_stats_deltas: +/- chunks, +/- length). Inserts of
-- different transactions never wait for each other, so writers neither queue nor deadlock on
-- statistics. The corpus statistics a search reads are base + committed deltas (views lexical_df and
-- lexical_corpus), so they stay exact and transactional: a search sees a writer's chunks and their
-- statistics together or neither. cs_lexical_compact() folds the deltas into the base tables; it runs
-- after ingestion batches and admin changes (one compactor at a time, by a transaction-level
-- advisory lock; a busy compactor is skipped, not waited for). Compaction changes no sum, so a search
-- never sees a difference whether it ran or not.

CREATE TABLE lexical_term_deltas (
    term   text    NOT NULL,
    delta  integer NOT NULL
);
CREATE INDEX lexical_term_deltas_term ON lexical_term_deltas (term) INCLUDE (delta);

CREATE TABLE lexical_stats_deltas (
    chunks        bigint NOT NULL,
    total_length  bigint NOT NULL
);

-- Terms whose frequency fell to zero, found without scanning every term.
CREATE INDEX lexical_terms_gone ON lexical_terms (term) WHERE df <= 0;

CREATE VIEW lexical_df AS
    SELECT term, sum(df)::bigint AS df
    FROM (SELECT term, df FROM lexical_terms UNION ALL SELECT term, delta FROM lexical_term_deltas) t
    GROUP BY term HAVING sum(df) > 0;

CREATE VIEW lexical_corpus AS
    SELECT (SELECT chunks FROM lexical_stats) + coalesce((SELECT sum(chunks) FROM lexical_stats_deltas), 0)
               AS chunks,
           (SELECT total_length FROM lexical_stats)
               + coalesce((SELECT sum(total_length) FROM lexical_stats_deltas), 0) AS total_length;

CREATE OR REPLACE FUNCTION cs_chunks_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO lexical_postings (term, chunk_id, tf, dl, clearance_level, visibility, department, campus,
                                  priority, last_reviewed)
        SELECT u.lexeme, n.id, coalesce(array_length(u.positions, 1), 1), n.lexical_length, n.clearance_level,
               n.visibility, n.department, n.campus, n.priority, n.last_reviewed
        FROM new_rows n, unnest(n.lexical) u;
    INSERT INTO lexical_stats_deltas (chunks, total_length)
        SELECT count(*), coalesce(sum(lexical_length), 0) FROM new_rows HAVING count(*) > 0;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION cs_chunks_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO lexical_stats_deltas (chunks, total_length)
        SELECT -count(*), -coalesce(sum(lexical_length), 0) FROM old_rows HAVING count(*) > 0;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION cs_chunks_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- text changed: re-create the chunk's postings
    DELETE FROM lexical_postings p USING new_rows n, old_rows o
        WHERE p.chunk_id = n.id AND o.id = n.id AND n.lexical IS DISTINCT FROM o.lexical;
    INSERT INTO lexical_postings (term, chunk_id, tf, dl, clearance_level, visibility, department, campus,
                                  priority, last_reviewed)
        SELECT u.lexeme, n.id, coalesce(array_length(u.positions, 1), 1), n.lexical_length, n.clearance_level,
               n.visibility, n.department, n.campus, n.priority, n.last_reviewed
        FROM new_rows n JOIN old_rows o ON o.id = n.id, unnest(n.lexical) u
        WHERE n.lexical IS DISTINCT FROM o.lexical;
    INSERT INTO lexical_stats_deltas (chunks, total_length)
        SELECT 0, sum(n.lexical_length - o.lexical_length)
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.lexical IS DISTINCT FROM o.lexical
        HAVING coalesce(sum(n.lexical_length - o.lexical_length), 0) <> 0;
    -- only access or ranking metadata changed: follow it in place
    UPDATE lexical_postings p
       SET clearance_level = n.clearance_level, visibility = n.visibility, department = n.department,
           campus = n.campus, priority = n.priority, last_reviewed = n.last_reviewed
      FROM new_rows n JOIN old_rows o ON o.id = n.id
     WHERE p.chunk_id = n.id AND n.lexical IS NOT DISTINCT FROM o.lexical
       AND (n.clearance_level, n.visibility, n.department, n.campus, n.priority, n.last_reviewed)
           IS DISTINCT FROM (o.clearance_level, o.visibility, o.department, o.campus, o.priority, o.last_reviewed);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION cs_postings_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO lexical_term_deltas (term, delta) SELECT term, count(*) FROM new_rows GROUP BY term;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION cs_postings_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO lexical_term_deltas (term, delta) SELECT term, -count(*) FROM old_rows GROUP BY term;
    RETURN NULL;
END $$;

-- No writer needs the statistics row any more (migrations 007 and 010 took it first to order locks).
DROP TRIGGER IF EXISTS chunks_lock_stats ON chunks;
DROP TRIGGER IF EXISTS documents_lock_stats ON documents;
DROP TRIGGER IF EXISTS documents_lock_stats_truncate ON documents;

CREATE FUNCTION cs_lexical_compact() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    folded integer;
BEGIN
    IF NOT pg_try_advisory_xact_lock(7450114) THEN
        RETURN -1;  -- another compactor is at work; the deltas are folded by it or the next one
    END IF;
    WITH moved AS (DELETE FROM lexical_term_deltas RETURNING term, delta),
         sums AS (SELECT term, sum(delta)::integer AS d FROM moved GROUP BY term)
    INSERT INTO lexical_terms AS t (term, df)
        SELECT term, d FROM sums WHERE d <> 0 ORDER BY term
        ON CONFLICT (term) DO UPDATE SET df = t.df + EXCLUDED.df;
    GET DIAGNOSTICS folded = ROW_COUNT;
    DELETE FROM lexical_terms WHERE df <= 0;
    WITH moved AS (DELETE FROM lexical_stats_deltas RETURNING chunks, total_length)
    UPDATE lexical_stats SET chunks = chunks + (SELECT coalesce(sum(chunks), 0) FROM moved),
                             total_length = total_length + (SELECT coalesce(sum(total_length), 0) FROM moved);
    RETURN folded;
END $$;
