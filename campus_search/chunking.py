"""Structure-aware chunking.

A parsed document is a sequence of :class:`Block` (a paragraph with its section title and page).
Chunks never cross a section boundary. Within a section, sentences are packed greedily up to
``max_tokens`` model tokens; the next chunk repeats the last sentences of the previous one, up to
``overlap`` tokens, so a passage cut at a boundary is still found whole. A sentence longer than
``max_tokens`` is cut between words, never inside one. A chunk's page is the page its text starts on.

Defaults (200 tokens, 32 overlap) leave room for the title and section prefix inside the model's
256-token window (see :func:`embedding_text`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 200
DEFAULT_OVERLAP = 32
CHUNKER_VERSION = "1"  # part of content hashes: a chunking change re-chunks everything once

_SENTENCE = re.compile(r"(?<=[.!?;:])\s+(?=[\"'(\[]?[A-Z0-9])|\n+")
_SPACE = re.compile(r"[ \t\r\f\v]+")


@dataclass(frozen=True)
class Block:
    text: str
    section_title: str | None = None
    page_number: int | None = None


@dataclass(frozen=True)
class Chunk:
    text: str
    section_title: str | None
    page_number: int | None
    tokens: int


TokenCounter = Callable[[Sequence[str]], list[int]]


def split_sentences(text: str) -> list[str]:
    parts = (_SPACE.sub(" ", p).strip() for p in _SENTENCE.split(text))
    return [p for p in parts if p]


def _split_long(sentence: str, count: TokenCounter, max_tokens: int) -> list[tuple[str, int]]:
    """Cut an over-long sentence between words into pieces of at most max_tokens."""
    words = sentence.split(" ")
    sizes = count(words)
    pieces: list[tuple[str, int]] = []
    current: list[str] = []
    size = 0
    for word, n in zip(words, sizes, strict=True):
        if current and size + n > max_tokens:
            pieces.append((" ".join(current), size))
            current, size = [], 0
        current.append(word)
        size += n
    if current:
        pieces.append((" ".join(current), size))
    return pieces


def chunk_blocks(blocks: Sequence[Block], count: TokenCounter, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 overlap: int = DEFAULT_OVERLAP) -> list[Chunk]:
    if max_tokens <= 0 or overlap < 0 or overlap >= max_tokens:
        raise ValueError("need max_tokens > overlap >= 0")
    # (sentence, page, section) units, grouped by section in document order
    units: list[tuple[str, int | None, str | None]] = []
    for block in blocks:
        for sentence in split_sentences(block.text):
            units.append((sentence, block.page_number, block.section_title))
    if not units:
        return []
    sizes = count([u[0] for u in units])
    chunks: list[Chunk] = []
    section_start = 0
    while section_start < len(units):
        section = units[section_start][2]
        end = section_start
        while end < len(units) and units[end][2] == section:
            end += 1
        items: list[tuple[str, int, int | None]] = []
        for (sentence, page, _), n in zip(units[section_start:end], sizes[section_start:end], strict=True):
            if n > max_tokens:
                items.extend((piece, size, page) for piece, size in _split_long(sentence, count, max_tokens))
            else:
                items.append((sentence, n, page))
        chunks.extend(_pack(items, section, max_tokens, overlap))
        section_start = end
    return chunks


def _pack(items: list[tuple[str, int, int | None]], section: str | None, max_tokens: int,
          overlap: int) -> list[Chunk]:
    out: list[Chunk] = []
    i = 0
    while i < len(items):
        j, size = i, 0
        while j < len(items) and (j == i or size + items[j][1] <= max_tokens):
            size += items[j][1]
            j += 1
        out.append(Chunk(" ".join(t for t, _, _ in items[i:j]), section, items[i][2], size))
        if j >= len(items):
            break
        # Step back over trailing sentences that fit in the overlap budget, but always advance.
        back, carried = j, 0
        while back - 1 > i and carried + items[back - 1][1] <= overlap:
            back -= 1
            carried += items[back][1]
        i = back
    return out


def embedding_text(title: str, section_title: str | None, text: str) -> str:
    """What the model sees for a chunk: its document title and section give it context."""
    head = title if not section_title or section_title == title else f"{title} — {section_title}"
    return f"{head}\n{text}" if head else text
