-- Database-side ingest at a million chunks (issue 14): the postings' primary key is (chunk_id, term), and
-- the separate chunk_id index goes.
--
-- Until now every posting inserted went into three B-trees: the primary key (term, chunk_id), the
-- chunk_id index (deletes) and the impact index (migration 018). The primary key's order scattered a new
-- chunk's ~78 postings over ~78 places of a 77-million-entry index, one random leaf page each: at 1M
-- chunks the bulk load fell from ~1,330 chunks/s (100k) to 987. Keyed by (chunk_id, term) a chunk's
-- postings are one run of entries at the index's right end (chunk ids only grow), and the same index
-- serves what the chunk_id index did (deletes by chunk) and what the old key did (the exact-score probe
-- of one term of one chunk, index-only with tf and dl). A term's whole list is read through the impact
-- index, which has carried the chunk, its document, tf and dl since migration 018. One B-tree less per
-- posting, and the rescoring probes of one chunk now land on one leaf page.
--
-- The key is rebuilt in place: at 1M chunks (77M postings) that takes minutes under the migration lock.
DO $$
DECLARE
    wanted_kb bigint := least(4 * 1024 * 1024,
                              greatest(0, (SELECT reltuples FROM pg_class WHERE oid = 'lexical_postings'::regclass))
                              * 0.05)::bigint;
BEGIN
    IF wanted_kb > (SELECT setting::bigint FROM pg_settings WHERE name = 'maintenance_work_mem') THEN
        PERFORM set_config('maintenance_work_mem', wanted_kb || 'kB', true);
    END IF;
END $$;
ALTER TABLE lexical_postings DROP CONSTRAINT lexical_postings_pkey;
DROP INDEX IF EXISTS lexical_postings_chunk;
ALTER TABLE lexical_postings ADD CONSTRAINT lexical_postings_pkey PRIMARY KEY (chunk_id, term) INCLUDE (tf, dl);
