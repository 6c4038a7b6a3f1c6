-- Group ACLs (SPEC §2, docs/security.md): a document may carry `groups` (course, committee, project ids)
-- with visibility 'group'; a user who shares one of them sees it, under the clearance ceiling. The access
-- model is declared once in campus_search/security/access.py; this migration gives the new attribute its
-- columns on every table that carries access: documents, chunks (the table the vector index scans) and
-- the lexical postings' copies (BM25 candidates are cut on them, alias p).

ALTER TABLE documents ADD COLUMN groups text[] NOT NULL DEFAULT '{}';
ALTER TABLE chunks ADD COLUMN groups text[] NOT NULL DEFAULT '{}';
ALTER TABLE lexical_postings ADD COLUMN groups text[] NOT NULL DEFAULT '{}';

ALTER TABLE documents DROP CONSTRAINT documents_visibility_check,
    ADD CONSTRAINT documents_visibility_check CHECK (visibility IN ('public', 'department', 'group'));
ALTER TABLE chunks DROP CONSTRAINT chunks_visibility_check,
    ADD CONSTRAINT chunks_visibility_check CHECK (visibility IN ('public', 'department', 'group'));
-- A group-visible document names at least one group (the validator says so first, with a message).
ALTER TABLE documents ADD CONSTRAINT documents_group_needs_groups
    CHECK (visibility <> 'group' OR cardinality(groups) > 0);

-- The predicate's group clause, `visibility = 'group' AND groups && $user_groups`, is answered by a GIN
-- index over the group-visible chunks only (an exact scan for a user who sees little through groups
-- combines it with chunks_access in a BitmapOr); the other rows cost it nothing.
CREATE INDEX chunks_groups ON chunks USING gin (groups) WHERE visibility = 'group';

-- Lexical candidates are joined back to their chunks' access columns (migration 004): keep that lookup
-- index-only with the new column.
DROP INDEX IF EXISTS chunks_access_cover;
CREATE INDEX chunks_access_cover ON chunks (id)
    INCLUDE (clearance_level, visibility, department, campus, priority, last_reviewed, groups);

-- The postings' copy of `groups`. The chunk triggers of migrations 005/013 (and 014, BM25's own) copy the
-- other access columns; `groups` is kept by triggers of its own, so the lexical redesign can replace
-- those functions without knowing about groups. They run after the postings triggers: PostgreSQL fires
-- triggers of one event in name order, and chunks_x_* sorts after chunks_inserted / chunks_updated, so
-- the postings of the new or re-tokenised chunks exist when these run. Only chunks with groups (or whose
-- groups changed) are touched: a corpus without groups pays one empty scan of the transition table.
CREATE FUNCTION cs_postings_groups_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE lexical_postings p SET groups = n.groups
      FROM new_rows n
     WHERE cardinality(n.groups) > 0 AND p.chunk_id = n.id AND p.groups IS DISTINCT FROM n.groups;
    RETURN NULL;
END $$;

CREATE FUNCTION cs_postings_groups_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE lexical_postings p SET groups = n.groups
      FROM new_rows n JOIN old_rows o ON o.id = n.id
     WHERE p.chunk_id = n.id AND p.groups IS DISTINCT FROM n.groups
       AND (n.groups IS DISTINCT FROM o.groups
            OR (n.lexical IS DISTINCT FROM o.lexical AND cardinality(n.groups) > 0));
    RETURN NULL;
END $$;

CREATE TRIGGER chunks_x_groups_inserted AFTER INSERT ON chunks REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cs_postings_groups_inserted();
CREATE TRIGGER chunks_x_groups_updated AFTER UPDATE ON chunks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cs_postings_groups_updated();

ANALYZE chunks;
