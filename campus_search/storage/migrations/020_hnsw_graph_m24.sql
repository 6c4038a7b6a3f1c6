-- Dense recall at a million chunks (issue 14): the HNSW graph is rebuilt with m 24 and ef_construction
-- 128 (was pgvector's defaults, m 16 and ef_construction 64).
--
-- Measured on bench_scale.py's 1M corpus (clustered like real embeddings: ~200 chunks around each
-- source abstract), dense recall@10 against the exact allowed-only top 10, 200 queries, HNSW plan:
--   m 16 / ef_construction 64:  admin 0.964 at ef_search 400, 0.970 at 800; a member of a 4 % department
--                               0.934-0.940 whatever ef_search (the graph did not reach the allowed
--                               neighbours of some queries at all);
--   m 24 / ef_construction 128: admin 0.900 / 0.938 / 0.960 / 0.975 at ef_search 100 / 200 / 300 / 400;
--                               the 4 % member 0.975-0.982 at every ef_search from 100 to 400.
-- The index is the same size (each element still takes one 8 kB page slot: the vector dominates); the
-- build took 334 s at 1M (2 cores, maintenance_work_mem 6GB; the m 16 graph 318 s on a busy machine), and
-- an insert costs more distance computations. The migration rebuilds the index in place: at 1M that
-- holds the migration lock for about as long as the build (minutes), so upgrade a large deployment in a
-- quiet hour. A graph that does not fit in maintenance_work_mem is built many times slower, so the build
-- gets ~2.6 kB per chunk (PostgreSQL's row estimate) when the server's setting is smaller, up to 4GB.
DO $$
DECLARE
    wanted_kb bigint := least(4 * 1024 * 1024,
                              greatest(0, (SELECT reltuples FROM pg_class WHERE oid = 'chunks'::regclass)) * 2.6)::bigint;
BEGIN
    IF wanted_kb > (SELECT setting::bigint FROM pg_settings WHERE name = 'maintenance_work_mem') THEN
        PERFORM set_config('maintenance_work_mem', wanted_kb || 'kB', true);
    END IF;
END $$;
DROP INDEX IF EXISTS chunks_embedding_hnsw;
CREATE INDEX chunks_embedding_hnsw ON chunks USING hnsw (embedding vector_cosine_ops)
    WITH (m = 24, ef_construction = 128);
