"""The command line as an operator uses it: embedded PostgreSQL that survives restarts, `eval` on BEIR files,
`token` accepted by the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_SECRET

CLI = [sys.executable, "-m", "campus_search.cli"]


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


def test_embedded_database_keeps_data_across_restarts(tmp_path: Path, folder: Path) -> None:
    env = {"DATA_DIR": str(tmp_path / "state"), "DATABASE_URL": "", "DB_HOST": ""}
    # parking.txt states no department: public must be said (DEFAULT_VISIBILITY is department)
    first = run(["ingest", str(folder), "--quiet", "--visibility", "public"], env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.strip().splitlines()[-1])["added"] == 2
    # each CLI process started the embedded cluster and stopped it on exit; a new process finds the data
    again = run(["ingest", str(folder), "--quiet"], env)  # no flags: the stored access stays
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["unchanged"] == 2 and summary["chunks_embedded"] == 0
    probe = subprocess.run(
        [sys.executable, "-c",
         "from campus_search.config import load_settings; from campus_search.services import Services;"
         "from campus_search.search import SearchParams; from campus_search.security.roles import superuser;"
         "s = Services(load_settings()).ensure_open();"
         "hits = s.searcher.search(superuser(), SearchParams('how do I renew a parking permit', max_results=1));"
         "print(hits[0].document_title)"],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().splitlines()[-1] == "Parking"  # a .txt file's title comes from its name
    assert (tmp_path / "state" / "pgdata" / "PG_VERSION").exists()


def test_eval_prints_metrics_json_last(tmp_path: Path, make_database: Any) -> None:
    corpus = tmp_path / "corpus.jsonl"
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
    env = {"DATABASE_URL": make_database(), "DATA_DIR": str(tmp_path / "state"), "JWT_SECRET_KEY": TEST_SECRET}
    r = run(["eval", "--corpus", str(corpus), "--queries", str(queries), "--qrels", str(qrels), "--quiet"], env)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["queries"] == 3
    assert result["ndcg@10"] == pytest.approx(1.0)
    assert result["recall@100"] == pytest.approx(1.0)
    assert result["mean_latency_ms"] > 0
    assert result["config"]["retrieval"] == "hybrid"
    dense = run(["eval", "--corpus", str(corpus), "--queries", str(queries), "--qrels", str(qrels), "--quiet",
                 "--fusion", "dense"], env)
    assert json.loads(dense.stdout.strip().splitlines()[-1])["config"]["retrieval"] == "dense"


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
