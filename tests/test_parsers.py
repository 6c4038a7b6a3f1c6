"""Parsers on real files the tests write: PDF pages and bookmarks, DOCX headings, HTML without chrome,
Markdown front matter, sidecar and folder metadata, and clear errors for bad files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from docfiles import write_docx, write_html, write_pdf

from campus_search.errors import IngestError
from campus_search.ingest.formats import ParseLimits
from campus_search.ingest.sources import discover, parse_bytes, parse_file, read_jsonl

LONG = ("Staff who forget their password must verify their identity with the IT Service Desk before a reset "
        "can be issued, and the new password must meet the complexity rules of the university.")


def test_pdf_text_per_page_with_sections_from_bookmarks(tmp_path: Path) -> None:
    pdf = write_pdf(tmp_path / "handbook.pdf", [
        ["Introduction", "This handbook explains how staff accounts are managed by Information Services.", LONG],
        ["More introductory text on the second page continues the same section."],
        ["Password Reset Procedures", LONG, "Resets are logged and audited every month."],
        ["Account Closure", "Accounts close ninety days after a contract ends."],
    ], title="IT Staff Account Handbook", bookmarks=[("Introduction", 0), ("Password Reset Procedures", 2),
                                                     ("Account Closure", 3)])
    doc = parse_file(pdf, tmp_path)
    assert doc.title == "IT Staff Account Handbook"
    assert doc.external_id == "handbook.pdf"
    assert doc.source == str(pdf.resolve())
    by_text = {b.text: (b.section_title, b.page_number) for b in doc.blocks}
    assert by_text[LONG.replace("  ", " ")] in {("Introduction", 1), ("Password Reset Procedures", 3)}
    assert by_text["More introductory text on the second page continues the same section."] == ("Introduction", 2)
    assert by_text["Resets are logged and audited every month."] == ("Password Reset Procedures", 3)
    assert by_text["Accounts close ninety days after a contract ends."] == ("Account Closure", 4)
    # headings are section titles, not body text; wrapped lines are re-joined into one paragraph
    assert "Account Closure" not in by_text
    assert sum(1 for b in doc.blocks if b.text == LONG) == 2


def test_pdf_without_bookmarks_has_pages_and_the_title_as_section(tmp_path: Path) -> None:
    pdf = write_pdf(tmp_path / "notice.pdf", [["First page text here."], ["Second page text here."]])
    doc = parse_file(pdf, tmp_path)
    assert doc.title == "Notice"
    assert [(b.text, b.section_title, b.page_number) for b in doc.blocks] == [
        ("First page text here.", "Notice", 1), ("Second page text here.", "Notice", 2)]


def test_text_before_the_first_heading_is_under_the_title(tmp_path: Path) -> None:
    """What a reader sees above a passage: the nearest heading, else the document's title -- never nothing."""
    md = tmp_path / "leave.md"
    md.write_text("# Annual Leave\n\nThis policy applies to all staff.\n\n## Carry-over\n\nUp to five days.\n")
    assert [(b.text, b.section_title) for b in parse_file(md, tmp_path).blocks] == [
        ("This policy applies to all staff.", "Annual Leave"), ("Up to five days.", "Carry-over")]
    page = tmp_path / "rooms.html"
    page.write_text("<html><body><main><h1>Room booking</h1><p>Book through the portal.</p><h2>Cancelling</h2>"
                    "<p>Cancel a day ahead.</p></main></body></html>", encoding="utf-8")
    assert [(b.text, b.section_title) for b in parse_file(page, tmp_path).blocks] == [
        ("Book through the portal.", "Room booking"), ("Cancel a day ahead.", "Cancelling")]


def test_plain_text_title_is_its_heading_line_else_its_file_name(tmp_path: Path) -> None:
    headed = tmp_path / "parking.txt"
    headed.write_text("Parking permits\n\nStaff parking permits are renewed every August.\n\nApply online.\n")
    doc = parse_file(headed, tmp_path)
    assert doc.title == "Parking permits"  # the line a reader sees at the top, not the file name
    assert [(b.text, b.section_title) for b in doc.blocks] == [
        ("Staff parking permits are renewed every August.", "Parking permits"), ("Apply online.", "Parking permits")]
    prose = tmp_path / "bike_storage.txt"
    prose.write_text("Bikes may be stored in the racks by the library.\n\nThe racks are checked nightly.\n")
    doc = parse_file(prose, tmp_path)
    assert doc.title == "Bike storage"  # the first line is a sentence, not a heading: the file name
    assert [(b.text, b.section_title) for b in doc.blocks] == [
        ("Bikes may be stored in the racks by the library.", "Bike storage"),
        ("The racks are checked nightly.", "Bike storage")]
    named = parse_bytes(b"Parking permits\n\nRenewed in August.", "p.txt", external_id="p",
                        metadata={"title": "Parking"})
    assert named.title == "Parking"  # metadata wins; the heading line is kept as the section, not lost
    assert [(b.text, b.section_title) for b in named.blocks] == [("Renewed in August.", "Parking permits")]
    only = parse_bytes(b"Just one line", "memo.txt", external_id="m")
    assert only.title == "Memo" and [(b.text, b.section_title) for b in only.blocks] == [("Just one line", "Memo")]


def test_pdf_headings_from_font_size_when_there_are_no_bookmarks(tmp_path: Path) -> None:
    pdf = write_pdf(tmp_path / "policy.pdf", [
        ["# Scope", "This policy applies to all staff.", LONG],
        ["# Annual Leave Entitlement", "Full-time staff receive thirty days of leave.", LONG],
    ])
    doc = parse_file(pdf, tmp_path)
    assert [(b.text[:20], b.section_title, b.page_number) for b in doc.blocks] == [
        ("This policy applies ", "Scope", 1), (LONG[:20], "Scope", 1),
        ("Full-time staff rece", "Annual Leave Entitlement", 2), (LONG[:20], "Annual Leave Entitlement", 2)]


@pytest.mark.parametrize("data", [b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog", b"not a pdf at all", b""])
def test_corrupt_pdf_is_a_clear_ingest_error(tmp_path: Path, data: bytes) -> None:
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(data)
    with pytest.raises(IngestError) as info:
        parse_file(bad, tmp_path)
    assert info.value.message == f"{bad}: not a readable PDF (corrupt or truncated file)"


def test_pdf_without_text_says_so(tmp_path: Path) -> None:
    pdf = write_pdf(tmp_path / "scan.pdf", [[], []])
    with pytest.raises(IngestError, match="no text found in the PDF"):
        parse_file(pdf, tmp_path)


def test_docx_headings_become_section_titles(tmp_path: Path) -> None:
    docx_file = write_docx(tmp_path / "lab-safety.docx", "Laboratory Safety Induction", [
        ("Before you start", ["All new researchers complete the online induction.", "Bring your staff card."]),
        ("Chemical spills", ["Use the spill kit in the corridor and report every spill."]),
        ("Waste disposal", ["Sharps go in yellow bins."]),
    ], page_breaks_before=[2], table=[["Hazard", "Contact"], ["Fire", "Security 2222"]])
    doc = parse_file(docx_file, tmp_path)
    assert doc.title == "Laboratory Safety Induction"
    assert [(b.text, b.section_title, b.page_number) for b in doc.blocks] == [
        ("All new researchers complete the online induction.", "Before you start", 1),
        ("Bring your staff card.", "Before you start", 1),
        ("Use the spill kit in the corridor and report every spill.", "Chemical spills", 1),
        ("Sharps go in yellow bins.", "Waste disposal", 2),
        ("Hazard · Contact", "Waste disposal", 2),
        ("Fire · Security 2222", "Waste disposal", 2),
    ]


def test_docx_without_page_breaks_has_no_page_numbers(tmp_path: Path) -> None:
    doc = parse_file(write_docx(tmp_path / "memo.docx", "Memo", [("Notes", ["Text."])]), tmp_path)
    assert [(b.section_title, b.page_number) for b in doc.blocks] == [("Notes", None)]


def test_corrupt_docx_is_a_clear_ingest_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.docx"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(IngestError) as info:
        parse_file(bad, tmp_path)
    assert info.value.message == f"{bad}: not a readable DOCX (corrupt file or another format)"


def test_html_main_content_without_navigation_boilerplate(tmp_path: Path) -> None:
    page = write_html(tmp_path / "vpn.html", "VPN Remote Access", [
        ("Installing the client", ["Download the FortiClient VPN from the software centre.",
                                   "Sign in with your <b>EASE</b> username and <a href='/mfa'>MFA</a>."]),
        ("Troubleshooting", ["Restart the client if the connection drops."]),
    ])
    doc = parse_file(page, tmp_path)
    assert doc.title == "VPN Remote Access"
    assert [(b.text, b.section_title) for b in doc.blocks] == [
        ("Download the FortiClient VPN from the software centre.", "Installing the client"),
        ("Sign in with your EASE username and MFA.", "Installing the client"),
        ("Restart the client if the connection drops.", "Troubleshooting"),
    ]
    everything = " ".join(b.text for b in doc.blocks)
    for chrome in ("Home", "Contact us", "Search the site", "Copyright", "tracking code", "late script",
                   "Sidebar related link", "font-family", "Information Services", "University logo"):
        assert chrome not in everything


def test_html_without_main_uses_body_minus_header_and_footer(tmp_path: Path) -> None:
    page = tmp_path / "plain.htm"
    page.write_text("<html><head><title>Room booking</title></head><body><header>Site banner</header>"
                    "<nav>Menu</nav><div>Book rooms through the portal.<p>Cancel 24 hours ahead.</p></div>"
                    "<footer>Footer</footer></body></html>", encoding="utf-8")
    doc = parse_file(page, tmp_path)
    assert doc.title == "Room booking"
    assert [b.text for b in doc.blocks] == ["Book rooms through the portal.", "Cancel 24 hours ahead."]


def test_metadata_precedence_folder_then_sidecar_then_front_matter(tmp_path: Path) -> None:
    (tmp_path / ".campus-search.yaml").write_text("department: Library\ncampus: Central Campus\npriority: 2\n")
    sub = tmp_path / "it"
    sub.mkdir()
    (sub / ".campus-search.yaml").write_text("department: IT Services\nvisibility: department\n")
    md = sub / "guide.md"
    md.write_text("---\nclearance_level: 3\n---\n# Guide\n\nBody text.\n")
    (sub / "guide.md.meta.yaml").write_text("clearance_level: 2\npriority: 4\n")
    pdf = write_pdf(sub / "form.pdf", [["Form text."]])
    (sub / "form.pdf.meta.yaml").write_text("clearance_level: 4\nid: forms/expenses\n")

    md_doc = parse_file(md, tmp_path)
    assert md_doc.metadata == {"department": "IT Services", "campus": "Central Campus", "priority": 4,
                               "visibility": "department", "clearance_level": 3}
    pdf_doc = parse_file(pdf, tmp_path)
    assert pdf_doc.external_id == "forms/expenses"
    assert pdf_doc.metadata["clearance_level"] == 4 and pdf_doc.metadata["department"] == "IT Services"


def test_bad_sidecar_yaml_is_an_ingest_error(tmp_path: Path) -> None:
    md = tmp_path / "a.md"
    md.write_text("# A\n\ntext\n")
    (tmp_path / "a.md.meta.yaml").write_text("department: \"unclosed\n")
    with pytest.raises(IngestError, match="a.md.meta.yaml: invalid YAML"):
        parse_file(md, tmp_path)


def test_discover_skips_hidden_lock_sidecar_and_unsupported_files(tmp_path: Path) -> None:
    for name in ("a.md", "b.pdf", "c.docx", "d.html", "e.txt", "~$c.docx", ".hidden.md", "f.md.meta.yaml",
                 "image.png", "README.md"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.md").write_text("x")
    found = [p.name for p, root in discover([tmp_path])]
    assert found == ["a.md", "b.pdf", "c.docx", "d.html", "e.txt"]
    with pytest.raises(IngestError, match="no such file or directory"):
        list(discover([tmp_path / "missing"]))


def test_parse_bytes_for_uploads(tmp_path: Path) -> None:
    pdf = write_pdf(tmp_path / "x.pdf", [["Uploaded page one."], ["Uploaded page two."]])
    doc = parse_bytes(pdf.read_bytes(), "upload.PDF", external_id="policies/x", metadata={"priority": 5})
    assert doc.external_id == "policies/x" and doc.metadata == {"priority": 5}
    assert [b.page_number for b in doc.blocks] == [1, 2]
    md = parse_bytes(b"---\ntitle: From front matter\ndepartment: HR\n---\nText.", "n.md", external_id="n",
                     metadata={"department": "Finance"})
    assert md.title == "From front matter" and md.metadata == {"department": "Finance"}
    with pytest.raises(IngestError, match="unsupported file type .exe"):
        parse_bytes(b"MZ", "tool.exe", external_id="t")
    with pytest.raises(IngestError, match="not UTF-8"):
        parse_bytes(b"\xff\xfe\x00bad", "notes.txt", external_id="t")


def test_jsonl_sources_are_absolute_and_bad_lines_reported(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"_id": "1", "title": "T", "text": "Body."}\nnot json\n{"title": "no id"}\n')
    items = list(read_jsonl(corpus))
    assert items[0].source == f"{corpus.resolve()}:1"  # type: ignore[union-attr]
    assert [type(i).__name__ for i in items] == ["ParsedDocument", "IngestError", "IngestError"]


@pytest.mark.parametrize(("front_matter", "message"), [
    ('x: &a "IT Services"\ndepartment: *a', "YAML aliases (*name) are not allowed in metadata"),
    ("department: [IT, Library]", "not lists or mappings"),
    ("department: {name: IT}", "not lists or mappings"),
    ("title: " + "t" * 1001, "longer than 1000 characters"),
    ("last_reviewed: 2024-13-45", "invalid YAML (ValueError)"),  # a YAML timestamp no calendar has
    ("priority: " + "9" * 900, None),  # a long number is a value like any other (validated later)
])
def test_metadata_yaml_holds_single_bounded_values(tmp_path: Path, front_matter: str, message: str | None) -> None:
    md = tmp_path / "a.md"
    md.write_text(f"---\n{front_matter}\n---\n\nBody text.\n")
    if message is None:
        assert parse_file(md, tmp_path).metadata["priority"] == int("9" * 900)
        return
    with pytest.raises(IngestError, match=re.escape(f"{md}: front matter: ") + ".*" + re.escape(message)):
        parse_file(md, tmp_path)


def test_metadata_files_are_bounded(tmp_path: Path) -> None:
    md = tmp_path / "a.md"
    md.write_text("# A\n\ntext\n")
    (tmp_path / "a.md.meta.yaml").write_text("# padding\n" * 7000 + "department: IT\n")
    with pytest.raises(IngestError, match="a.md.meta.yaml: 70,015 bytes is over the limit of 65,536 .metadata file"):
        parse_file(md, tmp_path)


def test_files_over_the_unpacked_limit_are_not_read(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_text("word " * 1000)
    limits = ParseLimits(max_unpacked_bytes=4000)
    with pytest.raises(IngestError, match="5,000 bytes is over the limit of 4,000 .MAX_DOCUMENT_UNPACKED_BYTES"):
        parse_file(big, tmp_path, limits=limits)
    with pytest.raises(IngestError, match="over the limit of 4,000"):
        parse_bytes(big.read_bytes(), "big.txt", external_id="b", limits=limits)
    html = tmp_path / "p.html"
    html.write_text("<p>" + "word " * 700 + "</p>")
    with pytest.raises(IngestError, match="more than 3,000 characters of text .MAX_DOCUMENT_CHARS"):
        parse_file(html, tmp_path, limits=ParseLimits(max_chars=3000))


def test_jsonl_bad_bytes_and_long_lines_are_per_line_errors(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b'{"_id": "1", "text": "One."}\n{"_id": "2", "text": "caf\xe9"}\n'
                       b'{"_id": "3", "text": "' + b"x" * 5000 + b'"}\n' + b"[" * 3000 + b"\n"
                       b'{"_id": "n", "priority": ' + b"9" * 5000 + b"}\n"
                       b'{"_id": "4", "text": "Four."}\n')
    items = list(read_jsonl(corpus, ParseLimits(max_unpacked_bytes=4000)))
    errors = [i.message for i in items if isinstance(i, IngestError)]
    assert [i.external_id for i in items if not isinstance(i, IngestError)] == ["1", "4"]
    assert [e.split(": ", 1)[1] for e in errors] == [
        "not UTF-8 text (byte 26 of the line)", "line longer than 4,000 bytes (MAX_DOCUMENT_UNPACKED_BYTES)",
        "invalid JSON (RecursionError)", "line longer than 4,000 bytes (MAX_DOCUMENT_UNPACKED_BYTES)"]


def test_id_grammar() -> None:
    from campus_search.ingest.textrules import id_problem, shorten, text_problem

    for good in ("a", "it/printing guide.md", "café/menü", "x" * 500, "a\u00adb"):
        assert id_problem(good) is None, good
    for bad in ("", " a", "a ", "a\n", "a\x0cb", "a\x7f", "a\x85", "a\u2028", "a\ud800", "x" * 501, "\u3000a"):
        assert id_problem(bad) is not None, repr(bad)
    assert text_problem("fine") is None and "NUL" in (text_problem("a\x00") or "")
    assert "surrogate" in (text_problem("\udc80") or "")
    assert shorten("short", 10) == "short"
    assert shorten("one two three four five", 12) == "one two…" and len(shorten("x" * 50, 10)) == 10
