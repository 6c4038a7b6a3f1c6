-- Database-side ingest (issue 14): the postings' foreign key to chunks goes; the chunk triggers that write
-- the postings also remove them.
--
-- Every chunk has ~78 postings, and each posting inserted fired the foreign key's per-row check (a
-- lookup of its chunk, FOR KEY SHARE): measured on a 20,000-chunk corpus, inserting 2,500 chunks ran at
-- ~700 chunks/s with the key and ~1,080 without it (same statement, same triggers, alternated three
-- times). The key guarded nothing the triggers do not: postings are written only by the chunk triggers
-- (insert, text change) from the chunk row itself, so a posting for a missing chunk cannot be created;
-- what the key also did, deleting a chunk's postings with it (ON DELETE CASCADE), the statement trigger
-- below now does, set-based, in the same statement, whether chunks go by a DELETE or by a document's
-- cascade. TRUNCATE of chunks is refused (it would bypass the triggers): delete documents instead.

ALTER TABLE lexical_postings DROP CONSTRAINT IF EXISTS lexical_postings_chunk_id_fkey;

CREATE OR REPLACE FUNCTION cs_chunks_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM lexical_postings p USING old_rows o WHERE p.chunk_id = o.id;
    INSERT INTO lexical_stats_deltas (chunks, total_length)
        SELECT -count(*), -coalesce(sum(lexical_length), 0) FROM old_rows HAVING count(*) > 0;
    RETURN NULL;
END $$;

CREATE FUNCTION cs_chunks_no_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'TRUNCATE chunks would leave their lexical postings and statistics behind; delete the documents instead'
        USING ERRCODE = 'feature_not_supported';
END $$;
CREATE TRIGGER chunks_no_truncate BEFORE TRUNCATE ON chunks
    FOR EACH STATEMENT EXECUTE FUNCTION cs_chunks_no_truncate();
