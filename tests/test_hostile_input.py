"""Hostile input (issue 16, "bounded work per file"): bombs, one bad byte, pathological markup. Each
case is a real file through the real ``campus-search ingest`` in a subprocess under a memory limit
(tests/hostile.py), or a real request to the real app. One bad file is a per-file error (reported,
exit status 3); every good file of the same run is stored."""

from __future__ import annotations

import io
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

from campus_search.ingest.textrules import MAX_SECTION_TITLE_CHARS, MAX_TITLE_CHARS

CLI = [sys.executable, "-m", "campus_search.cli.main"]
MiB = 1024 * 1024
GOOD = "Library opening hours are extended during the examination period, until midnight."


def ingest(env: dict[str, str], *paths: Path, extra: tuple[str, ...] = ()) -> tuple[int, dict[str, Any], str]:
    proc = run_limited([*CLI, "ingest", *map(str, paths), "--quiet", *extra], env)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture
def cli_env(make_database: Callable[[], str], tmp_path: Path) -> dict[str, str]:
    # documents nobody restricts are public here (tests/test_access_writes.py covers DEFAULT_VISIBILITY)
    return {"DATABASE_URL": make_database(), "DATA_DIR": str(tmp_path / "state"), "JWT_SECRET_KEY": TEST_SECRET,
            "DB_POOL_MIN_SIZE": "1", "EMBEDDING_PROVIDER": "local", "LOG_LEVEL": "ERROR",
            "DEFAULT_VISIBILITY": "public", "CAMPUS_SEARCH_CONFIG": ""}


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
        "from campus_search.ingest.sources import parse_markdown\n"
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


# ------------------------------------------------------------------------------------- HTTP API

API_SCRIPT = """
import io, json, sys
from campus_search.app import create_app
from campus_search.config import load_settings
from campus_search.security.auth import mint_token
from campus_search.services import Services

settings = load_settings()
app = create_app(Services(settings))
client = app.test_client()
admin = {"Authorization": "Bearer " + mint_token(settings, sub="admin", role="admin")}
out = []
for name, path in json.loads(sys.argv[1]):
    with open(path, "rb") as fh:
        data = fh.read()
    if name.endswith(".md"):
        r = client.put("/api/admin/documents/" + name, headers=admin, json={"text": data.decode()})
    else:
        r = client.put("/api/admin/documents/" + name, headers=admin, content_type="multipart/form-data",
                       data={"file": (io.BytesIO(data), name)})
    out.append([name, r.status_code, (r.get_json().get("error") or {}).get("message", "")])
print(json.dumps(out))
"""


def test_bombs_through_the_admin_api_are_refused_within_bounded_memory(cli_env: dict[str, str],
                                                                       tmp_path: Path) -> None:
    """The same parsers serve PUT /api/admin/documents: a 100 KB DOCX that unpacks to 96 MiB (the
    report's 121 KB one took a worker to 1.66 GB) and the YAML bombs, in a process limited to 1.5 GB."""
    files = [("bomb.docx", docx_bomb(tmp_path / "bomb.docx", 96 * MiB)),
             ("yaml-bomb.md", tmp_path / "yaml-bomb.md"), ("alias.md", tmp_path / "alias.md"),
             ("fine.md", tmp_path / "fine.md")]
    (tmp_path / "yaml-bomb.md").write_text(yaml_alias_bomb())
    (tmp_path / "alias.md").write_text('---\nx: &t "A title"\ntitle: *t\n---\n\nAliased.\n')
    (tmp_path / "fine.md").write_text(f"# Fine\n\n{GOOD}\n")
    assert (tmp_path / "bomb.docx").stat().st_size < 200_000
    proc = run_limited([sys.executable, "-c", API_SCRIPT, json.dumps([(n, str(p)) for n, p in files])], cli_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = {name: (status, message) for name, status, message in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert answers["bomb.docx"][0] == 422 and "MAX_DOCUMENT_UNPACKED_BYTES" in answers["bomb.docx"][1]
    assert answers["yaml-bomb.md"] == (422, "inline.md: front matter: metadata values must be single values "
                                            "(text, numbers, dates), not lists or mappings")
    assert answers["alias.md"] == (422, "inline.md: front matter: YAML aliases (*name) are not allowed in metadata")
    assert answers["fine.md"][0] == 201
    assert set(stored(cli_env["DATABASE_URL"])) == {"fine.md"}


@pytest.fixture
def api(settings_factory: Any, services_factory: Any, token: Any) -> tuple[Any, dict[str, str], Any]:
    from campus_search.app import create_app

    services = services_factory(settings_factory(default_visibility="public"))
    app = create_app(services)
    app.config["TESTING"] = True
    return app.test_client(), {"Authorization": token("admin")}, services


def test_unstorable_text_and_malformed_bodies_are_400s(api: Any) -> None:
    client, admin, _ = api
    assert client.put("/api/admin/documents/keep", headers=admin, json={"text": f"# Keep\n\n{GOOD}"}).status_code == 201
    cases = [
        ("patch", "keep", {"json": {"metadata": {"department": "\ud800"}}}, "contains a lone surrogate (U+D800)"),
        ("put", "keep", {"json": {"text": "a \ud800"}}, "contains a lone surrogate (U+D800)"),
        ("put", "keep", {"json": {"text": "x", "title": "\udc00"}}, "contains a lone surrogate (U+DC00)"),
        ("put", "keep", {"json": {"text": "a \u0000 b"}}, "contains a NUL character"),
        ("put", "keep", {"data": b'{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                         "content_type": "application/json"}, "send a JSON object"),
        ("put", "keep", {"data": (b"--B\r\nContent-Disposition: form-data\r\n\r\nnameless\r\n--B\r\n"
                                  b'Content-Disposition: form-data; name="x"\r\n\r\nxv\r\n--B--\r\n'),
                         "content_type": "multipart/form-data; boundary=B"}, "every multipart part needs a name"),
        ("put", "keep", {"data": {"file": [(io.BytesIO(b"one"), "a.txt"), (io.BytesIO(b"two"), "b.txt")]},
                         "content_type": "multipart/form-data"}, "may be given once"),
        ("patch", "keep", {"json": {"metadata": None}}, "metadata must be a JSON object"),
        ("put", "keep", {"json": {"text": "x", "metadata": None}}, "metadata must be a JSON object"),
        ("put", "keep", {"json": {"text": "x", "title": "t" * 301}}, "at most 300 characters"),
    ]
    for method, doc_id, kwargs, message in cases:
        r = getattr(client, method)(f"/api/admin/documents/{doc_id}", headers=admin, **kwargs)
        body = r.get_json()
        assert r.status_code == 400 and message in body["error"]["message"], (method, kwargs, r.status_code, body)
    doc = client.get("/api/admin/documents/keep", headers=admin).get_json()
    assert doc["title"] == "Keep" and doc["metadata"]["department"] is None
    search = client.post("/api/search", headers=admin, json={"query": "library hours", "user": [None, None]})
    assert search.status_code == 400 and "user must be an object" in search.get_json()["error"]["message"]
    deep = client.post("/api/search", headers=admin, data=b"[" * 60_000, content_type="application/json")
    assert deep.status_code == 400


def test_nested_html_is_read_and_titles_are_capped(api: Any) -> None:
    """'<div>' * 1000 raised RecursionError (a 500); now the page is read at any depth. A 1 MB <h1>
    made every search result carry the megabyte; titles are capped (textrules.py)."""
    client, admin, _ = api
    deep = "<html><body>" + "<div>" * 1000 + "<p>Deeply nested guidance on parking permits.</p>" + "</div>" * 1000
    r = client.put("/api/admin/documents/deep", headers=admin, content_type="multipart/form-data",
                   data={"file": (io.BytesIO(deep.encode()), "deep.html")})
    assert r.status_code == 201, r.get_json()
    empty = client.put("/api/admin/documents/empty", headers=admin, json={"text": "<div>" * 1000, "format": "html"})
    assert empty.status_code == 422 and "no text found" in empty.get_json()["error"]["message"]
    page = ("<html><body><main><h1>" + "Enormous heading " * 62_000 + "</h1><h2>" + "Section " * 500
            + "</h2><p>Sports centre membership is free for all staff.</p></main></body></html>")
    r = client.put("/api/admin/documents/long", headers=admin, json={"text": page, "format": "html"})
    assert r.status_code == 201, r.get_json()
    found = client.post("/api/search", headers=admin, json={"query": "sports centre membership for staff"})
    assert found.status_code == 200 and len(found.get_data()) < 20_000
    hit = next(h for h in found.get_json()["results"] if h["document_id"] == "long")
    assert len(hit["document_title"]) <= MAX_TITLE_CHARS and hit["document_title"].endswith("…")
    assert len(hit["section_title"]) <= MAX_SECTION_TITLE_CHARS


def test_document_ids_are_taken_exactly_or_refused(api: Any) -> None:
    client, admin, _ = api
    for doc_id in ("it/printing guide.md", "café/menü", "a b"):
        r = client.put(f"/api/admin/documents/{doc_id}", headers=admin, json={"text": f"# T\n\n{GOOD}"})
        assert r.status_code == 201 and r.get_json()["document_id"] == doc_id, r.get_json()
        assert client.get(f"/api/admin/documents/{doc_id}", headers=admin).get_json()["document_id"] == doc_id
    for raw, why in [("x%0A", "U+000A"), ("x%20", "whitespace at either end"), ("%20x", "whitespace"),
                     ("x%0C", "U+000C"), ("%0Cx", "U+000C"), ("x%C2%85", "U+0085"), ("x%E2%80%A8y", "U+2028"),
                     ("%ff", "not valid UTF-8"), ("%fe", "not valid UTF-8"), ("x" * 501, "1-500 characters")]:
        for method in ("get", "put", "patch", "delete"):
            r = getattr(client, method)(f"/api/admin/documents/{raw}", headers=admin, json={"text": "t"})
            body = r.get_json()
            assert r.status_code == 400 and why in body["error"]["message"], (raw, method, body)
    # the ids that were stripped before: "a b" is not "a b " (and was never created as such)
    assert client.get("/api/admin/documents?limit=500", headers=admin).get_json()["total"] == 3
    assert client.get("/api/admin/documents?limit=501", headers=admin).status_code == 400


def test_an_unexpected_parser_exception_is_one_files_error(settings_factory: Any, services_factory: Any, token: Any,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: a library failing in a way nobody foresaw (here the HTML parser and the
    Markdown heading reader raise RuntimeError) fails that file only, with its class in the report."""
    import selectolax.lexbor

    from campus_search.ingest import sources as parsers
    from campus_search.ingest.sync import sync_paths

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("a library bug")

    docs = tmp_path / "docs"
    docs.mkdir()
    write_html(docs / "page.html", "Page", [("S", ["Text of the page."])])
    (docs / "notes.md").write_text("# Notes\n\nNotes about the canteen.\n")
    (docs / "plain.txt").write_text(f"{GOOD}\n")
    monkeypatch.setattr(selectolax.lexbor, "LexborHTMLParser", broken)
    monkeypatch.setattr(parsers, "_heading", broken)
    services = services_factory(settings_factory(default_visibility="public"))
    report = sync_paths(services.ingester, [docs])
    assert (report.added, report.failed) == (1, 2), report.errors
    assert sorted(e.rsplit("/", 1)[1] for e in report.errors) == [
        "notes.md: could not be parsed (RuntimeError)", "page.html: could not be parsed (RuntimeError)"]

    from campus_search.app import create_app

    client = create_app(services).test_client()
    r = client.put("/api/admin/documents/page", headers={"Authorization": token("admin")},
                   json={"text": "<p>A page.</p>", "format": "html"})
    assert r.status_code == 422
    assert r.get_json()["error"]["message"] == "inline.html: could not be parsed (RuntimeError)"


def test_chunk_export_applies_the_same_checks_and_caps_as_ingest(embedder: Any) -> None:
    """``campus-search chunks`` hashes must be the ones ingest stores: the title is capped the same
    way, and a document ingest refuses is left out and counted."""
    from campus_search.ingest.chunking import Block, embedding_text
    from campus_search.ingest.pipeline import Ingester, IngestReport, _chunk_hash
    from campus_search.ingest.sources import ParsedDocument

    ingester = Ingester(None, embedder)  # type: ignore[arg-type]  # chunking only
    long_title = "Policy " * 100
    docs = [ParsedDocument("a", long_title, [Block(GOOD)], source="a.md"),
            ParsedDocument("b", "NUL", [Block("a \x00 b")], source="b.md")]
    report = IngestReport()
    exported = list(ingester.chunk_inputs(docs, report))
    assert report.failed == 1 and "b.md: text contains a NUL character" in report.errors[0]
    [(digest, text)] = exported
    capped = text.split("\n", 1)[0]
    assert len(capped) <= MAX_TITLE_CHARS and capped.endswith("…") and long_title.startswith(capped[:-1])
    assert digest == _chunk_hash(embedder.model_name, embedding_text(capped, None, GOOD))
