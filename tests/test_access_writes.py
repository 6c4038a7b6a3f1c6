"""SPEC §2 "How access metadata changes", end to end: the real `campus-search ingest` (its main
function, in process) and the admin HTTP API on one real PostgreSQL database, then searches through
the real searcher. Each test is a hole that was open (issue 10) and is now closed."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DEMO, TEST_SECRET

from campus_search.cli import main as cli
from campus_search.config import Settings, load_settings
from campus_search.retrieval.params import SearchParams
from campus_search.security.roles import DEFAULT_ROLES, Principal, superuser

ADMIN = superuser("admin-test")
STUDENT = Principal("student-test", DEFAULT_ROLES["student"])


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, make_database: Callable[[], str], data_dir: Path) -> Settings:
    monkeypatch.setenv("DATABASE_URL", make_database())
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    monkeypatch.setenv("JWT_SECRET_KEY", TEST_SECRET)
    monkeypatch.setenv("AUDIT_HMAC_KEY", "audit-" + "k" * 40)
    monkeypatch.setenv("DB_POOL_MIN_SIZE", "1")
    monkeypatch.setenv("RATE_LIMITS_ENABLED", "false")
    for name in ("EMBEDDING_PROVIDER", "DEFAULT_VISIBILITY", "CAMPUS_SEARCH_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return load_settings()


@pytest.fixture
def services(env: Settings, embedder: Any) -> Iterator[Any]:
    from campus_search.services import Services

    s = Services(env, embedder=embedder).ensure_open()
    yield s
    s.close()


@pytest.fixture
def client(env: Settings, services: Any) -> Any:
    from campus_search.app import create_app

    app = create_app(services)
    app.config["TESTING"] = True
    return app.test_client()


@pytest.fixture
def admin(token: Any) -> dict[str, str]:
    return {"Authorization": token("it_administrator", sub="admin-7")}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    capsys.readouterr()
    code = cli.main(["ingest", "--quiet", *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]), err


def stored(services: Any, doc_id: str) -> dict[str, Any] | None:
    with services.db.connection(read=False) as conn:
        row = conn.execute("SELECT department, visibility, clearance_level, campus, priority, last_reviewed, source, "
                           "title, pinned FROM documents WHERE external_id = %s", (doc_id,)).fetchone()
    if row is None:
        return None
    return dict(zip(("department", "visibility", "clearance_level", "campus", "priority", "last_reviewed",
                     "source", "title", "pinned"), row, strict=True))


def doc_ids(services: Any) -> set[str]:
    with services.db.connection(read=False) as conn:
        return {r[0] for r in conn.execute("SELECT external_id FROM documents")}


def hits(services: Any, query: str, user: Principal = ADMIN) -> list[Any]:
    return services.searcher.search(user, SearchParams(query=query, max_results=50, similarity_threshold=-1.0))


def audit_count(services: Any) -> int:
    with services.db.connection(read=False) as conn:
        return int(conn.execute("SELECT count(*) FROM audit_log").fetchone()[0])


def md(path: Path, front: str, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((f"---\n{front}\n---\n" if front else "") + body, encoding="utf-8")
    return path


# --- 1. ingestion reads only what it was given ---------------------------------------------------------

def test_symlink_to_the_jwt_secret_is_refused_and_never_searchable(env: Settings, services: Any, tmp_path: Path,
                                                                   data_dir: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    secret = data_dir / "secrets" / "jwt_secret_key"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("zebraquartz leak signing secret 7731\n")
    docs = tmp_path / "docs"
    md(docs / "welcome.md", "visibility: public", "# Welcome\n\nThe leak in the library roof is fixed.\n")
    (docs / "leak.txt").symlink_to(secret)
    os.link(secret, docs / "hardlink.txt")  # no link to follow: the same file under another name
    (docs / "alias.md").symlink_to(docs / "welcome.md")  # inside the folder: not followed, a note
    os.mkfifo(docs / "pipe.md")  # would block a naive read forever
    (tmp_path / "elsewhere.md").write_text("# Elsewhere\n\nOutside the folder.\n")
    (docs / "out.md").symlink_to(tmp_path / "elsewhere.md")

    code, summary, err = run(capsys, str(docs), "--visibility", "public")
    assert code == 3 and (summary["added"], summary["failed"]) == (1, 4)
    assert f"{docs / 'leak.txt'}: refused: a symbolic link into the service's own data" in err
    assert f"{docs / 'hardlink.txt'}: refused: the service's own data and configuration" in err
    assert f"{docs / 'out.md'}: refused: a symbolic link that leads outside" in err
    assert f"{docs / 'pipe.md'}: refused: not a regular file" in err
    assert f"note: {docs / 'alias.md'}: skipped: a symbolic link inside the folder" in err

    # named directly on the command line: a link to the secret, the secret, DATA_DIR itself, and a
    # folder that contains DATA_DIR
    direct = tmp_path / "direct.txt"
    direct.symlink_to(secret)
    code, summary, err = run(capsys, str(direct), str(secret), str(data_dir), "--visibility", "public")
    assert code == 3 and summary["added"] == 0 and err.count("are never ingested") == 3
    code, summary, err = run(capsys, str(tmp_path), "--visibility", "public")
    assert f"{data_dir}: refused: the service's own data (DATA_DIR) is never ingested" in err

    assert "zebraquartz" not in json.dumps([h.text for h in hits(services, "leak signing secret zebraquartz")])
    with services.db.connection(read=False) as conn:
        assert conn.execute("SELECT count(*) FROM chunks WHERE text LIKE '%zebraquartz%'").fetchone()[0] == 0


# --- 2. a file cannot claim another document's identity --------------------------------------------------

def test_front_matter_or_sidecar_id_cannot_hijack_a_demo_document(env: Settings, services: Any, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    real = DEMO / "it-staff-password-management.md"
    code, summary, _ = run(capsys, str(real))
    assert code == 0 and summary["added"] == 1
    evil = tmp_path / "evil"
    md(evil / "notes.md", "id: it-staff-password-management.md\nvisibility: public\nclearance_level: 1",
       "# IT Staff Password Management Guide\n\nAll administrator passwords are hunter2, ask anyone.\n")
    md(evil / "other.md", "", "# Other\n\nThe sidecar claims the guide's id too. hunter2.\n")
    (evil / "other.md.meta.yaml").write_text("id: it-staff-password-management.md\nvisibility: public\n")

    for flags in ([], ["--allow-loosening"]):  # not even the explicit act lets a file take another's id
        code, summary, err = run(capsys, str(evil), *flags)
        row = stored(services, "it-staff-password-management.md")
        assert row is not None and row["title"] == "IT Staff Password Management Guide"
        assert (row["visibility"], row["clearance_level"], row["source"]) == ("department", 3, str(real.resolve()))
        assert code == 3 and (summary["added"], summary["updated"], summary["failed"]) == (0, 0, 2)
        assert err.count("refused: id 'it-staff-password-management.md' belongs to the document from") == 2
    assert all("hunter2" not in h.text for h in hits(services, "administrator passwords hunter2"))
    assert all(h.document_title != "IT Staff Password Management Guide"
               for h in hits(services, "administrator passwords", STUDENT))


# --- 3. one rule for every writer --------------------------------------------------------------------------

def test_reingest_without_flags_keeps_the_stored_access(env: Settings, services: Any, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's reproduction: --visibility department --clearance 4, then a re-ingest without flags."""
    docs = tmp_path / "finance"
    md(docs / "forecast.md", "", "# Budget Forecast\n\nThe confidential budget forecast cuts three posts.\n")
    md(docs / "audit.md", "", "# Internal Audit\n\nThe internal audit found two control weaknesses.\n")
    code, summary, _ = run(capsys, str(docs), "--visibility", "department", "--department", "Finance",
                           "--clearance", "4")
    assert code == 0 and summary["added"] == 2
    md(docs / "forecast.md", "", "# Budget Forecast\n\nThe confidential budget forecast cuts four posts.\n")

    code, summary, err = run(capsys, str(docs))
    for doc_id in ("forecast.md", "audit.md"):
        row = stored(services, doc_id)
        assert row is not None and (row["visibility"], row["department"], row["clearance_level"]) == (
            "department", "Finance", 4)
    assert hits(services, "confidential budget forecast", STUDENT) == []
    assert code == 0 and (summary["updated"], summary["unchanged"], summary["held_back"]) == (1, 1, 0)


def test_file_loosening_is_held_back_until_allowed_and_then_audited(env: Settings, services: Any, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "docs"
    body = "# Pay Scales\n\nThe pay scales for grade nine staff are negotiated each spring.\n"
    md(docs / "pay.md", "department: Human Resources\nvisibility: department\nclearance_level: 3", body)
    assert run(capsys, str(docs))[1]["added"] == 1

    md(docs / "pay.md", "department: Human Resources\nvisibility: public\nclearance_level: 1", body)
    code, summary, err = run(capsys, str(docs))
    assert code == 0 and (summary["held_back"], summary["loosened"], summary["metadata_updated"]) == (1, 0, 0)
    assert "held back, access not loosened: visibility stays 'department' (source says 'public')" in err
    assert "clearance_level stays 3 (source says 1)" in err and "1 held back" in err
    assert stored(services, "pay.md")["visibility"] == "department"  # type: ignore[index]
    assert hits(services, "grade nine pay scales", STUDENT) == []

    code, summary, err = run(capsys, str(docs), "--allow-loosening")
    assert code == 0 and (summary["loosened"], summary["metadata_updated"]) == (1, 1)
    assert "access loosened (--allow-loosening): visibility 'department' -> 'public'" in err
    row = stored(services, "pay.md")
    assert row is not None and (row["visibility"], row["clearance_level"]) == ("public", 1)
    assert [h.document_title for h in hits(services, "grade nine pay scales", STUDENT)][:1] == ["Pay Scales"]
    with services.db.connection(read=False) as conn:
        action, target, user_id, details = conn.execute(
            "SELECT action, target, user_id, details FROM audit_log WHERE kind = 'admin'").fetchone()
    details = json.loads(details)
    assert (action, target) == ("ingest.loosen", "pay.md") and user_id.startswith("cli:")
    assert (details["before"]["visibility"], details["after"]["visibility"]) == ("department", "public")
    assert (details["before"]["clearance_level"], details["after"]["clearance_level"]) == (3, 1)

    md(docs / "pay.md", "department: Human Resources\nvisibility: public\nclearance_level: 5", body)
    code, summary, _ = run(capsys, str(docs))  # tightening needs no flag
    assert code == 0 and stored(services, "pay.md")["clearance_level"] == 5  # type: ignore[index]


def _refuse_audit_inserts(services: Any) -> None:
    with services.db.connection() as conn:  # the database refuses audit inserts (disk full, permissions)
        conn.execute("CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN RAISE EXCEPTION 'audit refused'; END $$")
        conn.execute("CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log "
                     "FOR EACH ROW EXECUTE FUNCTION refuse_audit()")


def test_a_loosening_that_cannot_be_audited_is_not_applied(env: Settings, services: Any, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The record is written in the loosening's own transaction: no record, no loosening (refuse)."""
    docs = tmp_path / "docs"
    body = "# Rota\n\nThe night shift rota for porters.\n"
    md(docs / "rota.md", "department: Estates\nvisibility: department", body)
    keys = "# Keys\n\nWhere the porters keep keys.\n"
    md(docs / "keys.md", "department: Estates\nvisibility: department", keys)
    assert run(capsys, str(docs))[1]["added"] == 2
    md(docs / "rota.md", "department: Estates\nvisibility: public", body)
    md(docs / "keys.md", "department: Estates\nvisibility: department\nclearance_level: 4", keys)  # tighter
    _refuse_audit_inserts(services)
    capsys.readouterr()
    code = cli.main(["ingest", "--quiet", str(docs), "--allow-loosening"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert "the audit log is unavailable, so the access of 'rota.md' was not loosened" in err
    assert stored(services, "rota.md")["visibility"] == "department"  # type: ignore[index]
    assert hits(services, "night shift rota porters", STUDENT) == []
    # the same run's tightening is written before the loosening, in a transaction of its own
    assert stored(services, "keys.md")["clearance_level"] == 4  # type: ignore[index]


def test_the_loosenings_of_one_transaction_are_recorded_together(env: Settings, services: Any, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """One record per loosened document, written by one INSERT at the end of the transaction that loosens
    them (consecutive in the chain, which still verifies)."""
    from campus_search.audit.verify import verify

    docs = tmp_path / "docs"
    names = [f"notice-{i}.md" for i in range(5)]
    for name in names:
        md(docs / name, "department: Estates\nvisibility: department", f"# {name}\n\nEstates notice {name}.\n")
    assert run(capsys, str(docs))[1]["added"] == 5
    for name in names:
        md(docs / name, "department: Estates\nvisibility: public", f"# {name}\n\nEstates notice {name}.\n")
    code, summary, _ = run(capsys, str(docs), "--allow-loosening")
    assert code == 0 and summary["loosened"] == 5
    with services.db.connection(read=False) as conn:
        rows = conn.execute("SELECT seq, target, xmin::text FROM audit_log WHERE action = 'ingest.loosen' "
                            "ORDER BY seq").fetchall()
        assert verify(conn, services.settings.audit_hmac_key).ok
    assert sorted(r[1] for r in rows) == names
    assert [r[0] for r in rows] == list(range(rows[0][0], rows[0][0] + 5))
    assert len({r[2] for r in rows}) == 1  # one INSERT (a savepoint per record would give each its own xid)


def test_a_loosening_audited_to_the_error_log_only_is_said_out_loud(
        env: Settings, services: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """AUDIT_FAILURE_MODE=log: the loosening applies, its record goes to the error log, the command exits 3."""
    docs = tmp_path / "docs"
    body = "# Rota\n\nThe night shift rota for porters.\n"
    md(docs / "rota.md", "department: Estates\nvisibility: department", body)
    assert run(capsys, str(docs))[1]["added"] == 1
    md(docs / "rota.md", "department: Estates\nvisibility: public", body)
    _refuse_audit_inserts(services)
    monkeypatch.setenv("AUDIT_FAILURE_MODE", "log")
    code, summary, err = run(capsys, str(docs), "--allow-loosening")
    assert code == 3 and summary["loosened"] == 1
    assert "the loosening(s) above were applied; 1 of them could not be stored in the audit log" in err
    assert stored(services, "rota.md")["visibility"] == "public"  # type: ignore[index]
    unstored = [r.getMessage() for r in caplog.records if "audit record NOT stored" in r.getMessage()]
    assert len(unstored) == 1 and '"action": "ingest.loosen"' in unstored[0] and '"target": "rota.md"' in unstored[0]


def test_a_loosening_another_writer_kept_out_is_neither_reported_nor_audited(
        env: Settings, services: Any) -> None:
    """The loosenings reported (and audited) are the ones written: a document whose row another writer
    changed between this run's read and its write is not written, so its loosening is not recorded."""
    from campus_search.ingest.sources import Block, ParsedDocument

    doc = ParsedDocument(external_id="memo", title="Memo", source="memo.md", blocks=[Block("A memo for estates.")])
    assert services.ingester.ingest([doc], {"department": "Estates", "visibility": "department"}).added == 1
    real = services.ingester._still_current

    def another_writer_first(conn: Any, pending: Any, report: Any) -> Any:
        conn.execute("UPDATE documents SET priority = priority + 1 WHERE external_id = 'memo'")
        return real(conn, pending, report)

    recorded: list[Any] = []
    services.ingester._still_current = another_writer_first
    try:
        report = services.ingester.ingest([doc], {"department": "Estates", "visibility": "public"},
                                          allow_loosening=True,
                                          audit=lambda conn, r: recorded.append(list(r.access_changes)))
    finally:
        services.ingester._still_current = real
    assert report.failed == 1 and report.loosened == 0 and report.access_changes == []
    assert recorded and all(changes == [] for changes in recorded)
    assert not any("access loosened" in n for n in report.notes)


def test_a_loosening_asked_for_without_an_audit_hook_is_refused_before_anything_is_written(
        env: Settings, services: Any) -> None:
    """The library entry points too: ``allow_loosening`` without the hook that records it raises, so no
    caller can loosen access with no audit record; the stored access and the audit log are untouched."""
    from campus_search.ingest.sources import Block, ParsedDocument

    memo = ParsedDocument(external_id="memo", title="Memo", source="memo.md",
                          blocks=[Block("Estates memo about the porters' rota.")])
    dept = {"department": "Estates", "visibility": "department"}
    assert services.ingester.ingest([memo], dept).added == 1
    before = audit_count(services)
    with pytest.raises(ValueError, match="needs an audit hook"):
        services.ingester.ingest([memo], {**dept, "visibility": "public"}, allow_loosening=True)
    with pytest.raises(ValueError, match="needs an audit hook"):
        services.ingester.update_metadata("memo", {"visibility": "public"}, allow_loosening=True)
    assert stored(services, "memo")["visibility"] == "department"  # type: ignore[index]
    assert audit_count(services) == before
    assert hits(services, "porters rota memo", STUDENT) == []
    # with the hook the same act loosens, and is recorded with before and after
    report = services.ingester.ingest([memo], {**dept, "visibility": "public"}, allow_loosening=True,
                                      audit=cli.LooseningAudit(services))
    assert report.loosened == 1 and stored(services, "memo")["visibility"] == "public"  # type: ignore[index]
    assert audit_count(services) == before + 1


def test_new_document_without_visibility_gets_the_safe_default(env: Settings, services: Any, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "docs"
    md(docs / "minutes.md", "", "# Committee Minutes\n\nThe committee approved the new library budget.\n")
    code, summary, err = run(capsys, str(docs))
    assert code == 3 and summary["added"] == 0
    assert "no visibility stated and no department" in err and "--visibility public" in err

    code, summary, err = run(capsys, str(docs), "--department", "Library")
    assert code == 0 and (summary["added"], summary["defaulted"]) == (1, 1)
    assert "'department' applied (DEFAULT_VISIBILITY)" in err and "1 given DEFAULT_VISIBILITY" in err
    row = stored(services, "minutes.md")
    assert row is not None and (row["visibility"], row["department"]) == ("department", "Library")
    assert hits(services, "committee library budget", STUDENT) == []


def test_api_loosening_needs_allow_loosening_and_is_audited(env: Settings, services: Any, client: Any,
                                                            admin: dict[str, str]) -> None:
    meta = {"department": "Finance", "visibility": "department", "clearance_level": 3}
    text = "# Grants\n\nResearch grant overheads are charged at forty percent.\n"
    assert client.put("/api/admin/documents/fin/grants", json={"text": text, "metadata": meta},
                      headers=admin).status_code == 201
    r = client.patch("/api/admin/documents/fin/grants", json={"metadata": {"visibility": "public"}}, headers=admin)
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "loosening_refused"
    assert r.get_json()["error"]["details"]["loosened"] == [
        {"field": "visibility", "before": "department", "after": "public"}]
    r = client.put("/api/admin/documents/fin/grants", json={"text": text, "metadata": {"clearance_level": 1}},
                   headers=admin)
    assert r.status_code == 409 and "clearance_level 3 -> 1" in r.get_json()["error"]["message"]
    assert stored(services, "fin/grants")["visibility"] == "department"  # type: ignore[index]
    assert client.patch("/api/admin/documents/fin/grants", json={"metadata": {"clearance_level": 4}},
                        headers=admin).status_code == 200  # tightening: no flag needed

    r = client.patch("/api/admin/documents/fin/grants", headers=admin,
                     json={"metadata": {"visibility": "public", "clearance_level": 2}, "allow_loosening": True})
    assert r.status_code == 200 and [c["field"] for c in r.get_json()["loosened"]] == ["visibility",
                                                                                      "clearance_level"]
    assert [h.document_title for h in hits(services, "grant overheads", STUDENT)][:1] == ["Grants"]
    r = client.put("/api/admin/documents/fin/grants", headers=admin, json={  # PUT: the same rule
        "text": text, "metadata": {"clearance_level": 1}, "allow_loosening": True})
    assert r.status_code == 200 and r.get_json()["loosened"] == [
        {"field": "clearance_level", "before": 2, "after": 1}]
    with services.db.connection(read=False) as conn:
        upserts = [json.loads(d) for (d,) in conn.execute(
            "SELECT details FROM audit_log WHERE action = 'document.upsert' AND success ORDER BY seq")]
        rows = conn.execute("SELECT success, status, details FROM audit_log WHERE action = 'document.metadata' "
                            "ORDER BY seq").fetchall()
    assert (upserts[-1]["before"]["clearance_level"], upserts[-1]["after"]["clearance_level"]) == (2, 1)
    assert upserts[-1]["loosened"] == [{"field": "clearance_level", "before": 2, "after": 1}]
    assert [(ok, status) for ok, status, _ in rows] == [(False, 409), (True, 200), (True, 200)]
    last = json.loads(rows[-1][2])
    assert (last["before"]["visibility"], last["after"]["visibility"], last["allow_loosening"]) == (
        "department", "public", True)


# --- 4. unknown or misspelt keys, invalid values ---------------------------------------------------------

def test_misspelt_keys_and_invalid_values_fail_the_file(env: Settings, services: Any, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "docs"
    md(docs / "a.md", "", "# A\n\nSidecar typo.\n")
    (docs / "a.md.meta.yaml").write_text("visibilty: department\ndepartment: HR\n")
    md(docs / "b.md", "visiblity: department\ndepartment: HR", "# B\n\nFront matter typo.\n")
    md(docs / "sub" / "c.md", "", "# C\n\nFolder file typo.\n")
    (docs / "sub" / ".campus-search.yaml").write_text("clearence_level: 4\n")
    md(docs / "d.md", "clearance_level: 7", "# D\n\nOut of range.\n")
    md(docs / "e.md", "visibility: public", "# E\n\nFine.\n")
    code, summary, err = run(capsys, str(docs), "--department", "HR")
    assert code == 3 and (summary["added"], summary["failed"]) == (1, 4)
    assert f"{docs / 'a.md.meta.yaml'}: unknown metadata key 'visibilty' (did you mean 'visibility'?)" in err
    assert f"{docs / 'b.md'}: front matter: unknown metadata key 'visiblity' (did you mean 'visibility'?)" in err
    assert "unknown metadata key 'clearence_level' (did you mean 'clearance_level'?)" in err
    assert "clearance_level must be between 1 and 5, got 7" in err
    assert doc_ids(services) == {"e.md"}

    corpus = tmp_path / "corpus.jsonl"  # a BEIR corpus line with a typo fails that line
    corpus.write_text(json.dumps({"_id": "j1", "title": "J", "text": "Fine.", "clearance_level": 2}) + "\n"
                      + json.dumps({"_id": "j2", "title": "K", "text": "Typo.", "visiblity": "public"}) + "\n")
    code, summary, err = run(capsys, str(corpus), "--visibility", "public")
    assert code == 3 and (summary["added"], summary["failed"]) == (1, 1)
    assert f"{corpus}:2: unknown metadata key 'visiblity' (did you mean 'visibility'?)" in err


# --- 5. a PATCH is not undone by the next sync -----------------------------------------------------------

def test_patch_survives_sync_until_unpinned(env: Settings, services: Any, client: Any, admin: dict[str, str],
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "docs"
    front = "department: IT Services\nvisibility: department\nclearance_level: 2\npriority: 3"
    md(docs / "vpn.md", front, "# VPN\n\nThe VPN concentrator admin console is at port 8443.\n")
    assert run(capsys, str(docs))[1]["added"] == 1
    r = client.patch("/api/admin/documents/vpn.md", json={"metadata": {"clearance_level": 4, "priority": 5}},
                     headers=admin)
    assert r.status_code == 200

    md(docs / "vpn.md", front, "# VPN\n\nThe VPN concentrator admin console moved to port 9443.\n")
    staff = Principal("it-staff", DEFAULT_ROLES["staff"], departments=("IT Services",))
    for flags in ([], ["--allow-loosening"]):  # not even the flag undoes a pin
        code, summary, err = run(capsys, str(docs), *flags)
        row = stored(services, "vpn.md")
        assert row is not None and (row["clearance_level"], row["priority"]) == (4, 5)
        assert hits(services, "VPN concentrator admin console", staff) == []
        assert code == 0 and "kept (pinned by an admin through the API): clearance_level 4 (source says 2)" in err
    assert r.get_json()["pinned"] == ["clearance_level", "priority"]

    r = client.patch("/api/admin/documents/vpn.md", json={"unpin": ["clearance_level", "priority"]}, headers=admin)
    assert r.status_code == 200 and r.get_json()["pinned"] == []
    assert client.get("/api/admin/documents/vpn.md", headers=admin).get_json()["pinned"] == []
    code, summary, _ = run(capsys, str(docs), "--allow-loosening")
    row = stored(services, "vpn.md")
    assert row is not None and (row["clearance_level"], row["priority"]) == (2, 3) and summary["loosened"] == 1


def test_a_patch_landing_while_a_sync_embeds_is_not_overwritten(env: Settings, services: Any, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync decides each document's metadata from the rows it read, then embeds, then writes. An
    admin's PATCH that commits in between must not be overwritten with that stale decision."""
    from campus_search.ingest.sync import sync_paths

    docs = tmp_path / "docs"
    front = "department: Estates\nvisibility: department\nclearance_level: 2"
    md(docs / "keys.md", front, "# Keys\n\nMaster keys are signed out at the estates help desk.\n")
    assert sync_paths(services.ingester, [docs]).added == 1
    md(docs / "keys.md", front, "# Keys\n\nMaster keys are signed out at the estates office.\n")
    ingester, embed = services.ingester, services.ingester._vectors_for

    def patch_meanwhile(*args: Any) -> Any:  # runs between the sync's read and its write
        assert ingester.update_metadata("keys.md", {"clearance_level": 5}) is not None
        return embed(*args)

    monkeypatch.setattr(ingester, "_vectors_for", patch_meanwhile)
    report = sync_paths(ingester, [docs])
    assert (report.updated, report.failed) == (0, 1)
    assert "another writer changed document 'keys.md'" in report.errors[0]
    assert stored(services, "keys.md")["clearance_level"] == 5  # type: ignore[index]
    monkeypatch.setattr(ingester, "_vectors_for", embed)
    again = sync_paths(ingester, [docs])  # the next run applies the edit and keeps the pinned clearance
    row = stored(services, "keys.md")
    assert again.updated == 1 and row is not None and row["clearance_level"] == 5


# --- 6. uploads cannot loosen through their own front matter ---------------------------------------------

def test_upload_front_matter_cannot_loosen(env: Settings, services: Any, client: Any,
                                           admin: dict[str, str]) -> None:
    meta = {"department": "Human Resources", "visibility": "department", "clearance_level": 3}
    body = "# Grievances\n\nA formal grievance is heard by a panel within twenty days.\n"
    assert client.put("/api/admin/documents/hr/grievance", json={"text": body, "metadata": meta},
                      headers=admin).status_code == 201
    loose = "---\nvisibility: public\nclearance_level: 1\n---\n" + body.replace("twenty", "fifteen")
    for extra in ({}, {"allow_loosening": True}):  # the flag covers the request's metadata, not the file's
        r = client.put("/api/admin/documents/hr/grievance", json={"text": loose, **extra}, headers=admin)
        assert r.status_code == 200, r.get_json()
        out = r.get_json()
        assert (out["metadata"]["visibility"], out["metadata"]["clearance_level"]) == ("department", 3)
        assert hits(services, "formal grievance panel", STUDENT) == []
        assert out["loosened"] == [] and [c["field"] for c in out["held_back"]] == ["visibility", "clearance_level"]
    tighter = "---\nclearance_level: 4\n---\n" + body
    assert client.put("/api/admin/documents/hr/grievance", json={"text": tighter},
                      headers=admin).get_json()["metadata"]["clearance_level"] == 4


def test_put_cannot_replace_a_document_that_ingestion_owns(env: Settings, services: Any, client: Any,
                                                           admin: dict[str, str], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    md(tmp_path / "docs" / "x.md", "visibility: public", "# X\n\nFrom a file.\n")
    run(capsys, str(tmp_path / "docs"))
    r = client.put("/api/admin/documents/x.md", json={"text": "# X\n\nFrom the API."}, headers=admin)
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "source_conflict"
    # and the other way round: a file cannot take an API document's id
    client.put("/api/admin/documents/api-doc", json={"text": "# API\n\nMade here.", "metadata": {
        "visibility": "department", "department": "Library"}}, headers=admin)
    md(tmp_path / "more" / "y.md", "id: api-doc\nvisibility: public", "# Y\n\nClaims it.\n")
    code, _, err = run(capsys, str(tmp_path / "more"))
    assert code == 3 and "refused: id 'api-doc' belongs to the document from api:inline.md" in err


# --- 7. --prune never deletes what it could not list -----------------------------------------------------

def test_prune_spares_a_folder_that_cannot_be_listed(env: Settings, services: Any, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / ".campus-search.yaml").write_text("visibility: public\n")
    md(docs / "top.md", "", "# Top\n\nTop level.\n")
    md(docs / "sub" / "inner.md", "", "# Inner\n\nInside the subfolder.\n")
    assert run(capsys, str(docs))[1]["added"] == 2
    (docs / "top.md").unlink()

    # Tests run as root, which no permission bit stops: make os.scandir fail for that one folder, as
    # it does for an unreadable folder (EACCES) for any other user.
    real_scandir = os.scandir
    denied = {str(docs / "sub")}

    def scandir(path: Any = ".") -> Any:
        if os.fspath(path) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code, summary, err = run(capsys, str(docs), "--prune")
    assert code == 3 and summary["deleted"] == 0
    assert f"{docs / 'sub'}: cannot list the folder (Permission denied)" in err
    assert f"{docs}: not pruned (part of it could not be read)" in err
    assert doc_ids(services) == {"top.md", "sub/inner.md"}

    denied.add(str(docs))  # the root itself
    code, summary, err = run(capsys, str(docs), "--prune")
    assert code == 3 and summary["deleted"] == 0 and doc_ids(services) == {"top.md", "sub/inner.md"}

    denied.clear()
    code, summary, _ = run(capsys, str(docs), "--prune")
    assert code == 0 and summary["deleted"] == 1 and doc_ids(services) == {"sub/inner.md"}


def test_an_id_a_run_repeats_in_a_later_batch_fails_there_too(env: Settings, services: Any) -> None:
    """Ids are unique within a run across its batches, not only within one: a corpus that repeats an id
    DOC_BATCH documents later has that second document fail, so it neither overwrites the first nor
    loosens (and records) the same access twice."""
    from campus_search.ingest import pipeline
    from campus_search.ingest.sources import Block, ParsedDocument

    def doc(i: int, doc_id: str) -> ParsedDocument:
        return ParsedDocument(external_id=doc_id, title=f"Note {i}", source=f"corpus.jsonl:{i}",
                              blocks=[Block(f"Estates note number {i} for the porters.")])

    dept = {"department": "Estates", "visibility": "department"}
    assert services.ingester.ingest([doc(0, "memo")], dept).added == 1
    run_docs = [doc(0, "memo")] + [doc(i, f"filler-{i}") for i in range(1, pipeline.DOC_BATCH + 1)] + [doc(99, "memo")]
    report = services.ingester.ingest(run_docs, {**dept, "visibility": "public"}, allow_loosening=True,
                                      audit=cli.LooseningAudit(services))
    assert report.failed == 1 and any("refused: id 'memo' is also the id of" in e for e in report.errors)
    assert [c["document_id"] for c in report.access_changes].count("memo") == 1
    assert stored(services, "memo")["title"] == "Note 0"  # type: ignore[index]


# --- 8. ids do not collide across folders ----------------------------------------------------------------

def test_same_relative_path_under_two_roots_is_refused_not_overwritten(env: Settings, services: Any,
                                                                      tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    org = tmp_path / "org"
    md(org / "hr" / "policy.md", "department: Human Resources\nvisibility: department\nclearance_level: 3",
       "# HR Policy\n\nSalary bands are reviewed by the remuneration committee.\n")
    md(org / "it" / "policy.md", "visibility: public", "# IT Policy\n\nPrinters are on every floor.\n")
    code, summary, err = run(capsys, str(org / "hr"), str(org / "it"))
    assert code == 3 and (summary["added"], summary["failed"]) == (1, 1)
    assert f"{(org / 'it' / 'policy.md').resolve()}: refused: id 'policy.md' is also the id of" in err
    code, summary, err = run(capsys, str(org / "it"))  # a later run: still refused, never an overwrite
    assert code == 3 and "refused: id 'policy.md' belongs to the document from" in err
    row = stored(services, "policy.md")
    assert row is not None and (row["title"], row["visibility"]) == ("HR Policy", "department")

    code, summary, _ = run(capsys, str(org), "--prune")  # what the message suggests: the common parent
    assert code == 0 and (summary["added"], summary["deleted"]) == (2, 1)
    assert doc_ids(services) == {"hr/policy.md", "it/policy.md"}


# --- 9. null clears what may be empty ----------------------------------------------------------------------

def test_patch_null_clears_clearable_fields(env: Settings, services: Any, client: Any,
                                            admin: dict[str, str]) -> None:
    client.put("/api/admin/documents/lib", headers=admin, json={"text": "# Library\n\nOpen late.", "metadata": {
        "department": "Library", "visibility": "public", "campus": "Central Campus", "last_reviewed": "2024-01-02"}})
    r = client.patch("/api/admin/documents/lib", json={"metadata": {"campus": None, "last_reviewed": None}},
                     headers=admin)
    assert r.status_code == 200 and (r.get_json()["metadata"]["campus"], r.get_json()["metadata"]["last_reviewed"]) \
        == (None, None)
    row = stored(services, "lib")
    assert row is not None and (row["campus"], row["last_reviewed"]) == (None, None)
    for field in ("visibility", "clearance_level", "priority"):
        r = client.patch("/api/admin/documents/lib", json={"metadata": {field: None}}, headers=admin)
        assert r.status_code == 400 and f"{field} cannot be cleared" in r.get_json()["error"]["message"]
    assert client.patch("/api/admin/documents/lib", json={"metadata": {"department": None}},
                        headers=admin).get_json()["metadata"]["department"] is None  # public: may be empty
    client.patch("/api/admin/documents/lib", json={"metadata": {"department": "Library", "visibility": "department"}},
                 headers=admin)
    r = client.patch("/api/admin/documents/lib", json={"metadata": {"department": None}}, headers=admin)
    assert r.status_code == 400 and "needs a department" in r.get_json()["error"]["message"]


def test_help_names_the_loosening_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["ingest", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--allow-loosening" in out and "DEFAULT_VISIBILITY" in out and "held back" in out


# --- 10. property: random sequences of writes never loosen without an explicit act --------------------

DEPTS = ("Finance", "Library")
PRINCIPALS = [STUDENT, Principal("fin", DEFAULT_ROLES["staff"], departments=("Finance",)),
              Principal("lib", DEFAULT_ROLES["staff"], departments=("Library",)),
              Principal("aca", DEFAULT_ROLES["academic"]), ADMIN]


def _random_meta(rng: Any) -> dict[str, Any]:
    """A random subset of access fields, as a source might state them."""
    out: dict[str, Any] = {}
    if rng.random() < 0.6:
        out["visibility"] = rng.choice(("public", "department"))
    if rng.random() < 0.6:
        out["department"] = rng.choice(DEPTS)
    if rng.random() < 0.6:
        out["clearance_level"] = rng.randint(1, 5)
    if rng.random() < 0.2:
        out["priority"] = rng.randint(1, 5)
    return out


def _yaml(meta: dict[str, Any]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in meta.items())


def _all_stored(services: Any) -> dict[str, Any]:
    from campus_search.ingest.metadata import AccessMetadata

    with services.db.connection(read=False) as conn:
        rows = conn.execute("SELECT external_id, department, visibility, clearance_level, campus, priority, "
                            "last_reviewed, pinned FROM documents").fetchall()
    return {r[0]: (AccessMetadata(*r[1:7]), set(r[7] or ())) for r in rows}


def test_random_write_sequences_never_loosen_without_an_explicit_act(
        env: Settings, services: Any, client: Any, admin: dict[str, str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Seeded random sequences of CLI ingests (with and without flags, with and without
    --allow-loosening), sidecar and front-matter edits, PATCHes (with pins and unpins) and uploads.
    After every step: no document is looser than before the step unless that step was an explicit
    loosening act, a pinned field never loosens through a file, and what the real searcher shows each
    kind of user is exactly what the visibility rule allows for the stored metadata."""
    import random

    from campus_search.ingest.metadata import loosenings
    from campus_search.security.roles import is_visible

    rng = random.Random(20261130)
    docs = tmp_path / "docs"
    files = [f"f{i}.md" for i in range(3)]
    for i, name in enumerate(files):
        md(docs / name, "", f"# Policy {i}\n\nPolicy number {i} about campus parking permits.\n")
    code, _, err = run(capsys, str(docs), "--visibility", "department", "--department", "Finance",
                       "--clearance", "3")
    assert code == 0, err
    assert client.put("/api/admin/documents/api-0", headers=admin, json={
        "text": "# Policy api\n\nPolicy about campus parking permits, uploaded.", "metadata": {
            "visibility": "department", "department": "Library", "clearance_level": 2}}).status_code == 201
    before = _all_stored(services)
    explicit_steps = 0
    for step in range(36):
        kind = rng.choice(("ingest", "sidecar", "front", "patch", "upload"))
        explicit = False
        if kind == "ingest":
            argv = [str(docs)]
            for flag, meta_key in (("--visibility", "visibility"), ("--department", "department"),
                                   ("--clearance", "clearance_level")):
                value = _random_meta(rng).get(meta_key)
                if value is not None:
                    argv += [flag, str(value)]
            if rng.random() < 0.25:
                argv.append("--allow-loosening")
                explicit = True
            run(capsys, *argv)
        elif kind in ("sidecar", "front"):
            name = rng.choice(files)
            meta = _random_meta(rng)
            if kind == "sidecar":
                (docs / (name + ".meta.yaml")).write_text(_yaml(meta) + "\n")
            else:
                md(docs / name, _yaml(meta), f"# Policy {name}\n\nPolicy {name} about campus parking permits, "
                                             f"edit {step}.\n")
            explicit = rng.random() < 0.25
            run(capsys, str(docs), *(["--allow-loosening"] if explicit else []))
        elif kind == "patch":
            target = rng.choice([*files, "api-0"])
            body: dict[str, Any] = {"metadata": _random_meta(rng)}
            if rng.random() < 0.2:
                body = {"unpin": ["clearance_level", "visibility", "department"]}
            elif rng.random() < 0.3:
                body["allow_loosening"] = explicit = True
            r = client.patch(f"/api/admin/documents/{target}", json=body, headers=admin)
            assert r.status_code in (200, 400, 409), r.get_json()
        else:
            front = _random_meta(rng)
            body = {"text": f"---\n{_yaml(front)}\n---\n# Policy api\n\nPolicy about campus parking permits, "
                            f"upload {step}." if front else f"# Policy api\n\nParking permits, upload {step}.",
                    "metadata": _random_meta(rng) if rng.random() < 0.5 else {}}
            if rng.random() < 0.3:
                body["allow_loosening"] = explicit = True
            r = client.put("/api/admin/documents/api-0", json=body, headers=admin)
            assert r.status_code in (200, 400, 409), r.get_json()
        explicit_steps += explicit
        after = _all_stored(services)
        assert set(after) == set(before), (step, kind)
        for doc_id, (meta, _pins) in after.items():
            old, old_pins = before[doc_id]
            loose = loosenings(old, meta)
            if not explicit:
                assert loose == [], (step, kind, doc_id, old, meta)
            elif kind in ("ingest", "sidecar", "front"):  # a file writer, even with the flag, keeps pins
                assert not {c.field for c in loose} & old_pins, (step, kind, doc_id, old, meta, old_pins)
        seen = {p.user_id: {h.document_id for h in hits(services, "campus parking permits policy", p)}
                for p in PRINCIPALS}
        for p in PRINCIPALS:
            expected = {doc_id for doc_id, (meta, _) in after.items()
                        if is_visible({"clearance_level": meta.clearance_level, "visibility": meta.visibility,
                                       "department": meta.department}, p)}
            assert seen[p.user_id] == expected, (step, kind, p.user_id)
        before = after
    assert explicit_steps >= 3  # the sequence exercised explicit acts too


def test_a_department_wide_change_is_applied_in_one_transaction(services: Any) -> None:
    """A change of many documents' access (a folder's visibility, more documents than one write batch)
    is seen by searches all at once: between the run's batches nothing of it is visible, at the end all
    of it. Observed from another session after every batch (ingestion's progress callback)."""
    import psycopg

    from campus_search.ingest import pipeline
    from campus_search.ingest.sources import Block, ParsedDocument
    from campus_search.security.access import visible_sql

    n = pipeline.DOC_BATCH * 2 + 10
    docs = [ParsedDocument(external_id=f"fin-{i}", title=f"Finance note {i}", source=f"finance/{i}.md",
                           blocks=[Block(f"Expense claim rule {i} of the finance office.")]) for i in range(n)]
    dept = {"department": "Finance", "visibility": "department", "clearance_level": 1}
    assert services.ingester.ingest(docs, dept).added == n
    rule, params = visible_sql(STUDENT)

    def visible_to_a_student() -> int:
        with psycopg.connect(services.dsn, autocommit=True) as conn:  # committed state only
            return int(conn.execute(f"SELECT count(*) FROM documents d WHERE external_id LIKE 'fin-%%' AND {rule}",
                                    params).fetchone()[0])

    seen: list[int] = []
    report = services.ingester.ingest(docs, {**dept, "visibility": "public"}, allow_loosening=True,
                                      progress=lambda *_: seen.append(visible_to_a_student()),
                                      audit=cli.LooseningAudit(services))
    assert report.failed == 0 and report.metadata_updated == n and report.loosened == n
    assert seen == [0, 0, n]  # after each full batch nothing, after the run (the last batch) all of it
    hits = services.searcher.search(STUDENT, SearchParams(query="expense claim rule finance office", max_results=5,
                                                          similarity_threshold=-1))
    assert hits and all(h.document_id.startswith("fin-") for h in hits)
