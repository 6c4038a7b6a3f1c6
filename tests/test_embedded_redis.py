"""The embedded Redis: with `make run`'s settings (no REDIS_URL, several gunicorn workers) the result cache,
its clearing and the rate limits are shared by every worker, exactly as with a production Redis; the
server is private to this user, reused by other processes of the same DATA_DIR, and stopped with the
service however the service ends."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
import requests
from conftest import ROOT, TEST_SECRET, serving

from campus_search.storage.embedded_redis import ping, socket_path

#: A process that uses the embedded Redis of DATA_DIR (argv[1]) until its stdin closes.
USER = ("import sys; from campus_search.storage.embedded_redis import ensure_embedded_redis as e; "
        "print(e(sys.argv[1]), flush=True); sys.stdin.read()")


def keeper(data_dir: Path) -> str | None:
    path = data_dir / "redis" / "keeper.pid"
    return path.read_text() if path.exists() else None


def wait_for(condition: Callable[[], bool], seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def pids_by_request(log: Path) -> dict[str, int]:
    """request id -> pid of the worker that answered it, from the JSON access records."""
    out = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("logger") == "campus_search.access":
            out[record["request_id"]] = record["pid"]
    return out


def test_make_run_settings_share_cache_clear_and_limits_across_workers(
        demo_services: Any, token: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS", "RATE_LIMIT", "CACHE_"))}
    env.update(DATABASE_URL=demo_services.dsn, DATA_DIR=str(data), JWT_SECRET_KEY=TEST_SECRET,
               AUDIT_HMAC_KEY="audit-" + "k" * 40, DB_POOL_MIN_SIZE="1", DB_POOL_MAX_SIZE="4",
               EMBEDDING_THREADS="1", LOG_FORMAT="json")
    log = tmp_path / "server.log"
    with serving(env, tmp_path, workers=2, threads=2) as base:  # `make run`: serve, 2 workers x 2 threads
        sock = socket_path(str(data))
        assert sock.parent == data / "redis"
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700  # nobody else may even reach the socket
        with redis.Redis.from_url(f"unix://{sock}") as r:
            assert r.config_get("port")["port"] == "0"  # no TCP listener at all
        banner = next(json.loads(line) for line in log.read_text().splitlines() if "campus-search ready" in line)
        assert banner["cache"].startswith("embedded Redis, Unix socket " + str(sock))
        health = requests.get(base + "/health", timeout=60).json()["components"]["cache"]
        assert health["mode"] == "embedded" and health["connection_active"] is True

        admin = token("admin", sub="operator")
        body = {"query": "how do I renew a library book", "config": {"max_results": 3}}

        def search(_: int = 0) -> dict[str, Any]:
            r = requests.post(base + "/api/search", json=body, headers={"Authorization": admin}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        def until_every_worker_answered() -> list[dict[str, Any]]:
            """The first search alone, then concurrent ones until both workers have answered some."""
            answers = [search()]
            with ThreadPoolExecutor(4) as pool:
                for _ in range(10):
                    answers += list(pool.map(search, range(8)))
                    pids = pids_by_request(log)
                    if len({pids.get(a["request_id"]) for a in answers} - {None}) >= 2:
                        return answers
            raise AssertionError("one worker answered every request")

        first = until_every_worker_answered()
        # One shared cache: one miss in all, not one per worker.
        assert [a["from_cache"] for a in first] == [False] + [True] * (len(first) - 1)
        cleared = requests.post(base + "/api/admin/cache/clear", headers={"Authorization": admin}, timeout=60)
        assert cleared.status_code == 200
        assert cleared.json()["scope"] == "service" and cleared.json()["mode"] == "embedded"
        after = until_every_worker_answered()
        # The clear reached every worker: the first search after it is computed afresh, whichever worker
        # answers, and no worker answers from an entry older than the clear.
        assert [a["from_cache"] for a in after] == [False] + [True] * (len(after) - 1)

        # Over HTTP as well: what was changed on the caller's behalf is said; filters ignore letter case.
        capped = requests.post(base + "/api/search", headers={"Authorization": token("student", sub="s-cap")},
                               json={"query": "library", "config": {"max_results": 500}}, timeout=60).json()
        assert capped["applied"]["max_results"] == 20 and capped["applied"]["clamped"] is True
        it = requests.post(base + "/api/search", headers={"Authorization": token("staff", departments=[
            "IT Services"])}, json={"query": "password reset instructions for staff",
                                    "filters": {"department": "It services"}}, timeout=60).json()
        assert it["count"] > 0 and {h["metadata"]["department"] for h in it["results"]} == {"IT Services"}
        # The brief's metric labels (its dashboards query endpoint="search_documents").
        scraped = requests.get(base + "/metrics", timeout=60).text
        assert 'endpoint="search_documents",method="POST",status="200"' in scraped \
            or 'method="POST",endpoint="search_documents",status="200"' in scraped
        assert 'endpoint="health_check"' in scraped and "search.search_documents" not in scraped

        # A role's per-minute limit (student: 30) admits exactly that many across the workers.
        student = token("student", sub="limited-student")
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: requests.post(
                base + "/api/search", json={"query": "exam timetable"}, headers={"Authorization": student},
                timeout=60).status_code, range(40)))
        assert Counter(codes) == Counter({200: 30, 429: 10})

        # Another process of the same DATA_DIR (a CLI command, say) attaches to the running server...
        before = keeper(data)
        other = subprocess.run([sys.executable, "-c", USER, str(data)], input="", capture_output=True, text=True,
                               cwd=ROOT, timeout=60)
        assert other.returncode == 0, other.stderr
        assert other.stdout.strip() == f"unix://{sock}" and keeper(data) == before
        # ...and its exit does not stop it under the server.
        assert ping(f"unix://{sock}")
        assert search()["from_cache"] is True
    # Stopped with the service.
    assert wait_for(lambda: keeper(data) is None and not sock.exists())
    assert not ping(f"unix://{sock}")


def test_killed_users_do_not_leave_it_running(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = subprocess.Popen([sys.executable, "-c", USER, str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=ROOT)
    second = subprocess.Popen([sys.executable, "-c", USER, str(data)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert first.stdout is not None and second.stdout is not None
        url = first.stdout.readline().strip()
        assert second.stdout.readline().strip() == url and ping(url)
        first.send_signal(signal.SIGKILL)  # no exit handler runs; the other user still needs it
        first.wait(10)
        time.sleep(1.5)  # a few of the keeper's rounds
        assert ping(url)
        second.send_signal(signal.SIGKILL)  # the last user dies without a word
        second.wait(10)
        assert wait_for(lambda: not ping(url) and keeper(data) is None)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            for stream in (proc.stdin, proc.stdout):
                if stream:
                    stream.close()


def test_redis_restarts_for_its_users_and_long_data_dirs_get_a_short_private_socket(tmp_path: Path) -> None:
    data = tmp_path / ("d" * 120)  # too long for an AF_UNIX path inside it
    user = subprocess.Popen([sys.executable, "-c", USER, str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        assert user.stdout is not None
        url = user.stdout.readline().strip()
        sock = Path(url.removeprefix("unix://"))
        assert len(str(sock)) < 108 and not str(sock).startswith(str(data))
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700 and sock.parent.stat().st_uid == os.geteuid()
        redis_pid = int((data / "redis" / "keeper.pid").read_text().split()[1])
        os.kill(redis_pid, signal.SIGKILL)  # redis-server dies under a live user: the keeper starts it again
        assert wait_for(lambda: ping(url))
    finally:
        assert user.stdin is not None and user.stdout is not None
        user.stdin.close()
        user.wait(30)
        user.stdout.close()
    assert wait_for(lambda: not ping(url) and not sock.exists())
