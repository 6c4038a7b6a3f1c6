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
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from typing import Any

from .chunking import Block
from .errors import IngestError

log = logging.getLogger(__name__)

Parsed = tuple[str, list[Block], dict[str, Any]]

_WS = re.compile(r"\s+")


def _clean(text: str) -> str:
    return _WS.sub(" ", text.replace("\u00ad", "")).strip()


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


def _pdf_lines(page: Any) -> list[_Line]:
    """The page's text lines in content order, each with its baseline height and font size."""
    lines: list[_Line] = []
    current: list[str] = []
    where: list[float] = []  # y, size of the fragment that started the current line

    def visit(text: str, cm: Any, tm: Any, _font: Any, font_size: float) -> None:
        if not text:
            return
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


def parse_pdf(data: bytes, *, where: str, fallback_title: str) -> Parsed:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            raise IngestError(f"{where}: the PDF is password-protected")
        pages = list(reader.pages)
    except IngestError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, OSError, RecursionError) as exc:
        log.debug("%s: pypdf: %r", where, exc)
        raise IngestError(f"{where}: not a readable PDF (corrupt or truncated file)") from None
    page_lines: list[list[_Line]] = []
    for index, page in enumerate(pages):
        try:
            page_lines.append(_pdf_lines(page))
        except Exception as exc:  # noqa: BLE001 - pypdf raises many types on damaged content streams
            log.debug("%s: page %d: %r", where, index + 1, exc)
            raise IngestError(f"{where}: page {index + 1} cannot be read (damaged PDF content)") from None
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


def parse_docx(data: bytes, *, where: str, fallback_title: str) -> Parsed:
    import docx
    from docx.table import Table

    try:
        doc = docx.Document(io.BytesIO(data))
        items = list(doc.iter_inner_content())
    except Exception as exc:  # noqa: BLE001 - python-docx, zipfile and lxml all fail their own ways
        log.debug("%s: python-docx: %r", where, exc)
        raise IngestError(f"{where}: not a readable DOCX (corrupt file or another format)") from None
    mode = _docx_pages(doc)
    page = 1
    title = _clean(doc.core_properties.title or "")
    section: str | None = None
    blocks: list[Block] = []
    for item in items:
        if isinstance(item, Table):
            for row in item.rows:
                cells: list[str] = []
                for cell in row.cells:
                    text = _clean(cell.text)
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
        text = _clean(item.text)
        if not text:
            continue
        style = (item.style.name if item.style is not None else "") or ""
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


def parse_html(data: bytes, *, where: str, fallback_title: str) -> Parsed:
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
    title: str | None = None
    section: str | None = None
    blocks: list[Block] = []
    buffer: list[str] = []

    def flush() -> None:
        joined = _clean("".join(buffer))  # text nodes carry their own spacing
        buffer.clear()
        if joined:
            blocks.append(Block(joined, section))

    def walk(node: Any) -> None:
        nonlocal title, section
        for child in node.iter(include_text=True):
            tag = child.tag
            if tag == "-text":
                buffer.append(child.text_content or "")
            elif tag in _HEADINGS:
                flush()
                heading = _clean(child.text(deep=True, separator=" "))
                if not heading:
                    continue
                if tag == "h1" and title is None and not blocks:
                    title = heading
                else:
                    section = heading
            elif tag in _BLOCKS:
                flush()
                walk(child)
                flush()
            elif not tag.startswith("-"):  # inline element (a, b, em, span, ...); skip comments
                walk(child)

    walk(root)
    flush()
    if title is None and head_title is not None:
        title = _clean(head_title.text()) or None
    return title or fallback_title, blocks, {}


BYTE_PARSERS = {".pdf": parse_pdf, ".docx": parse_docx, ".html": parse_html, ".htm": parse_html}
