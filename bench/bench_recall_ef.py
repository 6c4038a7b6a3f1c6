"""Dense recall@10 against an exact allowed-only search, by hnsw.ef_search, on a bench_scale.py data directory.

    .venv/bin/python bench/bench_recall_ef.py DATA_DIR 100,200,400,800

Uses the query vectors bench_scale.py saved there (query-vectors-50.npy: run bench_scale with
--recall-queries 50 first), an admin and a 4 %-department staff member, the HNSW plan forced
(exact_max_fraction 0) and the production candidate depth; prints one JSON line per principal and
ef_search.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

SECRET = "bench-secret-" + "x" * 40  # bench_scale.py's


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", help="a bench_scale.py data directory (with query-vectors-50.npy)")
    ap.add_argument("efs", help="hnsw.ef_search values, comma-separated, e.g. 100,200,400,800")
    args = ap.parse_args()
    data_dir, efs = args.data_dir, [int(x) for x in args.efs.split(",")]
    os.environ.update(DATA_DIR=data_dir, JWT_SECRET_KEY=SECRET, AUDIT_HMAC_KEY=SECRET + "audit",
                      CACHE_ENABLED="false", RATE_LIMITS_ENABLED="false", DB_STATEMENT_TIMEOUT_MS="3600000")
    os.environ.pop("DATABASE_URL", None)
    from campus_search.config import load_settings
    from campus_search.retrieval.search import CANDIDATE_FLOOR, Searcher
    from campus_search.security.auth import principal_from_claims
    from campus_search.services import Services

    settings = load_settings()
    services = Services(settings).ensure_open()
    principals = {
        "admin": principal_from_claims({"sub": "admin", "role": "it_administrator"}, settings),
        "staff:Finance": principal_from_claims({"sub": "s", "role": "professional_services",
                                                "departments": ["Finance"]}, settings),
    }
    qvecs = np.load(os.path.join(data_dir, "query-vectors-50.npy"))
    for label, user in principals.items():
        base = Searcher(services.db, services.embedder, ef_search=100, exact_max_fraction=0.0)
        exact = [base.dense_candidates(user, v, {}, CANDIDATE_FLOOR, exact=True)[:10] for v in qvecs]
        for ef in efs:
            s = Searcher(services.db, services.embedder, ef_search=ef, exact_max_fraction=0.0)
            recall, times = [], []
            for v, ex in zip(qvecs, exact, strict=True):
                t = time.perf_counter()
                got = s.dense_candidates(user, v, {}, CANDIDATE_FLOOR, exact=False)[:10]
                times.append((time.perf_counter() - t) * 1000)
                recall.append(len({h.chunk_id for h in got} & {h.chunk_id for h in ex}) / len(ex))
            times.sort()
            print(json.dumps({"principal": label, "ef_search": ef, "recall@10": round(statistics.mean(recall), 3),
                              "p50_ms": round(statistics.median(times), 1),
                              "p95_ms": round(times[int(0.95 * (len(times) - 1))], 1)}), flush=True)
    services.close()


if __name__ == "__main__":
    main()
