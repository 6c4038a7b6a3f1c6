"""Operations subcommands of ``campus-search``: ``backup``, ``restore`` and ``loadtest``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from campus_search.config import Settings, load_settings
from campus_search.errors import ConfigError


def _dsn(settings: Settings, given: str | None) -> str:
    if given:
        return given
    from campus_search.storage.db import resolve_dsns

    return resolve_dsns(settings)[0]  # the primary: backups and restores never go to a replica


def cmd_backup(args: argparse.Namespace) -> int:
    from campus_search.storage.backup import backup

    settings = load_settings()
    # A folder unless it names a .dump file: an existing folder, a trailing slash, or a path that does not
    # exist yet and has no .dump suffix (created, so `--output DIR` never writes a file called DIR).
    output = Path(args.output) if args.output else None
    if output is not None and (args.output.endswith(("/", os.sep))
                               or (not output.exists() and output.suffix != ".dump")):
        output.mkdir(parents=True, exist_ok=True, mode=0o700)
    result = backup(settings, _dsn(settings, args.database_url), output,
                    keep=args.keep)
    print(f"backup written: {result.path} ({result.bytes:,} bytes, {result.documents} documents, "
          f"{result.chunks} chunks, {result.seconds:.1f}s)", file=sys.stderr)
    print(json.dumps(result.as_dict()))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from campus_search.embedding.factory import MODEL_DIMENSIONS, index_model
    from campus_search.storage.backup import restore

    settings = load_settings()
    model = index_model(settings)
    result = restore(settings, _dsn(settings, args.database_url), Path(args.file), model=model,
                     dimension=MODEL_DIMENSIONS.get(model), replace=args.yes)
    if result.safety_backup:
        print(f"the replaced database was saved first: {result.safety_backup}", file=sys.stderr)
    print(f"restored {result.path}: {result.documents} documents, {result.chunks} chunks (replaced "
          f"{result.replaced_documents}); index generation {result.generation}, cached results invalidated",
          file=sys.stderr)
    print(json.dumps(result.as_dict()))
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from campus_search.ops.loadtest import DEFAULT_QUERIES, LoadTestConfig, format_report, run_loadtest

    queries: Any = DEFAULT_QUERIES
    if args.queries:
        try:
            text = Path(args.queries).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read {args.queries}: {exc.strerror}") from None
        queries = tuple(q.strip() for q in text.splitlines() if q.strip())
    cfg = LoadTestConfig(url=args.url, users=args.users, requests_per_user=args.requests, duration=args.duration,
                         timeout=args.timeout, queries=queries, max_results=args.max_results,
                         distinct=args.distinct, pause=args.pause)
    try:
        cfg.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.token:
        tokens = [args.token.removeprefix("Bearer ").strip()]
    else:
        from campus_search.security.auth import mint_token

        settings = load_settings()
        ttl = int(args.duration) + 600
        tokens = [mint_token(settings, sub=f"loadtest-{i:03d}", role=args.role, departments=args.department or [],
                             campus=args.campus, ttl=ttl) for i in range(args.users)]
    report = run_loadtest(cfg, tokens)
    print(format_report(report))
    print(json.dumps(report))
    if report["failed"] or report["successful"] == 0:
        print(f"campus-search loadtest: {report['failed']} of {report['requests']} requests failed"
              if report["failed"] else "campus-search loadtest: no request succeeded", file=sys.stderr)
        return 1
    if args.fail_under is not None and report["success_rate"] < args.fail_under:
        print(f"campus-search loadtest: success rate {report['success_rate']}% is below --fail-under "
              f"{args.fail_under:g}%", file=sys.stderr)
        return 1
    return 0


def add_ops_commands(sub: Any) -> None:
    """Register the operations subcommands on ``campus-search``'s subparsers."""
    p = sub.add_parser("backup", help="write a pg_dump backup of the search database",
                       description="Write a compressed pg_dump (custom format) of the configured database to "
                                   "DATA_DIR/backups/campus-search-<db>-<UTC time>.dump (or --output). Safe "
                                   "while the server runs. Prints one JSON line.")
    p.add_argument("--output", "-o", help="folder for the backup (created if missing; default DATA_DIR/backups/), "
                                         "or a file name ending in .dump")
    p.add_argument("--keep", type=int, metavar="N", help="then delete all but the newest N backups in that folder")
    p.add_argument("--database-url", help="back up this database instead of the configured one (use the primary "
                                          "directly, not pgbouncer)")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("restore", help="replace the search database with a backup (one transaction)",
                       description="Restore a backup made by `campus-search backup` into the configured database "
                                   "in a single transaction: running servers keep answering from the old index "
                                   "until it commits, then from the restored one; cached results are "
                                   "invalidated. Pending migrations are applied afterwards. Only an empty "
                                   "database or a Campus Search one is replaced: a database holding anything "
                                   "else (another application's tables) is refused, nothing changed. A "
                                   "database that holds anything is backed up first, beside FILE (its audit "
                                   "log included).")
    p.add_argument("file", help="a .dump file written by `campus-search backup`")
    p.add_argument("--yes", action="store_true", help="replace a database that already holds documents (it is "
                                                      "backed up first, beside FILE)")
    p.add_argument("--database-url", help="restore into this database instead of the configured one")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("loadtest", help="concurrent searches against a running server; reports latency and rate",
                       description="Simulate USERS concurrent users, each sending REQUESTS searches to URL with "
                                   "its own token (minted with JWT_SECRET_KEY, or --token). Bounded by --duration. "
                                   "Prints a report and a final JSON line. Exit status 1 when any request failed "
                                   "(an error status, no connection, a timeout; a 429 is rate limiting, not a "
                                   "failure) or the success rate is below --fail-under.")
    p.add_argument("--url", default="http://127.0.0.1:5100", help="server base URL (default http://127.0.0.1:5100)")
    p.add_argument("--users", type=int, default=10, help="concurrent users (default 10, at most 256)")
    p.add_argument("--requests", type=int, default=10, help="searches per user (default 10)")
    p.add_argument("--duration", type=float, default=60.0, help="stop after this many seconds (default 60)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds (default 30)")
    p.add_argument("--role", default="staff", help="role of the minted tokens (default staff)")
    p.add_argument("--department", action="append", help="department claim of the minted tokens (repeatable)")
    p.add_argument("--campus", help="campus claim of the minted tokens")
    p.add_argument("--token", help="use this bearer token for every user instead of minting")
    p.add_argument("--queries", help="file with one query per line (default: a built-in list)")
    p.add_argument("--max-results", type=int, default=5, help="config.max_results of each search (default 5)")
    p.add_argument("--distinct", action="store_true",
                   help="make every query unique, so the result cache cannot answer (uncached figures)")
    p.add_argument("--pause", type=float, default=0.0, metavar="S",
                   help="seconds each user waits between its searches (think time; default 0)")
    p.add_argument("--fail-under", type=float, metavar="PCT",
                   help="also exit 1 when the success rate (429s count against it) is below PCT")
    p.set_defaults(func=cmd_loadtest)
