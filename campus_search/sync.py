"""Sync files, folders and BEIR ``.jsonl`` corpora into the index (``campus-search ingest``).

Each path given is parsed and ingested through :meth:`Ingester.ingest`, which embeds only what
changed. With ``prune=True`` a path is also a *scope*: afterwards, documents whose source lies under
a synced folder (or came from a synced corpus file) but that this run did not see are deleted — the
files were removed, renamed, or now carry another ``id``. Pruning is conservative, because deleting
by mistake is worse than keeping a stale document one more run:

- a file that failed to parse keeps its previously ingested version (the error is reported);
- a folder that could not be listed, or a corpus file with unreadable lines, is not pruned at all;
- nothing is pruned if the run stops early (an exception propagates before pruning starts).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CampusSearchError, IngestError
from .ingest import Ingester, IngestReport, Progress
from .metadata import AccessMetadata
from .parsers import ParsedDocument, discover, parse_file, read_jsonl

log = logging.getLogger(__name__)


@dataclass
class _Scope:
    """One path given on the command line, and what this run saw under it."""

    path: Path
    prefix: str | None  # source prefix that --prune may delete under; None: nothing to prune
    ids: set[str] = field(default_factory=set)
    failed_sources: set[str] = field(default_factory=set)
    complete: bool = True


def _scope(path: Path) -> _Scope:
    resolved = path.resolve()
    if path.is_dir():
        return _Scope(path, str(resolved).rstrip("/") + "/")
    if path.is_file() and path.suffix.lower() == ".jsonl":
        return _Scope(path, f"{resolved}:")
    return _Scope(path, None)


def _count(scope: _Scope) -> int:
    """Documents a path will yield (for the progress bar's ETA); a cheap pre-pass."""
    try:
        if scope.path.is_file() and scope.path.suffix.lower() == ".jsonl":
            with scope.path.open(encoding="utf-8", errors="replace") as fh:
                return sum(1 for line in fh if line.strip())
        return sum(1 for _ in discover([scope.path]))
    except (CampusSearchError, OSError):
        return 1  # reported as one failure when the run reaches it


def _items(scope: _Scope) -> Iterator[ParsedDocument | CampusSearchError]:
    path = scope.path
    if path.is_file() and path.suffix.lower() == ".jsonl":
        try:
            for item in read_jsonl(path):
                if isinstance(item, ParsedDocument):
                    scope.ids.add(item.external_id)
                else:
                    scope.complete = False
                yield item
        except CampusSearchError as exc:
            scope.complete = False
            yield exc
        return
    try:
        found = list(discover([path]))
    except CampusSearchError as exc:
        scope.complete = False
        yield exc
        return
    for file, root in found:
        try:
            doc = parse_file(file, root)
        except CampusSearchError as exc:
            scope.failed_sources.add(str(file.resolve()))
            yield exc
            continue
        scope.ids.add(doc.external_id)
        yield doc


def documents(paths: Sequence[Path]) -> Iterator[ParsedDocument | CampusSearchError]:
    """Every document ``paths`` yield, parsed as ingestion would parse them (problems as errors)."""
    for path in paths:
        yield from _items(_scope(path))


def sync_paths(ingester: Ingester, paths: Sequence[Path], defaults: AccessMetadata | None = None, *,
               prune: bool = False, progress: Progress | None = None,
               on_total: Progress | None = None) -> IngestReport:
    """Ingest ``paths`` (files, folders, ``.jsonl`` corpora); with ``prune``, delete what is gone.

    ``on_total(total, report)`` is called once before ingesting with the number of documents ahead
    (for a progress bar). Returns the report; ``report.deleted`` counts pruned documents."""
    scopes = [_scope(p) for p in paths]
    if on_total is not None:
        on_total(sum(_count(s) for s in scopes), IngestReport())

    def items() -> Iterator[ParsedDocument | CampusSearchError]:
        for scope in scopes:
            yield from _items(scope)

    report = ingester.ingest((i if not isinstance(i, CampusSearchError) or isinstance(i, IngestError)
                              else IngestError(i.message) for i in items()), defaults, progress=progress)
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
