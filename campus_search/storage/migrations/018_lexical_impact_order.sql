-- Bounded BM25 on the lean postings of migration 017 (issue 14): read a common term's postings in impact
-- order and stop.
--
-- Until now a search scored every posting of every query term through the (term, chunk_id) primary key,
-- so its cost grew with the terms' document frequencies, i.e. with the corpus. This index orders each
-- term's postings by BM25's term-frequency saturation at fixed parameters (k1 0.9, b 0.4, a reference
-- length of 100 terms):  key = tf / (tf + 0.54 + 0.0036 * dl).  For a term with more postings than
-- retrieval/lexical.py's CUT_DF, a search reads the top of the list through this index (IMPACT_KEY there
-- must stay the same expression), keeps the postings whose document the principal may see (a hashed
-- test against the principal's allowed documents, or a primary-key probe of the document), stops after a
-- fixed number of them, scores what it read exactly with the current N, df and avgdl, rescores the best
-- candidates exactly by primary-key probes, and knows a bound on anything it left unread. The key holds
-- nothing that changes as documents arrive (no idf, no average length), so it never goes stale.
--
-- INCLUDE carries what the read needs, so it is index-only: the chunk, its document (the access test),
-- tf and dl (the exact score). Nothing about access is copied: it stays on documents (migration 017).

CREATE INDEX lexical_postings_impact ON lexical_postings
    (term, (tf::float8 / (tf + 0.54::float8 + 0.0036::float8 * dl)) DESC)
    INCLUDE (chunk_id, document_id, tf, dl);

ANALYZE lexical_postings;
