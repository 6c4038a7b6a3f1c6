"""Hybrid search on a bench_scale.py data directory: one statement against BM25 beside the dense half.

    .venv/bin/python bench/bench_split.py DATA_DIR [--principals admin,staff,student] [--queries 50]
        [--scan 20000,1000000000] [--plans | --halves]

For each principal and each ``BM25_SCAN`` value, the shipped ``Searcher.search`` with precomputed query
vectors (bench_scale.py saved them in DATA_DIR: query-vectors-200.npy or -50.npy), run twice over the
queries: a warm-up pass, then a timed pass in which each query runs both ways, in alternating order --
the hybrid search as one statement (the split forced off) and split (BM25 on a second connection that
imports the search's snapshot, ``Searcher.search_beside``). Prints p50/p95 ms of each and how many top-10
lists were the same (they must all be). One JSON line per principal and scan value.

``--plans``: instead of one statement against split, the shipped search with its statements run on their
generic plan (``search.GENERIC_PLAN``, as shipped) against PostgreSQL's ``auto`` plan cache mode.

``--halves``: instead, each half of the split search alone, then the whole: the BM25 half
(``Searcher.lexical_pool``, one statement), the dense half (the shipped dense statement of the principal's
plan, exact or HNSW) and ``Searcher.search``, one after the other per query; p50/p95 ms of each. Which half
bounds a principal's search.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

SECRET = "bench-secret-" + "x" * 40  # bench_scale.py's
CLAIMS: dict[str, dict[str, Any]] = {"admin": {"sub": "admin", "role": "it_administrator"},
          "staff": {"sub": "s", "role": "professional_services", "departments": ["Finance"]},
          "student": {"sub": "u", "role": "student"}}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir")
    ap.add_argument("--principals", default="admin,staff,student")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--scan", default="20000", help="BM25_SCAN values, comma-separated (default 20000)")
    ap.add_argument("--plans", action="store_true", help="generic plans (shipped) against auto, not one/split")
    ap.add_argument("--halves", action="store_true", help="the BM25 half, the dense half and the whole, timed apart")
    args = ap.parse_args()
    data_dir = Path(args.data_dir)
    os.environ.update(DATA_DIR=str(data_dir), JWT_SECRET_KEY=SECRET, AUDIT_HMAC_KEY=SECRET + "audit",
                      CACHE_ENABLED="false", RATE_LIMITS_ENABLED="false")
    os.environ.pop("DATABASE_URL", None)
    from campus_search.config import load_settings
    from campus_search.retrieval import search as search_module
    from campus_search.retrieval.fusion import FusionConfig
    from campus_search.retrieval.lexical import BM25
    from campus_search.retrieval.params import SearchParams
    from campus_search.retrieval.querytext import normalise_query
    from campus_search.security.auth import principal_from_claims
    from campus_search.services import Services

    settings = load_settings()
    services = Services(settings).ensure_open()
    saved = [data_dir / f"query-vectors-{n}.npy" for n in (200, 50)]
    vectors = next((path for path in saved if path.exists()), None)
    if vectors is None:
        raise SystemExit(f"no query vectors in {data_dir}: run bench_scale.py on it first")
    qvecs = np.load(vectors)[:args.queries]
    lines = (Path(os.environ.get("SCIFACT_DIR", Path(__file__).resolve().parents[2] / "shared/data/scifact"))
             / "queries-train.jsonl").read_text(encoding="utf-8").splitlines()
    queries = [json.loads(line)["text"] for line in lines if line.strip()][:len(qvecs)]
    threshold, generic = search_module.LEXICAL_BESIDE_MIN_CHUNKS, search_module.GENERIC_PLAN
    modes = ("generic", "auto") if args.plans else ("one", "split")
    try:
        for who in args.principals.split(","):
            user = principal_from_claims(CLAIMS[who], settings)
            for scan in (int(x) for x in args.scan.split(",")):
                bm25 = BM25(settings.bm25_k1, settings.bm25_b, depth=settings.bm25_depth,
                            cut_df=settings.bm25_cut_df, scan=scan, whole_chunks=settings.bm25_whole_chunks)
                searcher = search_module.Searcher(services.db, services.embedder, ef_search=settings.hnsw_ef_search,
                                                  exact_max_fraction=settings.dense_exact_fraction,
                                                  fusion=FusionConfig(method="convex"), bm25=bm25)
                for q, v in zip(queries, qvecs, strict=True):
                    searcher.query_vectors.put(normalise_query(q), np.asarray(v, dtype=np.float32))
                if args.halves:
                    print(json.dumps({"principal": who, "bm25_scan": scan, **halves(searcher, user, queries, qvecs),
                                      "load_average": os.getloadavg()}), flush=True)
                    continue
                times: dict[str, list[float]] = {m: [] for m in modes}
                same = 0
                for timed in (False, True):
                    for i, q in enumerate(queries):
                        top: dict[str, list[int]] = {}
                        for mode in modes if i % 2 == 0 else modes[::-1]:
                            if args.plans:
                                search_module.GENERIC_PLAN = generic if mode == "generic" else "auto"
                            else:
                                search_module.LEXICAL_BESIDE_MIN_CHUNKS = 10**15 if mode == "one" else 0
                            t = time.perf_counter()
                            hits = searcher.search(user, SearchParams(q, {}, 10, 0.0))
                            if timed:
                                times[mode].append((time.perf_counter() - t) * 1000)
                            top[mode] = [h.chunk_id for h in hits]
                        same += timed and top[modes[0]] == top[modes[1]]
                print(json.dumps({"principal": who, "bm25_scan": scan, "queries": len(queries),
                                  **{f"{m}_p50": round(statistics.median(t), 1) for m, t in times.items()},
                                  **{f"{m}_p95": round(pct(t, .95), 1) for m, t in times.items()},
                                  "same_top10": same, "load_average": os.getloadavg()}), flush=True)
    finally:
        search_module.LEXICAL_BESIDE_MIN_CHUNKS, search_module.GENERIC_PLAN = threshold, generic
        services.close()


def halves(searcher: Any, user: Any, queries: list[str], qvecs: np.ndarray) -> dict[str, Any]:
    """p50/p95 ms of the BM25 half alone, the dense half alone and the whole search (a warm-up pass, then a
    timed one), and the dense plan the principal gets."""
    from campus_search.retrieval import search as search_module
    from campus_search.retrieval.params import SearchParams

    where, where_params = search_module._where(user, {})
    exact = searcher.dense_plan(user, {}) == "exact"
    dense_sql = f"SELECT array_agg(id) FROM ({search_module._dense_sql(where, exact)}) t"
    times: dict[str, list[float]] = {"bm25_half": [], "dense_half": [], "search": []}
    for timed in (False, True):
        for q, v in zip(queries, qvecs, strict=True):
            t0 = time.perf_counter()
            searcher.lexical_pool(user, q, {}, 40)
            t1 = time.perf_counter()
            searcher._fetch(dense_sql, {"q": np.asarray(v, dtype=np.float32), "k": 40, **where_params}, 40,
                            exact=exact)
            t2 = time.perf_counter()
            searcher.search(user, SearchParams(q, {}, 10, 0.0))
            t3 = time.perf_counter()
            if timed:
                for name, ms in (("bm25_half", t1 - t0), ("dense_half", t2 - t1), ("search", t3 - t2)):
                    times[name].append(ms * 1000)
    return {"dense_plan": "exact" if exact else "hnsw", "queries": len(queries),
            **{f"{m}_p50": round(statistics.median(t), 1) for m, t in times.items()},
            **{f"{m}_p95": round(pct(t, .95), 1) for m, t in times.items()}}


if __name__ == "__main__":
    main()
