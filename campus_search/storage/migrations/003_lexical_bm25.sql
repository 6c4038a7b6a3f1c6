-- Lexical retrieval with real BM25 inside PostgreSQL (docs/ranking.md).
--
-- Each chunk's terms come from PostgreSQL full-text search (english stemming and stop words) over its
-- document title, section title and text. An inverted index (lexical_postings: term -> chunk, tf,
-- chunk length) carries what BM25 needs; document frequencies (lexical_terms) and corpus statistics
-- (lexical_stats) are kept exact by statement-level triggers with transition tables, inside the same
-- transaction as the chunk change, whoever writes the chunks. So adding, replacing or deleting
-- documents keeps IDF and average length correct, and a search never sees half an update.

ALTER TABLE chunks ADD COLUMN lexical tsvector;
ALTER TABLE chunks ADD COLUMN lexical_length integer NOT NULL DEFAULT 0;

CREATE TABLE lexical_postings (
    term      text    NOT NULL,
    chunk_id  bigint  NOT NULL REFERENCES chunks (id) ON DELETE CASCADE,
    tf        integer NOT NULL,
    dl        integer NOT NULL,   -- the chunk's length in terms (copied: scoring needs no join)
    PRIMARY KEY (term, chunk_id)
);
CREATE INDEX lexical_postings_chunk ON lexical_postings (chunk_id);

CREATE TABLE lexical_terms (
    term  text PRIMARY KEY,
    df    integer NOT NULL
);

CREATE TABLE lexical_stats (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    chunks        bigint NOT NULL DEFAULT 0,
    total_length  bigint NOT NULL DEFAULT 0
);

CREATE FUNCTION cs_lexical_vector(doc_id bigint, section text, body text) RETURNS tsvector
LANGUAGE sql STABLE AS $$
    SELECT to_tsvector('english'::regconfig,
                       coalesce((SELECT title FROM documents WHERE id = doc_id), '') || E'\n' ||
                       coalesce(section, '') || E'\n' || body)
$$;

CREATE FUNCTION cs_tsvector_length(v tsvector) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(sum(coalesce(array_length(u.positions, 1), 1)), 0)::integer FROM unnest(v) u
$$;

-- Backfill chunks that exist already.
UPDATE chunks SET lexical = cs_lexical_vector(document_id, section_title, text);
UPDATE chunks SET lexical_length = cs_tsvector_length(lexical);
INSERT INTO lexical_postings (term, chunk_id, tf, dl)
    SELECT u.lexeme, c.id, coalesce(array_length(u.positions, 1), 1), c.lexical_length
    FROM chunks c, unnest(c.lexical) u;
INSERT INTO lexical_terms (term, df) SELECT term, count(*) FROM lexical_postings GROUP BY term;
INSERT INTO lexical_stats (chunks, total_length)
    SELECT count(*), coalesce(sum(lexical_length), 0) FROM chunks;

-- Row level: compute the chunk's terms before it is stored.
CREATE FUNCTION cs_chunks_lexical_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.lexical := cs_lexical_vector(NEW.document_id, NEW.section_title, NEW.text);
    NEW.lexical_length := cs_tsvector_length(NEW.lexical);
    RETURN NEW;
END $$;
CREATE TRIGGER chunks_lexical_row BEFORE INSERT OR UPDATE OF text, section_title, document_id ON chunks
    FOR EACH ROW EXECUTE FUNCTION cs_chunks_lexical_row();

-- Statement level: postings and corpus statistics for the rows a statement added or removed.
CREATE FUNCTION cs_chunks_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO lexical_postings (term, chunk_id, tf, dl)
        SELECT u.lexeme, n.id, coalesce(array_length(u.positions, 1), 1), n.lexical_length
        FROM new_rows n, unnest(n.lexical) u;
    UPDATE lexical_stats SET chunks = chunks + (SELECT count(*) FROM new_rows),
                             total_length = total_length + (SELECT coalesce(sum(lexical_length), 0) FROM new_rows);
    RETURN NULL;
END $$;
CREATE TRIGGER chunks_inserted AFTER INSERT ON chunks REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cs_chunks_inserted();

CREATE FUNCTION cs_chunks_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE lexical_stats SET chunks = chunks - (SELECT count(*) FROM old_rows),
                             total_length = total_length - (SELECT coalesce(sum(lexical_length), 0) FROM old_rows);
    RETURN NULL;
END $$;
CREATE TRIGGER chunks_deleted AFTER DELETE ON chunks REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cs_chunks_deleted();

-- Text edited in place (ingestion replaces chunks instead, but any writer stays correct). Transition
-- tables rule out a column list, so metadata-only updates also come here and are skipped row by row.
CREATE FUNCTION cs_chunks_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM lexical_postings p USING new_rows n, old_rows o
        WHERE p.chunk_id = n.id AND o.id = n.id AND n.lexical IS DISTINCT FROM o.lexical;
    INSERT INTO lexical_postings (term, chunk_id, tf, dl)
        SELECT u.lexeme, n.id, coalesce(array_length(u.positions, 1), 1), n.lexical_length
        FROM new_rows n JOIN old_rows o ON o.id = n.id, unnest(n.lexical) u
        WHERE n.lexical IS DISTINCT FROM o.lexical;
    UPDATE lexical_stats SET total_length = total_length + (
        SELECT coalesce(sum(n.lexical_length - o.lexical_length), 0)
        FROM new_rows n JOIN old_rows o ON o.id = n.id WHERE n.lexical IS DISTINCT FROM o.lexical);
    RETURN NULL;
END $$;
CREATE TRIGGER chunks_updated AFTER UPDATE ON chunks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cs_chunks_updated();

-- Document frequencies follow the postings (also when chunks go by ON DELETE CASCADE).
-- Rows are locked in term order so concurrent ingests cannot deadlock on each other.
CREATE FUNCTION cs_postings_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO lexical_terms AS t (term, df)
        SELECT term, count(*) FROM new_rows GROUP BY term ORDER BY term
        ON CONFLICT (term) DO UPDATE SET df = t.df + EXCLUDED.df;
    RETURN NULL;
END $$;
CREATE TRIGGER postings_inserted AFTER INSERT ON lexical_postings REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cs_postings_inserted();

CREATE FUNCTION cs_postings_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM lexical_terms t WHERE t.term IN (SELECT DISTINCT term FROM old_rows)
        ORDER BY t.term FOR UPDATE;
    UPDATE lexical_terms t SET df = t.df - o.n
        FROM (SELECT term, count(*) AS n FROM old_rows GROUP BY term) o WHERE t.term = o.term;
    DELETE FROM lexical_terms t WHERE t.df <= 0 AND t.term IN (SELECT DISTINCT term FROM old_rows);
    RETURN NULL;
END $$;
CREATE TRIGGER postings_deleted AFTER DELETE ON lexical_postings REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cs_postings_deleted();
