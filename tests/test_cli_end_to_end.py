"""The command line as an operator uses it: embedded PostgreSQL that survives restarts, `eval` on BEIR files,
`token` accepted by the server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from campus_search.storage.server_memory import HUGE_PAGES_WORTH_MB
from tests.conftest import TEST_SECRET

CLI = [sys.executable, "-m", "campus_search.cli.main"]


def run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CLI + args, capture_output=True, text=True, env={**os.environ, **env}, timeout=timeout)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "printing.md").write_text("---\ntitle: Printing on campus\ndepartment: IT Services\n---\n"
                                   "## Printing credit\nTop up printing credit online with a card.\n")
    (d / "parking.txt").write_text("Parking permits\n\nStaff parking permits are renewed every August.\n")
    return d


def tuning_mb() -> int:
    """The embedded cluster's shared_buffers on this machine, in MB."""
    from campus_search.storage.embedded_pg import tuning

    return int(re.search(r"shared_buffers = '(\d+)MB'", tuning()).group(1))  # type: ignore[union-attr]


def test_embedded_database_keeps_data_across_restarts(tmp_path: Path, folder: Path) -> None:
    env = {"DATA_DIR": str(tmp_path / "state"), "DATABASE_URL": "", "DB_HOST": ""}
    # parking.txt states no department: public must be said (DEFAULT_VISIBILITY is department)
    first = run(["ingest", str(folder), "--quiet", "--visibility", "public"], env)
    assert first.returncode == 0, first.stderr
    # the process that started the cluster says so when it runs a large buffer pool without huge pages
    if int(Path("/proc/sys/vm/nr_hugepages").read_text()) == 0 and tuning_mb() >= HUGE_PAGES_WORTH_MB:
        assert "PostgreSQL runs without huge pages" in first.stderr and "sysctl -w vm.nr_hugepages=" in first.stderr
    assert json.loads(first.stdout.strip().splitlines()[-1])["added"] == 2
    # each CLI process started the embedded cluster and stopped it on exit; a new process finds the data
    again = run(["ingest", str(folder), "--quiet"], env)  # no flags: the stored access stays
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["unchanged"] == 2 and summary["chunks_embedded"] == 0
    probe = subprocess.run(
        [sys.executable, "-c",
         "from campus_search.config import load_settings; from campus_search.services import Services;"
         "from campus_search.retrieval.params import SearchParams; from campus_search.security.roles import superuser;"
         "s = Services(load_settings()).ensure_open();"
         "hits = s.searcher.search(superuser(), SearchParams('how do I renew a parking permit', max_results=1));"
         "print(hits[0].document_title)"],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
    assert probe.returncode == 0, probe.stderr
    # a .txt file's title is its heading line ("Parking permits"), as a reader sees it (docs/ingestion.md)
    assert probe.stdout.strip().splitlines()[-1] == "Parking permits"
    assert (tmp_path / "state" / "pgdata" / "PG_VERSION").exists()


def documents_in(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM documents").fetchone()
    return int(row[0]) if row else 0


def test_eval_uses_a_kept_scratch_database_never_the_live_index(tmp_path: Path, make_database: Any) -> None:
    corpus = tmp_path / "scifact-mini" / "corpus.jsonl"
    corpus.parent.mkdir()
    docs = {
        "d1": ("Vitamin D and bone density", "Vitamin D supplementation increases bone mineral density in "
               "older adults."),
        "d2": ("Aspirin and heart attacks", "Low-dose aspirin reduces the risk of a first myocardial infarction."),
        "d3": ("Sleep and memory", "Sleep after learning consolidates declarative memory."),
        "d4": ("Coffee consumption", "Moderate coffee drinking is not associated with higher mortality."),
    }
    corpus.write_text("\n".join(json.dumps({"_id": k, "title": t, "text": x}) for k, (t, x) in docs.items()))
    queries = tmp_path / "queries.jsonl"
    queries.write_text("\n".join(json.dumps(q) for q in [
        {"_id": "q1", "text": "Does vitamin D strengthen bones?"},
        {"_id": "q2", "text": "aspirin prevents myocardial infarction"},
        {"_id": "q3", "text": "sleeping helps you remember what you learned"},
        {"_id": "q9", "text": "a query without judgements is not evaluated"},
    ]))
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq3\td3\t1\n")
    live = make_database()  # the index a server would be using
    from campus_search.storage.db import migrate

    migrate(live, model="all-MiniLM-L6-v2", dimension=384)
    env = {"DATABASE_URL": live, "DATA_DIR": str(tmp_path / "state"), "JWT_SECRET_KEY": TEST_SECRET}
    files = ["--queries", str(queries), "--qrels", str(qrels)]
    r = run(["eval", "--corpus", str(corpus), *files], env)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["queries"] == 3
    assert result["ndcg@10"] == pytest.approx(1.0)
    assert result["recall@100"] == pytest.approx(1.0)
    assert result["mean_latency_ms"] > 0
    assert result["config"]["retrieval"] == "hybrid"
    name = result["index"]["name"]
    assert result["index"]["database"] == "scratch" and name.startswith("campus_search_eval_scifact_mini_corpus_")
    assert f"evaluating in scratch database {name} (created;" in r.stderr
    assert "3/3 100%" in r.stderr and "queries/s" in r.stderr  # query progress on stderr
    scratch = make_conninfo(live, dbname=name)  # beside the configured database, on the same server
    assert documents_in(live) == 0  # the served index got nothing
    assert documents_in(scratch) == 4
    # Kept: the second run finds the corpus ingested and only runs the queries.
    again = run(["eval", "--corpus", str(corpus), *files, "--fusion", "dense", "--quiet"], env)
    assert again.returncode == 0, again.stderr
    assert f"{name} (reused;" in again.stderr and "0 added, 0 updated, 4 unchanged" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["config"]["retrieval"] == "dense"
    # --live evaluates the configured index as it is, read-only: here the scratch one, named as the live one.
    with psycopg.connect(scratch) as conn:
        generation = conn.execute("SELECT generation FROM index_state").fetchone()
    lived = run(["eval", "--live", *files, "--quiet"], {**env, "DATABASE_URL": scratch})
    assert lived.returncode == 0, lived.stderr
    out = json.loads(lived.stdout.strip().splitlines()[-1])
    assert out["index"] == {"database": "live", "read_only": True} and out["ndcg@10"] == pytest.approx(1.0)
    with psycopg.connect(scratch) as conn:
        assert conn.execute("SELECT generation FROM index_state").fetchone() == generation
    both = run(["eval", "--live", "--corpus", str(corpus), *files], env)
    assert both.returncode == 2 and "not both" in both.stderr


def test_read_only_dsn_refuses_writes(make_database: Any) -> None:
    from campus_search.retrieval.evaluation import read_only

    with psycopg.connect(read_only(make_database())) as conn, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        conn.execute("CREATE TABLE t (x int)")


def test_token_command_mints_a_token_the_api_accepts(tmp_path: Path, demo_app: Any) -> None:
    r = run(["token", "--sub", "staff123", "--role", "professional_services", "--department", "IT Services",
             "--campus", "King's Buildings", "--ttl", "600"], {"JWT_SECRET_KEY": TEST_SECRET,
                                                                "DATA_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    client = demo_app.test_client()
    resp = client.post("/api/search", json={"query": "password reset instructions for staff"},
                       headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["user_id"] == "staff123"
    assert body["results"][0]["document_title"] == "IT Staff Password Management Guide"


def test_config_into_a_closed_pipe_stops_quietly(tmp_path: Path) -> None:
    """`campus-search config | head`: the reader goes away; no BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has already gone when the command writes
    try:
        proc = subprocess.run(CLI + ["config"], stdout=write_end, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "DATA_DIR": str(tmp_path)}, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 141  # 128 + SIGPIPE, what a shell reports for a reader that went away


def test_token_ttl_must_be_positive(tmp_path: Path) -> None:
    env = {"JWT_SECRET_KEY": TEST_SECRET, "DATA_DIR": str(tmp_path)}
    for ttl in ("0", "-5", "soon"):
        r = run(["token", "--sub", "a1", "--role", "student", "--ttl", ttl], env)
        assert r.returncode == 2 and r.stdout == "", ttl  # no token minted with some other lifetime
        assert "--ttl" in r.stderr
    assert run(["token", "--sub", "a1", "--role", "student", "--ttl", "1"], env).returncode == 0
