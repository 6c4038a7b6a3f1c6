-- Every search evaluates the visibility rule on `documents` (through documents_access and the table), so
-- its dead row versions cost every search. A metadata change rewrites documents' access columns (indexed:
-- no HOT update), leaving a dead version and a dead index entry per document until a vacuum; with the
-- default trigger (20 % of the table dead) they stay. Measured on bench_scale.py's 1M corpus (200,000
-- documents) after the day's metadata-change runs left 40,000 dead versions: the student's exact dense
-- scan (its ~2,400 allowed documents, their ~12,000 chunks) read 12,078 documents_access entries for
-- 2,381 live documents, p50 27.5 ms; after VACUUM 24.8 ms, its whole hybrid search p50/p95 40.6/52.9 ->
-- 35.4/46.6 ms (docs/performance.md, "A narrow read spent by weight"). The table is small (~90 bytes a
-- chunk): vacuum it once 1 % of it (plus 500 rows) is dead, analyze it once 1 % changed.
ALTER TABLE documents SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 500,
                           autovacuum_analyze_scale_factor = 0.01, autovacuum_analyze_threshold = 500);
