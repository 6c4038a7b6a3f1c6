"""A result's page is where its text is (issue 11): a PDF of short pages used to become one chunk cited
as page 1. A chunk never crosses a page boundary, so the page reported is the page of all its text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from docfiles import write_pdf

from campus_search.cli.main import ingest_paths
from campus_search.ingest.chunking import Block, chunk_blocks
from campus_search.ingest.metadata import AccessMetadata
from campus_search.retrieval.params import SearchParams
from campus_search.security.roles import DEFAULT_ROLES, Principal

PAGES = [
    ["Fire safety in university buildings. Know your nearest exit."],
    ["Fire alarms are tested every Monday at ten o'clock."],
    ["Assembly points: staff of the chemistry building assemble on the lawn by the library."],
]


def test_pdf_result_cites_the_page_of_its_text(settings_factory: Any, services_factory: Any,
                                               tmp_path: Path) -> None:
    services = services_factory(settings_factory())
    pdf = write_pdf(tmp_path / "fire-safety.pdf", PAGES, title="Fire safety")
    report = ingest_paths(services, [pdf], AccessMetadata(), quiet=True)
    assert report.added == 1 and report.failed == 0
    with services.db.connection() as conn:
        chunks = conn.execute("SELECT page_number, text FROM chunks ORDER BY chunk_index").fetchall()
    assert [page for page, _ in chunks] == [1, 2, 3]
    for page, text in chunks:  # each chunk holds only its own page's text
        assert text.split()[0] == PAGES[page - 1][0].split()[0]
    hits = services.searcher.search(Principal("s", DEFAULT_ROLES["student"]),
                                    SearchParams("where do chemistry staff assemble", max_results=3))
    assert hits[0].page_number == 3 and "lawn" in hits[0].text and "Monday" not in hits[0].text


def test_a_chunk_never_spans_pages() -> None:
    def words(texts: Any) -> list[int]:
        return [len(t.split()) for t in texts]

    blocks = [Block("One. Two.", "S", 1), Block("Three. Four.", "S", 2), Block("Five.", "S", 2),
              Block("Six.", "S", 4)]
    chunks = chunk_blocks(blocks, words, max_tokens=100, overlap=10)
    assert [(c.page_number, c.text) for c in chunks] == [(1, "One. Two."), (2, "Three. Four.\nFive."), (4, "Six.")]
