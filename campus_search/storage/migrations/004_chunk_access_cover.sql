-- Lexical candidates are scored from the postings alone, then joined to their chunks for the visibility
-- rule and filters. A covering index on the access columns turns that join into index-only lookups
-- instead of reading the wide chunk rows (text, vector, tsvector).
CREATE INDEX chunks_access_cover ON chunks (id)
    INCLUDE (clearance_level, visibility, department, campus, priority, last_reviewed);
-- BM25 reads (tf, dl) for each posting of a query term: carried in the primary key index, the postings
-- of a term are one index-only range scan (autovacuum keeps the visibility map current after ingests).
ALTER TABLE lexical_postings DROP CONSTRAINT lexical_postings_pkey,
    ADD CONSTRAINT lexical_postings_pkey PRIMARY KEY (term, chunk_id) INCLUDE (tf, dl);
ANALYZE chunks;
ANALYZE lexical_postings;
ANALYZE lexical_terms;
