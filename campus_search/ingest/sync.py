"""Sync files, folders and BEIR ``.jsonl`` corpora into the index (``campus-search ingest``).

Each path given is read through :mod:`.fileguard` (no links out of a folder, no special files, never
``DATA_DIR``), parsed and ingested through :meth:`Ingester.ingest`, which embeds only what
changed. With ``prune=True`` a path is also a *scope*: afterwards, documents whose source lies under
a synced folder (or came from a synced corpus file) but that this run did not see are deleted — the
files were removed, renamed, or now carry another ``id``. Pruning is conservative, because deleting
by mistake is worse than keeping a stale document one more run:

- a file that failed to parse keeps its previously ingested version (the error is reported);
- a folder that could not be listed (wholly or in part: ``os.scandir`` failed anywhere under it), or a
  corpus file with unreadable lines, is not pruned at all;
- a file refused by :mod:`.fileguard` (a link out, a FIFO) keeps its previously ingested version;
- nothing is pruned if the run stops early (an exception propagates before pruning starts).

Whatever goes wrong with one file (or one corpus line) is an error for that file, reported in the
summary: a parser's unexpected exception is logged with its traceback and the run goes on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from campus_search.errors import CampusSearchError, IngestError
from campus_search.ingest.fileguard import Guard, Reader
from campus_search.ingest.formats import DEFAULT_LIMITS, ParseLimits
from campus_search.ingest.metadata import AccessMetadata
from campus_search.ingest.pipeline import AuditHook, Ingester, IngestReport, Progress
from campus_search.ingest.sources import ParsedDocument, list_documents, parse_file, read_jsonl

log = logging.getLogger(__name__)


@dataclass
class _Scope:
    """One path given on the command line, and what this run saw under it."""

    path: Path
    prefix: str | None  # source prefix that --prune may delete under; None: nothing to prune
    ids: set[str] = field(default_factory=set)
    failed_sources: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    complete: bool = True


def _is_jsonl(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".jsonl"


def _scope(path: Path) -> _Scope:
    resolved = path.resolve()
    if path.is_dir():
        return _Scope(path, str(resolved).rstrip("/") + "/")
    if _is_jsonl(path):
        return _Scope(path, f"{resolved}:")
    return _Scope(path, None)


def _count(scope: _Scope, guard: Guard) -> int:
    """Documents a path will yield (for the progress bar's ETA); a cheap pre-pass."""
    try:
        if _is_jsonl(scope.path):
            return _count_lines(scope.path)
        if scope.path.is_dir():
            return len(list_documents(scope.path, guard).files)
        return 1
    except (CampusSearchError, OSError):
        return 1  # reported as one failure when the run reaches it


def _count_lines(path: Path) -> int:
    """Non-blank lines, read in fixed-size blocks (a corpus line may be as long as the file)."""
    count, blank = 0, True
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            for n, part in enumerate(block.split(b"\n")):
                if n:  # a line ended
                    count += not blank
                    blank = True
                blank = blank and not part.strip()
    return count + (not blank)


def _parse_file(file: Path, root: Path, reader: Reader, limits: ParseLimits) -> ParsedDocument:
    try:
        return parse_file(file, root, reader, limits)
    except CampusSearchError:
        raise
    except Exception as exc:  # noqa: BLE001 - one file's surprise must not end the run
        log.warning("%s: could not be parsed", file, exc_info=True)
        raise IngestError(f"{file}: could not be parsed ({exc.__class__.__name__})") from None


def _named_file(path: Path, guard: Guard) -> IngestError | None:
    """Why a path named on the command line (not a folder) cannot be read, or None."""
    if not path.exists():
        return IngestError(f"{path}: no such file or directory")
    if not path.is_file():
        return IngestError(f"{path}: refused: not a regular file (a FIFO, socket or device)")
    if guard.protects(os.path.realpath(path)):
        return IngestError(f"{path}: refused: the service's own data and configuration (DATA_DIR, "
                           f"CAMPUS_SEARCH_CONFIG) are never ingested")
    return None


def _items(scope: _Scope, guard: Guard, limits: ParseLimits) -> Iterator[ParsedDocument | CampusSearchError]:
    path = scope.path
    if not path.is_dir():
        problem = _named_file(path, guard)
        if problem is not None:
            scope.complete = False
            yield problem
            return
    if _is_jsonl(path):
        try:
            for item in read_jsonl(path, limits):
                if isinstance(item, ParsedDocument):
                    scope.ids.add(item.external_id)
                else:
                    scope.complete = False
                yield item
        except CampusSearchError as exc:
            scope.complete = False
            yield exc
        return
    if not path.is_dir():  # one file named directly: its link, if any, is followed (and checked)
        found, reader = [(path, path.parent)], guard.reader(None)
    else:
        listing = list_documents(path, guard)
        scope.complete = scope.complete and listing.complete
        scope.notes.extend(listing.notes)
        for refused, why in listing.refused:
            scope.failed_sources.add(_source_of(refused))
            yield why
        found, reader = [(f, path) for f in listing.files], guard.reader(path)
    for file, root in found:
        try:
            doc = _parse_file(file, root, reader, limits)
        except CampusSearchError as exc:
            scope.failed_sources.add(_source_of(file))
            yield exc
            continue
        scope.ids.add(doc.external_id)
        yield doc


def documents(paths: Sequence[Path], guard: Guard | None = None,
              limits: ParseLimits = DEFAULT_LIMITS) -> Iterator[ParsedDocument | CampusSearchError]:
    """Every document ``paths`` yield, parsed and guarded as ingestion would (problems as errors)."""
    guard = guard or Guard()
    for path in paths:
        yield from _items(_scope(path), guard, limits)


def _source_of(file: Path) -> str:
    """The ``source`` a document from ``file`` was stored with (its folder resolved, not the file:
    a file refused because it became a link keeps the document it was before)."""
    return str(Path(os.path.realpath(file.parent)) / file.name)


def sync_paths(ingester: Ingester, paths: Sequence[Path],
               defaults: Mapping[str, Any] | AccessMetadata | None = None, *, prune: bool = False,
               allow_loosening: bool = False, guard: Guard | None = None, progress: Progress | None = None,
               on_total: Progress | None = None, audit: AuditHook | None = None) -> IngestReport:
    """Ingest ``paths`` (files, folders, ``.jsonl`` corpora); with ``prune``, delete what is gone.

    ``defaults`` are the fields stated for every document (CLI flags); ``allow_loosening`` is the
    explicit act that lets this run loosen stored access (:func:`campus_search.ingest.metadata.resolve`);
    ``guard`` names what must never be read (``Guard.for_settings``: DATA_DIR, the config file).
    ``on_total(total, report)`` is called once before ingesting with the number of documents ahead
    (for a progress bar). ``audit(conn, report)`` is called last in each write transaction (the CLI's
    ``LooseningAudit`` records the loosenings written in it). Returns the report; ``report.deleted``
    counts pruned documents."""
    guard = guard or Guard()
    scopes = [_scope(p) for p in paths]
    limits = ingester.limits
    if on_total is not None:
        on_total(sum(_count(s, guard) for s in scopes), IngestReport())

    def items() -> Iterator[ParsedDocument | CampusSearchError]:
        for scope in scopes:
            yield from _items(scope, guard, limits)

    report = ingester.ingest((i if not isinstance(i, CampusSearchError) or isinstance(i, IngestError)
                              else IngestError(i.message) for i in items()), defaults,
                             allow_loosening=allow_loosening, progress=progress, audit=audit)
    for scope in scopes:
        report.notes.extend(scope.notes)
    if prune:
        for scope in scopes:
            if scope.prefix is None:
                continue
            if not scope.complete:
                message = f"{scope.path}: not pruned (part of it could not be read)"
                report.errors.append(message)
                log.debug("%s", message)  # reported through IngestReport.errors
                continue
            report.deleted += ingester.prune(scope.prefix, scope.ids, scope.failed_sources)
    return report
