"""campus-search backup / restore against the real PostgreSQL + pgvector: a backup of the demo corpus,
restored into a fresh database, answers searches exactly like the original; a restore under a
running server is atomic and keeps its pooled connections working."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import TEST_SECRET, make_settings

from campus_search.cli.main import main
from campus_search.retrieval.params import SearchParams
from campus_search.security.roles import DEFAULT_ROLES, Principal, superuser
from campus_search.storage.backup import NAME_RE, backup_name, pg_bin_dir, prune_backups, server_major

QUERIES = ("password reset instructions for staff", "research ethics approval", "fire evacuation procedure")
USERS = (superuser("admin1"), Principal("s1", DEFAULT_ROLES["student"]),
         Principal("st1", DEFAULT_ROLES["staff"], departments=("IT Services",), campus="King's Buildings"))


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> Path:
    for name in ("DATABASE_URL", "DB_HOST", "DATABASE_READ_URL", "PG_BIN_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    monkeypatch.setenv("JWT_SECRET_KEY", TEST_SECRET)
    return data_dir


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 else {}), err


CASES = [(user, query) for user in USERS for query in QUERIES]


def answer(services: Any, case: int) -> list[tuple[str, str | None, float]]:
    user, query = CASES[case]
    # the searcher itself, not the result cache in front of it: this compares what the database answers
    hits = services.ensure_open().searcher.search(user, SearchParams(query=query, max_results=8))
    return [(h.document_id, h.section_title, round(h.similarity, 4)) for h in hits]


def answers(services: Any) -> list[list[tuple[str, str | None, float]]]:
    return [answer(services, i) for i in range(len(CASES))]


def counts(dsn: str) -> tuple[int, int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM chunks), "
                           "(SELECT generation FROM index_state)").fetchone()
    assert row is not None
    return row[0], row[1], row[2]


@pytest.fixture(scope="module")
def demo_backup(demo_services: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One backup of the demo database, made through the CLI, shared by the tests below."""
    folder = tmp_path_factory.mktemp("backups")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATA_DIR", str(folder))
        mp.setenv("JWT_SECRET_KEY", TEST_SECRET)
        code = main(["backup", "--database-url", demo_services.dsn, "--output", str(folder)])
    assert code == 0
    (dump,) = folder.glob("*.dump")
    return dump


def test_backup_output_that_does_not_exist_is_a_folder(demo_services: Any, cli_env: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = cli_env / "nightly" / "backups"  # neither exists yet, and no trailing slash
    code, result, err = run_cli(capsys, "backup", "--database-url", demo_services.dsn, "--output", str(folder))
    assert code == 0, err
    (dump,) = folder.iterdir()  # a folder holding a named backup, not a file called "backups"
    assert NAME_RE.match(dump.name) and result["path"] == str(dump)
    assert folder.stat().st_mode & 0o077 == 0
    named = cli_env / "elsewhere" / "before-upgrade.dump"  # a .dump name is a file name
    code, result, err = run_cli(capsys, "backup", "--database-url", demo_services.dsn, "--output", str(named))
    assert code == 0, err
    assert named.is_file() and result["path"] == str(named)


def test_backup_file_is_named_with_a_timestamp_and_private(demo_backup: Path, demo_services: Any) -> None:
    assert NAME_RE.match(demo_backup.name), demo_backup.name
    assert demo_backup.read_bytes()[:5] == b"PGDMP"
    assert demo_backup.stat().st_mode & 0o077 == 0  # holds restricted documents: owner only
    assert not list(demo_backup.parent.glob(".partial-*"))


def test_restore_into_fresh_database_gives_the_same_search_results(
        demo_backup: Path, demo_services: Any, make_database: Callable[[], str], services_factory: Any,
        cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fresh = make_database()
    code, result, err = run_cli(capsys, "restore", str(demo_backup), "--database-url", fresh)
    assert code == 0, err
    docs, chunks, _ = counts(demo_services.dsn)
    assert (result["documents"], result["chunks"]) == (docs, chunks) and docs >= 30
    assert result["replaced_documents"] == 0
    restored = services_factory(make_settings(fresh, cli_env))
    assert answers(restored) == answers(demo_services)
    assert any(answers(restored)), "the comparison must not be between empty answers"


def test_restore_refuses_to_overwrite_without_yes(
        demo_backup: Path, make_database: Callable[[], str], cli_env: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    target = make_database()
    assert run_cli(capsys, "restore", str(demo_backup), "--database-url", target)[0] == 0
    before = counts(target)
    code, _, err = run_cli(capsys, "restore", str(demo_backup), "--database-url", target)
    assert code == 2
    assert "pass --yes" in err
    assert counts(target) == before


def test_restore_rejects_a_file_that_is_not_a_backup(
        tmp_path: Path, make_database: Callable[[], str], cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "notes.dump"
    bogus.write_text("DROP TABLE documents;")
    code, _, err = run_cli(capsys, "restore", str(bogus), "--database-url", make_database(), "--yes")
    assert code == 2
    assert "not a pg_dump custom-format archive" in err
    assert "Traceback" not in err


def test_restore_under_a_running_server_is_atomic_and_invalidates_the_cache(
        demo_backup: Path, demo_services: Any, make_database: Callable[[], str], services_factory: Any,
        cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = make_database()
    assert run_cli(capsys, "restore", str(demo_backup), "--database-url", target)[0] == 0
    server = services_factory(make_settings(target, cli_env))  # pools open, vector type registered
    expected = answers(demo_services)
    assert answers(server) == expected
    # Change the live index so that "old" and "restored" differ: drop the ethics documents.
    with psycopg.connect(target) as conn:
        conn.execute("DELETE FROM documents WHERE title ILIKE '%ethics%'")
        conn.execute("UPDATE index_state SET generation = generation + 1")
    changed = answers(server)
    assert changed != expected
    documents, chunks, generation_before = counts(target)

    seen: list[tuple[int, Any]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def search_meanwhile() -> None:
        n = 0
        while not stop.is_set():
            case = n % len(CASES)
            n += 1
            try:
                seen.append((case, answer(server, case)))
            except BaseException as exc:  # any failure is the finding
                failures.append(exc)
                return

    worker = threading.Thread(target=search_meanwhile)
    worker.start()
    try:
        code, result, err = run_cli(capsys, "restore", str(demo_backup), "--database-url", target, "--yes")
    finally:
        stop.set()
        worker.join(timeout=120)
    assert code == 0, err
    assert not failures, failures
    # every answer during the restore comes wholly from the old index or wholly from the restored one
    assert seen and all(a in (changed[case], expected[case]) for case, a in seen)
    # the same pooled connections work after the restore (the vector type kept its OID)
    assert answers(server) == expected
    assert result["generation"] > generation_before
    assert result["replaced_documents"] > 0
    # the replaced database was saved first, beside the archive restored, and holds what was replaced
    safety = Path(result["safety_backup"])
    assert safety.parent == Path(demo_backup).parent and NAME_RE.match(safety.name)
    undo = make_database()
    assert run_cli(capsys, "restore", str(safety), "--database-url", undo)[0] == 0
    assert counts(undo)[:2] == (documents, chunks)


FOREIGN_APP = """
    CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL);
    CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers, total numeric);
    CREATE VIEW big_orders AS SELECT * FROM orders WHERE total > 100;
    CREATE FUNCTION order_total(int) RETURNS numeric LANGUAGE sql AS 'SELECT total FROM orders WHERE id = $1';
    CREATE SCHEMA billing;
    CREATE TABLE billing.invoices (id int);
    INSERT INTO customers (name) VALUES ('Ada'), ('Grace');
    INSERT INTO orders (customer_id, total) VALUES (1, 250), (2, 40);
"""


def foreign_state(dsn: str) -> list[Any]:
    with psycopg.connect(dsn) as conn:
        return [conn.execute("SELECT count(*) FROM customers").fetchone(),
                conn.execute("SELECT count(*) FROM orders").fetchone(),
                conn.execute("SELECT count(*) FROM big_orders").fetchone(),
                conn.execute("SELECT order_total(1)").fetchone(),
                conn.execute("SELECT count(*) FROM billing.invoices").fetchone()]


def test_restore_refuses_another_applications_database(
        demo_backup: Path, make_database: Callable[[], str], cli_env: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped --database-url names another application's database: refused with or without --yes,
    before any safety backup or lock, and every table, row, view and function of it is still there."""
    other = make_database()
    with psycopg.connect(other) as conn:
        conn.execute(FOREIGN_APP)
    before = foreign_state(other)
    for extra in ((), ("--yes",)):
        code, _, err = run_cli(capsys, "restore", str(demo_backup), "--database-url", other, *extra)
        assert code == 2, err
        assert "is not a Campus Search database" in err and "table public.customers" in err
        assert "nothing was changed" in err and "Traceback" not in err
        assert foreign_state(other) == before
    dbname = str(psycopg.conninfo.conninfo_to_dict(other)["dbname"])
    assert not [p for p in demo_backup.parent.glob("*.dump") if dbname in p.name]  # refused before any backup
    # A Campus Search database that also holds somebody else's table is refused just the same.
    mixed = make_database()
    assert run_cli(capsys, "restore", str(demo_backup), "--database-url", mixed)[0] == 0
    with psycopg.connect(mixed) as conn:
        conn.execute("CREATE TABLE payroll (employee text, salary numeric); INSERT INTO payroll VALUES ('x', 1)")
        docs = conn.execute("SELECT count(*) FROM documents").fetchone()
    code, _, err = run_cli(capsys, "restore", str(demo_backup), "--database-url", mixed, "--yes")
    assert code == 2 and "table public.payroll" in err
    with psycopg.connect(mixed) as conn:
        assert conn.execute("SELECT count(*) FROM payroll").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM documents").fetchone() == docs


def test_restore_transaction_itself_refuses_foreign_objects(
        demo_backup: Path, make_database: Callable[[], str], cli_env: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The check is repeated inside the restore's transaction (an object created between the first check
    and the restore, here simulated by blinding the first check): rolled back, nothing dropped."""
    import campus_search.storage.backup as backup_module

    other = make_database()
    with psycopg.connect(other) as conn:
        conn.execute(FOREIGN_APP)
    before = foreign_state(other)
    real = backup_module.inventory
    monkeypatch.setattr(backup_module, "inventory", lambda dsn: (real(dsn)[0], []))
    code, _, err = run_cli(capsys, "restore", str(demo_backup), "--database-url", other, "--yes")
    assert code == 2 and "not Campus Search's" in err and "rolled back" in err
    assert foreign_state(other) == before


def test_restore_always_saves_a_database_that_holds_anything(
        demo_backup: Path, make_database: Callable[[], str], services_factory: Any, cli_env: Path,
        token: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """A Campus Search database without documents still holds its audit log: saved before it is replaced.
    An empty database holds nothing to save."""
    from campus_search.app import create_app

    target = make_database()
    settings = make_settings(target, cli_env)
    services = services_factory(settings)  # migrated, no documents
    r = create_app(services).test_client().post(
        "/api/search", json={"query": "anything"}, headers={"Authorization": token("student", sub="audited")})
    assert r.status_code == 200 and counts(target)[0] == 0
    services.close()

    def audited(dsn: str) -> Any:
        with psycopg.connect(dsn) as conn:
            return conn.execute("SELECT count(*) FROM audit_log WHERE user_id = 'audited'").fetchone()

    assert audited(target) == (1,)
    code, result, err = run_cli(capsys, "restore", str(demo_backup), "--database-url", target)
    assert code == 0, err
    safety = Path(result["safety_backup"])
    assert safety.exists() and NAME_RE.match(safety.name) and "saved first" in err
    undo = make_database()
    assert run_cli(capsys, "restore", str(safety), "--database-url", undo)[0] == 0
    assert audited(undo) == (1,)
    code, result, _ = run_cli(capsys, "restore", str(demo_backup), "--database-url", make_database())
    assert code == 0 and result["safety_backup"] is None


def test_backup_keep_prunes_older_backups(tmp_path: Path) -> None:
    import datetime as dt

    dsn = "postgresql://u@h/campus_search"
    names = [backup_name(dsn, dt.datetime(2025, 1, d, 3, 0, tzinfo=dt.UTC)) for d in (3, 1, 2)]
    for n in names:
        (tmp_path / n).write_bytes(b"PGDMP")
    (tmp_path / "unrelated.dump").write_bytes(b"x")
    removed = prune_backups(tmp_path, keep=1)
    assert sorted(p.name for p in removed) == sorted(names[1:])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[0], "unrelated.dump"])


def test_client_programs_match_the_server(pg_cluster: str, cli_env: Path) -> None:
    from campus_search.config import load_settings
    from campus_search.storage.backup import tool_major

    major = server_major(pg_cluster)
    bindir = pg_bin_dir(load_settings(), major)
    assert tool_major(bindir / "pg_dump") >= major


def test_every_object_the_migrations_create_is_campus_searchs_own(demo_services: Any) -> None:
    """A migrated, populated database is all ours: every table, view and function the migrations create
    (migration 013 added views) is recognised, so restore never mistakes its own database for another's."""
    from campus_search.storage.backup import inventory

    everything, foreign = inventory(demo_services.dsn)
    assert ("view", "public.lexical_df") in everything
    assert foreign == []
