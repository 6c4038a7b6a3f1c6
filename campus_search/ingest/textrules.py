"""What text the index stores, and what a document id is: one rule for every writer (CLI and API).

- **Text** (titles, section titles, paragraphs, metadata values, ids, sources) must be storable:
  PostgreSQL text cannot hold U+0000 (NUL), and a lone surrogate (``"\\ud800"`` in JSON, a non-UTF-8
  file name) is not Unicode text at all. Such a document is refused with a message naming the
  problem; nothing is stripped or replaced silently. A NUL in a Markdown, text or JSONL file usually
  means a binary or UTF-16 file; in a PDF, a damaged text layer.
- **Titles** are labels, repeated in every search result: a document title is cut to
  :data:`MAX_TITLE_CHARS` characters and a section title to :data:`MAX_SECTION_TITLE_CHARS`, at a word
  boundary, ending in "…" (a section title that is the document title, as for text before the first
  heading, is capped as the title). The text under them is kept whole.
- **Document ids** are taken exactly as given, never trimmed or repaired: 1 to :data:`MAX_ID_CHARS`
  characters of Unicode text, without control characters (U+0000-U+001F, U+007F-U+009F), line or
  paragraph separators (U+2028, U+2029) or lone surrogates, and without whitespace at either end.
  In a URL an id is percent-encoded UTF-8; ``/`` may appear inside it.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

MAX_ID_CHARS = 500
MAX_TITLE_CHARS = 300
MAX_SECTION_TITLE_CHARS = 200

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_ID_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")

ID_RULE = (f"a document id is 1-{MAX_ID_CHARS} characters of UTF-8 text without control characters, line "
           "separators or whitespace at either end")


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored, or None."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "contains a NUL character (U+0000), which cannot be stored"
    return f"contains a lone surrogate (U+{ord(found.group()):04X}), which is not valid Unicode text"


def json_text_problem(value: Any) -> str | None:
    """Why a parsed JSON value holds text that cannot be stored (any key or string, at any depth), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and (problem := text_problem(item)) is not None:
            return problem
    return None


def id_problem(doc_id: str) -> str | None:
    """Why ``doc_id`` is not a document id (see the module docstring), or None."""
    if not doc_id or len(doc_id) > MAX_ID_CHARS:
        return ID_RULE
    found = _ID_FORBIDDEN.search(doc_id)
    if found is not None:
        name = unicodedata.name(found.group(), "")
        return f"{ID_RULE} (found U+{ord(found.group()):04X}{' ' + name if name else ''})"
    if doc_id[0].isspace() or doc_id[-1].isspace():
        return f"{ID_RULE} (it starts or ends with whitespace)"
    return None


def shorten(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary, ending in "…" when cut."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    space = cut.rfind(" ")
    if space >= limit // 2:
        cut = cut[:space]
    return cut.rstrip() + "…"
