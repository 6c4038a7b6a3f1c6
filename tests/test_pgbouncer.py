"""Through a real pgbouncer in transaction pooling mode (the production stack's pool_mode), in front of
the session's PostgreSQL: migrations, ingestion and concurrent searches work and answer exactly as a
direct connection does; and the prepared-statement hazard that DB_PREPARE_THRESHOLD avoids is real.

Needs the `pgbouncer` program (Debian package; `make test` installs it when it can); skipped without it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from conftest import make_settings
from psycopg.conninfo import conninfo_to_dict
from redis_server import free_port

from campus_search.app import create_app
from campus_search.ingest.metadata import AccessMetadata
from campus_search.ingest.sources import parse_bytes
from campus_search.retrieval.params import SearchParams
from campus_search.security.roles import superuser

pytestmark = pytest.mark.skipif(shutil.which("pgbouncer") is None, reason="pgbouncer is not installed")

DOCS = {
    "parking.md": "# Parking permits\n\nStaff apply for a car parking permit through the Estates portal each August.",
    "eduroam.md": "# Eduroam\n\nConnect to the eduroam wifi network with your university login and password.",
    "library.md": "# Library loans\n\nBooks can be renewed online up to five times unless someone requests them.",
}


def _run_as() -> str | None:
    """pgbouncer refuses to run as root; run it as the embedded cluster's owner, who can reach its socket."""
    if os.geteuid() != 0:
        return None
    for name in ("pgserver", "postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    pytest.skip("no unprivileged user to run pgbouncer as")


@pytest.fixture
def pgbouncer(pg_cluster: str, make_database: Callable[[], str]) -> Iterator[tuple[str, str]]:
    """(database URL through pgbouncer, direct URL) for a fresh database."""
    direct = make_database()
    info = conninfo_to_dict(direct)
    dbname = urlsplit(direct).path.lstrip("/")
    host = info.get("host") or "127.0.0.1"
    port, listen = info.get("port") or "5432", free_port()
    # Not under pytest's tmp_path: that is private to root, and pgbouncer runs as another user.
    work = Path(tempfile.mkdtemp(prefix="cs-pgbouncer-"))
    (work / "userlist.txt").write_text(f'"{info.get("user") or "postgres"}" ""\n')
    (work / "pgbouncer.ini").write_text(f"""
[databases]
{dbname} = host={host} port={port} dbname={dbname}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {work}/userlist.txt
pool_mode = transaction
; one server connection: every client's transactions interleave on the same server session, the
; harshest test of "no session state", and it makes the prepared-statement collision deterministic
default_pool_size = 1
max_client_conn = 100
logfile = {work}/pgbouncer.log
pidfile = {work}/pgbouncer.pid
""")
    user = _run_as()
    os.chmod(work, 0o777)
    for f in work.iterdir():
        os.chmod(f, 0o644)
    proc = subprocess.Popen(["pgbouncer", *(["-u", user] if user else []), str(work / "pgbouncer.ini")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"postgresql://{info.get('user') or 'postgres'}@127.0.0.1:{listen}/{dbname}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with psycopg.connect(url, prepare_threshold=None, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (work / "pgbouncer.log").read_text() if (work / "pgbouncer.log").exists() else ""
                    proc.kill()
                    err = proc.communicate()[1].decode(errors="replace")
                    pytest.fail(f"pgbouncer did not start: {log[-2000:]} {err[-2000:]}")
                time.sleep(0.2)
        yield url, direct
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(work, ignore_errors=True)


def test_prepared_statements_collide_behind_transaction_pooling(pgbouncer: tuple[str, str]) -> None:
    """Why DB_PREPARE_THRESHOLD=none behind pgbouncer: two clients whose transactions share a server
    connection both prepare psycopg's first statement name, and the second one fails."""
    url, _ = pgbouncer
    with psycopg.connect(url, prepare_threshold=0) as a, psycopg.connect(url, prepare_threshold=0) as b:
        a.execute("SELECT 1").fetchone()  # prepares "_pg3_0" on the one server connection
        a.commit()
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
            b.execute("SELECT 2").fetchone()  # b's own first statement: the same name, the same server session
    with psycopg.connect(url, prepare_threshold=None) as a, psycopg.connect(url, prepare_threshold=None) as b:
        for _ in range(10):
            for conn in (a, b):
                assert conn.execute("SELECT %s::int", (3,)).fetchone() == (3,)
                conn.commit()


@pytest.mark.parametrize("split", [False, True], ids=["one-statement", "bm25-beside"])
def test_the_app_works_through_pgbouncer(pgbouncer: tuple[str, str], tmp_path: Path, embedder: Any,
                                         token: Any, split: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also with a hybrid search's BM25 half meant for a second connection importing the search's
    snapshot (as on a large corpus). This pgbouncer has one server connection, held by the search's own
    transaction: the half waits in pgbouncer's queue and can never import a live snapshot, so every
    search goes on without it (SharedSnapshot) and answers the same -- no search waits for it, none hangs."""
    from campus_search.retrieval import search as search_module
    from campus_search.services import Services

    url, direct = pgbouncer
    via_bouncer = Services(make_settings(url, tmp_path / "a", db_prepare_threshold="none",
                                         db_pool_max_size=4), embedder=embedder).ensure_open()
    try:
        docs = [parse_bytes(text.encode(), name, external_id=name) for name, text in DOCS.items()]
        report = via_bouncer.ingester.ingest(iter(docs), AccessMetadata())
        assert report.added == 3 and report.failed == 0
        direct_services = Services(make_settings(direct, tmp_path / "b"), embedder=embedder).ensure_open()
        try:
            queries = ("car parking permit", "wifi login", "renew library books")
            expected = {q: [(h.document_id, round(h.similarity, 4)) for h in direct_services.searcher.search(
                superuser(), SearchParams(query=q, max_results=3))] for q in queries}
        finally:
            direct_services.close()
        assert all(expected.values())

        halves: list[Any] = []
        if split:
            monkeypatch.setattr(search_module, "LEXICAL_BESIDE_MIN_CHUNKS", 0)
            original = via_bouncer.searcher.lexical_pool

            def pool(*args: Any) -> Any:
                rows = original(*args)
                halves.append(rows)  # [] when the search had gone on without it
                return rows

            monkeypatch.setattr(via_bouncer.searcher, "lexical_pool", pool)
        app = create_app(via_bouncer)
        app.config["TESTING"] = True
        auth = {"Authorization": token("admin")}
        failures: list[Any] = []

        def user(n: int) -> None:
            client = app.test_client()
            for i in range(8):  # > psycopg's default prepare threshold on every pooled connection
                q = queries[(n + i) % len(queries)]
                r = client.post("/api/search", json={"query": q, "config": {"max_results": 3}}, headers=auth)
                got = [(h["document_id"], h["similarity"]) for h in r.get_json().get("results", [])] \
                    if r.status_code == 200 else r.get_json()
                if got != expected[q]:
                    failures.append((q, r.status_code, got))

        threads = [threading.Thread(target=user, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not failures, failures[:3]
        assert not any(halves)  # no half ever ran a statement: the searches above went on without them
    finally:
        via_bouncer.close()


def test_search_timeout_holds_per_transaction_and_never_leaks_to_another_client(pgbouncer: tuple[str, str],
                                                                                tmp_path: Path) -> None:
    """One server connection behind transaction pooling: the search's SET LOCAL timeout is in force in
    its own transaction and absent from the next client's (a session SET would be inherited)."""
    from campus_search.retrieval.search import Searcher
    from campus_search.storage.db import Database, migrate

    url, _ = pgbouncer
    migrate(url, model="all-MiniLM-L6-v2", dimension=384)
    settings = make_settings(url, tmp_path, db_statement_timeout_ms=1234, db_pool_min_size=0, db_pool_max_size=1)
    db = Database(settings, url)
    db.open()
    try:
        searcher = Searcher(db, embedder=None)  # type: ignore[arg-type]
        for _ in range(3):
            assert searcher._fetch("SELECT current_setting('statement_timeout')", {}, 1) == [("1234ms",)]
            with psycopg.connect(url, prepare_threshold=None) as other:  # same server connection
                assert other.execute("SHOW statement_timeout").fetchone() != ("1234ms",)
    finally:
        db.close()
