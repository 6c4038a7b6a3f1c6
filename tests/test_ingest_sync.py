"""Incremental sync of a folder of real files into the real PostgreSQL + pgvector index, with the real
model wrapped in a counter: what is re-embedded, what is pruned, what a search sees meanwhile."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from docfiles import write_docx, write_html, write_pdf

from campus_search.ingest.metadata import AccessMetadata
from campus_search.ingest.sync import sync_paths
from campus_search.retrieval.params import SearchParams
from campus_search.security.roles import DEFAULT_ROLES, Principal, superuser
from campus_search.services import Services

ADMIN = superuser("admin-test")
STUDENT = Principal("student-test", DEFAULT_ROLES["student"])


class CountingEmbedder:
    """The real model; remembers every text it was asked to embed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.model_name = inner.model_name
        self.dimension = inner.dimension
        self.texts: list[str] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.texts.extend(texts)
        return self.inner.embed(texts)

    def embed_query(self, texts: Sequence[str]) -> np.ndarray:  # searches: not counted
        return self.inner.embed_query(texts)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.inner.count_tokens(texts)

    def take(self) -> list[str]:
        texts, self.texts = self.texts, []
        return texts


@pytest.fixture
def counting(embedder: Any) -> CountingEmbedder:
    return CountingEmbedder(embedder)


@pytest.fixture
def services(settings_factory: Callable[..., Any], counting: CountingEmbedder) -> Iterator[Services]:
    # these tests are about sync mechanics: documents nobody restricts are public, as before
    # DEFAULT_VISIBILITY existed (tests/test_access_writes.py covers the shipped default)
    s = Services(settings_factory(default_visibility="public"), embedder=counting).ensure_open()
    yield s
    s.close()


def search(services: Services, query: str, user: Principal = ADMIN, k: int = 50) -> list[Any]:
    # the searcher itself, not the result cache in front of it: these tests are about what the index holds
    return services.searcher.search(user, SearchParams(query=query, max_results=k, similarity_threshold=-1.0))


def doc_ids(services: Services) -> set[str]:
    with services.db.connection(read=True) as conn:
        return {r[0] for r in conn.execute("SELECT external_id FROM documents")}


def chunk_rows(services: Services, external_id: str) -> list[tuple[str, str]]:
    with services.db.connection(read=True) as conn:
        return conn.execute("SELECT c.content_hash, c.text FROM chunks c JOIN documents d ON d.id = c.document_id "
                            "WHERE d.external_id = %s ORDER BY c.chunk_index", (external_id,)).fetchall()


PARAS = {
    "Eligibility": [f"Paragraph {i} on eligibility explains who may apply for remote access to university "
                    f"systems and which staff category number {i} falls under the scheme. Approval comes from "
                    f"the line manager and is recorded in the staff record system." for i in range(6)],
    "Setup": [f"Step {i} of the setup: install the client, sign in with EASE and confirm the prompt "
              f"on the registered phone number {i}. Then test the connection from home before travelling."
              for i in range(6)],
}


def write_markdown(path: Path, paras: dict[str, list[str]]) -> None:
    body = "\n\n".join(f"## {section}\n\n" + "\n\n".join(ps) for section, ps in paras.items())
    path.write_text(f"# Remote Access Policy\n\n{body}\n", encoding="utf-8")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    (root / "it").mkdir(parents=True)
    (root / "it" / ".campus-search.yaml").write_text("department: IT Services\ncampus: King's Buildings\n")
    write_markdown(root / "it" / "remote-access.md", PARAS)
    write_pdf(root / "it" / "handbook.pdf", [
        ["Introduction", "This handbook describes how Information Services manages staff accounts."],
        ["Password Reset Procedures", "Staff reset a forgotten password at the IT Service Desk with photo "
         "identification; resets by telephone are not permitted."],
    ], title="IT Staff Account Handbook", bookmarks=[("Introduction", 0), ("Password Reset Procedures", 1)])
    write_docx(root / "lab-safety.docx", "Laboratory Safety Induction", [
        ("Chemical spills", ["Use the spill kit in the corridor and report every chemical spill to the "
                             "laboratory manager the same day."]),
        ("Waste", ["Broken glass goes in the glass bin, never in general waste."])])
    write_html(root / "library.html", "Library Opening Hours", [
        ("Term time", ["The Main Library is open from eight in the morning until midnight during term."])])
    (root / "broken.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R")
    return root


def test_sync_real_files_then_rerun_embeds_nothing(services: Services, counting: CountingEmbedder,
                                                   folder: Path) -> None:
    report = sync_paths(services.ingester, [folder])
    assert (report.added, report.failed) == (4, 1)
    assert report.errors == [f"{folder / 'broken.pdf'}: not a readable PDF (corrupt or truncated file)"]
    assert report.chunks_embedded == len(counting.take()) == report.chunks_written > 0

    hits = search(services, "how do staff reset a forgotten password at the service desk")
    top = hits[0]
    assert (top.document_title, top.section_title, top.page_number) == (
        "IT Staff Account Handbook", "Password Reset Procedures", 2)
    assert top.metadata["department"] == "IT Services" and top.metadata["campus"] == "King's Buildings"
    spill = search(services, "what to do after a chemical spill in the lab")[0]
    assert (spill.document_title, spill.section_title) == ("Laboratory Safety Induction", "Chemical spills")
    library = search(services, "library opening hours during term")[0]
    assert library.document_title == "Library Opening Hours"
    assert "Contact us" not in library.text
    counting.take()  # the searches' own query embeddings

    again = sync_paths(services.ingester, [folder])
    assert (again.added, again.updated, again.metadata_updated, again.unchanged, again.failed) == (0, 0, 0, 4, 1)
    assert again.chunks_embedded == 0 and counting.take() == []


def test_editing_one_paragraph_re_embeds_only_its_chunks(services: Services, counting: CountingEmbedder,
                                                         folder: Path) -> None:
    sync_paths(services.ingester, [folder])
    counting.take()
    before = chunk_rows(services, "it/remote-access.md")
    assert len(before) >= 4

    edited = {k: list(v) for k, v in PARAS.items()}
    edited["Setup"][3] = edited["Setup"][3].replace("test the connection", "test the VPN tunnel")
    write_markdown(folder / "it" / "remote-access.md", edited)
    report = sync_paths(services.ingester, [folder])
    assert (report.updated, report.unchanged) == (1, 3)
    texts = counting.take()
    after = chunk_rows(services, "it/remote-access.md")
    new_chunks = [text for h, text in after if h not in {h for h, _ in before}]
    assert len(texts) == report.chunks_embedded == len(new_chunks) >= 1
    assert all("VPN tunnel" in text for text in texts)  # only chunks holding the edited paragraph
    assert len(new_chunks) < len(after)
    assert any("VPN tunnel" in h.text for h in search(services, "test the VPN tunnel from home"))


def test_metadata_only_change_applies_at_once_without_embedding(services: Services, counting: CountingEmbedder,
                                                                folder: Path) -> None:
    sync_paths(services.ingester, [folder])
    counting.take()
    query = "library opening hours during term"
    assert any(h.document_title == "Library Opening Hours" for h in search(services, query, STUDENT))
    generation = services.db.generation()
    counting.take()

    (folder / "library.html.meta.yaml").write_text("clearance_level: 4\npriority: 5\n")
    report = sync_paths(services.ingester, [folder])
    assert (report.metadata_updated, report.updated, report.chunks_embedded) == (1, 0, 0)
    assert counting.take() == []
    assert services.db.generation() > generation
    assert all(h.document_title != "Library Opening Hours" for h in search(services, query, STUDENT))
    admin_hit = next(h for h in search(services, query) if h.document_title == "Library Opening Hours")
    assert (admin_hit.metadata["clearance_level"], admin_hit.metadata["priority"]) == (4, 5)


def test_deleted_file_leaves_search_only_with_prune(services: Services, counting: CountingEmbedder,
                                                    folder: Path) -> None:
    sync_paths(services.ingester, [folder])
    (folder / "lab-safety.docx").unlink()
    query = "what to do after a chemical spill in the lab"

    kept = sync_paths(services.ingester, [folder])
    assert kept.deleted == 0 and "lab-safety.docx" in doc_ids(services)

    pruned = sync_paths(services.ingester, [folder], prune=True)
    assert pruned.deleted == 1
    assert doc_ids(services) == {"it/remote-access.md", "it/handbook.pdf", "library.html"}
    assert all(h.document_title != "Laboratory Safety Induction" for h in search(services, query))
    with services.db.connection(read=True) as conn:  # chunks went with it
        assert conn.execute("SELECT count(*) FROM chunks c LEFT JOIN documents d ON d.id = c.document_id "
                            "WHERE d.id IS NULL").fetchone()[0] == 0


def test_prune_keeps_a_file_that_failed_to_parse_and_other_folders(services: Services, folder: Path,
                                                                   tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "note.md").write_text("# Other note\n\nKept because it lives in another synced folder.\n")
    sync_paths(services.ingester, [folder, other])
    (folder / "it" / "handbook.pdf").write_bytes(b"%PDF-1.4 truncated")  # now corrupt: keep the old version

    report = sync_paths(services.ingester, [folder], prune=True)
    assert report.deleted == 0 and report.failed == 2
    assert {"it/handbook.pdf", "note.md"} <= doc_ids(services)
    hit = search(services, "how do staff reset a forgotten password at the service desk")[0]
    assert hit.document_title == "IT Staff Account Handbook"


def test_rename_with_prune_moves_the_document_and_reuses_vectors(services: Services, counting: CountingEmbedder,
                                                                 folder: Path) -> None:
    sync_paths(services.ingester, [folder])
    counting.take()
    (folder / "it" / "remote-access.md").rename(folder / "it" / "vpn-policy.md")
    report = sync_paths(services.ingester, [folder], prune=True)
    assert (report.added, report.deleted, report.chunks_embedded) == (1, 1, 0)
    assert counting.take() == []
    assert "it/vpn-policy.md" in doc_ids(services) and "it/remote-access.md" not in doc_ids(services)


def test_jsonl_corpus_prune_and_bad_lines_block_pruning(services: Services, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    lines = [{"_id": f"d{i}", "title": f"Doc {i}", "text": f"Document number {i} is about topic {i}."}
             for i in range(4)]
    corpus.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert sync_paths(services.ingester, [corpus]).added == 4

    corpus.write_text("".join(json.dumps(x) + "\n" for x in lines[1:]) + "{broken\n")
    blocked = sync_paths(services.ingester, [corpus], prune=True)
    assert blocked.deleted == 0 and blocked.failed == 1
    assert any("not pruned" in e for e in blocked.errors)

    corpus.write_text("".join(json.dumps(x) + "\n" for x in lines[1:]))
    done = sync_paths(services.ingester, [corpus], prune=True)
    assert (done.deleted, done.unchanged) == (1, 3)
    assert doc_ids(services) == {"d1", "d2", "d3"}


def test_defaults_lose_to_folder_and_file_metadata(services: Services, folder: Path) -> None:
    defaults = AccessMetadata(department="Registry", campus="Easter Bush", priority=2)
    sync_paths(services.ingester, [folder], defaults)
    with services.db.connection(read=True) as conn:
        rows = dict(conn.execute("SELECT external_id, department || '/' || campus FROM documents").fetchall())
    assert rows["it/handbook.pdf"] == "IT Services/King's Buildings"
    assert rows["library.html"] == "Registry/Easter Bush"


@pytest.mark.parametrize("split", [False, True], ids=["one-statement", "bm25-beside"])
def test_a_search_never_sees_a_half_updated_document(services: Services, tmp_path: Path, split: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """While a document is rewritten between two versions again and again, every search sees all of
    one version's chunks or all of the other's, never a mixture (one transaction per batch). Also when
    the hybrid search's BM25 half runs on a connection of its own, as on a large corpus (one snapshot)."""
    if split:
        from campus_search.retrieval import search as search_module

        monkeypatch.setattr(search_module, "LEXICAL_BESIDE_MIN_CHUNKS", 0)
    root = tmp_path / "atomic"
    root.mkdir()
    path = root / "guide.md"

    def version(tag: str) -> None:
        paras = [f"Version {tag} paragraph {i}: parking permits for staff are renewed every year at "
                 f"the estates office, version {tag} rules apply to bay {i}." for i in range(8)]
        path.write_text("# Parking Guide\n\n" + "\n\n".join(paras) + "\n")

    version("alpha")
    sync_paths(services.ingester, [root])
    n_chunks = len(chunk_rows(services, "guide.md"))
    stop = threading.Event()
    mixed: list[set[str]] = []
    seen: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            hits = search(services, "staff parking permit renewal", k=50)
            tags = {tag for h in hits for tag in ("alpha", "beta") if f"Version {tag}" in h.text}
            seen.append(len(hits))
            if len(tags) > 1:
                mixed.append(tags)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(6):
            version("beta" if n % 2 == 0 else "alpha")
            assert sync_paths(services.ingester, [root]).updated == 1
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not mixed
    assert seen and all(n == n_chunks for n in seen)
