"""``campus-search audit verify | hash-query | show`` (docs/security.md)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import psycopg

from campus_search.audit.records import Auditor
from campus_search.audit.reports import latest_records
from campus_search.audit.verify import verify
from campus_search.config import load_settings
from campus_search.errors import ConfigError


def _connect() -> tuple[Any, psycopg.Connection]:
    from campus_search.storage.db import resolve_dsns

    settings = load_settings()
    if not settings.audit_hmac_key:
        raise ConfigError("AUDIT_HMAC_KEY is not set")
    dsn, _ = resolve_dsns(settings)  # the primary: replicas may lag behind the chain head
    return settings, psycopg.connect(dsn)


def _anchor(raw: str) -> tuple[int, str]:
    seq, sep, digest = raw.partition(":")
    if not sep or not seq.isdigit() or len(digest) != 64:
        raise argparse.ArgumentTypeError("expected SEQ:HASH as printed by an earlier `audit verify`")
    return int(seq), digest.lower()


def cmd_verify(args: argparse.Namespace) -> int:
    settings, conn = _connect()
    with conn:
        try:
            report = verify(conn, settings.audit_hmac_key, anchor=args.anchor)
        except psycopg.errors.UndefinedTable:
            raise ConfigError("this database has no audit log yet (the server creates it at start)") from None
    if args.json:
        print(json.dumps(report.as_dict()))
    elif report.ok:
        print(f"audit log intact: {report.records} records; anchor {report.last_seq}:{report.last_hash}")
    else:
        print(f"AUDIT LOG TAMPERED: first bad record {report.first_bad_seq}: {report.problem} "
              f"({report.bad_records} problem(s) in {report.records} records)", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_hash_query(args: argparse.Namespace) -> int:
    settings = load_settings()
    print(Auditor(None, settings).query_hash(args.text))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    _, conn = _connect()
    with conn:
        for record in latest_records(conn, args.last, args.user):
            print(json.dumps(record, default=str, ensure_ascii=False))
    return 0


def add_audit_commands(sub: Any) -> None:
    """Register ``audit`` and its subcommands on the top-level parser's subparsers."""
    audit = sub.add_parser("audit", help="verify the audit log's hash chain, hash a query, show records")
    commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    p = commands.add_parser("verify", help="recompute the chain; name the first altered or missing record "
                                           "(exit status 1 if any)")
    p.add_argument("--anchor", type=_anchor, metavar="SEQ:HASH",
                   help="a SEQ:HASH printed by an earlier verify and kept elsewhere: also detects a rewritten "
                        "or truncated log")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_verify)
    p = commands.add_parser("hash-query", help="the audit hash of a query text (to find who searched for it)")
    p.add_argument("text")
    p.set_defaults(func=cmd_hash_query)
    p = commands.add_parser("show", help="print the latest records as JSON lines")
    p.add_argument("--last", type=int, default=20, metavar="N", help="how many (default 20)")
    p.add_argument("--user", help="only this user id")
    p.set_defaults(func=cmd_show)
