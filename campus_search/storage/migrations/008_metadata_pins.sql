-- Fields an admin set through the API (PATCH) are pinned: file writers (campus-search ingest / sync)
-- change a pinned field afterwards only to tighten access, so an emergency clearance raise survives
-- the next sync. PATCH {"unpin": [...]} releases fields. See docs/ingestion.md, "Who may change what".
ALTER TABLE documents ADD COLUMN pinned text[] NOT NULL DEFAULT '{}';
