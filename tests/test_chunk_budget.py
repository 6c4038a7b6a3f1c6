"""A very long title or heading cannot starve chunks (issue 11: the budget went to <= 0 and every word
became a chunk), and token counting is one rule for the local and remote embedders."""

from __future__ import annotations

from typing import Any

from campus_search.embedding.base import MAX_SEQ_LENGTH
from campus_search.embedding.remote import RemoteEmbedder
from campus_search.ingest.chunking import Block
from campus_search.ingest.metadata import AccessMetadata
from campus_search.ingest.pipeline import HEAD_SHARE, IngestReport, _content_hash, _Pending
from campus_search.ingest.sources import ParsedDocument

BODY = " ".join(f"Sentence {i} explains how staff book the lecture theatre for the term." for i in range(25))
LONG = " ".join(["Regulations governing the administration of postgraduate research degrees"] * 60)


def test_long_title_and_heading_leave_room_for_text(settings_factory: Any, services_factory: Any,
                                                    embedder: Any) -> None:
    services = services_factory(settings_factory())
    doc = ParsedDocument(external_id="regs", title=LONG, blocks=[Block(BODY, section_title=LONG)], source="regs")
    report = services.ingester.ingest([doc], AccessMetadata())
    assert report.added == 1 and report.failed == 0
    window = MAX_SEQ_LENGTH - 2
    # the text (about 400 tokens) needs a few chunks of at least 3/4 of the window, not one per word
    assert embedder.count_tokens([BODY])[0] < 4 * (window - window // HEAD_SHARE)
    assert 2 <= report.chunks_written <= 4
    with services.db.connection() as conn:
        texts = [r[0] for r in conn.execute("SELECT text FROM chunks ORDER BY chunk_index")]
    assert " ".join(texts).count("Sentence") >= 25  # all the text is there
    # what the model reads per chunk (capped title and heading + text) fits its window
    doc = services.ingester._checked(doc)  # the title capped as ingestion caps it
    p = _Pending(doc, {}, _content_hash(doc, embedder.model_name))
    services.ingester._prepare_chunks([p], IngestReport())
    sizes = embedder.count_tokens(p.inputs)
    assert len(sizes) == report.chunks_written and max(sizes) <= window
    assert all(text.startswith("Regulations governing") for text in p.inputs)


def test_local_and_remote_embedders_count_tokens_alike(embedder: Any) -> None:
    long_text = "Tokenisation of a long passage about university accommodation. " * 120
    texts = [long_text, "Short text.", ""]
    remote = RemoteEmbedder("ollama", "http://127.0.0.1:9", "all-MiniLM-L6-v2")  # counting needs no server
    local_counts = embedder.count_tokens(texts)
    assert local_counts == remote.count_tokens(texts)
    assert local_counts[0] > MAX_SEQ_LENGTH  # never capped at the model's window
    assert local_counts[2] == 0
