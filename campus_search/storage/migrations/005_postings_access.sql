-- Each posting carries its chunk's access and filter columns, so BM25 candidates are restricted by the
-- visibility rule and the client's filters while the postings are read (index-only), instead of by a
-- join to every matching chunk afterwards. The chunk triggers keep the copies exact: new chunks copy
-- them, a changed text re-creates the postings, a metadata-only change updates them in place.
ALTER TABLE lexical_postings
    ADD COLUMN clearance_level smallint,
    ADD COLUMN visibility      text,
    ADD COLUMN department      text,
    ADD COLUMN campus          text,
    ADD COLUMN priority        smallint,
    ADD COLUMN last_reviewed   timestamp;

UPDATE lexical_postings p
   SET clearance_level = c.clearance_level, visibility = c.visibility, department = c.department,
       campus = c.campus, priority = c.priority, last_reviewed = c.last_reviewed
  FROM chunks c WHERE c.id = p.chunk_id;

ALTER TABLE lexical_postings
    ALTER COLUMN clearance_level SET NOT NULL,
    ALTER COLUMN visibility SET NOT NULL,
    ALTER COLUMN priority SET NOT NULL,
    DROP CONSTRAINT lexical_postings_pkey,
    ADD CONSTRAINT lexical_postings_pkey PRIMARY KEY (term, chunk_id)
        INCLUDE (tf, dl, clearance_level, visibility, department, campus, priority, last_reviewed);

CREATE OR REPLACE FUNCTION cs_chunks_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO lexical_postings (term, chunk_id, tf, dl, clearance_level, visibility, department, campus,
                                  priority, last_reviewed)
        SELECT u.lexeme, n.id, coalesce(array_length(u.positions, 1), 1), n.lexical_length, n.clearance_level,
               n.visibility, n.department, n.campus, n.priority, n.last_reviewed
        FROM new_rows n, unnest(n.lexical) u;
    UPDATE lexical_stats SET chunks = chunks + (SELECT count(*) FROM new_rows),
                             total_length = total_length + (SELECT coalesce(sum(lexical_length), 0) FROM new_rows);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION cs_chunks_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- text changed: re-create the chunk's postings
    DELETE FROM lexical_postings p USING new_rows n, old_rows o
        WHERE p.chunk_id = n.id AND o.id = n.id AND n.lexical IS DISTINCT FROM o.lexical;
    INSERT INTO lexical_postings (term, chunk_id, tf, dl, clearance_level, visibility, department, campus,
                                  priority, last_reviewed)
        SELECT u.lexeme, n.id, coalesce(array_length(u.positions, 1), 1), n.lexical_length, n.clearance_level,
               n.visibility, n.department, n.campus, n.priority, n.last_reviewed
        FROM new_rows n JOIN old_rows o ON o.id = n.id, unnest(n.lexical) u
        WHERE n.lexical IS DISTINCT FROM o.lexical;
    UPDATE lexical_stats SET total_length = total_length + (
        SELECT coalesce(sum(n.lexical_length - o.lexical_length), 0)
        FROM new_rows n JOIN old_rows o ON o.id = n.id WHERE n.lexical IS DISTINCT FROM o.lexical);
    -- only access or ranking metadata changed: follow it in place
    UPDATE lexical_postings p
       SET clearance_level = n.clearance_level, visibility = n.visibility, department = n.department,
           campus = n.campus, priority = n.priority, last_reviewed = n.last_reviewed
      FROM new_rows n JOIN old_rows o ON o.id = n.id
     WHERE p.chunk_id = n.id AND n.lexical IS NOT DISTINCT FROM o.lexical
       AND (n.clearance_level, n.visibility, n.department, n.campus, n.priority, n.last_reviewed)
           IS DISTINCT FROM (o.clearance_level, o.visibility, o.department, o.campus, o.priority, o.last_reviewed);
    RETURN NULL;
END $$;

ANALYZE lexical_postings;
