"""Search latency and throughput through HTTP, served the way production serves it.

Starts gunicorn with the brief's command (gthread workers, --preload) on a free loopback port against
an existing database (DATA_DIR's embedded PostgreSQL, or DATABASE_URL), rate limits off. By default the
result cache is off and every query distinct, so each request embeds its query and searches PostgreSQL
(``--cached``: cache on, the concurrent run repeats a few popular questions). Then:

1. concurrency 1: one client, N sequential requests -> median / p95 latency;
2. concurrency C: ``wrk`` (Debian package ``wrk``; a second process, cheap on the CPU) with a Lua
   script that cycles through the queries and makes each one distinct -> requests/s, p50 / p95.

Run it once per retrieval mode to compare fusion with dense-only:

    DATA_DIR=/tmp/cs-scifact .venv/bin/python bench/bench_search.py --fusion convex
    DATA_DIR=/tmp/cs-scifact .venv/bin/python bench/bench_search.py --fusion dense

The corpus must already be ingested (e.g. ``campus-search eval`` on SciFact). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
#: the wrk script (shared with bench_peer.py)
LUA = Path(__file__).resolve().parent / "search.lua"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_queries(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.open(encoding="utf-8") if line.strip()]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gunicorn exited with {proc.returncode} (log in {tempfile.gettempdir()})")
        try:
            if requests.get(url + "/health/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not become ready")


def parse_wrk(output: str) -> dict[str, float]:
    out: dict[str, float] = {}
    units = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
    for line in output.splitlines():
        parts = line.split()
        if line.strip().startswith(("50%", "75%", "90%", "99%")) and len(parts) == 2:
            value = parts[1]
            for unit in ("us", "ms", "s"):
                if value.endswith(unit):
                    out[f"p{parts[0].rstrip('%')}_ms"] = round(float(value[: -len(unit)]) * units[unit], 2)
                    break
        elif line.startswith("Requests/sec:"):
            out["requests_per_s"] = round(float(parts[1]), 1)
        elif "Non-2xx" in line:
            out["non_2xx"] = float(parts[-1])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", default=str(ROOT.parent / "shared/data/scifact/queries-train.jsonl"))
    ap.add_argument("--fusion", default="convex", choices=("convex", "rrf", "dense", "lexical"))
    ap.add_argument("--sequential", type=int, default=300, help="requests at concurrency 1")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=int, default=20, help="seconds of the concurrent run")
    ap.add_argument("--rate", type=float, default=0,
                    help="paced run: the concurrent users together offer about this many requests/s "
                         "(each waits concurrency/rate s between requests, jittered); 0 = as fast as possible")
    ap.add_argument("--cached", action="store_true",
                    help="cached run: result cache on, the concurrent run repeats --popular questions")
    ap.add_argument("--popular", type=int, default=12, help="distinct questions in a --cached run")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed for the concurrent run: apt-get install -y wrk")
    queries = load_queries(Path(args.queries))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SEARCH_FUSION": args.fusion, "CACHE_ENABLED": "true" if args.cached else "false",
           "RATE_LIMITS_ENABLED": "false",
           "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
    # In-process caches, as the figures in bench/README.md were measured (before the embedded Redis became
    # the default without REDIS_URL); bench_cache.py measures the cache through a real Redis.
    env["REDIS_URL"] = "memory://"
    gunicorn = [str(Path(sys.executable).parent / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers",
                str(args.workers), "--worker-class", "gthread", "--threads", str(args.threads), "--timeout", "60",
                "--keepalive", "10", "--preload", "production_system:create_production_app"]
    log_path = Path(tempfile.gettempdir()) / f"bench-gunicorn-{port}.log"
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(gunicorn, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_ready(url, proc)
        token = subprocess.check_output([str(Path(sys.executable).parent / "campus-search"), "token", "--sub",
                                         "bench", "--role", "admin"], env=env, text=True).strip()
        session = requests.Session()
        headers = {"Authorization": f"Bearer {token}"}
        for i in range(20):  # warm every worker's model and prepared statements
            session.post(url + "/api/search", json={"query": f"warm up {i}"}, headers=headers, timeout=30)
        latencies = []
        for i in range(args.sequential):
            q = f"{queries[i % len(queries)]} (s{i})"
            started = time.perf_counter()
            r = session.post(url + "/api/search", json={"query": q, "config": {"max_results": 10}},
                             headers=headers, timeout=30)
            latencies.append((time.perf_counter() - started) * 1000)
            if r.status_code != 200:
                raise SystemExit(f"search failed: {r.status_code} {r.text[:200]}")
        latencies.sort()
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as qfile:
            qfile.write("\n".join(q.replace("\n", " ") for q in (queries[:args.popular] if args.cached else queries)))
        wrk = subprocess.run(["wrk", "-t2", f"-c{args.concurrency}", f"-d{args.duration}s", "--latency",
                              "-s", str(LUA), url],
                             env={**env, "BENCH_QUERIES": qfile.name, "BENCH_TOKEN": token,
                                  "BENCH_CACHED": "1" if args.cached else "0",
                                  "BENCH_PAUSE_MS": str(int(1000 * args.concurrency / args.rate) if args.rate else 0)},
                             capture_output=True, text=True, timeout=args.duration + 60)
        result = {
            "fusion": args.fusion, "cached": args.cached, "offered_rate": args.rate or "max",
            "workers": args.workers, "threads": args.threads,
            "c1_median_ms": round(statistics.median(latencies), 2),
            "c1_p95_ms": round(latencies[int(0.95 * len(latencies)) - 1], 2),
            "c1_requests": len(latencies),
            f"c{args.concurrency}": parse_wrk(wrk.stdout),
        }
        print(wrk.stdout, file=sys.stderr)
        print(json.dumps(result))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
