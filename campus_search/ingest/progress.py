"""Progress bar and end-of-run summary for long ingests (written to stderr; stdout stays for JSON)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

BAR_WIDTH = 24
LOG_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal (CI logs, files)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressBar:
    """``[#####-----] 1,234/5,183 24% 23.5 docs/s ETA 2m48s | added 10, updated 2, ...``

    Redrawn in place on a terminal; elsewhere one line every few seconds. Call :meth:`set_total`
    once the number of documents is known, :meth:`update` as they are done, :meth:`close` at the end.
    """

    def __init__(self, stream: TextIO | None = None, unit: str = "documents", rate_unit: str = "docs") -> None:
        self.stream = stream or sys.stderr
        self.unit = unit
        self.rate_unit = rate_unit
        self.tty = self.stream.isatty()
        self.total: int | None = None
        self.started = time.perf_counter()
        self._last_line = 0.0
        self._drawn = False

    def set_total(self, total: int, _report: Any = None) -> None:
        self.total = total
        self.started = time.perf_counter()

    def line(self, done: int, report: Any) -> str:
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = []
        if self.total:
            frac = min(1.0, done / self.total)
            filled = int(frac * BAR_WIDTH)
            parts.append(f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {done:,}/{self.total:,} {frac:4.0%}")
        else:
            parts.append(f"{done:,} {self.unit}")
        parts.append(f"{rate:,.1f} {self.rate_unit}/s")
        if self.total and rate > 0 and done < self.total:
            parts.append(f"ETA {_duration((self.total - done) / rate)}")
        if report is None:
            return "  ".join(parts)
        counts = (f"added {report.added}, updated {report.updated + report.metadata_updated}, "
                  f"unchanged {report.unchanged}, failed {report.failed}")
        return "  ".join(parts) + " | " + counts

    def update(self, done: int, report: Any = None) -> None:
        now = time.perf_counter()
        if not self.tty and now - self._last_line < LOG_EVERY and done != self.total:
            return
        self._last_line = now
        text = self.line(done, report)
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def summary(report: Any) -> str:
    """One human line: what happened to how many documents, and how fast."""
    secs = report.seconds or 0.0
    changed = report.added + report.updated
    rate = f"{changed / secs:,.1f} docs/s, {report.chunks_written / secs:,.1f} chunks/s" if secs > 0 else "-"
    meta = f" ({report.metadata_updated} metadata only)" if report.metadata_updated else ""
    access = [f"{n} {what}" for n, what in (
        (getattr(report, "loosened", 0), "loosened (audited)"),
        (getattr(report, "held_back", 0), "held back (access kept; --allow-loosening to apply)"),
        (getattr(report, "defaulted", 0), "given DEFAULT_VISIBILITY")) if n]
    return (f"ingest: {report.added} added, {report.updated + report.metadata_updated} updated{meta}, "
            f"{report.unchanged} unchanged, {report.deleted} deleted, {report.failed} failed — "
            f"{report.chunks_written} chunks written, {report.chunks_embedded} embedded"
            f"{f', {report.chunks_given} with given vectors' if getattr(report, 'chunks_given', 0) else ''} in "
            f"{_duration(secs) if secs >= 1 else f'{secs:.2f}s'} ({rate})"
            + (f"; access: {', '.join(access)}" if access else ""))
