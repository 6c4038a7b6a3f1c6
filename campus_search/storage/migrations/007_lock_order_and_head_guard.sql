-- Two fixes found in review.
--
-- 1. Lock order. The chunk triggers lock lexical_terms rows (document frequencies) and then the single
--    lexical_stats row, statement by statement. Two ingests whose transactions write several documents
--    could each hold what the other needs next (terms vs stats) and deadlock. Every statement that
--    changes chunks now takes the stats row first, before any term: writers queue on that one row
--    (they did anyway) and can no longer cross.
CREATE FUNCTION cs_chunks_lock_stats() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM lexical_stats FOR UPDATE;
    RETURN NULL;
END $$;
CREATE TRIGGER chunks_lock_stats BEFORE INSERT OR UPDATE OR DELETE ON chunks
    FOR EACH STATEMENT EXECUTE FUNCTION cs_chunks_lock_stats();

-- 2. The audit chain head moves only through the batch-extend trigger (migration 006), never by a
--    direct UPDATE: a head moved by hand would let records be appended after a forged hash.
CREATE OR REPLACE FUNCTION cs_audit_head_forward() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'the audit chain head moves only when records are appended'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.seq <= OLD.seq THEN
        RAISE EXCEPTION 'audit chain head only moves forward'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
