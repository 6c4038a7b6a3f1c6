"""Ingestion: parsed documents -> chunks -> embeddings -> PostgreSQL, idempotently.

Per document, by content hash:
- unchanged content and metadata: nothing happens;
- only metadata changed (e.g. clearance raised): the document row is updated in place (access metadata
  lives there only, migration 017), no chunk is touched, nothing is embedded;
- content changed or new: re-chunked; chunks whose embedding input is unchanged reuse their stored
  vector (matched by hash), only new text is embedded; the old chunks are replaced in one transaction,
  so a search sees the old version or the new one, never a mixture.
Every change bumps ``index_state.generation``, which is part of every cache key.

Access metadata follows the one rule of :func:`campus_search.ingest.metadata.resolve` (SPEC §2 "How access
metadata changes"): fields no source states keep their stored value, a loosening applies only with
``allow_loosening`` (else the stored access is kept and the document is reported as held back),
fields an admin pinned through the API only tighten, and a new document whose visibility nobody
states gets ``DEFAULT_VISIBILITY``. A document belongs to its source: an id whose stored document
came from another file (that still exists) or from the API is refused, never overwritten, and so is
the second of two files that claim one id in a run.

Chunks are written in exactly two places: :meth:`Ingester._replace` (new or changed content) and
:meth:`Ingester.delete` (which :meth:`Ingester.prune` uses); access metadata is written to the
document row only (:meth:`Ingester._write_metadata`), where retrieval reads it; a run's metadata-only
changes are written together at its end, in one transaction (:meth:`Ingester._apply_metadata`). Folder sync (walking,
``--prune`` scopes) is in :mod:`.sync`.

Every document is checked before anything is written (:meth:`Ingester._checked`): its id and text
follow :mod:`.textrules` (titles are shortened to their caps, NUL characters and lone surrogates
refuse the document), it has at most ``MAX_DOCUMENT_CHARS`` characters and, once chunked, at most
``MAX_DOCUMENT_CHUNKS`` chunks. A document that fails is reported; the rest of its batch is stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from campus_search.embedding.base import MAX_SEQ_LENGTH, Embedder
from campus_search.errors import BadRequest, CampusSearchError, IngestError
from campus_search.ingest.chunking import (
    CHUNKER_VERSION,
    DEFAULT_MAX_TOKENS,
    DEFAULT_OVERLAP,
    Chunk,
    chunk_blocks,
    embedding_text,
)
from campus_search.ingest.formats import DEFAULT_LIMITS, ParseLimits
from campus_search.ingest.metadata import METADATA_FIELDS, AccessMetadata, Change, Resolution, check_keys, resolve
from campus_search.ingest.sources import ParsedDocument
from campus_search.ingest.textrules import MAX_SECTION_TITLE_CHARS, MAX_TITLE_CHARS, id_problem, shorten, text_problem
from campus_search.security.access import columns
from campus_search.storage.db import Database
from campus_search.storage.index_state import compact_lexical

#: The metadata columns (security.access declares them): a stored row is
#: (external_id, id, content_hash, *metadata, source, pinned)
_META = columns()
_SET = ", ".join(f"{n}=%s" for n in METADATA_FIELDS)
_SOURCE = 3 + len(METADATA_FIELDS)


def _stored(row: Any) -> AccessMetadata:
    return AccessMetadata.from_row(row[3:_SOURCE])

log = logging.getLogger(__name__)

DOC_BATCH = 64  # documents per embedding batch / transaction
DEFAULT_MAX_CHUNKS = 5000  # MAX_DOCUMENT_CHUNKS
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
    chunks_given: int = 0  # stored with a precomputed vector (``ingest --vectors``), not embedded here
    loosened: int = 0  # documents whose access was loosened, by an explicit act (audited)
    held_back: int = 0  # documents whose source asked for looser access: the stored access was kept
    defaulted: int = 0  # new documents that got DEFAULT_VISIBILITY because nobody stated one
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # reported, not failures (held back, pinned, defaults)
    access_changes: list[dict[str, Any]] = field(default_factory=list)  # loosenings applied: before/after
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("errors", "notes", "access_changes")}
        out["errors"] = self.errors[:50]
        out["notes"] = self.notes[:50]
        out["access_changes"] = self.access_changes[:50]
        return out


@dataclass
class _Pending:
    doc: ParsedDocument
    given: dict[str, Any]  # metadata its sources state
    content_hash: str
    meta: AccessMetadata = field(default_factory=AccessMetadata)  # resolved against what is stored
    existing: tuple[Any, ...] | None = None
    chunks: list[Chunk] = field(default_factory=list)
    chunk_hashes: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # what the model reads per chunk
    loosening: dict[str, Any] | None = None  # the access this write loosens (before/after), if any
    loosening_note: str = ""


@dataclass
class MetadataUpdate:
    """What :meth:`Ingester.update_metadata` did (for the API response and the audit record)."""

    before: AccessMetadata
    after: AccessMetadata
    loosened: list[Change]
    pinned: list[str]


class LooseningRefused(CampusSearchError):
    """A write would loosen access without an explicit act (``"allow_loosening": true``)."""

    status = 409
    code = "loosening_refused"


_JSONL_SOURCE = re.compile(r"^(.*\.jsonl):\d+$", re.I)


def _owner(source: str) -> str:
    m = _JSONL_SOURCE.match(source)
    return m.group(1) if m else source


def same_owner(stored: str | None, new: str | None) -> bool:
    """Whether a write from ``new`` may replace the document stored from ``stored``: the same file (or
    corpus file), the API for an API document, or a file that no longer exists (a moved file keeping
    its ``id:``). Documents without a recorded source (older rows, programmatic callers) are open."""
    if stored is None or new is None:
        return True
    if stored.startswith("api:") or new.startswith("api:"):
        return stored.startswith("api:") and new.startswith("api:")
    old = _owner(stored)
    return old == _owner(new) or not os.path.lexists(old)


def stated(defaults: Mapping[str, Any] | AccessMetadata | None) -> dict[str, Any]:
    """Defaults as the fields they state. An :class:`AccessMetadata` states every field that has a value."""
    if defaults is None:
        return {}
    if isinstance(defaults, AccessMetadata):
        return defaults.stated()
    return dict(defaults)


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


def _loosening_is_audited(allow_loosening: bool, audit: AuditHook | None) -> None:
    """The explicit act that lets a write loosen access comes with the hook that records it: without one a
    loosening would be applied with no audit record, which no writer may do (SPEC §2). The CLI and the
    admin API always pass one (cli.main.LooseningAudit, api.documents)."""
    if allow_loosening and audit is None:
        raise ValueError("allow_loosening=True needs an audit hook: a loosening is recorded with before and after "
                         "in the transaction that applies it (e.g. campus_search.cli.main.LooseningAudit)")


class Ingester:
    def __init__(self, db: Database, embedder: Embedder, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 overlap: int = DEFAULT_OVERLAP, default_visibility: str = "department",
                 limits: ParseLimits = DEFAULT_LIMITS, max_chunks: int = DEFAULT_MAX_CHUNKS) -> None:
        self.db = db
        self.embedder = embedder
        self.max_tokens = max_tokens
        self.overlap = overlap
        #: precomputed vectors by chunk hash (``campus-search ingest --vectors``, :mod:`.vectors`)
        self.given_vectors: Mapping[str, np.ndarray] = {}
        self.default_visibility = default_visibility
        self.limits = limits  # what parsers may spend on one file (sync.py passes them on)
        self.max_chunks = max_chunks

    def ingest(self, items: Iterable[ParsedDocument | IngestError],
               defaults: Mapping[str, Any] | AccessMetadata | None = None, *, allow_loosening: bool = False,
               respect_pins: bool = True, progress: Progress | None = None,
               audit: AuditHook | None = None) -> IngestReport:
        """Ingest documents. ``defaults`` are fields stated for every document (the CLI flags); a
        document's own metadata wins over them, and both are resolved against what is stored
        (:func:`~campus_search.ingest.metadata.resolve`). ``allow_loosening`` is the explicit act that lets
        a write loosen access, and needs ``audit``: a loosening is audited with before and after, in the
        transaction that applies it (SPEC §2), so asking for one without a hook raises ValueError before
        anything is written. ``respect_pins=False`` only for the API, which owns the pins.
        ``audit(conn, report)`` is called last in each batch's write transaction."""
        _loosening_is_audited(allow_loosening, audit)
        report = IngestReport()
        started = time.perf_counter()
        base = stated(defaults)
        batch: list[_Pending] = []
        deferred: list[_Pending] = []  # metadata-only changes: all applied at the end, in one transaction
        claimed: dict[str, _Pending] = {}  # ids taken by this run's documents so far, in any batch
        seen = 0
        for item in items:
            seen += 1
            if isinstance(item, IngestError):
                self._fail(report, item.message)
                continue
            try:
                item = self._checked(item)
                check_keys(item.metadata, METADATA_FIELDS, item.source or item.external_id)
                if not item.blocks:
                    raise IngestError(f"{item.source or item.external_id}: no text found")
                wanted = {**base, **item.metadata}
                for value in (v for stated_value in wanted.values()
                              for v in (stated_value if isinstance(stated_value, list | tuple) else (stated_value,))):
                    if isinstance(value, str) and (problem := text_problem(value)):
                        raise IngestError(f"{item.source or item.external_id}: metadata {problem}")
                pending = _Pending(item, wanted, _content_hash(item, self.embedder.model_name))
            except (BadRequest, IngestError) as exc:
                self._fail(report, exc.message)
                continue
            batch.append(pending)
            if len(batch) >= DOC_BATCH:
                self._flush(batch, report, allow_loosening, respect_pins, audit, deferred, claimed)
                batch = []
                if progress:
                    progress(seen, report)
        if batch:
            self._flush(batch, report, allow_loosening, respect_pins, audit, deferred, claimed)
        if deferred:
            self._apply_metadata(deferred, report, audit)
        if progress:
            progress(seen, report)
        report.seconds = time.perf_counter() - started
        return report

    def _checked(self, doc: ParsedDocument) -> ParsedDocument:
        """``doc`` with its titles capped, or an IngestError if it cannot be stored (see the module
        docstring and :mod:`.textrules`)."""
        where = doc.source or doc.external_id
        if (problem := text_problem(where)) is not None:
            raise IngestError(f"{ascii(where)}: the file name {problem}")
        if (problem := id_problem(doc.external_id)) is not None:
            raise IngestError(f"{where}: id {ascii(doc.external_id)[:80]}: {problem}")
        total = 0
        for text in (doc.title, *(b.text for b in doc.blocks), *{b.section_title or "" for b in doc.blocks}):
            if (problem := text_problem(text)) is not None:
                hint = " (a binary, UTF-16 or damaged file?)" if "NUL" in problem else ""
                raise IngestError(f"{where}: text {problem}{hint}")
            total += len(text)
        if total > self.limits.max_chars:
            raise IngestError(f"{where}: more than {self.limits.max_chars:,} characters of text "
                              "(MAX_DOCUMENT_CHARS); split the document or raise the limit")
        title = shorten(doc.title, MAX_TITLE_CHARS)
        # text without a heading has the document title as its section (parsers.ParsedDocument): it stays
        # equal to the title, capped the same way, so the model does not read the title twice
        sections = {b.section_title: title if b.section_title == doc.title
                    else shorten(b.section_title, MAX_SECTION_TITLE_CHARS)
                    for b in doc.blocks if b.section_title and len(b.section_title) > MAX_SECTION_TITLE_CHARS}
        blocks = [dataclasses.replace(b, section_title=sections[b.section_title])
                  if b.section_title in sections else b for b in doc.blocks] if sections else doc.blocks
        return dataclasses.replace(doc, title=title, blocks=blocks)

    @staticmethod
    def _fail(report: IngestReport, message: str) -> None:
        report.failed += 1
        report.errors.append(message)
        log.debug("skipped: %s", message)  # the caller reports IngestReport.errors

    def _resolve(self, batch: list[_Pending], report: IngestReport, allow_loosening: bool,
                 respect_pins: bool, claimed: dict[str, _Pending]) -> list[_Pending]:
        """Identity and access checks against the stored rows; returns the documents to write. ``claimed``:
        the ids this run has taken so far (in earlier batches too); a second document with one fails."""
        with self.db.connection() as conn:
            rows = conn.execute(
                f"SELECT external_id, id, content_hash, {_META}, source, pinned FROM documents "
                "WHERE external_id = ANY(%s)",
                (list({p.doc.external_id for p in batch}),)).fetchall()
        stored = {row[0]: row for row in rows}
        out: list[_Pending] = []
        for p in batch:
            doc_id, where = p.doc.external_id, p.doc.source or p.doc.external_id
            row = stored.get(doc_id)
            if row is not None and not same_owner(row[_SOURCE], p.doc.source):
                self._fail(report, f"{where}: refused: id {doc_id!r} belongs to the document from {row[_SOURCE]}; a "
                                   f"file cannot replace another source's document (give it its own id:, or "
                                   f"ingest the common parent folder so relative paths differ)")
                continue
            if doc_id in claimed:
                self._fail(report, f"{where}: refused: id {doc_id!r} is also the id of "
                                   f"{claimed[doc_id].doc.source or doc_id} in this run; ids must be unique "
                                   f"(give it its own id:, or ingest the common parent folder)")
                continue
            try:
                res = resolve(_stored(row) if row else None, p.given, allow_loosening=allow_loosening,
                              pinned=(row[_SOURCE + 1] or ()) if row and respect_pins else (),
                              default_visibility=self.default_visibility, source=where)
            except BadRequest as exc:
                self._fail(report, exc.message)
                continue
            claimed[doc_id] = p
            p.meta, p.existing = res.meta, row
            self._note(report, p, res)
            out.append(p)
        return out

    @staticmethod
    def _note(report: IngestReport, p: _Pending, res: Resolution) -> None:
        where = p.doc.source or p.doc.external_id
        if res.defaults:
            report.defaulted += 1
            report.notes.append(f"{where}: new document, nobody stated its visibility: "
                                f"{res.defaults['visibility']!r} applied (DEFAULT_VISIBILITY)")
        if res.pinned:
            report.notes.append(f"{where}: kept (pinned by an admin through the API): "
                                + ", ".join(f"{c.field} {c.before!r} (source says {c.after!r})" for c in res.pinned))
        if res.held_back:
            report.held_back += 1
            report.notes.append(f"{where}: held back, access not loosened: "
                                + ", ".join(f"{c.field} stays {c.before!r} (source says {c.after!r})"
                                            for c in res.held_back) + "; re-run with --allow-loosening to apply")
        if res.loosened and res.before is not None:  # reported once written (_written), in its transaction
            p.loosening = {"document_id": p.doc.external_id, "source": p.doc.source,
                           "before": res.before.as_json(), "after": res.meta.as_json(),
                           "loosened": [c.as_json() for c in res.loosened]}
            p.loosening_note = (f"{where}: access loosened (--allow-loosening): "
                                + ", ".join(str(c) for c in res.loosened))

    @staticmethod
    def _written(report: IngestReport, written: Iterable[_Pending]) -> None:
        """Inside the write transaction, before its audit hook: the loosenings these written documents
        carry join ``report.access_changes`` (with a note), so the hook records exactly the ones that
        commit with it -- none that another writer's change kept from being written."""
        for p in written:
            if p.loosening is None:
                continue
            report.loosened += 1
            report.access_changes.append(p.loosening)
            report.notes.append(p.loosening_note)

    def _flush(self, batch: list[_Pending], report: IngestReport, allow_loosening: bool, respect_pins: bool,
               audit: AuditHook | None, deferred: list[_Pending], claimed: dict[str, _Pending]) -> None:
        """Write one batch: new and changed documents (embedded here) in one transaction. Metadata-only
        changes go to ``deferred`` (:meth:`_apply_metadata` writes them all at the end of the run)."""
        batch = self._resolve(batch, report, allow_loosening, respect_pins, claimed)
        unchanged: list[_Pending] = []
        meta_only: list[_Pending] = []
        changed: list[_Pending] = []
        for p in batch:
            if p.existing is None or p.existing[2] != p.content_hash:
                changed.append(p)
                continue
            stored = _stored(p.existing)
            (unchanged if stored == p.meta else meta_only).append(p)
        report.unchanged += len(unchanged)
        moved = [p for p in unchanged if p.doc.source and p.existing and p.existing[_SOURCE] != p.doc.source]
        for p in meta_only:
            p.doc = dataclasses.replace(p.doc, blocks=[])  # only its id, source and metadata are needed
        deferred.extend(meta_only)
        if changed:
            changed = self._prepare_chunks(changed, report)
            vectors = self._vectors_for(changed, report)
        with self.db.connection() as conn:
            current = self._still_current(conn, [*moved, *changed], report)
            for p in moved:  # same content from another path (or an old relative path): keep prune exact
                if id(p) in current:
                    assert p.existing is not None
                    conn.execute("UPDATE documents SET source = %s WHERE id = %s", (p.doc.source, p.existing[1]))
            done: list[_Pending] = []  # written in this transaction
            for p in changed:
                if id(p) not in current:
                    continue  # reported by _still_current
                if not self._replace(conn, p, vectors):
                    self._fail(report, f"{p.doc.source or p.doc.external_id}: another writer changed document "
                                       f"{p.doc.external_id!r} while this run was writing it; nothing written, "
                                       f"run again")
                    continue
                done.append(p)
                if p.existing is None:
                    report.added += 1
                else:
                    report.updated += 1
                report.chunks_written += len(p.chunks)
            if done:
                self.db.bump_generation(conn)
            self._written(report, done)
            if audit is not None:
                audit(conn, report)
        if done:
            self.compact()

    def compact(self) -> None:
        """Fold the lexical statistics deltas of committed writes (:func:`.index_state.compact_lexical`), in a short
        transaction of its own after the write: writers only insert deltas, so they never queue on a shared
        counter row, and this keeps the delta tables small."""
        with self.db.connection() as conn:
            compact_lexical(conn)

    def _still_current(self, conn: Any, pending: list[_Pending], report: IngestReport) -> set[int]:
        """Inside the write transaction: lock the stored rows this batch decided on and keep only the
        documents whose row is exactly as it was read (``id()`` of each :class:`_Pending` kept). A row
        another writer changed meanwhile (a PATCH, a pin, another sync) is not overwritten with a
        decision taken on a stale read: that document fails for this run, loudly. New documents are
        kept here; :meth:`_replace` refuses them if someone created the id meanwhile."""
        ids = sorted({p.existing[1] for p in pending if p.existing is not None})
        fresh = {}
        if ids:
            fresh = {row[1]: tuple(row) for row in conn.execute(
                f"SELECT external_id, id, content_hash, {_META}, source, pinned FROM documents "
                "WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                (ids,)).fetchall()}
        keep: set[int] = set()
        for p in pending:
            if p.existing is None or fresh.get(p.existing[1]) == tuple(p.existing):
                keep.add(id(p))
            else:
                self._fail(report, f"{p.doc.source or p.doc.external_id}: another writer changed document "
                                   f"{p.doc.external_id!r} while this run was reading it; nothing written, run again")
        return keep

    def _prepare_chunks(self, pending: list[_Pending], report: IngestReport) -> list[_Pending]:
        """Chunk each document; those with more than ``max_chunks`` chunks fail and are left out."""
        model = self.embedder.model_name
        kept: list[_Pending] = []
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
            if len(p.chunks) > self.max_chunks:
                self._fail(report, f"{p.doc.source or p.doc.external_id}: {len(p.chunks):,} chunks, more than "
                                   f"{self.max_chunks:,} (MAX_DOCUMENT_CHUNKS); split the document or raise the limit")
                continue
            p.inputs = [f"{head(c.section_title)[0]}\n{c.text}" if head(c.section_title)[0] else c.text
                        for c in p.chunks]
            p.chunk_hashes = [_chunk_hash(model, text) for text in p.inputs]
            kept.append(p)
        return kept

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
                if h in vectors:
                    continue
                given = self.given_vectors.get(h)
                if given is not None:
                    vectors[h] = given
                    report.chunks_given += 1
                else:
                    todo[h] = text
        if todo:
            hashes = list(todo)
            embedded = self.embedder.embed([todo[h] for h in hashes])
            if embedded.shape[1] != self.embedder.dimension:
                raise IngestError(f"embedding dimension {embedded.shape[1]} != index {self.embedder.dimension}")
            vectors.update(zip(hashes, embedded, strict=True))
            report.chunks_embedded += len(hashes)
        return vectors

    def chunk_inputs(self, docs: Iterable[ParsedDocument],
                     report: IngestReport | None = None) -> Iterator[tuple[str, str]]:
        """``(chunk hash, exact text to embed)`` for every chunk ingestion would make of ``docs``, through
        the same checks and chunking (``campus-search chunks``: inputs for an embedding farm,
        :mod:`.vectors`). Documents ingestion would refuse are left out and counted in ``report``."""
        report = report if report is not None else IngestReport()
        for doc in docs:
            try:
                doc = self._checked(doc)  # titles capped as ingest caps them: the hashes must match
            except IngestError as exc:
                self._fail(report, exc.message)
                continue
            for p in self._prepare_chunks([_Pending(doc, {}, "")], report):
                yield from zip(p.chunk_hashes, p.inputs, strict=True)

    @staticmethod
    def _meta_params(meta: AccessMetadata) -> tuple[Any, ...]:
        return meta.row()

    def _write_metadata(self, conn: Any, rows: list[tuple[int, AccessMetadata, str | None]]) -> None:
        """Store (document pk, metadata, source) rows in ``conn``'s transaction. Access lives on the
        document row only (migration 017): no chunk, posting or vector index entry is touched, so a change
        of any size is one short transaction, and a search sees all of it or none."""
        if rows:
            with conn.cursor() as cur:
                cur.executemany(f"UPDATE documents SET {_SET}, source=%s, updated_at=now() WHERE id=%s",
                                [(*self._meta_params(meta), source, doc_id) for doc_id, meta, source in rows])

    def _apply_metadata(self, pending: list[_Pending], report: IngestReport, audit: AuditHook | None) -> None:
        """The run's metadata-only changes: a department-wide change (a folder's ``.campus-search.yaml``,
        ``--visibility`` over a tree) becomes visible to searches all at once, never half-applied batch by
        batch. Two transactions at most: first every change that loosens nothing, then the loosenings (with
        their audit records, ``audit``), so a loosening that cannot be audited rolls back alone and never
        takes a tightening with it; between the two, what searches see is only ever tighter. Rows another
        writer changed since they were read fail loudly (:meth:`_still_current`), as in a batch."""
        tighter = [p for p in pending if p.loosening is None]
        looser = [p for p in pending if p.loosening is not None]
        for group in (tighter, looser):
            if group:
                self._apply_metadata_group(group, report, audit)

    def _apply_metadata_group(self, pending: list[_Pending], report: IngestReport, audit: AuditHook | None) -> None:
        with self.db.connection() as conn:
            current = self._still_current(conn, pending, report)
            todo = [p for p in pending if id(p) in current and p.existing is not None]
            self._write_metadata(conn, [(p.existing[1], p.meta, p.doc.source) for p in todo if p.existing])
            report.metadata_updated += len(todo)
            if todo:
                self.db.bump_generation(conn)
            self._written(report, todo)
            if audit is not None:
                audit(conn, report)

    def _replace(self, conn: Any, p: _Pending, vectors: Mapping[str, np.ndarray]) -> bool:
        """Write a new or changed document and its chunks. A document that was new when read but
        whose id another writer created meanwhile is not written (returns False): never an overwrite."""
        params = self._meta_params(p.meta)
        on_conflict = ("DO NOTHING" if p.existing is None else
                       "DO UPDATE SET title=EXCLUDED.title, source=EXCLUDED.source, "
                       "content_hash=EXCLUDED.content_hash, "
                       + ", ".join(f"{n}=EXCLUDED.{n}" for n in METADATA_FIELDS) + ", updated_at=now()")
        row = conn.execute(
            f"INSERT INTO documents (external_id, title, source, content_hash, {_META}) "
            f"VALUES (%s,%s,%s,%s,{', '.join(['%s'] * len(METADATA_FIELDS))}) "
            f"ON CONFLICT (external_id) {on_conflict} RETURNING id",
            (p.doc.external_id, p.doc.title, p.doc.source, p.content_hash, *params)).fetchone()
        if row is None:
            return False
        doc_id = row[0]
        conn.execute("DELETE FROM chunks WHERE document_id = %s", (doc_id,))
        with conn.cursor().copy(
                "COPY chunks (document_id, chunk_index, section_title, page_number, text, content_hash, "
                "embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "int4", "text", "int4", "text", "text", "vector"])
            for i, (c, h) in enumerate(zip(p.chunks, p.chunk_hashes, strict=True)):
                copy.write_row((doc_id, i, c.section_title, c.page_number, c.text, h, vectors[h]))
        return True

    def update_metadata(self, external_id: str, overrides: Mapping[str, Any], *, allow_loosening: bool = False,
                        unpin: Collection[str] = (), audit: AuditHook | None = None) -> MetadataUpdate | None:
        """Change a stored document's access metadata in place (no re-embedding): the admin API's
        PATCH. Fields given replace (``None`` clears), the rest stay; a loosening raises
        :class:`LooseningRefused` unless ``allow_loosening``. The fields given become *pinned*: file
        writers (sync) change them afterwards only to tighten, until ``unpin`` names them. Returns
        what happened, or None if there is no such document. Takes effect for the next search.
        ``audit(conn, update)`` is called last in the transaction when the document exists; with
        ``allow_loosening`` it is required (ValueError without it, as :meth:`ingest`)."""
        _loosening_is_audited(allow_loosening, audit)
        with self.db.connection() as conn:
            row = conn.execute(
                f"SELECT id, {_META}, source, pinned FROM documents WHERE external_id = %s FOR UPDATE",
                (external_id,)).fetchone()
            if row is None:
                return None
            before = AccessMetadata.from_row(row[1:1 + len(METADATA_FIELDS)])
            source, pins = row[1 + len(METADATA_FIELDS):]
            res = resolve(before, overrides, allow_loosening=True, source="metadata")
            if res.loosened and not allow_loosening:
                raise LooseningRefused(
                    "this change loosens access (" + "; ".join(str(c) for c in res.loosened)
                    + "); send \"allow_loosening\": true to confirm",
                    details={"loosened": [c.as_json() for c in res.loosened]})
            pinned = sorted((set(pins or ()) | {k for k in overrides if k in METADATA_FIELDS}) - set(unpin))
            doc = ParsedDocument(external_id=external_id, title="", blocks=[], source=source)
            if res.meta != before:
                self._write_metadata(conn, [(row[0], res.meta, doc.source)])
                self.db.bump_generation(conn)
            if pinned != sorted(pins or ()):
                conn.execute("UPDATE documents SET pinned = %s WHERE id = %s", (pinned, row[0]))
            update = MetadataUpdate(before, res.meta, res.loosened, pinned)
            if audit is not None:
                audit(conn, update)
        return update

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
                self.db.bump_generation(conn)
                if audit is not None:
                    audit(conn, n)
        if n:
            self.compact()
        return n
