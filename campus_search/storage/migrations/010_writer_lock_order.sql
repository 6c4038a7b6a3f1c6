-- Lock order for every writer: the lexical_stats row first, then document rows, then terms.
--
-- Migration 007 made every chunk statement take the single lexical_stats row before any term, but a
-- writer locks a documents row (the upsert or delete of a document) BEFORE its first chunk statement.
-- So a batch that already held the stats row (it had written document A's chunks) and then upserted
-- document X could wait for an API PUT/DELETE of X that held X's row and waited for the stats row:
-- a deadlock. Every statement that writes documents now takes the stats row first as well, before it
-- locks any document row, so no writer ever holds a document row while waiting for the stats row.
-- (A writer that locks documents with SELECT ... FOR UPDATE takes the stats row itself first:
-- ingest.lock_index_for_writing.) Superseded by migration 013: writers no longer take the stats row.
CREATE TRIGGER documents_lock_stats BEFORE INSERT OR UPDATE OR DELETE ON documents
    FOR EACH STATEMENT EXECUTE FUNCTION cs_chunks_lock_stats();
CREATE TRIGGER documents_lock_stats_truncate BEFORE TRUNCATE ON documents
    FOR EACH STATEMENT EXECUTE FUNCTION cs_chunks_lock_stats();
