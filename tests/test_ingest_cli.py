"""``campus-search ingest`` end to end: real files, the real database, progress, summary, --prune."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_SECRET
from docfiles import write_docx, write_pdf

from campus_search.cli import main as cli
from campus_search.ingest.progress import ProgressBar


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, make_database: Callable[[], str], data_dir: Path) -> None:
    monkeypatch.setenv("DATABASE_URL", make_database())
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    monkeypatch.setenv("JWT_SECRET_KEY", TEST_SECRET)
    monkeypatch.setenv("DB_POOL_MIN_SIZE", "1")
    monkeypatch.delenv("EMBEDDING_PROVIDER", raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    code = cli.main(["ingest", *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]), err


def test_ingest_sync_and_prune_from_the_command_line(env: None, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    write_pdf(docs / "fees.pdf", [["Tuition fees are paid in two instalments."], ["Refunds take ten days."]])
    write_docx(docs / "leave.docx", "Annual Leave", [("Entitlement", ["Staff get thirty days of leave."])])
    (docs / "corrupt.pdf").write_bytes(b"%PDF-1.3\nthis file was cut off")

    code, summary, err = run(capsys, str(docs), "--department", "Finance", "--campus", "Central Campus")
    assert code == 3  # a file failed: reported, skipped, the rest ingested
    assert (summary["added"], summary["failed"], summary["deleted"]) == (2, 1, 0)
    assert summary["chunks_embedded"] == summary["chunks_written"] > 0
    assert f"skipped: {docs / 'corrupt.pdf'}: not a readable PDF (corrupt or truncated file)" in err
    assert "3/3" in err and "docs/s" in err  # the progress line (not a terminal: printed at the end)
    assert "ingest: 2 added, 0 updated, 0 unchanged, 0 deleted, 1 failed" in err
    assert "Traceback" not in err

    (docs / "corrupt.pdf").unlink()
    (docs / "fees.pdf").unlink()
    code, summary, err = run(capsys, str(docs), "--prune", "--quiet", "--department", "Finance",
                             "--campus", "Central Campus")
    assert code == 0
    assert (summary["unchanged"], summary["deleted"], summary["chunks_embedded"]) == (1, 1, 0)
    assert " | added" not in err  # --quiet: no progress line, only the summary


def test_ingest_without_paths_is_a_clear_error(env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ingest"]) == 2
    assert "give at least one PATH" in capsys.readouterr().err


def test_ingest_help_mentions_prune_and_formats(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["ingest", "--help"])
    out = capsys.readouterr().out
    assert "--prune" in out and "PDF" in out and "DOCX" in out


class FakeTTY:
    """A stream that says it is a terminal, to see the redrawn bar."""

    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def test_progress_bar_shows_rate_and_eta() -> None:
    from campus_search.ingest.pipeline import IngestReport

    stream = FakeTTY()
    bar = ProgressBar(stream)  # type: ignore[arg-type]
    bar.set_total(200)
    bar.started -= 10.0  # as if 10 s had passed
    bar.update(50, IngestReport(added=40, unchanged=10))
    bar.close()
    line = stream.text.split("\r\x1b[K")[-1]
    assert line.startswith("[######------------------] 50/200  25%")
    assert "5.0 docs/s" in line and "ETA 30s" in line and "added 40" in line and "unchanged 10" in line
    assert stream.text.endswith("\n")
    assert sys.stderr is not stream


def test_progress_bar_for_eval_queries_shows_rate_and_eta() -> None:
    stream = FakeTTY()
    bar = ProgressBar(stream, unit="queries", rate_unit="queries")  # type: ignore[arg-type]
    bar.set_total(300)
    bar.started -= 20.0
    bar.update(100)  # campus-search eval: no ingest report, only the count
    line = stream.text.split("\r\x1b[K")[-1]
    assert line.startswith("[########----------------] 100/300  33%")
    assert "5.0 queries/s" in line and "ETA 40s" in line and "|" not in line
