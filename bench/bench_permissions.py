"""Search latency of the most restricted user vs an admin on the same corpus, and the cost of an audit write.

    .venv/bin/python bench/bench_permissions.py [--docs 5183] [--queries 200] [--data-dir DIR]

Builds (once; ingestion is idempotent, so re-runs skip it) the SciFact corpus from
/work/shared/data/scifact with access metadata assigned deterministically per document: skewed
departments, 10% public, clearance 1-5. Then, for principals from anonymous (public, clearance 1: the
most restricted, about 1.5% of chunks) to admin (everything), it times:

- ``search``: ``Services.run_search`` -- permission-filtered hybrid retrieval + ranking, result cache
  off, query vectors warmed first (the embedding costs the same for everybody);
- ``api``: a full ``POST /api/search`` through the Flask app -- JWT check, the same search, the
  audit record (synchronous INSERT in the hash chain), JSON.

Principals take turns query by query so background noise hits them alike. Finally it times audit
appends alone: sequential, and 8 threads on two pools (two processes' worth). Everything runs on
127.0.0.1 (an embedded PostgreSQL under --data-dir). Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the evaluation data beside the checkout (../shared), or SCIFACT_DIR
SCIFACT = next((p for p in (Path(os.environ.get("SCIFACT_DIR", "")),
                            Path(__file__).resolve().parent.parent.parent / "shared/data/scifact")
                if (p / "corpus.jsonl").is_file()), Path("/work/shared/data/scifact"))
SECRET = "bench-secret-" + "x" * 40
DEPARTMENTS = [("Medicine", 35), ("Informatics", 25), ("Library", 15), ("Estates", 10), ("Human Resources", 8),
               ("Finance", 4), ("Vet School", 2), ("Chaplaincy", 1)]
CAMPUSES = ("Central Campus", "King's Buildings", "Easter Bush", "Western General")
PRINCIPALS = [  # (label, SSO role claim, departments): a claim maps to a role only through ROLE_MAPPING
    ("anonymous", None, ()), ("student", "student", ("Medicine",)),
    ("staff:Chaplaincy", "professional_services", ("Chaplaincy",)),
    ("staff:Medicine", "professional_services", ("Medicine",)), ("academic", "academic_staff", ()),
    ("admin", "it_administrator", ()),
]


def _bucket(doc_id: str, salt: str, n: int) -> int:
    return int(hashlib.sha256(f"{salt}:{doc_id}".encode()).hexdigest()[:8], 16) % n


def _weighted(doc_id: str, salt: str, choices: list[tuple[Any, int]]) -> Any:
    point = _bucket(doc_id, salt, sum(w for _, w in choices))
    for value, weight in choices:
        if point < weight:
            return value
        point -= weight
    raise AssertionError


def corpus_with_metadata(out: Path, docs: int) -> Path:
    """SciFact documents with deterministic access metadata, as a BEIR .jsonl the CLI can ingest."""
    path = out / f"scifact-{docs}.jsonl"
    if path.exists():
        return path
    with (SCIFACT / "corpus.jsonl").open(encoding="utf-8") as src, path.open("w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if i == docs:
                break
            d = json.loads(line)
            d.update(department=_weighted(d["_id"], "dept", DEPARTMENTS),
                     visibility="public" if _bucket(d["_id"], "vis", 10) == 0 else "department",
                     clearance_level=_weighted(d["_id"], "cl", [(1, 15), (2, 15), (3, 30), (4, 25), (5, 15)]),
                     campus=CAMPUSES[_bucket(d["_id"], "campus", 4)], priority=1 + _bucket(d["_id"], "prio", 5))
            dst.write(json.dumps(d) + "\n")
    return path


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=5183, help="SciFact documents to index (default: all 5183)")
    ap.add_argument("--queries", type=int, default=200, help="queries per principal (default 200)")
    ap.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "campus-search-bench-permissions"),
                    help="embedded PostgreSQL and corpus; kept, so re-runs skip ingestion")
    args = ap.parse_args()
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(DATA_DIR=str(data_dir), JWT_SECRET_KEY=SECRET, AUDIT_HMAC_KEY=SECRET + "audit",
                      CACHE_ENABLED="false", RATE_LIMITS_ENABLED="false", DB_POOL_MAX_SIZE="8",
                      ALLOW_ANONYMOUS="true")
    os.environ.pop("DATABASE_URL", None)

    from campus_search.app import create_app
    from campus_search.audit.chain import AuditRecord
    from campus_search.audit.records import Auditor
    from campus_search.cli.main import ingest_paths
    from campus_search.config import load_settings
    from campus_search.embedding.factory import get_embedder, ingest_threads
    from campus_search.ingest.metadata import AccessMetadata
    from campus_search.retrieval.params import SearchParams
    from campus_search.retrieval.search import _where
    from campus_search.security.auth import anonymous_principal, mint_token, principal_from_claims
    from campus_search.security.roles import visible_sql
    from campus_search.services import Services
    from campus_search.storage.db import Database

    settings = load_settings()
    services = Services(settings, embedder=get_embedder(settings, threads=ingest_threads())).ensure_open()
    started = time.perf_counter()
    report = ingest_paths(services, [corpus_with_metadata(data_dir, args.docs)], AccessMetadata(), quiet=True)
    print(f"corpus: {report.added} added, {report.unchanged} unchanged ({time.perf_counter() - started:.0f}s)",
          file=sys.stderr)
    services.close()
    services = Services(settings).ensure_open()  # serving configuration: one ONNX thread
    app = create_app(services)
    client = app.test_client()

    users: dict[str, Any] = {}
    tokens: dict[str, str | None] = {}
    for label, role, depts in PRINCIPALS:
        if role is None:
            users[label], tokens[label] = anonymous_principal(settings), None
        else:
            users[label] = principal_from_claims({"sub": label, "role": role, "departments": list(depts)}, settings)
            tokens[label] = "Bearer " + mint_token(settings, sub=label, role=role, departments=depts, ttl=3600)
    lines = (SCIFACT / "queries-train.jsonl").read_text(encoding="utf-8").splitlines()
    queries = [json.loads(line)["text"] for line in lines if line.strip()][:args.queries]
    for q in queries:
        services.searcher.embed_query(q)
    with services.db.connection(read=True) as conn:
        total = conn.execute("SELECT count(*) FROM chunks").fetchall()[0][0]
        share, plans = {}, {}
        for label, user in users.items():
            clause, params = visible_sql(user, "c")
            visible = conn.execute(f"SELECT count(*) FROM chunks c WHERE {clause}", params).fetchall()[0][0]
            share[label] = visible / total
            where, params = _where(user, {})
            conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
            plan = " ".join(r[0] for r in conn.execute(
                f"EXPLAIN SELECT c.id FROM chunks c WHERE {where} ORDER BY c.embedding <=> %(q)s LIMIT 40",
                {"q": services.searcher.embed_query(queries[0]), **params}))
            plans[label] = "hnsw+iterative" if "chunks_embedding_hnsw" in plan else "exact (btree+sort)"

    timings: dict[str, dict[str, list[float]]] = {label: {"search": [], "api": []} for label in users}
    counts: dict[str, list[int]] = {label: [] for label in users}
    for q in queries[:5]:  # warm-up: pools, plans, code paths
        for label in users:
            services.run_search(users[label], SearchParams(q, {}, 10, settings.similarity_threshold))
    for q in queries:
        for label, user in users.items():
            t = time.perf_counter()
            hits = services.run_search(user, SearchParams(q, {}, 10, settings.similarity_threshold)).hits
            timings[label]["search"].append((time.perf_counter() - t) * 1000)
            counts[label].append(len(hits))
            headers = {"Authorization": tokens[label]} if tokens[label] else {}
            t = time.perf_counter()
            r = client.post("/api/search", json={"query": q, "config": {"max_results": 10}}, headers=headers)
            timings[label]["api"].append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.get_data(as_text=True)

    # audit appends alone
    auditor = Auditor(services.db, settings)

    def record() -> AuditRecord:
        return AuditRecord(kind="search", action="search", success=True, user_id="bench", role="staff",
                           query_hmac="0" * 64, filters='{"campus":"Easter Bush"}', result_count=10,
                           response_time_ms=12.345, client_ip="127.0.0.1", user_agent="bench")

    seq = []
    for _ in range(300):
        t = time.perf_counter()
        auditor.append(record())
        seq.append((time.perf_counter() - t) * 1000)
    pools = [Database(settings, services.dsn) for _ in range(2)]
    for db in pools:
        db.open()
    per_thread = 100

    def work(db: Any) -> None:
        a = Auditor(db, settings)
        for _ in range(per_thread):
            a.append(record())

    threads = [threading.Thread(target=work, args=(pools[i % 2],)) for i in range(8)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    concurrent_rate = 8 * per_thread / (time.perf_counter() - t)
    for db in pools:
        db.close()
    services.close()

    result: dict[str, Any] = {"chunks": total, "queries": len(queries), "principals": {}}
    print(f"\n{total} chunks, {len(queries)} queries per principal\n")
    print(f"{'principal':18} {'sees':>7} {'plan':19} {'search p50':>10} {'p95':>7} {'api p50':>8} {'p95':>7}"
          f" {'results':>7}")
    for label in users:
        s, a = timings[label]["search"], timings[label]["api"]
        row = {"visible_share": round(share[label], 4), "plan": plans[label],
               "search_p50_ms": round(statistics.median(s), 2), "search_p95_ms": round(pct(s, 0.95), 2),
               "api_p50_ms": round(statistics.median(a), 2), "api_p95_ms": round(pct(a, 0.95), 2),
               "mean_results": round(statistics.mean(counts[label]), 2)}
        result["principals"][label] = row
        print(f"{label:18} {share[label]:>7.1%} {plans[label]:19} {row['search_p50_ms']:>10} "
              f"{row['search_p95_ms']:>7} {row['api_p50_ms']:>8} {row['api_p95_ms']:>7} {row['mean_results']:>7}")
    p = result["principals"]
    result["restricted_vs_admin_search_p50"] = round(p["anonymous"]["search_p50_ms"] / p["admin"]["search_p50_ms"], 2)
    result["restricted_vs_admin_api_p50"] = round(p["anonymous"]["api_p50_ms"] / p["admin"]["api_p50_ms"], 2)
    result["audit_append_p50_ms"] = round(statistics.median(seq), 3)
    result["audit_append_p95_ms"] = round(pct(seq, 0.95), 3)
    result["audit_appends_per_s_8_threads"] = round(concurrent_rate)
    print(f"\nmost restricted / admin, median: search {result['restricted_vs_admin_search_p50']}x, "
          f"api {result['restricted_vs_admin_api_p50']}x (target: within 2x)")
    print(f"audit append: p50 {result['audit_append_p50_ms']} ms, p95 {result['audit_append_p95_ms']} ms; "
          f"{result['audit_appends_per_s_8_threads']}/s from 8 threads on 2 pools")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
