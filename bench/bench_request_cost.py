"""Where an uncached search's time goes, in-process, on a data directory that bench_peer.py built.

    .venv/bin/python bench/bench_request_cost.py DATA_DIR [--queries 300]

``DATA_DIR`` is bench_peer.py's ``--data-dir`` + ``/data`` (an embedded PostgreSQL holding SciFact
documents). With the result cache and rate limits off, as an admin, SciFact train questions made unique
with bench_peer.py's suffix:

1. PostgreSQL CPU per search (all ``postgres`` processes' CPU time, from /proc, over the run): the hybrid
   search and the dense-only search (``Searcher.search``, query vectors computed beforehand), and the whole
   ``POST /api/search`` through Flask's test client (audit record included);
2. concurrency 1, the same request path with the query embedded: the median wall time of the request and
   of its parts (the query embedding, the hybrid statement, the audit append).

``--plans``: instead, the hybrid search's PostgreSQL CPU with its statement run as shipped (its generic
plan: ``search.GENERIC_PLAN``) and under PostgreSQL's ``auto`` plan cache mode, alternating in blocks of
20 searches, three passes over the queries.

The machine's speed moves between runs (docs/performance.md): compare rows of one run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCIFACT = Path(os.environ.get("SCIFACT_DIR") or ROOT.parent / "shared/data/scifact")


def postgres_cpu() -> float:
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["name"]):
        try:
            if (proc.info["name"] or "").startswith("postgres"):
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--plans", action="store_true", help="the hybrid search's generic plan against auto")
    args = ap.parse_args()
    os.environ.update(DATA_DIR=args.data_dir, CACHE_ENABLED="false", RATE_LIMITS_ENABLED="false")
    os.environ.pop("DATABASE_URL", None)
    sys.path.insert(0, str(ROOT))
    import dataclasses

    from campus_search.app import create_app
    from campus_search.config import load_settings
    from campus_search.retrieval.params import SearchParams
    from campus_search.retrieval.querytext import normalise_query
    from campus_search.security.auth import mint_token
    from campus_search.security.roles import superuser
    from campus_search.services import Services

    settings = load_settings()
    services = Services(settings).ensure_open()
    searcher = services.searcher
    lines = (SCIFACT / "queries-train.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines if line.strip()][:args.queries]
    app = create_app(services)
    client = app.test_client()
    auth = {"Authorization": "Bearer " + mint_token(settings, sub="bench-admin", role="admin")}
    admin = superuser("bench")
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "queries": len(texts)}

    def per_search(label: str, queries: list[str], run: Callable[[str], Any]) -> None:
        for query in queries:  # a warm-up pass: every page the timed pass reads is in shared buffers
            run(query)
        cpu, wall = postgres_cpu(), time.perf_counter()
        for query in queries:
            run(query)
        n = len(queries)
        row = {"postgres_cpu_ms": round((postgres_cpu() - cpu) * 1000 / n, 2),
               "wall_ms": round((time.perf_counter() - wall) * 1000 / n, 2)}
        report[label] = row
        print(f"{label:28s} PostgreSQL CPU {row['postgres_cpu_ms']:6.2f} ms   wall {row['wall_ms']:6.2f} ms")

    # 1. PostgreSQL CPU per search, the query vectors computed beforehand
    queries = [f"{q} (r0o1-{i})" for i, q in enumerate(texts)]
    for query in queries:
        searcher.query_vectors.put(normalise_query(query), services.embedder.embed_query([query])[0])
    if args.plans:
        compare_plans(searcher, admin, queries, report)
        services.close()
        return
    fusion = searcher.fusion
    per_search("hybrid search", queries, lambda q: searcher.search(admin, SearchParams(q, {}, 10, -1.0)))
    searcher.fusion = dataclasses.replace(fusion, method="dense")
    per_search("dense-only search", queries, lambda q: searcher.search(admin, SearchParams(q, {}, 10, -1.0)))
    searcher.fusion = fusion

    def api(query: str) -> None:
        response = client.post("/api/search", json={"query": query}, headers=auth)
        assert response.status_code == 200, response.get_data(as_text=True)

    per_search("POST /api/search", queries, api)

    # 2. concurrency 1, queries embedded in the request: the parts of a request's wall time
    parts: dict[str, list[float]] = collections.defaultdict(list)

    def timed(obj: Any, name: str, label: str) -> None:
        original = getattr(obj, name)

        def wrapper(*a: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                parts[label].append((time.perf_counter() - start) * 1000)

        setattr(obj, name, wrapper)

    timed(searcher.embedder, "embed_query", "query embedding")
    timed(searcher, "hybrid_candidates", "hybrid statement")
    timed(services.auditor, "append", "audit append")
    fresh = [f"{q} (c1-{i})" for i, q in enumerate(texts)]
    for i, query in enumerate(fresh):
        start = time.perf_counter()
        api(query)
        if i >= 20:
            parts["request"].append((time.perf_counter() - start) * 1000)
    print("\nconcurrency 1, query embedded in the request (median ms)")
    for label in ("request", "query embedding", "hybrid statement", "audit append"):
        values = parts[label][20:] if label != "request" else parts[label]
        report[f"c1 {label} ms"] = round(statistics.median(values), 2)
        print(f"  {label:18s} {statistics.median(values):6.2f}")
    print(json.dumps(report))
    services.close()


def compare_plans(searcher: Any, admin: Any, queries: list[str], report: dict[str, Any]) -> None:
    from campus_search.retrieval import search as search_module
    from campus_search.retrieval.params import SearchParams

    shipped = search_module.GENERIC_PLAN
    modes = {"generic plan (shipped)": shipped, "auto": "auto"}
    cpu = dict.fromkeys(modes, 0.0)
    for query in queries[:40]:  # warm: pages cached, statements prepared
        searcher.search(admin, SearchParams(query, {}, 10, -1.0))
    try:
        for rep in range(3):
            for block in range(0, len(queries), 20):
                order = list(modes) if (block // 20 + rep) % 2 == 0 else list(modes)[::-1]
                for label in order:
                    search_module.GENERIC_PLAN = modes[label]
                    start = postgres_cpu()
                    for query in queries[block:block + 20]:
                        searcher.search(admin, SearchParams(query, {}, 10, -1.0))
                    cpu[label] += postgres_cpu() - start
    finally:
        search_module.GENERIC_PLAN = shipped
    for label in modes:
        ms = round(cpu[label] * 1000 / (3 * len(queries)), 2)
        report[f"hybrid search, {label}"] = {"postgres_cpu_ms": ms}
        print(f"hybrid search, {label:24s} PostgreSQL CPU {ms:6.2f} ms")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
