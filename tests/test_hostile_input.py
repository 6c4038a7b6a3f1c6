"""Hostile input (issue 16, "bounded work per file"): bombs, one bad byte, pathological markup. Each
case is a real file through the real ``campus-search ingest`` in a subprocess under a memory limit
(tests/hostile.py), or a real request to the real app. One bad file is a per-file error (reported,
exit status 3); every good file of the same run is stored."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import TEST_SECRET
from docfiles import write_docx, write_html, write_pdf
from hostile import (
    docx_bomb,
    docx_damaged_table,
    pdf_stream_bomb,
    pdf_text,
    pdf_with_streams,
    run_limited,
    yaml_alias_bomb,
)

from campus_search.textrules import MAX_SECTION_TITLE_CHARS, MAX_TITLE_CHARS

CLI = [sys.executable, "-m", "campus_search.cli"]
MiB = 1024 * 1024
GOOD = "Library opening hours are extended during the examination period, until midnight."


def ingest(env: dict[str, str], *paths: Path, extra: tuple[str, ...] = ()) -> tuple[int, dict[str, Any], str]:
    proc = run_limited([*CLI, "ingest", *map(str, paths), "--quiet", *extra], env)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture
def cli_env(make_database: Callable[[], str], tmp_path: Path) -> dict[str, str]:
    return {"DATABASE_URL": make_database(), "DATA_DIR": str(tmp_path / "state"), "JWT_SECRET_KEY": TEST_SECRET,
            "DB_POOL_MIN_SIZE": "1", "EMBEDDING_PROVIDER": "local", "LOG_LEVEL": "ERROR"}


def stored(dsn: str) -> dict[str, tuple[str, list[str | None]]]:
    """external_id -> (title, section titles of its chunks)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT d.external_id, d.title, array_agg(c.section_title ORDER BY c.chunk_index) "
                            "FROM documents d JOIN chunks c ON c.document_id = d.id GROUP BY 1, 2").fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def test_bombs_and_bad_bytes_fail_alone_and_the_rest_of_the_run_is_stored(cli_env: dict[str, str],
                                                                            tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    # good files, one per format, and good files that used to break parsers
    (docs / "good.md").write_text(f"# Opening hours\n\n{GOOD}\n")
    write_pdf(docs / "good.pdf", [["Tuition fees are paid in two instalments each year."]])
    write_docx(docs / "good.docx", "Annual Leave", [("Entitlement", ["Staff get thirty days of leave."])])
    write_html(docs / "good.html", "Printing", [("Costs", ["Colour pages cost twenty pence each."])])
    (docs / "deep.html").write_text("<html><body>" + "<div>" * 1000 + "<p>Deeply nested guidance on "
                                    "parking permits.</p>" + "</div>" * 1000 + "</body></html>")
    (docs / "long-title.html").write_text("<html><body><main><h1>" + "Enormous heading " * 62_000 + "</h1>"
                                          "<h2>" + "Section " * 500 + "</h2><p>Text under a long heading about "
                                          "sports centre membership.</p></main></body></html>")
    # bad files
    (docs / "yaml-bomb.md").write_text(yaml_alias_bomb())
    (docs / "alias.md").write_text('---\nx: &name "IT Services"\ndepartment: *name\n---\n\nAliased metadata.\n')
    docx_bomb(docs / "bomb.docx", 96 * MiB)
    pdf_stream_bomb(docs / "bomb.pdf", 96 * MiB)
    (docs / "nul.md").write_bytes(b"# NUL\n\nA paragraph with a \x00 byte.\n")
    pdf_with_streams(docs / "nul.pdf", [pdf_text(b"Refunds take \\000 ten days.")])
    docx_damaged_table(docs / "table.docx")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b"\n".join([
        json.dumps({"_id": "j1", "title": "Good line", "text": "Sports centre membership is free for staff."}).encode(),
        json.dumps({"_id": "j2", "title": "NUL", "text": "a \u0000 b"}).encode(),
        b'{"_id": "j3", "title": "Surrogate \\ud800", "text": "lone surrogate"}',
        b'{"_id": "j4", "title": "Latin-1 \xe9", "text": "not UTF-8"}',
        json.dumps({"_id": "j5", "title": "Also good", "text": "Bike storage is behind the library."}).encode(),
    ]) + b"\n")

    code, summary, err = ingest(cli_env, docs, corpus)

    assert "Traceback" not in err and "MemoryError" not in err, err[-3000:]
    assert code == 3, err[-3000:]
    expected_errors = {
        "yaml-bomb.md": "not lists or mappings",
        "alias.md": "YAML aliases (*name) are not allowed in metadata",
        "bomb.docx": "unpacks to more than 67,108,864 bytes (MAX_DOCUMENT_UNPACKED_BYTES",
        "bomb.pdf": "unpacks to more than 67,108,864 bytes (MAX_DOCUMENT_UNPACKED_BYTES",
        "nul.md": "contains a NUL character (U+0000)",
        "nul.pdf": "contains a NUL character (U+0000)",
        "table.docx": "not a readable DOCX (damaged document structure)",
        "corpus.jsonl:2": "contains a NUL character (U+0000)",
        "corpus.jsonl:3": "contains a lone surrogate (U+D800)",
        "corpus.jsonl:4": "not UTF-8 text",
    }
    lines = err.splitlines()
    for name, message in expected_errors.items():
        assert any(f"{name}: " in line and message in line for line in lines), (name, message, err[-3000:])
    assert summary["failed"] == len(expected_errors), summary
    assert summary["added"] == 8, (summary, err[-3000:])

    docs_stored = stored(cli_env["DATABASE_URL"])
    assert set(docs_stored) == {"good.md", "good.pdf", "good.docx", "good.html", "deep.html", "long-title.html",
                                "j1", "j5"}
    title, sections = docs_stored["long-title.html"]
    assert len(title) <= MAX_TITLE_CHARS and title.startswith("Enormous heading") and title.endswith("…")
    assert all(s is not None and len(s) <= MAX_SECTION_TITLE_CHARS for s in sections)
    with psycopg.connect(cli_env["DATABASE_URL"]) as conn:
        texts = {r[0] for r in conn.execute("SELECT c.text FROM chunks c JOIN documents d ON d.id = c.document_id "
                                            "WHERE d.external_id = 'deep.html'")}
    assert texts == {"Deeply nested guidance on parking permits."}


def test_markdown_patterns_do_not_backtrack_over_a_line() -> None:
    """Lines a few hundred KB long that made the heading, link and emphasis patterns backtrack
    (cubic or quadratic: hours for these). Each must parse in linear time; the subprocess's timeout is
    the bound, not an assertion on speed."""
    script = (
        "from campus_search.parsers import parse_markdown\n"
        "lines = ['# ' + ' ' * 20000 + '#' * 20000 + ' ' * 20000 + 'y', '[' * 200000, '[a](' * 100000,\n"
        "         '*a ' * 100000, '_a ' * 100000, '## Costs ##', 'See [the form](http://x/f) and **bold** text.']\n"
        "title, blocks, _ = parse_markdown('# Markup\\n\\n' + '\\n\\n'.join(lines), fallback_title='x')\n"
        "print(title, len(blocks), blocks[-1].section_title, '|', blocks[-1].text)\n")
    proc = run_limited([sys.executable, "-c", script], {}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() [:3] == ["Markup", "5", "Costs"]
    assert proc.stdout.strip().endswith("| See the form and bold text.")


def test_text_and_chunk_limits_refuse_a_document_and_keep_the_rest(cli_env: dict[str, str], tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "small.md").write_text(f"# Small\n\n{GOOD}\n")
    (docs / "long.txt").write_text("\n\n".join(f"Paragraph {i}. " + "Words about the library. " * 20
                                               for i in range(40)))  # ~20,000 characters
    many = "\n\n".join(f"## Heading {i}\n\nShort section {i}." for i in range(30))  # 30 sections: 30 chunks
    (docs / "many.md").write_text(f"# Many\n\n{many}\n")
    env = {**cli_env, "MAX_DOCUMENT_CHARS": "10000", "MAX_DOCUMENT_CHUNKS": "20"}

    code, summary, err = ingest(env, docs)

    assert code == 3 and summary["added"] == 1 and summary["failed"] == 2, err[-3000:]
    assert "long.txt: more than 10,000 characters of text (MAX_DOCUMENT_CHARS)" in err
    assert "many.md: 30 chunks, more than 20 (MAX_DOCUMENT_CHUNKS)" in err
    assert set(stored(cli_env["DATABASE_URL"])) == {"small.md"}


def test_all_decoded_pdf_streams_together_are_bounded(cli_env: dict[str, str], tmp_path: Path) -> None:
    """Three pages, each stream under the limit, together over it."""
    docs = tmp_path / "docs"
    docs.mkdir()
    page = pdf_text(b"A page of the handbook.") + b"\n" + b"%" + b" " * (400 * 1024) + b"\n"
    pdf_with_streams(docs / "pages.pdf", [page, page, page])
    pdf_with_streams(docs / "one.pdf", [page])
    code, summary, err = ingest({**cli_env, "MAX_DOCUMENT_UNPACKED_BYTES": str(1_000_000)}, docs)
    assert code == 3 and summary["added"] == 1, err[-3000:]
    assert "pages.pdf: unpacks to more than 1,000,000 bytes (MAX_DOCUMENT_UNPACKED_BYTES" in err
