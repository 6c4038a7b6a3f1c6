-- Documents and their chunks. Access metadata (SPEC §2) lives on the document and is copied onto each
-- chunk so the visibility rule and client filters are plain predicates on the one table that the
-- vector index scans (a pre-filter inside the index scan, not a post-filter).
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE documents (
    id              bigserial PRIMARY KEY,
    external_id     text NOT NULL UNIQUE,          -- stable key: BEIR _id, file path relative to its root, API id
    title           text NOT NULL,
    source          text,                          -- where it came from (path, URL)
    content_hash    text NOT NULL,                 -- sha256 of the parsed content; unchanged => nothing to do
    department      text,
    visibility      text NOT NULL DEFAULT 'public' CHECK (visibility IN ('public', 'department')),
    clearance_level smallint NOT NULL DEFAULT 1 CHECK (clearance_level BETWEEN 1 AND 5),
    campus          text,
    priority        smallint NOT NULL DEFAULT 3 CHECK (priority BETWEEN 1 AND 5),
    last_reviewed   timestamp,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE chunks (
    id              bigserial PRIMARY KEY,
    document_id     bigint NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    chunk_index     integer NOT NULL,
    section_title   text,
    page_number     integer,
    text            text NOT NULL,
    content_hash    text NOT NULL,                 -- sha256 of what was embedded; reused across re-ingests
    embedding       vector({dim}) NOT NULL,
    department      text,
    visibility      text NOT NULL CHECK (visibility IN ('public', 'department')),
    clearance_level smallint NOT NULL CHECK (clearance_level BETWEEN 1 AND 5),
    campus          text,
    priority        smallint NOT NULL CHECK (priority BETWEEN 1 AND 5),
    last_reviewed   timestamp,
    UNIQUE (document_id, chunk_index)
);

CREATE INDEX chunks_embedding_hnsw ON chunks USING hnsw (embedding vector_cosine_ops)
    WITH (m = 16, ef_construction = 64);
CREATE INDEX chunks_access ON chunks (clearance_level, visibility, department);
CREATE INDEX chunks_content_hash ON chunks (content_hash);

-- Bumped on every change to documents; part of every cache key, so no stale result survives a change.
CREATE TABLE index_state (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    generation  bigint NOT NULL DEFAULT 0,
    model       text NOT NULL,
    dimension   integer NOT NULL
);
