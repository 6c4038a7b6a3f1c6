"""Structure-aware chunking.

A parsed document is a sequence of :class:`Block` (a paragraph with its section title and page).
The rules, in order:

1. A chunk never crosses a section boundary (a heading starts a new chunk).
2. Within a section, whole sentences are packed greedily up to ``max_tokens`` tokens *of the
   embedding model* (counted with its own tokenizer, so a chunk fits the model's window).
3. Paragraphs are respected: once a chunk is at least half full, it ends at the next paragraph
   boundary rather than taking the start of a new paragraph. Besides keeping paragraphs whole, this
   keeps chunk boundaries local: editing one paragraph changes only the chunks holding it, so
   re-ingestion re-embeds only those (the ingester reuses vectors by chunk content hash).
4. Overlap: when a chunk has to end inside a paragraph, the next chunk repeats the last sentences of
   that paragraph, up to ``overlap`` tokens, so a passage cut at the boundary is still found whole.
   A chunk that ends at a paragraph boundary needs no overlap.
5. A sentence longer than ``max_tokens`` is cut between words, never inside a word.
6. A chunk never crosses a page boundary either (a new page starts a new chunk, like a heading), so
   its page number is the page where all of its text is: a search result cites the page a reader
   finds the passage on. A chunk keeps its section title.

Chunk text joins sentences with a space and paragraphs with a newline.

Defaults: 200 tokens with 32 overlap. all-MiniLM-L6-v2 reads 256 tokens; the rest is left for the
document title and section heading that :func:`embedding_text` puts in front of every chunk (the
ingester lowers the limit for a section whose title and heading are longer than that).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 200
DEFAULT_OVERLAP = 32
CHUNKER_VERSION = "3"  # part of content hashes: a chunking change re-chunks everything once

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
                 overlap: int = DEFAULT_OVERLAP,
                 max_tokens_for: Callable[[str | None], int] | None = None) -> list[Chunk]:
    """Chunks of ``blocks`` (see the module docstring for the rules).

    ``count`` gives model tokens per text. ``max_tokens_for(section_title)``, when given, lowers the
    limit for one section (the ingester uses it so title + heading + chunk fit the model's window)."""
    if max_tokens <= 0 or overlap < 0 or overlap >= max_tokens:
        raise ValueError("need max_tokens > overlap >= 0")
    # (sentence, page, section, starts a paragraph) in document order
    units: list[tuple[str, int | None, str | None, bool]] = []
    for block in blocks:
        for n, sentence in enumerate(split_sentences(block.text)):
            units.append((sentence, block.page_number, block.section_title, n == 0))
    if not units:
        return []
    sizes = count([u[0] for u in units])
    chunks: list[Chunk] = []
    section_start = 0
    while section_start < len(units):  # one run of units with the same section and page at a time
        section, page_of_run = units[section_start][2], units[section_start][1]
        end = section_start
        while end < len(units) and units[end][2] == section and units[end][1] == page_of_run:
            end += 1
        limit = max_tokens if max_tokens_for is None else max(1, min(max_tokens, max_tokens_for(section)))
        items: list[_Item] = []
        for (sentence, page, _, para_start), n in zip(units[section_start:end], sizes[section_start:end],
                                                      strict=True):
            if n > limit:
                pieces = _split_long(sentence, count, limit)
                items.extend(_Item(piece, size, page, para_start and k == 0)
                             for k, (piece, size) in enumerate(pieces))
            else:
                items.append(_Item(sentence, n, page, para_start))
        chunks.extend(_pack(items, section, limit, min(overlap, limit // 2)))
        section_start = end
    return chunks


@dataclass(frozen=True)
class _Item:
    text: str
    tokens: int
    page: int | None
    para_start: bool


def _pack(items: list[_Item], section: str | None, max_tokens: int, overlap: int) -> list[Chunk]:
    out: list[Chunk] = []
    half = max_tokens // 2
    i = 0
    while i < len(items):
        j, size = i, 0
        while j < len(items):
            item = items[j]
            if j > i and (size + item.tokens > max_tokens or (item.para_start and size >= half)):
                break  # full, or at least half full at a paragraph boundary: end here
            size += item.tokens
            j += 1
        out.append(Chunk(_join(items[i:j]), section, items[i].page, size))
        if j >= len(items):
            break
        if items[j].para_start:
            i = j  # a clean paragraph boundary needs no overlap
            continue
        # Cut inside a paragraph: the next chunk repeats trailing sentences of this paragraph, up to
        # ``overlap`` tokens, but always advances and always has room for new text.
        back, carried = j, 0
        while (back - 1 > i and not items[back].para_start
               and carried + items[back - 1].tokens <= overlap
               and carried + items[back - 1].tokens + items[j].tokens <= max_tokens):
            back -= 1
            carried += items[back].tokens
        i = back
    return out


def _join(items: Sequence[_Item]) -> str:
    """Sentences joined by a space, paragraphs by a newline."""
    text = ""
    for n, item in enumerate(items):
        if n:
            text += "\n" if item.para_start else " "
        text += item.text
    return text


def embedding_text(title: str, section_title: str | None, text: str) -> str:
    """What the model sees for a chunk: its document title and section give it context."""
    head = title if not section_title or section_title == title else f"{title} — {section_title}"
    return f"{head}\n{text}" if head else text
