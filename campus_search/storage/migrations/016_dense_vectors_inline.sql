-- The dense path's exact plan (a principal who sees a small share: the allowed rows through the access
-- index, each row's distance computed, retrieval/search.py) reads every allowed row's vector, and the
-- HNSW plan recomputes the distance of each candidate from the row. pgvector declares its type with
-- EXTERNAL storage, and a chunk row (text ~0.9 KB, tsvector ~1.2 KB, vector 1.5 KB) is over PostgreSQL's
-- 2 KB toast target, so the vector was the value moved out of line: every distance cost a TOAST index
-- lookup and one more page. MAIN keeps the vector in the row and moves the text and the tsvector out
-- instead (they are read only for the results shown, and by writers). Rows written before this keep
-- their layout until they are rewritten (re-ingestion, or VACUUM FULL chunks).
ALTER TABLE chunks ALTER COLUMN embedding SET STORAGE MAIN;
