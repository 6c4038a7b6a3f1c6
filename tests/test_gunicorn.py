"""The brief's production command on loopback: gunicorn, gthread workers, --preload, gunicorn.conf.py.

Checks that /metrics adds up across worker processes (even across worker restarts), that production
logs are JSON lines with request ids and without query text, and that SIGTERM lets an in-flight
request finish.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from conftest import DEMO, ROOT, TEST_SECRET, make_settings
from prometheus_client.parser import text_string_to_metric_families

GUNICORN = str(Path(sys.executable).parent / "gunicorn")
DOCS = ("it-staff-password-management.md", "student-password-reset.md", "library-borrowing-renewals.md",
        "eduroam-wifi-setup.md")
SECRET_WORD = "wombatsecret"


@pytest.fixture(scope="module")
def served_dsn(make_database: Callable[[], str], embedder: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database holding a few demo documents, for servers started by these tests."""
    from campus_search.cli.main import ingest_paths
    from campus_search.ingest.metadata import AccessMetadata
    from campus_search.services import Services

    settings = make_settings(make_database(), tmp_path_factory.mktemp("gunicorn-ingest"))
    services = Services(settings, embedder=embedder).ensure_open()
    report = ingest_paths(services, [DEMO / name for name in DOCS], AccessMetadata(), quiet=True)
    services.close()
    assert report.failed == 0 and report.added == len(DOCS)
    return settings.database_url or ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """gunicorn as a subprocess, started with the brief's command as written (2 workers, a free loopback
    port). The brief spells gunicorn's ``--keep-alive`` as ``--keepalive``; the start-up hook the project
    installs (``campus_search_gunicorn_keepalive.pth``, see setup.py) makes that spelling work.
    """

    def __init__(self, dsn: str, tmp: Path, **extra_env: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.metrics_dir = tmp / "metrics"
        self.stderr_path = tmp / "gunicorn.err"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PROMETHEUS", "CAMPUS_SEARCH", "DB_", "DATABASE", "REDIS", "LOG_"))}
        env.update(FLASK_ENV="production", DATABASE_URL=dsn, DATA_DIR=str(tmp / "data"),
                   JWT_SECRET_KEY=TEST_SECRET, AUDIT_HMAC_KEY="audit-" + "k" * 40, DB_POOL_MIN_SIZE="1",
                   DB_POOL_MAX_SIZE="4", DB_STATEMENT_TIMEOUT_MS="120000",
                   PROMETHEUS_MULTIPROC_DIR=str(self.metrics_dir))
        env.update(extra_env)
        self.stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [GUNICORN, "--bind", f"127.0.0.1:{self.port}", "--workers", "2", "--worker-class", "gthread",
             "--threads", "2", "--timeout", "60", "--keepalive", "10", "--preload",
             "production_system:create_production_app"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=self.stderr)
        self.sent = 0  # requests that reached the app (answered)

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        # A new connection each time (no Session), so the kernel spreads them over the workers.
        r = requests.request(method, self.base + path, timeout=120, **kw)
        self.sent += 1
        return r

    def wait_ready(self, limit: float = 180.0) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_text()
            try:
                if self.request("GET", "/health/ready").status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise AssertionError("gunicorn did not become ready:\n" + self.log_text())

    def workers(self) -> set[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return {int(p) for p in path.read_text().split()}

    def log_text(self) -> str:
        self.stderr.flush()
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.stderr.close()


@pytest.fixture(scope="module")
def server(served_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(served_dsn, tmp_path_factory.mktemp("gunicorn"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def admin_bearer(sub: str = "ops-admin") -> str:
    """An Authorization header value: an IT administrator's token for the test secret."""
    from campus_search.config import Settings
    from campus_search.security.auth import mint_token

    return "Bearer " + mint_token(Settings(jwt_secret_key=TEST_SECRET, data_dir="/nonexistent"),
                                  sub=sub, role="it_administrator")


def admin_search(srv: Server, query: str) -> requests.Response:
    r = admin_search_any(srv, query)
    assert r.status_code == 200, r.text
    return r


def totals(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name
            if s.name == "vector_search_requests_total" and s.labels.get("endpoint") == "search_documents":
                out["search_requests"] = out.get("search_requests", 0.0) + s.value
            out[key] = out.get(key, 0.0) + s.value
    return out


def test_metrics_add_up_across_workers_and_restarts(server: Server) -> None:
    sent_before = server.sent
    before = totals(server.request("GET", "/metrics").text)  # counted itself once it has answered
    for i in range(10):
        admin_search(server, f"password reset for staff accounts {i}")
        server.request("GET", "/health/live")
    # Replace both workers: every request above was answered by a process that no longer exists.
    for old in sorted(server.workers()):
        os.kill(old, signal.SIGTERM)
        deadline = time.monotonic() + 120
        while old in server.workers() or len(server.workers()) < 2:
            assert time.monotonic() < deadline, "worker was not replaced"
            time.sleep(0.2)
        assert not (server.metrics_dir / f"gauge_livesum_{old}.db").exists()  # child_exit dropped its gauges
    for i in range(6):
        admin_search(server, f"how do I renew library books {i}")
    sent = server.sent - sent_before
    after = totals(server.request("GET", "/metrics").text)

    assert after["vector_search_requests_total"] - before["vector_search_requests_total"] == sent
    assert after["search_requests"] - before.get("search_requests", 0.0) == 16
    assert after["vector_search_queries_total"] - before.get("vector_search_queries_total", 0.0) == 16
    assert after["vector_search_request_duration_seconds_count"] - \
        before["vector_search_request_duration_seconds_count"] == sent
    assert after["vector_search_db_pool_size"] >= 1


def test_production_logs_are_json_lines(server: Server) -> None:
    r = admin_search(server, f"{SECRET_WORD} eduroam certificate")
    request_id = r.headers["X-Request-ID"]
    assert r.json()["request_id"] == request_id
    deadline = time.monotonic() + 30
    while request_id not in server.log_text():  # written after the response was built
        assert time.monotonic() < deadline, "access record never appeared"
        time.sleep(0.1)
    text = server.log_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    access = [rec for rec in records if rec.get("request_id") == request_id and rec["logger"] == "campus_search.access"]
    assert len(access) == 1
    assert access[0]["status"] == 200 and access[0]["user_id"] == "ops-admin" and access[0]["latency_ms"] > 0
    assert SECRET_WORD not in text
    assert TEST_SECRET not in text and "kkkkkkkkkk" not in text
    banner = next(rec for rec in records if rec["message"] == "campus-search ready")
    assert banner["workers"] == 2 and banner["listening"] == f"127.0.0.1:{server.port}"
    assert "POST /api/search" in banner["endpoints"] and "GET /metrics" in banner["endpoints"]
    assert banner["jwt_secret"] == "(set)"
    assert any(rec["logger"] == "gunicorn.error" for rec in records)  # gunicorn's own lines too


def test_sigterm_lets_an_in_flight_request_finish(served_dsn: str, tmp_path: Path) -> None:
    srv = Server(served_dsn, tmp_path)
    try:
        srv.wait_ready()
        deadline = time.monotonic() + 120
        while srv.log_text().count("services open in pid") < 2:  # both workers past post_fork
            assert time.monotonic() < deadline, srv.log_text()
            time.sleep(0.1)
        with psycopg.connect(served_dsn) as lock_conn, ThreadPoolExecutor(1) as pool:
            lock_conn.execute("LOCK TABLE chunks IN ACCESS EXCLUSIVE MODE")  # searches now wait on us
            pending = pool.submit(admin_search, srv, "student password reset steps")
            with psycopg.connect(served_dsn, autocommit=True) as watcher:
                deadline = time.monotonic() + 60
                while not watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                          "AND wait_event_type = 'Lock'").fetchone()[0]:
                    assert time.monotonic() < deadline, "the search never reached the database"
                    time.sleep(0.1)
            srv.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 60
            while "Worker exiting" not in srv.log_text():  # the idle worker is gone: shutdown is under way
                assert time.monotonic() < deadline, srv.log_text()
                time.sleep(0.1)
            assert not pending.done()
            lock_conn.rollback()  # release the table
            response = pending.result(timeout=60)
        assert response.status_code == 200 and response.json()["count"] > 0
        assert srv.proc.wait(timeout=60) == 0
        assert srv.log_text().count("Worker exiting") == 2
    finally:
        srv.stop()


def _search_outcome(srv: Server, query: str) -> tuple[int | None, str | None]:
    try:
        r = admin_search_any(srv, query)
    except requests.RequestException:
        return None, None  # the worker died with the request: never answered
    return r.status_code, r.headers.get("X-Request-ID")


def admin_search_any(srv: Server, query: str, sub: str = "ops-admin") -> requests.Response:
    return srv.request("POST", "/api/search", json={"query": query}, headers={"Authorization": admin_bearer(sub)})


def wait_for_a_locked_append(dsn: str) -> None:
    """Until an audit append waits for the chain head's lock (which the caller holds)."""
    with psycopg.connect(dsn, autocommit=True) as watcher:
        deadline = time.monotonic() + 60
        while not watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                  "AND wait_event_type = 'Lock' AND query LIKE %s",
                                  ("%audit_chain_head%",)).fetchone()[0]:
            assert time.monotonic() < deadline, "no audit append reached the database"
            time.sleep(0.05)


def test_no_answered_search_loses_its_record_when_workers_are_killed(served_dsn: str, tmp_path: Path) -> None:
    """SPEC 3 under the audit's commit without a waited-for flush (docs/security.md, "Durability"): a search
    is answered only once its record is committed, so killing the workers (SIGKILL, no exit handler) while
    records are waiting to be written loses no answered search's record. The audit chain head is held
    locked so that searches are in flight with their records queued when the workers die."""
    srv = Server(served_dsn, tmp_path)
    try:
        srv.wait_ready()
        deadline = time.monotonic() + 120
        while srv.log_text().count("services open in pid") < 2:
            assert time.monotonic() < deadline, srv.log_text()
            time.sleep(0.1)
        queries = [f"student password reset, killed worker {i}" for i in range(6)]
        with psycopg.connect(served_dsn) as lock_conn, ThreadPoolExecutor(len(queries)) as pool:
            lock_conn.execute("SELECT seq FROM audit_chain_head FOR UPDATE")  # audit appends now wait on us
            in_flight = [pool.submit(_search_outcome, srv, q) for q in queries]
            wait_for_a_locked_append(served_dsn)
            time.sleep(1.0)  # the other searches finish their retrieval and queue their records
            workers = srv.workers()
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            outcomes = [f.result(timeout=120) for f in in_flight]
            lock_conn.rollback()
        after = _search_outcome(srv, "student password reset after the restart")  # a new worker answers
        answered = [rid for status, rid in [*outcomes, after] if status == 200]
        with psycopg.connect(served_dsn) as conn:
            recorded = {r[0] for r in conn.execute("SELECT request_id FROM audit_log WHERE request_id = ANY(%s)",
                                                   (answered,))}
        assert after[0] == 200, srv.log_text()[-3000:]
        assert set(answered) <= recorded, (outcomes, recorded)
        assert [o for o in outcomes if o[0] == 200] == []  # nothing answered while its record waited
    finally:
        srv.stop()


COMPARE_CONFIGS = r"""
import json, sys
sys.argv = ["gunicorn", "production_system:create_production_app"]
from gunicorn.app.wsgiapp import WSGIApplication
conf = WSGIApplication("%(prog)s [OPTIONS] [APP_MODULE]").cfg   # reads ./gunicorn.conf.py, as the brief's command
from campus_search.config import load_settings
from campus_search.ops.server import gunicorn_server
serve = gunicorn_server(load_settings(), app=None).cfg              # what `campus-search serve` runs
skip = {"default_proc_name"}  # gunicorn names the process after the app module it was given
diff = sorted(k for k in conf.settings if k not in skip and conf.settings[k].get() != serve.settings[k].get())
pick = lambda cfg: {k: repr(cfg.settings[k].get()) for k in ("bind", "workers", "threads", "worker_class", "timeout",
    "keepalive", "preload_app", "graceful_timeout", "worker_tmp_dir", "errorlog", "accesslog", "post_fork")}
print(json.dumps({"diff": diff, "conf": pick(conf), "serve": pick(serve),
                  "json_logs": [bool(c.logconfig_dict) for c in (conf, serve)]}))
"""


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_serve_and_gunicorn_conf_configure_gunicorn_alike(tmp_path: Path, log_format: str) -> None:
    """``campus-search serve`` and the brief's command (gunicorn.conf.py) agree on every gunicorn setting
    -- workers, bind, worker_tmp_dir, logging, hooks, timeouts -- from the same environment and config file."""
    cfg_file = tmp_path / "campus.env"
    cfg_file.write_text("WEB_CONCURRENCY=3\n")  # the config file sizes both servers too
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PROMETHEUS", "CAMPUS_SEARCH", "WEB_CONCURRENCY", "HOST", "PORT", "LOG_"))}
    env.update(HOST="127.0.0.9", PORT="6123", CAMPUS_SEARCH_CONFIG=str(cfg_file), LOG_FORMAT=log_format,
               DATA_DIR=str(tmp_path / "data"), PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))
    proc = subprocess.run([sys.executable, "-c", COMPARE_CONFIGS], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["diff"] == [], f"serve and gunicorn.conf.py differ on {out['diff']}: {out['conf']} vs {out['serve']}"
    conf = out["conf"]
    assert conf["bind"] == "['127.0.0.9:6123']" and conf["workers"] == "3" and conf["threads"] == "2"
    assert conf["worker_class"] == "'gthread'" and conf["keepalive"] == "10" and conf["preload_app"] == "True"
    assert conf["worker_tmp_dir"] == ("'/dev/shm'" if os.path.isdir("/dev/shm") else "None")
    assert conf["errorlog"] == "'-'" and "post_fork" in conf["post_fork"]
    assert out["json_logs"] == [log_format == "json"] * 2


HELLO_APP = """
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]
"""
KEEPALIVE_CONF = """
def when_ready(server):
    print("KEEPALIVE=%s" % server.cfg.keepalive, flush=True)
"""


@pytest.mark.parametrize("launcher", ["python -m gunicorn", "gunicorn"])
def test_keepalive_spelling_works_with_python_m_gunicorn(tmp_path: Path, launcher: str) -> None:
    """The brief's ``--keepalive 10`` reaches gunicorn as ``--keep-alive`` however gunicorn is started --
    its console script or ``python -m gunicorn`` -- through the installed start-up hook. A real server
    on a free loopback port answers, and reports the keep-alive it runs with."""
    (tmp_path / "hello.py").write_text(HELLO_APP)
    (tmp_path / "conf.py").write_text(KEEPALIVE_CONF)
    port = _free_port()
    program = [sys.executable, "-m", "gunicorn"] if launcher.startswith("python") else [GUNICORN]
    proc = subprocess.Popen([*program, "--bind", f"127.0.0.1:{port}", "--workers", "1", "--worker-class",
                             "gthread", "--keepalive", "10", "-c", str(tmp_path / "conf.py"), "hello:app"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]  # gunicorn refused the arguments
            try:
                r = requests.get(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.1)
        assert r.status_code == 200 and r.text == "hello"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert "KEEPALIVE=10" in out, out + err
    assert proc.returncode == 0, err


def test_the_master_derives_the_query_graph_once_before_its_workers_load_it(served_dsn: str, tmp_path: Path) -> None:
    """With an empty MODEL_CACHE_DIR, the int8 query graph is derived by a child of the master (the master
    itself must not load onnxruntime before forking) and every worker loads the cached file."""
    pytest.importorskip("onnx")
    from campus_search.embedding.quantized import cpu_has_vnni

    if not cpu_has_vnni():
        pytest.skip("EMBEDDING_QUERY_INT8=auto keeps the float32 graph on a CPU without VNNI")
    cache = tmp_path / "models"
    srv = Server(served_dsn, tmp_path, MODEL_CACHE_DIR=str(cache))
    try:
        srv.wait_ready()
        names = sorted(p.name for p in cache.iterdir())
        assert len(names) == 2 and names[0].endswith(".onnx") and names[1] == names[0] + ".sha256", names
        health = srv.request("GET", "/health").json()
        assert health["components"]["embedding_service"]["query_graph"] == "int8"
        assert admin_search(srv, "eduroam certificate").json()["results"]
        maps = Path(f"/proc/{srv.proc.pid}/maps").read_text()
        assert "onnxruntime" not in maps, "the master loaded onnxruntime before forking its workers"
    finally:
        code = srv.stop()
    text = srv.stderr_path.read_text(encoding="utf-8", errors="replace")
    assert "derived the int8 query graph" not in text  # no worker had to: the master's child had
    assert "terminate called" not in text and code == 0, text[-3000:]
