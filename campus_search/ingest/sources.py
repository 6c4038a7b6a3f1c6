"""Turn files into :class:`ParsedDocument` (title, blocks with section titles and pages, metadata).

Markdown and plain text here; PDF, DOCX and HTML in :mod:`.formats`. Each format is one function
registered by suffix in :data:`BYTE_PARSERS`, each ``(data, where, fallback_title, limits)``;
:data:`PATH_PARSERS` read the file first.
Metadata comes, most specific last (later wins): CLI defaults, ``.campus-search.yaml`` in the folder
and its parents (nearest wins), a sidecar ``<file>.meta.yaml``, YAML front matter (Markdown, text).
Each may hold only the keys :mod:`.metadata` allows for it (a misspelt key fails the file, with a
"did you mean"). A document's ``source`` is the file's absolute path, which is what ``--prune``
compares against. Files are read through :mod:`.fileguard` (no links out, no special files, never
``DATA_DIR``).

Work per file is bounded (:class:`~.formats.ParseLimits`): no file larger than
``MAX_DOCUMENT_UNPACKED_BYTES`` is read, metadata YAML is at most :data:`MAX_METADATA_BYTES` and
holds single values only (:class:`_MetadataLoader`), and a ``.jsonl`` corpus is read line by line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from campus_search.errors import IngestError
from campus_search.ingest.chunking import Block
from campus_search.ingest.fileguard import Guard, Listing, Reader, list_folder
from campus_search.ingest.formats import DEFAULT_LIMITS, RICH_PARSERS, ParseLimits
from campus_search.ingest.metadata import FILE_KEYS, FOLDER_KEYS, JSONL_KEYS, METADATA_FIELDS, check_keys
from campus_search.security.access import LIST_FIELDS

FOLDER_DEFAULTS = ".campus-search.yaml"
SIDECAR_SUFFIX = ".meta.yaml"
SKIP_NAMES = {"README.md", FOLDER_DEFAULTS}


@dataclass
class ParsedDocument:
    """A parsed document. Every block has a section title: the nearest heading above its text, or -- for
    text before the first heading, a plain-text file without headings, a BEIR record -- the document's
    title, the heading a reader sees above that text (docs/ingestion.md)."""

    external_id: str
    title: str
    blocks: list[Block]
    metadata: dict[str, Any] = field(default_factory=dict)  # raw; validated by metadata.validate
    source: str | None = None

    def __post_init__(self) -> None:
        if self.title:
            self.blocks = [b if b.section_title else Block(b.text, self.title, b.page_number) for b in self.blocks]


_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.S)
# These patterns run on every line of a file of up to MAX_DOCUMENT_UNPACKED_BYTES, so none may
# backtrack over a line: a span never crosses its own delimiter ("[" "]" "(" ")", the emphasis
# character), which keeps each match attempt as short as the gap to the next delimiter.
_HEADING = re.compile(r"(#{1,6})[ \t]+(?=\S)")
_LINK = re.compile(r"!?\[([^\[\]]*)\]\([^()]*\)")
_EMPHASIS = re.compile("|".join(rf"{d}(?=[^\s{c}])([^{c}]+?)(?<=[^\s{c}]){d}" for d, c in (
    (r"\*\*", r"\*"), ("__", "_"), (r"\*", r"\*"), ("_", "_"), ("`", "`"))))


def _heading(line: str) -> tuple[int, str] | None:
    """(level, text) of an ATX heading (``## Text ##``), or None."""
    m = _HEADING.match(line)
    if m is None:
        return None
    text = line[m.end():].rstrip()
    closing = text.rstrip("#")
    if closing != text and (not closing or closing[-1] in " \t"):  # an optional closing "###"
        text = closing.rstrip()
    return (len(m.group(1)), text) if text else None


MAX_METADATA_BYTES = 64 * 1024  # a metadata file or front matter block; real ones are a few lines
MAX_METADATA_VALUE_CHARS = 1000  # one value (a title is the longest legitimate one)


class _NotMetadata(yaml.YAMLError):
    """YAML that is valid but not metadata (the message says why)."""


class _MetadataLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` for metadata: one mapping of single values (a flat list of them for the list
    fields, ``groups``). Aliases (``*name``), which let a
    few hundred bytes expand to gigabytes (a "billion laughs" bomb), other lists, nested mappings and values
    over :data:`MAX_METADATA_VALUE_CHARS` are refused while the YAML is read, before anything is built."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise _NotMetadata("YAML aliases (*name) are not allowed in metadata")
        # A flat list only as the value of a list field (groups): nested mappings are refused here, so a
        # mapping parent is the document's own mapping, and the sequence's items are single values.
        list_field = (self.check_event(yaml.SequenceStartEvent) and isinstance(parent, yaml.MappingNode)
                      and isinstance(index, yaml.ScalarNode) and index.value in LIST_FIELDS)
        if parent is not None and self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent) and not list_field:
            raise _NotMetadata("metadata values must be single values (text, numbers, dates), not lists or mappings")
        event = self.peek_event()
        if isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_METADATA_VALUE_CHARS:
            raise _NotMetadata(f"a metadata value is longer than {MAX_METADATA_VALUE_CHARS} characters")
        return super().compose_node(parent, index)


def _load_yaml_mapping(text: str, where: str) -> dict[str, Any]:
    """A metadata mapping from YAML (folder defaults, sidecars, front matter), or an IngestError."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_METADATA_BYTES:
        raise IngestError(f"{where}: metadata is larger than {MAX_METADATA_BYTES // 1024} KiB")
    try:
        data = yaml.load(text, Loader=_MetadataLoader)  # noqa: S506 - a SafeLoader subclass
    except _NotMetadata as exc:
        raise IngestError(f"{where}: {exc}") from None
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as exc:  # e.g. a date in year 99999
        raise IngestError(f"{where}: invalid YAML ({exc.__class__.__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise IngestError(f"{where}: metadata must be a mapping")
    return data



def split_front_matter(text: str, where: str = "front matter") -> tuple[dict[str, Any], str]:
    m = _FRONT_MATTER.match(text)
    if not m:
        return {}, text
    return _load_yaml_mapping(m.group(1), where), text[m.end():]


def _plain(line: str) -> str:
    line = _LINK.sub(r"\1", line)
    return _EMPHASIS.sub(lambda m: next(g for g in m.groups() if g is not None), line)


def parse_markdown(text: str, *, fallback_title: str, where: str = "front matter") -> tuple[str, list[Block],
                                                                                            dict[str, Any]]:
    meta, body = split_front_matter(text, where)
    title = meta.pop("title", None)
    blocks: list[Block] = []
    section: str | None = None
    para: list[str] = []
    in_fence = False

    def flush() -> None:
        if para:
            joined = " ".join(s.strip() for s in para if s.strip())
            if joined:
                blocks.append(Block(joined, section))
            para.clear()

    for raw in body.splitlines():
        line = raw.rstrip()
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
            flush()
            continue
        heading = None if in_fence else _heading(line)
        if heading:
            flush()
            level, heading_text = heading[0], _plain(heading[1])
            if level == 1 and title is None:
                title = heading_text
            else:
                section = heading_text
            continue
        if not line.strip():
            flush()
            continue
        stripped = line.strip()
        # list items and table rows are paragraphs of their own
        if re.match(r"^([-*+]|\d+[.)])\s+", stripped) or stripped.startswith("|"):
            flush()
            if set(stripped) <= set("|-: "):
                continue  # table rule
            stripped = re.sub(r"^([-*+])\s+", "", stripped).strip("|").replace("|", " · ")
            para.append(_plain(stripped))
            if not stripped.endswith((".", ":", ";", "!", "?")):
                para[-1] += "."
            flush()
            continue
        para.append(_plain(stripped))
    flush()
    return str(title or fallback_title).strip(), blocks, meta


def paragraph_blocks(text: str) -> list[Block]:
    """Blank-line separated paragraphs, whitespace folded."""
    return [Block(" ".join(p.split())) for p in re.split(r"\n\s*\n", text) if p.strip()]


#: A plain-text file's first line is its heading when it stands alone (a blank line after it), is short and
#: does not end like a sentence: "Parking permits" above the text, not "Staff permits are renewed in August."
_TEXT_HEADING = re.compile(r"\A[^\n]{1,100}\Z")


def parse_text(text: str, *, fallback_title: str, where: str = "front matter") -> tuple[str, list[Block],
                                                                                    dict[str, Any]]:
    """Paragraphs; a heading-like first line is the title and the section of the text below it (and stays
    searchable as that section even when metadata gives another title); else the file name is the title."""
    meta, body = split_front_matter(text, where)
    blocks = paragraph_blocks(body)
    first = re.split(r"\n\s*\n", body.strip(), maxsplit=1)[0].strip()
    heading = None
    if len(blocks) > 1 and _TEXT_HEADING.match(first) and not first.endswith((".", ",", ";", ":", "!", "?")):
        heading = " ".join(first.split())
        blocks = [Block(b.text, heading, b.page_number) for b in blocks[1:]]
    title = meta.pop("title", None) or heading or fallback_title
    return str(title), blocks, meta


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise IngestError(f"{where}: not UTF-8 text") from None


Parsed = tuple[str, list[Block], dict[str, Any]]
BytesParser = Callable[[bytes, str, str, ParseLimits], Parsed]


def _markdown_bytes(data: bytes, where: str, fallback_title: str, limits: ParseLimits) -> Parsed:
    return parse_markdown(_decode(data, where), fallback_title=fallback_title, where=f"{where}: front matter")


def _text_bytes(data: bytes, where: str, fallback_title: str, limits: ParseLimits) -> Parsed:
    return parse_text(_decode(data, where), fallback_title=fallback_title, where=f"{where}: front matter")


def _rich(parser: Callable[..., Parsed]) -> BytesParser:
    return lambda data, where, fallback_title, limits: parser(data, where=where, fallback_title=fallback_title,
                                                              limits=limits)


BYTE_PARSERS: dict[str, BytesParser] = {
    ".md": _markdown_bytes,
    ".markdown": _markdown_bytes,
    ".txt": _text_bytes,
    ".text": _text_bytes,
    **{suffix: _rich(parser) for suffix, parser in RICH_PARSERS.items()},
}


def _path_parser(parser: BytesParser) -> Callable[[Path, ParseLimits], Parsed]:
    return lambda path, limits: parser(Guard().reader(None).read(path, limits.max_unpacked_bytes), str(path),
                                       _title_from_name(path), limits)


PATH_PARSERS: dict[str, Callable[[Path, ParseLimits], Parsed]] = {
    suffix: _path_parser(p) for suffix, p in BYTE_PARSERS.items()}


def parse_bytes(data: bytes, filename: str, *, external_id: str, metadata: Mapping[str, Any] | None = None,
                source: str | None = None, limits: ParseLimits = DEFAULT_LIMITS) -> ParsedDocument:
    """Parse an uploaded file (format from ``filename``'s suffix). ``metadata`` wins over front matter."""
    name = Path(filename)
    parser = BYTE_PARSERS.get(name.suffix.lower())
    if parser is None:
        raise IngestError(f"{filename}: unsupported file type {name.suffix or '(none)'}; supported: "
                          f"{', '.join(sorted(BYTE_PARSERS))}")
    limits.check_size(len(data), filename)
    title, blocks, meta = parser(data, filename, _title_from_name(name), limits)
    check_keys(meta, FILE_KEYS, f"{filename}: front matter", IngestError)
    meta.update(metadata or {})
    title = str(meta.pop("title", None) or title)
    meta.pop("id", None)
    return ParsedDocument(external_id=external_id, title=title, blocks=blocks, metadata=meta,
                          source=source or filename)


def _title_from_name(path: Path) -> str:
    return re.sub(r"[-_]+", " ", path.stem).strip().capitalize() or path.name


def folder_defaults(path: Path, root: Path, reader: Reader | None = None) -> dict[str, Any]:
    """Merged ``.campus-search.yaml`` from ``root`` down to the file's folder (nearest wins)."""
    reader = reader or Guard().reader(None)
    merged: dict[str, Any] = {}
    folders = [path.parent]
    while folders[-1] != root and root in folders[-1].parents:
        folders.append(folders[-1].parent)
    for folder in reversed(folders):
        candidate = folder / FOLDER_DEFAULTS
        if reader.exists(candidate):
            data = _load_yaml_mapping(_decode(reader.read(candidate, MAX_METADATA_BYTES, "metadata file"),
                                              str(candidate)), str(candidate))
            check_keys(data, FOLDER_KEYS, str(candidate), IngestError)
            merged.update(data)
    return merged


def parse_file(path: Path, root: Path, reader: Reader | None = None,
               limits: ParseLimits = DEFAULT_LIMITS) -> ParsedDocument:
    """Parse one file found under ``root`` (metadata layered as the module docstring says). Every
    byte is read through ``reader`` (:mod:`.fileguard`); without one, only regular files are read.
    A file over ``limits.max_unpacked_bytes`` is not read."""
    reader = reader or Guard().reader(None)
    parser = BYTE_PARSERS.get(path.suffix.lower())
    if parser is None:
        raise IngestError(f"{path}: unsupported file type {path.suffix or '(none)'}")
    title, blocks, meta = parser(reader.read(path, limits.max_unpacked_bytes), str(path), _title_from_name(path),
                                 limits)
    check_keys(meta, FILE_KEYS, f"{path}: front matter", IngestError)
    merged = folder_defaults(path, root, reader)
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    if reader.exists(sidecar):
        data = _load_yaml_mapping(_decode(reader.read(sidecar, MAX_METADATA_BYTES, "metadata file"), str(sidecar)),
                                  str(sidecar))
        check_keys(data, FILE_KEYS, str(sidecar), IngestError)
        merged.update(data)
    merged.update(meta)
    title = str(merged.pop("title", None) or title)
    rel = path.relative_to(root) if root != path else Path(path.name)
    stated_id = merged.pop("id", None)
    if stated_id is not None and (not isinstance(stated_id, str | int) or isinstance(stated_id, bool)
                                  or not str(stated_id).strip() or len(str(stated_id)) > 500):
        raise IngestError(f"{path}: id must be a non-empty string of at most 500 characters")
    # taken exactly: an id with whitespace at either end is refused by the ingester (textrules.py)
    external_id = str(stated_id) if stated_id is not None else rel.as_posix()
    return ParsedDocument(external_id=external_id, title=title, blocks=blocks, metadata=merged,
                          source=str(path.resolve()))


def _skipped_name(name: str) -> bool:
    # hidden files and folders, and Office lock files (~$name.docx) are never documents
    return name.startswith((".", "~$"))


def _is_document(path: Path) -> bool:
    return (path.name not in SKIP_NAMES and not path.name.endswith(SIDECAR_SUFFIX)
            and path.suffix.lower() in PATH_PARSERS)


def list_documents(root: Path, guard: Guard | None = None) -> Listing:
    """The :class:`~campus_search.ingest.fileguard.Listing` of the documents under the folder ``root``."""
    return list_folder(root, guard or Guard(), _is_document, _skipped_name)


def discover(paths: list[Path], guard: Guard | None = None) -> Iterator[tuple[Path, Path]]:
    """(file, root) pairs for every supported file under ``paths``, sorted, hidden files skipped.
    Links and special files are not yielded (:func:`list_documents` reports them)."""
    for given in paths:
        if given.is_file():
            yield given, given.parent
            continue
        if not given.is_dir():
            raise IngestError(f"{given}: no such file or directory")
        for path in list_documents(given, guard).files:
            yield path, given


def read_jsonl(path: Path, limits: ParseLimits = DEFAULT_LIMITS) -> Iterator[ParsedDocument | IngestError]:
    """BEIR corpus lines: {"_id", "title", "text"} plus optional access metadata fields.

    A bad line (not UTF-8, not JSON, no ``_id``, longer than ``MAX_DOCUMENT_UNPACKED_BYTES``) is
    yielded as an :class:`IngestError` (reported and skipped by the caller); the file is read line by
    line, so one line never costs more memory than that limit."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise IngestError(f"{path}: cannot read ({exc.strerror})") from exc
    where = path.resolve()  # sources are absolute, so ``--prune`` scopes match however the path was given
    with fh:
        lineno = 0
        while True:
            try:
                raw = fh.readline(limits.max_unpacked_bytes + 1)
            except OSError as exc:
                raise IngestError(f"{path}:{lineno + 1}: cannot read ({exc.strerror})") from exc
            if not raw:
                return
            lineno += 1
            if len(raw) > limits.max_unpacked_bytes:
                while raw and not raw.endswith(b"\n"):  # skip the rest of the over-long line
                    raw = fh.readline(1 << 20)
                yield IngestError(f"{path}:{lineno}: line longer than {limits.max_unpacked_bytes:,} bytes "
                                  "(MAX_DOCUMENT_UNPACKED_BYTES)")
                continue
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield IngestError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start + 1} of the line)")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield IngestError(f"{path}:{lineno}: invalid JSON ({exc.msg})")
                continue
            except (ValueError, RecursionError) as exc:  # a 5,000-digit number, nesting thousands deep
                yield IngestError(f"{path}:{lineno}: invalid JSON ({exc.__class__.__name__})")
                continue
            if not isinstance(record, Mapping) or "_id" not in record:
                yield IngestError(f"{path}:{lineno}: each line needs an \"_id\"")
                continue
            try:
                check_keys(record, JSONL_KEYS, f"{path}:{lineno}", IngestError)
            except IngestError as exc:
                yield exc
                continue
            text = str(record.get("text") or "")
            title = str(record.get("title") or "").strip()
            blocks = paragraph_blocks(text)
            meta = {k: record[k] for k in METADATA_FIELDS if k in record}
            yield ParsedDocument(external_id=str(record["_id"]), title=title or str(record["_id"]),
                                 blocks=blocks, metadata=meta, source=f"{where}:{lineno}")
