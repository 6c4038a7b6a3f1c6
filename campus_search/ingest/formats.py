"""Binary and markup formats: PDF (pypdf), DOCX (python-docx) and HTML (selectolax).

Each parser takes the file's bytes and returns ``(title, blocks, metadata)`` like the Markdown parser:
blocks are paragraphs carrying their section title and page number. Failures become
:class:`IngestError` with a message that names the file and says what is wrong, never a library's
exception text, so one bad file is reported and skipped.

- PDF: text per page (``page_number`` is the physical page, 1-based). Lines are re-joined into
  paragraphs (hyphenation at line ends undone). Section titles come from the PDF outline (bookmarks):
  a section starts where its bookmark's title appears as a line on the bookmarked page, else at the
  top of that page. Title: document info ``/Title``, else the file name.
- DOCX: paragraphs and tables in body order; ``Heading N`` styles become section titles, the
  ``Title`` style (or the core property) the title. Page numbers come from Word's rendered page
  breaks when the file has them (documents saved by Word), else from explicit page breaks, else none.
- HTML: the main content (``<main>``, ``role=main``, a single ``<article>``, else ``<body>``) without
  navigation, header/footer chrome, asides, forms, scripts and styles; ``h1``-``h6`` become section
  titles (the first ``h1`` is the title when there is one, else ``<title>``).

Every parser works within :class:`ParseLimits` (``MAX_DOCUMENT_UNPACKED_BYTES``,
``MAX_DOCUMENT_CHARS``): a file cannot make the process unpack or extract more than that, whatever
its compressed size, so a decompression bomb is refused before it costs memory. Any other failure of
a parser (a library's bug on a strange file) also becomes an :class:`IngestError` for that file.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from campus_search.errors import IngestError
from campus_search.ingest.chunking import Block

log = logging.getLogger(__name__)

Parsed = tuple[str, list[Block], dict[str, Any]]

_WS = re.compile(r"\s+")


def _clean(text: str) -> str:
    return _WS.sub(" ", text.replace("\u00ad", "")).strip()


# ------------------------------------------------------------------------------------------ limits

@dataclass(frozen=True)
class ParseLimits:
    """How much one document may cost to read (settings ``MAX_DOCUMENT_UNPACKED_BYTES`` and
    ``MAX_DOCUMENT_CHARS``, docs/ingestion.md). A document over a limit is refused, never truncated."""

    max_unpacked_bytes: int = 64 * 1024 * 1024
    """A file's own size when read from disk (and a ``.jsonl`` line's), the sum of a DOCX's ZIP
    members, each decoded PDF stream and all decoded PDF streams together."""
    max_chars: int = 2_000_000
    """Characters of text extracted from one document."""

    @classmethod
    def from_settings(cls, settings: Any) -> ParseLimits:
        return cls(max_unpacked_bytes=int(settings.max_document_unpacked_bytes),
                   max_chars=int(settings.max_document_chars))

    def check_size(self, size: int, where: str) -> None:
        if size > self.max_unpacked_bytes:
            raise IngestError(f"{where}: {size:,} bytes is over the limit of {self.max_unpacked_bytes:,} "
                              "(MAX_DOCUMENT_UNPACKED_BYTES)")


DEFAULT_LIMITS = ParseLimits()

# A DOCX has tens of parts; a ZIP with more than this many members is not a Word document.
MAX_ZIP_MEMBERS = 10_000


class _TextBudget:
    """Counts extracted characters; raises as soon as a document has more than ``max_chars``."""

    def __init__(self, limits: ParseLimits, where: str) -> None:
        self.limit, self.left, self.where = limits.max_chars, limits.max_chars, where

    def take(self, text: str) -> str:
        self.left -= len(text)
        if self.left < 0:
            raise IngestError(f"{self.where}: more than {self.limit:,} characters of text (MAX_DOCUMENT_CHARS); "
                              "split the document or raise the limit")
        return text


def _unpacked_too_large(where: str, limits: ParseLimits) -> IngestError:
    return IngestError(f"{where}: unpacks to more than {limits.max_unpacked_bytes:,} bytes "
                       "(MAX_DOCUMENT_UNPACKED_BYTES; a decompression bomb?)")


# --------------------------------------------------------------------------------------------- PDF

def _pdf_outline(reader: Any) -> list[tuple[int, str]]:
    """(page index, title) of every bookmark, in document order."""
    found: list[tuple[int, str]] = []

    def walk(items: Any) -> None:
        for item in items:
            if isinstance(item, list):
                walk(item)
                continue
            try:
                page = reader.get_destination_page_number(item)
            except Exception:  # a dangling bookmark must not cost the document  # noqa: BLE001
                continue
            title = _clean(str(getattr(item, "title", "") or ""))
            if page is not None and page >= 0 and title:
                found.append((page, title))

    try:
        walk(reader.outline)
    except Exception:  # noqa: BLE001 - a broken outline is ignored; the text still counts
        return []
    return sorted(found, key=lambda x: x[0])


@dataclass
class _Line:
    text: str
    y: float
    size: float


def _pdf_lines(page: Any, budget: _TextBudget) -> list[_Line]:
    """The page's text lines in content order, each with its baseline height and font size."""
    lines: list[_Line] = []
    current: list[str] = []
    where: list[float] = []  # y, size of the fragment that started the current line

    def visit(text: str, cm: Any, tm: Any, _font: Any, font_size: float) -> None:
        if not text:
            return
        budget.take(text)
        y = tm[4] * cm[1] + tm[5] * cm[3] + cm[5]
        scale = abs(tm[3] * cm[3]) or 1.0
        for n, part in enumerate(text.split("\n")):
            if n:  # a newline ended the line before this part
                lines.append(_Line("".join(current), *where) if where else _Line("", 0.0, 0.0))
                current.clear()
                where.clear()
            if part and not where:
                where.extend((y, round(font_size * scale, 1)))
            current.append(part)

    page.extract_text(visitor_text=visit)
    if "".join(current).strip():
        lines.append(_Line("".join(current), *where))
    return [_Line(ln.text.strip(), ln.y, ln.size) for ln in lines if ln.text.strip()]


def _pdf_paragraphs(lines: list[_Line]) -> list[tuple[str, float, int]]:
    """Re-join lines into paragraphs: (text, font size, number of lines).

    A paragraph ends at a larger vertical gap than the page's usual line spacing, a jump back up the
    page (a new column), a change of font size (a heading), or a short line that ends a sentence."""
    gaps = sorted(a.y - b.y for a, b in zip(lines, lines[1:], strict=False) if a.y - b.y > 0)
    spacing = gaps[len(gaps) // 4] if gaps else 0.0  # lower quartile: paragraph gaps may be half of all
    lengths = sorted(len(ln.text) for ln in lines)
    typical = lengths[int(len(lengths) * 0.9)] if lengths else 0
    out: list[tuple[str, float, int]] = []
    current, size, count = "", 0.0, 0
    for i, line in enumerate(lines):
        if current and current.endswith("-") and len(current) > 1 and current[-2].isalpha() \
                and line.text[:1].islower():
            current = current[:-1] + line.text  # "infor-" + "mation"
        else:
            current = f"{current} {line.text}" if current else line.text
        size, count = max(size, line.size), count + 1
        nxt = lines[i + 1] if i + 1 < len(lines) else None
        if nxt is None:
            break
        gap = line.y - nxt.y
        ends = (gap <= 0 or (spacing and gap > 1.4 * spacing) or abs(nxt.size - line.size) > 0.5
                or (line.text[-1:] in ".!?:" and len(line.text) < 0.8 * typical and nxt.text[:1].isupper()))
        if ends:
            out.append((_clean(current), size, count))
            current, size, count = "", 0.0, 0
    if current:
        out.append((_clean(current), size, count))
    return [p for p in out if p[0]]


def _body_size(pages: list[list[_Line]]) -> float:
    """The font size most of the text is set in."""
    weight: dict[float, int] = {}
    for lines in pages:
        for line in lines:
            weight[line.size] = weight.get(line.size, 0) + len(line.text)
    return max(weight, key=lambda k: weight[k]) if weight else 0.0


def _looks_like_heading(text: str, size: float, count: int, body: float) -> bool:
    return count == 1 and body > 0 and size >= 1.15 * body and len(text) <= 120 and text[-1:] not in ".,;"


def _pypdf_configuration(limits: ParseLimits) -> Any:
    """pypdf's own per-stream limits (its defaults are 75 MB), set to ours."""
    from pypdf import get_configuration

    n = limits.max_unpacked_bytes
    return get_configuration().with_overwrites(**{name: n for name in (
        "maximum_declared_stream_length", "array_based_stream_maximum_output_length", "jbig2_maximum_output_length",
        "lzw_maximum_output_length", "run_length_maximum_output_length", "zlib_maximum_output_length",
        "brotli_maximum_output_length", "image_maximum_buffer_size")})


class _DecodedStreams:
    """Bytes of every stream pypdf has decoded for one reader so far (it keeps each decoded stream with
    its object). Incremental: each call looks only at objects resolved since the last call and at
    streams not decoded yet, so checking after every page stays cheap for a long document."""

    def __init__(self, reader: Any) -> None:
        self.objects: dict[Any, Any] = reader.resolved_objects
        self.seen = 0
        self.pending: list[Any] = []
        self.total = 0

    def __call__(self) -> int:
        from pypdf.generic import EncodedStreamObject

        if len(self.objects) > self.seen:
            self.pending += [o for o in itertools.islice(self.objects.values(), self.seen, None)
                             if isinstance(o, EncodedStreamObject)]
            self.seen = len(self.objects)
        waiting = []
        for obj in self.pending:
            if obj.decoded_self is None:
                waiting.append(obj)
            else:
                self.total += len(obj.decoded_self.get_data())
        self.pending = waiting
        return self.total


def parse_pdf(data: bytes, *, where: str, fallback_title: str, limits: ParseLimits = DEFAULT_LIMITS) -> Parsed:
    from pypdf import apply_configuration

    # pypdf reads the configuration from a context variable: these limits hold for this parse only.
    with apply_configuration(_pypdf_configuration(limits)):
        return _parse_pdf(data, where, fallback_title, limits)


def _parse_pdf(data: bytes, where: str, fallback_title: str, limits: ParseLimits) -> Parsed:
    from pypdf import PdfReader
    from pypdf.errors import LimitReachedError, PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            raise IngestError(f"{where}: the PDF is password-protected")
        pages = list(reader.pages)
    except IngestError:
        raise
    except LimitReachedError:
        raise _unpacked_too_large(where, limits) from None
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, OSError, RecursionError) as exc:
        log.debug("%s: pypdf: %r", where, exc)
        raise IngestError(f"{where}: not a readable PDF (corrupt or truncated file)") from None
    budget = _TextBudget(limits, where)
    decoded = _DecodedStreams(reader)
    page_lines: list[list[_Line]] = []
    for index, page in enumerate(pages):
        try:
            page_lines.append(_pdf_lines(page, budget))
        except IngestError:
            raise
        except LimitReachedError:
            raise _unpacked_too_large(where, limits) from None
        except Exception as exc:  # noqa: BLE001 - pypdf raises many types on damaged content streams
            log.debug("%s: page %d: %r", where, index + 1, exc)
            raise IngestError(f"{where}: page {index + 1} cannot be read (damaged PDF content)") from None
        # Each stream is bounded by pypdf's limits above; this bounds them all together, since pypdf
        # keeps every decoded stream (many pages each decoding a large stream).
        if decoded() > limits.max_unpacked_bytes:
            raise _unpacked_too_large(where, limits)
    outline = _pdf_outline(reader)
    body = _body_size(page_lines) if not outline else 0.0  # font-size headings only without bookmarks
    blocks: list[Block] = []
    section: str | None = None
    pending = list(outline)
    for index, lines in enumerate(page_lines):
        starting = [t for p, t in pending if p == index]
        pending = [(p, t) for p, t in pending if p > index]
        for paragraph, size, count in _pdf_paragraphs(lines):
            # A bookmark title printed as a heading on its page: the section starts there.
            if starting and paragraph.casefold().startswith(starting[0].casefold()):
                section = starting.pop(0)
                paragraph = paragraph[len(section):].strip()
                if not paragraph:
                    continue
            elif _looks_like_heading(paragraph, size, count, body):
                section = paragraph
                continue
            blocks.append(Block(paragraph, section, index + 1))
        if starting:  # bookmarks whose heading was not found on the page: the section starts at the top
            section = starting[-1]
            blocks = _resection_page(blocks, index + 1, section)
    if not blocks and pages:
        raise IngestError(f"{where}: no text found in the PDF (a scanned image? OCR is not supported)")
    title = ""
    try:
        info = reader.metadata
        title = _clean(str(info.get("/Title") or "")) if info else ""
    except Exception:  # noqa: BLE001 - damaged info dictionary: fall back to the file name
        title = ""
    return title or fallback_title, blocks, {}


def _resection_page(blocks: list[Block], page: int, section: str) -> list[Block]:
    return [Block(b.text, section, b.page_number) if b.page_number == page else b for b in blocks]


# -------------------------------------------------------------------------------------------- DOCX

_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"


def _docx_pages(doc: Any) -> str | None:
    """Which page-break marks to count: Word's rendered breaks if present, else explicit breaks."""
    body = doc.element.body
    if next(body.iter(f"{_W}lastRenderedPageBreak"), None) is not None:
        return "rendered"
    for br in body.iter(f"{_W}br"):
        if br.get(f"{_W}type") == "page":
            return "explicit"
    return None


def _is_break(el: Any, mode: str | None) -> bool:
    if mode == "rendered":
        return el.tag == f"{_W}lastRenderedPageBreak"
    if mode == "explicit":
        return el.tag == f"{_W}br" and el.get(f"{_W}type") == "page"
    return False


def _check_docx_zip(data: bytes, where: str, limits: ParseLimits) -> None:
    """Refuse a DOCX whose ZIP members unpack to more than the limit, before anything is unpacked.

    The sizes are those the ZIP declares; :mod:`zipfile` never returns more than the declared size of
    a member (a member that inflates further fails its CRC check), so the declared total is a bound."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        raise IngestError(f"{where}: not a readable DOCX (corrupt file or another format)") from None
    if len(members) > MAX_ZIP_MEMBERS:
        raise IngestError(f"{where}: not a DOCX ({len(members):,} ZIP members; at most {MAX_ZIP_MEMBERS:,})")
    if sum(m.file_size for m in members) > limits.max_unpacked_bytes:
        raise _unpacked_too_large(where, limits)


def parse_docx(data: bytes, *, where: str, fallback_title: str, limits: ParseLimits = DEFAULT_LIMITS) -> Parsed:
    import docx

    _check_docx_zip(data, where, limits)
    try:
        doc = docx.Document(io.BytesIO(data))
        items = list(doc.iter_inner_content())
    except Exception as exc:  # noqa: BLE001 - python-docx, zipfile and lxml all fail their own ways
        log.debug("%s: python-docx: %r", where, exc)
        raise IngestError(f"{where}: not a readable DOCX (corrupt file or another format)") from None
    try:
        return _docx_blocks(doc, items, _TextBudget(limits, where), fallback_title)
    except IngestError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed table, style or run: this file fails, not the run
        log.debug("%s: python-docx: %r", where, exc)
        raise IngestError(f"{where}: not a readable DOCX (damaged document structure)") from None


def _docx_style_names(doc: Any) -> Callable[[Any], str]:
    """Style name of a paragraph. python-docx's ``paragraph.style`` scans every style of the document
    for each paragraph (most of the time of a long document); this looks them up once."""
    from docx.enum.style import WD_STYLE_TYPE

    names = {s.style_id: s.name or "" for s in doc.styles if s.type == WD_STYLE_TYPE.PARAGRAPH}
    default = doc.styles.default(WD_STYLE_TYPE.PARAGRAPH)
    default_name = (default.name or "") if default is not None else ""
    return lambda paragraph: names.get(paragraph._p.style, default_name) if paragraph._p.style else default_name


def _docx_blocks(doc: Any, items: list[Any], budget: _TextBudget, fallback_title: str) -> Parsed:
    from docx.table import Table

    mode = _docx_pages(doc)
    page = 1
    title = _clean(doc.core_properties.title or "")
    section: str | None = None
    blocks: list[Block] = []
    style_of = _docx_style_names(doc)
    for item in items:
        if isinstance(item, Table):
            for row in item.rows:
                cells: list[str] = []
                for cell in row.cells:
                    text = _clean(budget.take(cell.text))
                    if text and (not cells or cells[-1] != text):  # merged cells repeat their text
                        cells.append(text)
                if cells:
                    blocks.append(Block(" · ".join(cells), section, page if mode else None))
            continue
        # Page of the paragraph = page where its first text is; breaks after the text move on.
        text_page = None
        for el in item._p.iter():
            if _is_break(el, mode):
                page += 1
            elif el.tag == f"{_W}t" and el.text and el.text.strip() and text_page is None:
                text_page = page
        text = _clean(budget.take(item.text))
        if not text:
            continue
        style = style_of(item)
        if style == "Title":
            title = title or text
            continue
        if style.startswith("Heading"):
            section = text
            continue
        blocks.append(Block(text, section, (text_page or page) if mode else None))
    return title or fallback_title, blocks, {}


# -------------------------------------------------------------------------------------------- HTML

_DROP = ("script", "style", "noscript", "template", "nav", "aside", "form", "svg", "iframe", "button",
         "select", "dialog", "[role=navigation]", "[role=banner]", "[role=contentinfo]", "[role=search]",
         "[aria-hidden=true]", "[hidden]")
_CHROME = ("header", "footer")  # page chrome at body level; inside <main>/<article> a header holds the h1
_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
_BLOCKS = {"p", "div", "section", "article", "main", "li", "ul", "ol", "dl", "dt", "dd", "table", "tr",
           "td", "th", "thead", "tbody", "tfoot", "pre", "blockquote", "figure", "figcaption", "caption",
           "address", "details", "summary", "hr", "br", "header", "footer"} | _HEADINGS


def _main_content(tree: Any) -> tuple[Any, bool]:
    for selector in ("main", "[role=main]"):
        node = tree.css_first(selector)
        if node is not None:
            return node, False
    articles = tree.css("article")
    if len(articles) == 1:
        return articles[0], False
    return (tree.body if tree.body is not None else tree.root), True


def parse_html(data: bytes, *, where: str, fallback_title: str, limits: ParseLimits = DEFAULT_LIMITS) -> Parsed:
    from selectolax.lexbor import LexborHTMLParser

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")  # legacy pages: Windows-1252 is the web's default
    tree = LexborHTMLParser(text)
    head_title = tree.css_first("title")
    root, is_body = _main_content(tree)
    if root is None:
        raise IngestError(f"{where}: no HTML content found")
    for selector in _DROP + (_CHROME if is_body else ()):
        for node in root.css(selector):
            node.decompose()
    budget = _TextBudget(limits, where)
    title: str | None = None
    section: str | None = None
    blocks: list[Block] = []
    buffer: list[str] = []

    def flush() -> None:
        joined = _clean("".join(buffer))  # text nodes carry their own spacing
        buffer.clear()
        if joined:
            blocks.append(Block(joined, section))

    # Depth-first over the tree with an explicit stack: nesting is as deep as the page makes it
    # ('<div>' * 100000 parses), so no recursion. A _FLUSH marker ends a block element.
    stack: list[Any] = [iter(list(root.iter(include_text=True)))]
    while stack:
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
            continue
        if child is _FLUSH:
            flush()
            continue
        tag = child.tag
        if tag == "-text":
            buffer.append(budget.take(child.text_content or ""))
        elif tag in _HEADINGS:
            flush()
            heading = _clean(budget.take(child.text(deep=True, separator=" ")))
            if not heading:
                continue
            if tag == "h1" and title is None and not blocks:
                title = heading
            else:
                section = heading
        elif tag in _BLOCKS:
            flush()
            stack.append(iter([*child.iter(include_text=True), _FLUSH]))
        elif not tag.startswith("-"):  # inline element (a, b, em, span, ...); skip comments
            stack.append(iter(list(child.iter(include_text=True))))
    flush()
    if title is None and head_title is not None:
        title = _clean(head_title.text()) or None
    return title or fallback_title, blocks, {}


_FLUSH = object()


def _guarded(parser: Callable[..., Parsed]) -> Callable[..., Parsed]:
    """Any failure of a parser is an :class:`IngestError` for that file, never a crash of the run."""

    @functools.wraps(parser)
    def parse(data: bytes, *, where: str, fallback_title: str, limits: ParseLimits = DEFAULT_LIMITS) -> Parsed:
        try:
            return parser(data, where=where, fallback_title=fallback_title, limits=limits)
        except IngestError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported per file; the traceback goes to the log
            log.warning("%s: parser failed", where, exc_info=True)
            raise IngestError(f"{where}: could not be parsed ({exc.__class__.__name__})") from None

    return parse


#: The rich formats' parsers by suffix, each ``(data, *, where, fallback_title, limits)``; sources.py
#: registers them, beside Markdown and text, in its ``BYTE_PARSERS``.
RICH_PARSERS = {".pdf": _guarded(parse_pdf), ".docx": _guarded(parse_docx), ".html": _guarded(parse_html),
                ".htm": _guarded(parse_html)}
