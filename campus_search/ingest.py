"""Ingestion: parsed documents -> chunks -> embeddings -> PostgreSQL, idempotently.

Per document, by content hash:
- unchanged content and metadata: nothing happens;
- only metadata changed (e.g. clearance raised): documents and chunks are updated in place, no embedding;
- content changed or new: re-chunked; chunks whose embedding input is unchanged reuse their stored
  vector (matched by hash), only new text is embedded; the old chunks are replaced in one transaction,
  so a search sees the old version or the new one, never a mixture.
Every change bumps ``index_state.generation``, which is part of every cache key.

Chunks are written in exactly three places: :meth:`Ingester._replace` (new or changed content),
:meth:`Ingester._update_metadata` (access metadata copied onto chunks) and :meth:`Ingester.delete`
(which :meth:`Ingester.prune` uses). Folder sync (walking, ``--prune`` scopes) is in :mod:`.sync`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .chunking import (
    CHUNKER_VERSION,
    DEFAULT_MAX_TOKENS,
    DEFAULT_OVERLAP,
    Chunk,
    chunk_blocks,
    embedding_text,
)
from .db import Database
from .embedding import MAX_SEQ_LENGTH, Embedder
from .errors import BadRequest, IngestError
from .metadata import FIELDS as META_FIELDS
from .metadata import AccessMetadata
from .parsers import ParsedDocument

log = logging.getLogger(__name__)

DOC_BATCH = 64  # documents per embedding batch / transaction
HEAD_SHARE = 4  # the title/section prefix takes at most 1/HEAD_SHARE of the model's window


@dataclass
class IngestReport:
    added: int = 0
    updated: int = 0
    metadata_updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    failed: int = 0
    chunks_written: int = 0
    chunks_embedded: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "errors"}
        out["errors"] = self.errors[:50]
        return out


@dataclass
class _Pending:
    doc: ParsedDocument
    meta: AccessMetadata
    content_hash: str
    existing: tuple[Any, ...] | None = None
    chunks: list[Chunk] = field(default_factory=list)
    chunk_hashes: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # what the model reads per chunk


def _content_hash(doc: ParsedDocument, model: str) -> str:
    payload = json.dumps([CHUNKER_VERSION, model, doc.title,
                          [[b.text, b.section_title, b.page_number] for b in doc.blocks]],
                         ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _chunk_hash(model: str, text: str) -> str:
    return hashlib.sha256(f"{model}\x00{text}".encode()).hexdigest()


Progress = Callable[[int, IngestReport], None]
#: Called last inside a write transaction (``audit.AdminChange.record_in``): the change's audit record
#: commits with it, and an exception from it rolls the change back.
AuditHook = Callable[[Any, Any], None]


def lock_index_for_writing(conn: Any) -> None:
    """Take the writers' first lock (the ``lexical_stats`` row) in this transaction.

    Lock order for every writer: the stats row, then document rows, then terms. Statements that write
    chunks or documents take it by trigger (migrations 007 and 010); a writer that locks a document row
    by ``SELECT ... FOR UPDATE`` must call this first, or it could hold the row while waiting for the
    stats row held by a batch that wants the same document next (a deadlock)."""
    conn.execute("SELECT 1 FROM lexical_stats FOR UPDATE")


class Ingester:
    def __init__(self, db: Database, embedder: Embedder, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 overlap: int = DEFAULT_OVERLAP) -> None:
        self.db = db
        self.embedder = embedder
        self.max_tokens = max_tokens
        self.overlap = overlap

    def ingest(self, items: Iterable[ParsedDocument | IngestError],
               defaults: AccessMetadata | None = None, *, progress: Progress | None = None,
               audit: AuditHook | None = None) -> IngestReport:
        """Ingest documents (metadata on each document wins over ``defaults``). ``audit(conn, report)``
        is called last in each batch's write transaction."""
        report = IngestReport()
        started = time.perf_counter()
        defaults = defaults or AccessMetadata()
        batch: list[_Pending] = []
        seen = 0
        for item in items:
            seen += 1
            if isinstance(item, IngestError):
                self._fail(report, item.message)
                continue
            try:
                unknown = sorted(set(item.metadata) - set(META_FIELDS))
                if unknown:
                    log.debug("%s: ignoring unknown metadata %s", item.source, unknown)
                meta = defaults.merged(item.metadata, source=item.source or item.external_id)
                if not item.blocks:
                    raise IngestError(f"{item.source or item.external_id}: no text found")
            except (BadRequest, IngestError) as exc:
                self._fail(report, exc.message)
                continue
            batch.append(_Pending(item, meta, _content_hash(item, self.embedder.model_name)))
            if len(batch) >= DOC_BATCH:
                self._flush(batch, report, audit)
                batch = []
                if progress:
                    progress(seen, report)
        if batch:
            self._flush(batch, report, audit)
        if progress:
            progress(seen, report)
        report.seconds = time.perf_counter() - started
        return report

    @staticmethod
    def _fail(report: IngestReport, message: str) -> None:
        report.failed += 1
        report.errors.append(message)
        log.debug("skipped: %s", message)  # the caller reports IngestReport.errors

    def _flush(self, batch: list[_Pending], report: IngestReport, audit: AuditHook | None = None) -> None:
        # A document repeated within one batch: the last occurrence wins.
        by_id = {p.doc.external_id: p for p in batch}
        batch = list(by_id.values())
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT external_id, id, content_hash, department, visibility, clearance_level, campus, "
                "priority, last_reviewed, source FROM documents WHERE external_id = ANY(%s)",
                (list(by_id),)).fetchall()
        for row in rows:
            by_id[row[0]].existing = row
        unchanged: list[_Pending] = []
        meta_only: list[_Pending] = []
        changed: list[_Pending] = []
        for p in batch:
            if p.existing is None or p.existing[2] != p.content_hash:
                changed.append(p)
                continue
            stored = AccessMetadata(*p.existing[3:9])
            (unchanged if stored == p.meta else meta_only).append(p)
        report.unchanged += len(unchanged)
        moved = [p for p in unchanged if p.doc.source and p.existing and p.existing[9] != p.doc.source]
        if changed:
            self._prepare_chunks(changed)
            vectors = self._vectors_for(changed, report)
        with self.db.connection() as conn:
            for p in moved:  # same content from another path (or an old relative path): keep prune exact
                assert p.existing is not None
                conn.execute("UPDATE documents SET source = %s WHERE id = %s", (p.doc.source, p.existing[1]))
            for p in meta_only:
                assert p.existing is not None
                self._update_metadata(conn, p.existing[1], p.meta, p.doc)
            for p in changed:
                self._replace(conn, p, vectors)
                if p.existing is None:
                    report.added += 1
                else:
                    report.updated += 1
                report.chunks_written += len(p.chunks)
            report.metadata_updated += len(meta_only)
            if meta_only or changed:
                conn.execute("UPDATE index_state SET generation = generation + 1")
            if audit is not None:
                audit(conn, report)

    def _prepare_chunks(self, pending: list[_Pending]) -> None:
        model = self.embedder.model_name
        window = int(getattr(self.embedder, "max_seq_length", MAX_SEQ_LENGTH)) - 2  # [CLS] ... [SEP]
        for p in pending:
            heads: dict[str | None, tuple[str, int]] = {}

            def head(section: str | None, title: str = p.doc.title,
                     heads: dict[str | None, tuple[str, int]] = heads) -> tuple[str, int]:
                if section not in heads:
                    heads[section] = self._head(title, section, window // HEAD_SHARE)
                return heads[section]

            def budget(section: str | None) -> int:
                # The title/section prefix shares the model's window with the chunk text; it is capped at
                # a share of the window, so a very long title or heading still leaves room for text.
                return window - head(section)[1]

            p.chunks = chunk_blocks(p.doc.blocks, self.embedder.count_tokens, max_tokens=self.max_tokens,
                                    overlap=self.overlap, max_tokens_for=budget)
            p.inputs = [f"{head(c.section_title)[0]}\n{c.text}" if head(c.section_title)[0] else c.text
                        for c in p.chunks]
            p.chunk_hashes = [_chunk_hash(model, text) for text in p.inputs]

    def _head(self, title: str, section: str | None, cap: int) -> tuple[str, int]:
        """The ``Title — Section`` prefix the model reads before a chunk (chunking.embedding_text), cut
        between words to at most ``cap`` tokens, and its token count."""
        text = embedding_text(title, section, "").strip()
        if not text:
            return "", 0
        n = self.embedder.count_tokens([text])[0]
        if n <= cap:
            return text, n
        words = text.split()
        kept: list[str] = []
        used = 0
        for word, size in zip(words, self.embedder.count_tokens(words), strict=True):
            if used + size > cap:
                break
            kept.append(word)
            used += size
        text = " ".join(kept)
        return text, self.embedder.count_tokens([text])[0] if text else 0

    def _vectors_for(self, pending: list[_Pending], report: IngestReport) -> dict[str, np.ndarray]:
        """Embedding per chunk hash: stored ones reused, the rest embedded in one batch."""
        wanted = {h for p in pending for h in p.chunk_hashes}
        vectors: dict[str, np.ndarray] = {}
        with self.db.connection() as conn:
            for h, emb in conn.execute(
                    "SELECT DISTINCT ON (content_hash) content_hash, embedding FROM chunks "
                    "WHERE content_hash = ANY(%s)", (list(wanted),)):
                vectors[h] = np.asarray(emb.to_numpy() if hasattr(emb, "to_numpy") else emb, dtype=np.float32)
        todo: dict[str, str] = {}
        for p in pending:
            for text, h in zip(p.inputs, p.chunk_hashes, strict=True):
                if h not in vectors:
                    todo[h] = text
        if todo:
            hashes = list(todo)
            embedded = self.embedder.embed([todo[h] for h in hashes])
            if embedded.shape[1] != self.embedder.dimension:
                raise IngestError(f"embedding dimension {embedded.shape[1]} != index {self.embedder.dimension}")
            vectors.update(zip(hashes, embedded, strict=True))
            report.chunks_embedded += len(hashes)
        return vectors

    @staticmethod
    def _meta_params(meta: AccessMetadata) -> tuple[Any, ...]:
        return (meta.department, meta.visibility, meta.clearance_level, meta.campus, meta.priority,
                meta.last_reviewed)

    def _update_metadata(self, conn: Any, doc_id: int, meta: AccessMetadata, doc: ParsedDocument) -> None:
        params = self._meta_params(meta)
        conn.execute(
            "UPDATE documents SET department=%s, visibility=%s, clearance_level=%s, campus=%s, priority=%s, "
            "last_reviewed=%s, source=%s, updated_at=now() WHERE id=%s", (*params, doc.source, doc_id))
        conn.execute(
            "UPDATE chunks SET department=%s, visibility=%s, clearance_level=%s, campus=%s, priority=%s, "
            "last_reviewed=%s WHERE document_id=%s", (*params, doc_id))

    def _replace(self, conn: Any, p: _Pending, vectors: Mapping[str, np.ndarray]) -> None:
        params = self._meta_params(p.meta)
        doc_id = conn.execute(
            "INSERT INTO documents (external_id, title, source, content_hash, department, visibility, "
            "clearance_level, campus, priority, last_reviewed) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (external_id) DO UPDATE SET title=EXCLUDED.title, source=EXCLUDED.source, "
            "content_hash=EXCLUDED.content_hash, department=EXCLUDED.department, "
            "visibility=EXCLUDED.visibility, clearance_level=EXCLUDED.clearance_level, "
            "campus=EXCLUDED.campus, priority=EXCLUDED.priority, last_reviewed=EXCLUDED.last_reviewed, "
            "updated_at=now() RETURNING id",
            (p.doc.external_id, p.doc.title, p.doc.source, p.content_hash, *params)).fetchone()[0]
        conn.execute("DELETE FROM chunks WHERE document_id = %s", (doc_id,))
        with conn.cursor().copy(
                "COPY chunks (document_id, chunk_index, section_title, page_number, text, content_hash, "
                "embedding, department, visibility, clearance_level, campus, priority, last_reviewed) "
                "FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "int4", "text", "int4", "text", "text", "vector", "text", "text", "int2",
                            "text", "int2", "timestamp"])
            for i, (c, h) in enumerate(zip(p.chunks, p.chunk_hashes, strict=True)):
                copy.write_row((doc_id, i, c.section_title, c.page_number, c.text, h, vectors[h], *params))

    def update_metadata(self, external_id: str, overrides: Mapping[str, Any], *,
                        audit: AuditHook | None = None) -> AccessMetadata | None:
        """Change a stored document's access metadata in place (no re-embedding). Returns the new
        metadata, or None if there is no such document. Takes effect for the next search.
        ``audit(conn, meta)`` is called last in the transaction when the document exists."""
        with self.db.connection() as conn:
            lock_index_for_writing(conn)
            row = conn.execute(
                "SELECT id, department, visibility, clearance_level, campus, priority, last_reviewed, source "
                "FROM documents WHERE external_id = %s FOR UPDATE", (external_id,)).fetchone()
            if row is None:
                return None
            meta = AccessMetadata(*row[1:7]).merged(overrides, source="metadata")
            doc = ParsedDocument(external_id=external_id, title="", blocks=[], source=row[7])
            if meta != AccessMetadata(*row[1:7]):
                self._update_metadata(conn, row[0], meta, doc)
                conn.execute("UPDATE index_state SET generation = generation + 1")
            if audit is not None:
                audit(conn, meta)
        return meta

    def stale(self, source_prefix: str, keep_ids: Collection[str], keep_sources: Collection[str] = ()) -> list[str]:
        """External ids of documents whose source starts with ``source_prefix`` (a synced folder +
        "/", or a corpus file + ":") that are neither in ``keep_ids`` nor from ``keep_sources``."""
        with self.db.connection(read=False) as conn:
            rows = conn.execute(
                "SELECT external_id, source FROM documents WHERE starts_with(source, %s)",
                (source_prefix,)).fetchall()
        keep, sources = set(keep_ids), set(keep_sources)
        return sorted(eid for eid, source in rows if eid not in keep and source not in sources)

    def prune(self, source_prefix: str, keep_ids: Collection[str], keep_sources: Collection[str] = ()) -> int:
        """Delete the :meth:`stale` documents under ``source_prefix``; returns how many went."""
        return self.delete(self.stale(source_prefix, keep_ids, keep_sources))

    def delete(self, external_ids: Iterable[str], *, audit: AuditHook | None = None) -> int:
        """Delete documents (and, by cascade, their chunks) in one transaction; returns how many.
        ``audit(conn, n)`` is called last in the transaction when something was deleted."""
        ids = list(external_ids)
        if not ids:
            return 0
        with self.db.connection() as conn:
            n = conn.execute("DELETE FROM documents WHERE external_id = ANY(%s)", (ids,)).rowcount
            if n:
                conn.execute("UPDATE index_state SET generation = generation + 1")
                if audit is not None:
                    audit(conn, n)
        return n
