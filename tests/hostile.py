"""Writers for hostile inputs: tiny files that unpack or expand to far more than they weigh, and files
with one bad byte. Nothing large is stored in the repository; everything is generated here, streamed
so that writing a bomb costs the test no more memory than the bomb's compressed size.

Also :func:`run_limited`: a command in a subprocess under an address-space limit, so a regression
makes the test fail (MemoryError, or the kernel refusing memory) instead of exhausting the machine."""

from __future__ import annotations

import io
import os
import resource
import subprocess
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

from docfiles import pdf_bytes, write_docx

MEMORY_LIMIT = 1536 * 1024 * 1024  # address space of a subprocess under test (the ONNX model needs ~500 MB)


def run_limited(argv: Sequence[str], env: dict[str, str], *, timeout: float = 300,
                memory: int = MEMORY_LIMIT) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with at most ``memory`` bytes of address space and ``timeout`` seconds."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run(list(argv), capture_output=True, text=True, env={**os.environ, **env},
                          timeout=timeout, preexec_fn=limit)  # noqa: PLW1509 - only setrlimit, before exec


def yaml_alias_bomb(levels: int = 7, width: int = 9) -> str:
    """Markdown whose front matter title is ``width ** levels`` (4.8 million) strings by reference:
    each anchor is a list of ``width`` aliases of the one before. About 400 bytes."""
    lines = ["---", 'a0: &a0 ["lol"]']
    for n in range(1, levels):
        lines.append(f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * width)}]")
    lines += [f"title: *a{levels - 1}", "---", "", "The body of the billion laughs."]
    return "\n".join(lines) + "\n"


def docx_bomb(path: Path, unpacked: int) -> Path:
    """A real Word document whose ``word/document.xml`` is well-formed XML of ``unpacked`` bytes (one
    paragraph of one repeated letter): a few hundred KB on disk."""
    template = io.BytesIO()
    template_path = write_docx(path.with_suffix(".template.docx"), "Template", [("S", ["x"])])
    template.write(template_path.read_bytes())
    template_path.unlink()
    with zipfile.ZipFile(template) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename == "word/document.xml":
                continue
            dst.writestr(info, src.read(info.filename))
        w = b'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'
        dst_info = zipfile.ZipInfo("word/document.xml")
        dst_info.compress_type = zipfile.ZIP_DEFLATED
        with dst.open(dst_info, "w", force_zip64=True) as out:
            out.write(b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:document ' + w
                      + b"><w:body><w:p><w:r><w:t>")
            block = b"a" * (1 << 20)
            for _ in range(unpacked // len(block)):
                out.write(block)
            out.write(b"</w:t></w:r></w:p></w:body></w:document>")
    return path


def docx_damaged_table(path: Path) -> Path:
    """A Word document whose table cell spans "abc" columns (python-docx raises reading its rows)."""
    template = path.with_suffix(".template.docx")
    write_docx(template, "Damaged", [("Section", ["A paragraph before the table."])], table=[["a", "b"], ["c", "d"]])
    with zipfile.ZipFile(template) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "word/document.xml":
                data = data.replace(b"<w:tcPr>", b'<w:tcPr><w:gridSpan w:val="abc"/>', 1)
            dst.writestr(info, data)
    template.unlink()
    return path


def _pdf(objects: list[bytes]) -> bytes:
    """A PDF file of ``objects`` (1-based numbering; object 1 must be the catalog)."""
    return pdf_bytes(objects)


def pdf_with_streams(path: Path, contents: Sequence[bytes], *, compress: bool = True) -> Path:
    """One page per content stream (Helvetica as /F1), each stream Flate-compressed."""
    font = 3 + 2 * len(contents)
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]
    kids = []
    for n, content in enumerate(contents):
        page, stream = 3 + 2 * n, 4 + 2 * n
        kids.append(b"%d 0 R" % page)
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
                       b"/Resources << /Font << /F1 %d 0 R >> >> >>" % (stream, font))
        data = zlib.compress(content, 9) if compress else content
        objects.append(b"<< /Length %d%s >>\nstream\n" % (len(data), b" /Filter /FlateDecode" if compress else b"")
                       + data + b"\nendstream")
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(kids), len(contents))
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    path.write_bytes(_pdf(objects))
    return path


def pdf_stream_bomb(path: Path, unpacked: int) -> Path:
    """A one-page PDF whose content stream inflates to ``unpacked`` bytes (spaces after one line of text)."""
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(b"BT /F1 10 Tf 60 760 Td (A page of a bomb.) Tj ET\n")]
    block = b" " * (1 << 20)
    for _ in range(unpacked // len(block)):
        parts.append(compressor.compress(block))
    parts.append(compressor.flush())
    data = b"".join(parts)
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data) + data + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"]
    path.write_bytes(_pdf(objects))
    return path


def pdf_text(line: bytes) -> bytes:
    """A content stream showing one PDF string (``line`` is the string's raw bytes, escapes allowed)."""
    return b"BT /F1 10 Tf 60 760 Td (" + line + b") Tj ET"


__all__ = ["MEMORY_LIMIT", "docx_bomb", "docx_damaged_table", "pdf_stream_bomb", "pdf_text", "pdf_with_streams",
           "run_limited", "yaml_alias_bomb"]
