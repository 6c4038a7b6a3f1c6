"""Restart time and worker memory (SPEC §7: ready in < 15 s on an existing data directory; one worker
with the default model < 400 MB resident).

Starts ``campus-search serve`` on an existing DATA_DIR (embedded PostgreSQL already initialised and
holding a corpus), measures the time until ``/health/ready`` answers 200, sends searches so the worker
has loaded the model and filled its caches, then reads each gunicorn worker's VmRSS from /proc.

    DATA_DIR=/tmp/cs-scifact .venv/bin/python bench/bench_startup.py --workers 1 --searches 200
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--searches", type=int, default=200)
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cli = str(Path(sys.executable).parent / "campus-search")
    env = {**os.environ, "PORT": str(port), "RATE_LIMITS_ENABLED": "false", "LOG_LEVEL": "WARNING"}
    started = time.perf_counter()
    proc = subprocess.Popen([cli, "serve", "--workers", str(args.workers)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ready = None
        while time.perf_counter() - started < 120:
            try:
                if requests.get(url + "/health/ready", timeout=1).status_code == 200:
                    ready = time.perf_counter() - started
                    break
            except requests.RequestException:
                pass
            time.sleep(0.05)
        if ready is None:
            raise SystemExit("not ready within 120 s")
        token = subprocess.check_output([cli, "token", "--sub", "bench", "--role", "admin"], env=env,
                                        text=True).strip()
        session = requests.Session()
        first = time.perf_counter()
        r = session.post(url + "/api/search", json={"query": "first search after restart"},
                         headers={"Authorization": f"Bearer {token}"}, timeout=60)
        first_search = time.perf_counter() - first
        assert r.status_code == 200, r.text
        for i in range(args.searches):
            session.post(url + "/api/search", json={"query": f"memory probe query number {i}"},
                         headers={"Authorization": f"Bearer {token}"}, timeout=60)
        workers = children(proc.pid)
        result = {
            "ready_seconds": round(ready, 2),
            "first_search_seconds": round(first_search, 3),
            "master_rss_mb": round(rss_mb(proc.pid), 1),
            "worker_rss_mb": [round(rss_mb(p), 1) for p in workers],
        }
        print(json.dumps(result))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
