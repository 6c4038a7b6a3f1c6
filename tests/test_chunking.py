"""Chunking rules (campus_search/ingest/chunking.py): sizes in model tokens, overlap, sections, pages, words."""

from __future__ import annotations

import re
from typing import Any

import pytest

from campus_search.ingest.chunking import Block, Chunk, chunk_blocks, embedding_text, split_sentences


def words(texts: list[str] | Any) -> list[int]:
    """A counter where one word is one token: makes the packing arithmetic easy to follow."""
    return [len(t.split()) for t in texts]


def sentence(n: int, tag: str, length: int = 10) -> str:
    return " ".join([f"{tag.upper()}w{n}"] + [f"word{n}x{i}" for i in range(length - 2)]) + f" end{n}."


def paragraph(tag: str, sentences: int, length: int = 10) -> str:
    return " ".join(sentence(i, tag, length) for i in range(sentences))


def test_sentences_are_split_after_punctuation_before_capitals() -> None:
    assert split_sentences("First one. Second one! Third? e.g. lower stays.\nNew line") == [
        "First one.", "Second one!", "Third? e.g. lower stays.", "New line"]


def test_short_document_is_one_chunk_with_paragraphs_on_lines() -> None:
    chunks = chunk_blocks([Block("Alpha one. Alpha two.", "S"), Block("Beta one.", "S")], words)
    assert chunks == [Chunk("Alpha one. Alpha two.\nBeta one.", "S", None, 6)]


def test_chunks_respect_max_tokens_with_the_real_tokenizer(embedder: Any) -> None:
    text = ("Students who forget their EASE password can reset it online using the self-service portal, "
            "provided they registered a recovery email address beforehand. ") * 40
    blocks = [Block(text, "Password Reset", 3)]
    chunks = chunk_blocks(blocks, embedder.count_tokens, max_tokens=64, overlap=16)
    assert len(chunks) > 5
    for c in chunks:
        real = embedder.count_tokens([c.text])[0]
        assert real == c.tokens <= 64
        assert c.section_title == "Password Reset" and c.page_number == 3


def test_never_splits_a_word() -> None:
    text = paragraph("p", 30, length=13)
    source_words = set(text.split())
    chunks = chunk_blocks([Block(text)], words, max_tokens=40, overlap=8)
    for c in chunks:
        assert set(c.text.split()) <= source_words
    # every sentence of the source is in some chunk, whole
    for s in split_sentences(text):
        assert any(s in c.text for c in chunks)


def test_overlong_sentence_is_cut_between_words() -> None:
    text = " ".join(f"token{i}" for i in range(95))  # one sentence, no punctuation
    chunks = chunk_blocks([Block(text, "S")], words, max_tokens=40, overlap=8)
    assert [c.tokens for c in chunks] == [40, 40, 15]
    assert " ".join(c.text for c in chunks) == text


def test_overlap_repeats_trailing_sentences_inside_a_paragraph() -> None:
    text = paragraph("a", 12)  # 12 sentences of 10 words, one paragraph
    chunks = chunk_blocks([Block(text)], words, max_tokens=40, overlap=20)
    assert len(chunks) > 2
    for prev, nxt in zip(chunks, chunks[1:], strict=False):
        prev_s, next_s = split_sentences(prev.text), split_sentences(nxt.text)
        shared = [s for s in next_s if s in prev_s]
        assert shared == prev_s[-2:] == next_s[:2]  # 20 tokens of overlap = the last two sentences
        assert len(next_s) > len(shared)  # and always new text
    assert all(c.tokens <= 40 for c in chunks)


def test_no_overlap_across_a_paragraph_boundary_and_paragraphs_kept_whole() -> None:
    blocks = [Block(paragraph(tag, 3)) for tag in "abcd"]  # four paragraphs of 30 words
    # 30 tokens is at least half of 50, so each chunk ends with its paragraph, and there is no overlap
    assert [c.text for c in chunk_blocks(blocks, words, max_tokens=50, overlap=20)] == [b.text for b in blocks]
    # with room for two (30 < half of 70), two whole paragraphs per chunk
    pairs = chunk_blocks(blocks, words, max_tokens=70, overlap=20)
    assert [c.text for c in pairs] == [blocks[0].text + "\n" + blocks[1].text, blocks[2].text + "\n" + blocks[3].text]


def test_small_paragraphs_are_packed_together() -> None:
    blocks = [Block(sentence(i, "s", 10)) for i in range(8)]  # eight one-sentence paragraphs
    chunks = chunk_blocks(blocks, words, max_tokens=50, overlap=10)
    assert [c.tokens for c in chunks] == [30, 30, 20]  # closes at a boundary once >= 25 tokens
    assert chunks[0].text.count("\n") == 2


def test_sections_are_never_mixed_and_keep_their_titles() -> None:
    blocks = [Block(paragraph("a", 2), "Intro"), Block(paragraph("b", 9), "Procedure"),
              Block(paragraph("c", 1), "Contacts")]
    chunks = chunk_blocks(blocks, words, max_tokens=40, overlap=10)
    titles = [c.section_title for c in chunks]
    assert titles[0] == "Intro" and titles[-1] == "Contacts"
    assert titles == sorted(titles, key=["Intro", "Procedure", "Contacts"].index)
    for c in chunks:
        tag = {"Intro": "A", "Procedure": "B", "Contacts": "C"}[c.section_title]
        assert set(re.findall(r"\b([ABC])w\d+", c.text)) == {tag}


def test_page_number_is_where_the_chunk_starts() -> None:
    blocks = [Block(paragraph("a", 3), "S", 1), Block(paragraph("b", 3), "S", 2), Block(paragraph("c", 3), "S", 2)]
    chunks = chunk_blocks(blocks, words, max_tokens=45, overlap=10)
    pages = {c.text.split()[0][0]: c.page_number for c in chunks}
    assert pages == {"A": 1, "B": 2, "C": 2}


def test_editing_one_paragraph_changes_only_its_chunks() -> None:
    blocks = [Block(paragraph(tag, n)) for tag, n in zip("abcdefgh", [3, 5, 2, 7, 4, 3, 6, 2], strict=True)]
    before = chunk_blocks(blocks, words, max_tokens=60, overlap=15)
    edited = list(blocks)
    edited[3] = Block(blocks[3].text.replace("word3x4", "changed", 1))  # paragraph "d"
    after = chunk_blocks(edited, words, max_tokens=60, overlap=15)
    changed = [c.text for c in after if c.text not in {b.text for b in before}]
    assert changed and all("Dw" in text for text in changed)
    assert len(after) == len(before)


def test_per_section_limit_lowers_max_tokens() -> None:
    blocks = [Block(paragraph("a", 6), "Short"), Block(paragraph("b", 6), "A very long heading")]
    chunks = chunk_blocks(blocks, words, max_tokens=60, overlap=10,
                          max_tokens_for=lambda s: 30 if s == "A very long heading" else 1000)
    assert max(c.tokens for c in chunks if c.section_title == "Short") == 60
    assert max(c.tokens for c in chunks if c.section_title != "Short") <= 30


@pytest.mark.parametrize(("max_tokens", "overlap"), [(0, 0), (10, 10), (10, -1)])
def test_bad_sizes_are_rejected(max_tokens: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        chunk_blocks([Block("x")], words, max_tokens=max_tokens, overlap=overlap)


def test_empty_input_gives_no_chunks() -> None:
    assert chunk_blocks([], words) == []
    assert chunk_blocks([Block("   \n ")], words) == []


def test_embedding_text_puts_title_and_section_first() -> None:
    assert embedding_text("Guide", "Reset", "Body.") == "Guide — Reset\nBody."
    assert embedding_text("Guide", "Guide", "Body.") == "Guide\nBody."
    assert embedding_text("Guide", None, "Body.") == "Guide\nBody."
    assert embedding_text("", None, "Body.") == "Body."
