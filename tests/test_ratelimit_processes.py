"""Limits are exact across processes: `campus-search serve` with two gunicorn workers on loopback,
sharing one real redis-server, hammered by several client processes at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_SECRET, serving

ROOT = Path(__file__).resolve().parent.parent

#: One client process: THREADS threads x PER_THREAD requests as one user; prints the status codes.
CLIENT = r"""
import json, sys, threading, urllib.request, urllib.error
url, auth, threads, per_thread = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
codes, lock = [], threading.Lock()
body = json.dumps({"query": "exam timetable", "config": {"max_results": 1}}).encode()
def run():
    for _ in range(per_thread):
        req = urllib.request.Request(url, data=body, headers={"Authorization": auth,
                                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                code = r.status
        except urllib.error.HTTPError as e:
            code = e.code
        with lock:
            codes.append(code)
ts = [threading.Thread(target=run) for _ in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps(codes))
"""


@pytest.fixture
def server(make_database: Any, redis_server: Any, redis_prefix: str, tmp_path: Path) -> Iterator[str]:
    env = {**os.environ, "DATABASE_URL": make_database(), "REDIS_URL": redis_server.url,
           "REDIS_KEY_PREFIX": redis_prefix, "JWT_SECRET_KEY": TEST_SECRET, "AUDIT_HMAC_KEY": "audit-" + "k" * 40,
           "DATA_DIR": str(tmp_path / "data"),
           "RATE_LIMIT_PER_MINUTE": "17", "DB_POOL_MIN_SIZE": "1", "DB_POOL_MAX_SIZE": "4",
           "EMBEDDING_THREADS": "1"}
    with serving(env, tmp_path, workers=2, threads=2) as base:
        yield base


def run_clients(url: str, auth: str, processes: int, threads: int, per_thread: int) -> Counter[int]:
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, url, auth, str(threads), str(per_thread)],
                              stdout=subprocess.PIPE) for _ in range(processes)]
    codes: Counter[int] = Counter()
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0
        codes.update(json.loads(out))
    return codes


def test_limit_is_exact_across_workers_and_client_processes(server: str, token: Any) -> None:
    url = server + "/api/search"
    # 4 processes x 2 threads x 5 requests = 40 concurrent requests from one user, limit 17/min.
    codes = run_clients(url, token("student", sub="crowd"), processes=4, threads=2, per_thread=5)
    assert codes == Counter({200: 17, 429: 23})
    # Another user, meanwhile, has a budget of their own, counted as exactly.
    codes = run_clients(url, token("staff", sub="other", departments=["IT Services"]), processes=2, threads=2,
                        per_thread=6)
    assert codes == Counter({200: 17, 429: 7})
