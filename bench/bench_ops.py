"""What the operations surface costs: per-request metrics + access-log work, and a /metrics scrape.

    .venv/bin/python bench/bench_ops.py [--requests 20000] [--workers 4]

1. Per-request hook cost, in-process: what the metrics and access-log after_request hooks
   (``api/instrumentation.py``) do for one search (request counter + histogram, query counter, pool sample,
   one JSON access record formatted into memory), measured over ``--requests`` iterations.
2. Scrape cost in multiprocess mode: ``--workers`` forked processes each record ``--requests / 4``
   requests over a realistic label mix, then ``metrics.render()`` sums their files (what
   ``GET /metrics`` does under gunicorn), timed over 20 scrapes.

No database or network: the pool is a psycopg_pool ConnectionPool that is never opened (its
statistics are what the sampler reads). Prints a table, then one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

# Multiprocess mode must be chosen before prometheus_client is imported.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bench-ops-metrics-")

from psycopg_pool import ConnectionPool  # noqa: E402

from campus_search import metrics
from campus_search.ops import logs  # noqa: E402

ENDPOINTS = ("search.search_documents", "ops.health_check", "ops.metrics", "ops.liveness")
ROLES = ("student", "staff", "academic", "admin")
DEPARTMENTS = ("IT Services", "Library", "Registry", "none", "other")


class _Db:
    def __init__(self) -> None:
        self.read_pool = self.write_pool = ConnectionPool("postgresql:///unused", open=False, min_size=1)


def per_request_cost(n: int) -> float:
    """Microseconds of hook work per search request."""
    db = _Db()
    sampler = metrics.PoolSampler()
    stream = io.StringIO()
    log = logging.getLogger("bench.access")
    log.propagate = False
    log.addHandler(logs.make_handler("json", stream))
    log.setLevel(logging.INFO)
    started = time.perf_counter()
    for i in range(n):
        metrics.observe_request("POST", ENDPOINTS[0], 200, 0.012)
        metrics.search_answered(ROLES[i % 4], DEPARTMENTS[i % 5], i % 7)
        sampler.sample(db)
        log.info("POST /api/search 200 12.0ms", extra={
            "request_id": "req_0123456789abcdef", "method": "POST", "path": "/api/search",
            "endpoint": ENDPOINTS[0], "status": 200, "latency_ms": 12.0, "user_id": "staff123", "role": "staff"})
        if i % 1000 == 0:
            stream.seek(0)
            stream.truncate()
    return (time.perf_counter() - started) / n * 1e6


def scrape_cost(workers: int, per_worker: int) -> tuple[float, int]:
    """(median ms per render, bytes) with ``workers`` processes' files."""
    for w in range(workers):
        pid = os.fork()
        if pid == 0:  # a worker: record its share, then leave its files behind
            for i in range(per_worker):
                metrics.observe_request("POST" if i % 3 else "GET", ENDPOINTS[i % 4], 200 if i % 11 else 429,
                                        0.001 * (i % 300))
                metrics.search_answered(ROLES[(i + w) % 4], DEPARTMENTS[i % 5], i % 5)
                metrics.cache_op("get", "hit" if i % 2 else "miss")
                metrics.embedding_request("local", 0.004, True, 1)
            os._exit(0)
        os.waitpid(pid, 0)
    times = []
    size = 0
    for _ in range(20):
        started = time.perf_counter()
        size = len(metrics.render())
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000, help="iterations (default 20000)")
    parser.add_argument("--workers", type=int, default=4, help="simulated gunicorn workers (default 4)")
    args = parser.parse_args()
    try:
        hook_us = per_request_cost(args.requests)
        render_ms, size = scrape_cost(args.workers, max(1, args.requests // 4))
    finally:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    print(f"{'per-request hooks (metrics + pool sample + JSON access log)':<62} {hook_us:8.1f} µs")
    print(f"{f'/metrics render, {args.workers} workers (median of 20)':<62} {render_ms:8.2f} ms ({size:,} bytes)")
    print(json.dumps({"hook_us_per_request": round(hook_us, 1), "metrics_render_ms": round(render_ms, 2),
                      "metrics_bytes": size, "workers": args.workers, "requests": args.requests}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
