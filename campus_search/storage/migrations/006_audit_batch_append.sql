-- Audit appends in batches (audit.py's group commit): the chain is checked and the head moved once per
-- INSERT statement instead of once per row. Per-row head updates made every record of a batch walk
-- the head row's growing chain of versions; now the head row changes once per batch.
--
-- Guarantees are unchanged: every statement's records must continue the chain from the head exactly
-- (consecutive seq, each prev_hash the hash before it), checked under the head's row lock; the head
-- only moves forward; records can still never be updated or deleted.

DROP TRIGGER audit_log_extend ON audit_log;

-- Cheap per-row guard, before uniqueness is checked: a record at or behind the head is refused as a
-- chain violation (not as a duplicate key).
CREATE FUNCTION cs_audit_not_behind() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.seq <= (SELECT seq FROM audit_chain_head) THEN
        RAISE EXCEPTION 'audit record % does not extend the chain head', NEW.seq
            USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER audit_log_not_behind BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION cs_audit_not_behind();

CREATE FUNCTION cs_audit_extend_batch() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    head audit_chain_head%ROWTYPE;
    next_seq bigint;
    prev text;
    r record;
BEGIN
    SELECT * INTO head FROM audit_chain_head FOR UPDATE;
    next_seq := head.seq + 1;
    prev := head.hash;
    FOR r IN SELECT seq, prev_hash, hash FROM new_rows ORDER BY seq LOOP
        IF r.seq <> next_seq OR r.prev_hash <> prev THEN
            RAISE EXCEPTION 'audit record % does not extend the chain head (%)', r.seq, next_seq - 1
                USING ERRCODE = 'serialization_failure';
        END IF;
        next_seq := r.seq + 1;
        prev := r.hash;
    END LOOP;
    IF next_seq > head.seq + 1 THEN
        UPDATE audit_chain_head SET seq = next_seq - 1, hash = prev;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER audit_log_extend AFTER INSERT ON audit_log REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cs_audit_extend_batch();

CREATE OR REPLACE FUNCTION cs_audit_head_forward() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.seq <= OLD.seq THEN
        RAISE EXCEPTION 'audit chain head only moves forward'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
