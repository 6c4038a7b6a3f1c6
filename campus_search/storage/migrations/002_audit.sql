-- Audit log (SPEC §3, docs/security.md): append-only and tamper-evident.
--
-- Each record carries the previous record's hash and its own: hash = HMAC-SHA256(chain key,
-- prev_hash || '\n' || canonical JSON of the record), computed by the application (the key never
-- reaches the database), so rewriting history needs the key, not just write access to this table.
-- `campus-search audit verify` recomputes the chain and names the first altered or missing record.
--
-- The database enforces what it can: no UPDATE, DELETE or TRUNCATE of records; every INSERT must
-- extend the chain head by exactly one (the single-row head is the serialisation point that orders
-- appends from all processes); the head only moves forward. A table owner can still disable the
-- triggers -- the HMAC chain is what catches that.

CREATE TABLE audit_log (
    seq              bigint PRIMARY KEY CHECK (seq > 0),
    recorded_at      timestamptz NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('search', 'admin')),
    action           text NOT NULL,        -- 'search', or an admin action such as 'cache.clear'
    request_id       text,
    user_id          text,                 -- NULL when the caller was not authenticated
    role             text,
    department       text,                 -- the user's departments, '; '-joined
    query_hmac       text,                 -- HMAC-SHA256 of the normalised query (audit query key)
    query_text       text,                 -- raw query, only with AUDIT_RAW_QUERIES=true
    filters          text,                 -- canonical JSON; query it as filters::jsonb
    target           text,                 -- admin actions: what was acted on
    details          text,                 -- canonical JSON: max_results, error code, action details
    result_count     integer,
    response_time_ms double precision,
    client_ip        text,
    user_agent       text,
    status           integer,              -- HTTP status answered
    success          boolean NOT NULL,
    key_id           text NOT NULL,        -- fingerprint of the AUDIT_HMAC_KEY that chained this record
    prev_hash        text NOT NULL,
    hash             text NOT NULL
);
CREATE INDEX audit_log_recorded_at ON audit_log (recorded_at);
CREATE INDEX audit_log_user ON audit_log (user_id, recorded_at);

CREATE TABLE audit_chain_head (
    id    boolean PRIMARY KEY DEFAULT true CHECK (id),
    seq   bigint NOT NULL,
    hash  text NOT NULL
);
INSERT INTO audit_chain_head (seq, hash) VALUES (0, repeat('0', 64));

CREATE FUNCTION cs_audit_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit log is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION cs_audit_refuse();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION cs_audit_refuse();
CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_chain_head
    FOR EACH ROW EXECUTE FUNCTION cs_audit_refuse();
CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_chain_head
    FOR EACH STATEMENT EXECUTE FUNCTION cs_audit_refuse();

-- A record must follow the head exactly; the head then moves to it, in the same transaction.
CREATE FUNCTION cs_audit_extend() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    head audit_chain_head%ROWTYPE;
BEGIN
    SELECT * INTO head FROM audit_chain_head FOR UPDATE;
    IF NEW.seq <> head.seq + 1 OR NEW.prev_hash <> head.hash THEN
        RAISE EXCEPTION 'audit record % does not extend the chain head (%)', NEW.seq, head.seq
            USING ERRCODE = 'serialization_failure';
    END IF;
    UPDATE audit_chain_head SET seq = NEW.seq, hash = NEW.hash;
    RETURN NEW;
END $$;
CREATE TRIGGER audit_log_extend BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION cs_audit_extend();

CREATE FUNCTION cs_audit_head_forward() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.seq <> OLD.seq + 1 THEN
        RAISE EXCEPTION 'audit chain head only moves forward by one record'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER audit_head_forward BEFORE UPDATE ON audit_chain_head
    FOR EACH ROW EXECUTE FUNCTION cs_audit_head_forward();
