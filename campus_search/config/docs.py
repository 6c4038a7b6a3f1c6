"""The configuration reference table of docs/configuration.md (``make docs``, ``campus-search config
--markdown``), generated from :data:`~campus_search.config.settings.FIELDS`; a test keeps the file current.
"""

from __future__ import annotations

from campus_search.config.settings import FIELDS


def markdown_table() -> str:
    """The configuration reference (docs/configuration.md)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for f in FIELDS:
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(default)
        elif isinstance(default, dict):
            default = ",".join(f"{k}={v}" for k, v in default.items())
        shown = "—" if default in (None, "", ()) else f"`{default}`"
        names = " / ".join(f"`{n}`" for n in f.env)
        lines.append(f"| {names} | {shown} | {f.help} |")
    return "\n".join(lines) + "\n"
