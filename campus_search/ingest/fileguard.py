"""What ingestion may read, and reading it without being led elsewhere (SPEC §2, issue 10).

Ingestion reads only what it was given:

- A folder is walked with ``os.scandir`` without following symbolic links. A link inside it is never
  followed: one whose target lies inside the folder is skipped with a note (the target, if it is a
  document, is ingested once, under its own path); one that leads outside the folder, or nowhere, is
  refused and counts as a failure (exit status 3).
- Only regular files are read. FIFOs, sockets and devices are refused without being opened.
- Nothing under ``DATA_DIR`` or the service's configuration file is ever read, whatever the link: the
  real path of every file is checked *after* it is opened (``/proc/self/fd``), so a link swapped in
  between listing and reading cannot redirect the read. A hard link has no "real path" elsewhere, so
  the secret files (``DATA_DIR/secrets/*``, the configuration file) are also recognised by identity
  (device and inode) wherever a link to them appears. That holds for a file named directly on the
  command line too (it may itself be a link: it is followed, and its target checked).
- A folder that cannot be listed, wholly or in part, is reported and makes its ``--prune`` scope
  incomplete (``Listing.complete``), so nothing is deleted because it could not be seen.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from campus_search.errors import IngestError


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class Guard:
    """Real paths ingestion must never read (``DATA_DIR``, the configuration file), and the files of
    secrets by identity (device, inode), so a hard link to one elsewhere is refused too."""

    protected: tuple[str, ...] = ()
    secret_files: frozenset[tuple[int, int]] = frozenset()

    @classmethod
    def for_settings(cls, settings: object, environ: Mapping[str, str] | None = None) -> Guard:
        env = os.environ if environ is None else environ
        data_dir = getattr(settings, "data_dir", "") or ""
        paths = [data_dir, env.get("CAMPUS_SEARCH_CONFIG", "")]
        secrets: set[tuple[int, int]] = set()
        candidates = [env.get("CAMPUS_SEARCH_CONFIG", "")]
        if data_dir and os.path.isdir(os.path.join(data_dir, "secrets")):
            candidates += [entry.path for entry in os.scandir(os.path.join(data_dir, "secrets"))]
        for path in candidates:
            try:
                st = os.stat(path) if path else None
            except OSError:
                continue
            if st is not None and stat.S_ISREG(st.st_mode):
                secrets.add((st.st_dev, st.st_ino))
        return cls(tuple(os.path.realpath(p) for p in paths if p), frozenset(secrets))

    def protects(self, real: str) -> bool:
        return any(_inside(real, p) for p in self.protected)

    def reader(self, root: Path | None) -> Reader:
        """A reader for files found under the folder ``root`` (links refused, real path must stay
        inside it), or, with ``root=None``, for a file named directly (links followed)."""
        return Reader(self, os.path.realpath(root) if root is not None else None)


@dataclass(frozen=True)
class Reader:
    guard: Guard
    root_real: str | None  # None: a file named directly; its link, if any, is followed

    def exists(self, path: Path) -> bool:
        """Whether something is at ``path`` (a link counts: reading it is then refused, loudly)."""
        return os.path.lexists(path)

    def read(self, path: Path, max_bytes: int | None = None, limit_name: str = "MAX_DOCUMENT_UNPACKED_BYTES") -> bytes:
        """The file's bytes; with ``max_bytes``, a larger file is refused without being read."""
        follow = self.root_real is None
        try:
            st = os.stat(path) if follow else os.lstat(path)
        except OSError as exc:
            raise IngestError(f"{path}: cannot read ({exc.strerror})") from exc
        if stat.S_ISLNK(st.st_mode):
            raise IngestError(f"{path}: refused: a symbolic link (links inside a folder are not followed)")
        if not stat.S_ISREG(st.st_mode):
            raise IngestError(f"{path}: refused: not a regular file (a FIFO, socket or device)")
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise IngestError(f"{path}: cannot read ({exc.strerror})") from exc
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode):
                raise IngestError(f"{path}: refused: not a regular file (a FIFO, socket or device)")
            if (opened.st_dev, opened.st_ino) in self.guard.secret_files:  # a hard link to a secret
                raise IngestError(f"{path}: refused: the service's own data and configuration (DATA_DIR, "
                                  f"CAMPUS_SEARCH_CONFIG) are never ingested")
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")  # what was really opened
            except OSError:
                real = os.path.realpath(path)
            self.check(path, real)
            if max_bytes is not None and opened.st_size > max_bytes:
                raise IngestError(f"{path}: {opened.st_size:,} bytes is over the limit of {max_bytes:,} ({limit_name})")
            with os.fdopen(fd, "rb") as fh:
                fd = -1
                data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)  # a file growing meanwhile
            if max_bytes is not None and len(data) > max_bytes:
                raise IngestError(f"{path}: more than {max_bytes:,} bytes (the limit, {limit_name})")
            return data
        except OSError as exc:
            raise IngestError(f"{path}: cannot read ({exc.strerror})") from exc
        finally:
            if fd >= 0:
                os.close(fd)

    def check(self, path: Path, real: str) -> None:
        if self.guard.protects(real):
            raise IngestError(f"{path}: refused: the service's own data and configuration (DATA_DIR, "
                              f"CAMPUS_SEARCH_CONFIG) are never ingested")
        if self.root_real is not None and not _inside(real, self.root_real):
            raise IngestError(f"{path}: refused: leads outside the folder being ingested")


@dataclass
class Listing:
    """What a folder walk found: documents to read, refusals (failures), notes, and whether every
    folder could be listed."""

    files: list[Path] = field(default_factory=list)
    refused: list[tuple[Path, IngestError]] = field(default_factory=list)  # (path, why)
    notes: list[str] = field(default_factory=list)
    complete: bool = True


def list_folder(root: Path, guard: Guard, wanted: Callable[[Path], bool],
                skip: Callable[[str], bool] = lambda name: False) -> Listing:
    """Regular files under ``root`` for which ``wanted(path)`` holds, sorted. Entries whose name
    ``skip`` matches are ignored silently (hidden files, lock files); links and special files are
    reported; folders that cannot be listed make the listing incomplete."""
    listing = Listing()
    root_real = os.path.realpath(root)
    if guard.protects(root_real):
        listing.refused.append((root, IngestError(f"{root}: refused: the service's own data and configuration "
                                                  f"(DATA_DIR, CAMPUS_SEARCH_CONFIG) are never ingested")))
        listing.complete = False
        return listing
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            listing.complete = False
            listing.refused.append((folder, IngestError(f"{folder}: cannot list the folder "
                                                        f"({exc.strerror or exc}); nothing under it was read")))
            continue
        for entry in entries:
            if skip(entry.name):
                continue
            path = Path(entry.path)
            try:
                if entry.is_symlink():
                    _link(path, root, root_real, guard, listing)
                elif entry.is_dir(follow_symlinks=False):
                    if guard.protects(os.path.realpath(path)):
                        listing.refused.append((path, IngestError(
                            f"{path}: refused: the service's own data (DATA_DIR) is never ingested")))
                    else:
                        stack.append(path)
                elif not entry.is_file(follow_symlinks=False):
                    listing.refused.append((path, IngestError(
                        f"{path}: refused: not a regular file (a FIFO, socket or device)")))
                elif wanted(path):
                    listing.files.append(path)
            except OSError as exc:  # the entry vanished or cannot be examined
                listing.complete = False
                listing.refused.append((path, IngestError(f"{path}: cannot examine ({exc.strerror or exc})")))
    listing.files.sort()
    return listing


def _link(path: Path, root: Path, root_real: str, guard: Guard, listing: Listing) -> None:
    target = os.path.realpath(path)
    if guard.protects(target):
        listing.refused.append((path, IngestError(f"{path}: refused: a symbolic link into the service's own data "
                                                  f"and configuration, which are never ingested")))
    elif _inside(target, root_real) and os.path.exists(target):
        listing.notes.append(f"{path}: skipped: a symbolic link inside the folder (links are not followed)")
    else:
        listing.refused.append((path, IngestError(f"{path}: refused: a symbolic link that leads outside {root} "
                                                  f"(or nowhere); links are not followed")))
