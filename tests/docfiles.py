"""Writers for the real files the ingestion tests read: PDF (hand-written, independent of pypdf), DOCX
(python-docx) and HTML. Nothing here parses; the tests parse what these write with the product's code."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path


def _pdf_string(text: str) -> bytes:
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return b"(" + escaped.encode("cp1252") + b")"


def write_pdf(path: Path, pages: Sequence[Sequence[str]], *, title: str | None = None,
              bookmarks: Sequence[tuple[str, int]] = (), width: int = 80) -> Path:
    """A valid multi-page PDF: each page a list of paragraphs (wrapped at ``width`` characters, a blank
    line between paragraphs), Helvetica 10pt text (a paragraph "# X" is a 16pt heading), optional /Title
    and outline bookmarks (title, page index)."""
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    catalog = add(b"")  # filled in at the end
    pages_obj = add(b"")
    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    page_ids = []
    for paragraphs in pages:
        ops = [b"BT /F1 10 Tf 13 TL 60 760 Td"]
        for para in paragraphs:
            if para.startswith("# "):  # a heading, set larger (as real documents do)
                ops.append(b"/F1 16 Tf " + _pdf_string(para[2:]) + b" Tj T* /F1 10 Tf")
                continue
            for line in textwrap.wrap(para, width):
                ops.append(_pdf_string(line) + b" Tj T*")
            ops.append(b"T*")
        ops.append(b"ET")
        stream = b"\n".join(ops)
        content = add(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        page_ids.append(add(b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
                            b"/Resources << /Font << /F1 %d 0 R >> >> >>" % (pages_obj, content, font)))
    kids = b" ".join(b"%d 0 R" % p for p in page_ids)
    objects[pages_obj - 1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(page_ids))
    outline_ref = b""
    if bookmarks:
        outlines = add(b"")
        first = len(objects) + 1
        ids = list(range(first, first + len(bookmarks)))
        for n, (name, page) in enumerate(bookmarks):
            links = b""
            if n > 0:
                links += b" /Prev %d 0 R" % ids[n - 1]
            if n + 1 < len(ids):
                links += b" /Next %d 0 R" % ids[n + 1]
            add(b"<< /Title %s /Parent %d 0 R /Dest [%d 0 R /XYZ 0 792 0]%s >>"
                % (_pdf_string(name), outlines, page_ids[page], links))
        objects[outlines - 1] = b"<< /Type /Outlines /First %d 0 R /Last %d 0 R /Count %d >>" % (
            ids[0], ids[-1], len(ids))
        outline_ref = b" /Outlines %d 0 R" % outlines
    objects[catalog - 1] = b"<< /Type /Catalog /Pages %d 0 R%s >>" % (pages_obj, outline_ref)
    info = add(b"<< /Title %s >>" % _pdf_string(title)) if title else None

    path.write_bytes(pdf_bytes(objects, root=catalog, info=info))
    return path


def pdf_bytes(objects: Sequence[bytes], *, root: int = 1, info: int | None = None) -> bytes:
    """A PDF file of numbered ``objects`` (1-based) with its cross-reference table and trailer."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root %d 0 R" % (len(objects) + 1, root)
    if info:
        out += b" /Info %d 0 R" % info
    out += b" >>\nstartxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def write_docx(path: Path, title: str, sections: Sequence[tuple[str, Sequence[str]]], *,
               page_breaks_before: Sequence[int] = (), table: Sequence[Sequence[str]] = ()) -> Path:
    """A Word document: a Title paragraph, then per section a ``Heading 1`` and its paragraphs.
    ``page_breaks_before`` lists section indexes that start on a new page (explicit page breaks)."""
    import docx

    doc = docx.Document()
    doc.add_paragraph(title, style="Title")
    for n, (heading, paragraphs) in enumerate(sections):
        if n in page_breaks_before:
            doc.add_page_break()
        doc.add_heading(heading, level=1 if n % 2 == 0 else 2)
        for para in paragraphs:
            doc.add_paragraph(para)
    if table:
        grid = doc.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, value in enumerate(row):
                grid.cell(r, c).text = value
    doc.save(str(path))
    return path


def write_html(path: Path, title: str, sections: Sequence[tuple[str, Sequence[str]]], *,
               nav_links: Sequence[str] = ("Home", "Study", "Research", "Contact us")) -> Path:
    """A university web page: site header with navigation, breadcrumbs, a sidebar, the article in
    ``<main>``, a footer, scripts and styles."""
    nav = "".join(f'<li><a href="/{x.lower()}">{x}</a></li>' for x in nav_links)
    body = "".join(f"<h2>{h}</h2>" + "".join(f"<p>{p}</p>" for p in ps) for h, ps in sections)
    html = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title} | The University of Edinburgh</title>
<style>body {{ font-family: sans-serif; }} .hidden {{ display: none }}</style>
<script>window.analytics = {{track: function() {{ return "tracking code"; }}}};</script></head>
<body>
<header class="site-header"><a class="logo" href="/">University logo</a>
  <nav aria-label="Main"><ul>{nav}</ul></nav>
  <form role="search"><input name="q"><button>Search the site</button></form></header>
<div class="breadcrumbs" role="navigation"><a href="/">Home</a> &gt; <a href="/it">Information Services</a></div>
<main id="content"><h1>{title}</h1>{body}
  <aside><h3>Related links</h3><ul><li><a href="/x">Sidebar related link</a></li></ul></aside></main>
<footer><p>Copyright footer text, privacy and cookies statement.</p></footer>
<script>console.log("late script");</script>
</body></html>"""
    path.write_text(html, encoding="utf-8")
    return path
