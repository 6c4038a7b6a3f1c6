"""Group ACLs end to end (SPEC §2 "Groups"): documents given groups by every ingestion source (CLI flags,
folder file, front matter, sidecar, JSONL), tokens minted by `campus-search token --group`, the real server
(gunicorn on loopback) over real PostgreSQL answering searches, explain and admin changes, and the audit
log saying what happened -- without ever putting a claim's group list into a search record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import TEST_SECRET, serving

from campus_search.config import Settings
from campus_search.security.auth import mint_token

CLI = [sys.executable, "-m", "campus_search.cli.main"]
AUDIT_KEY = "audit-" + "g" * 40


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CLI + args, capture_output=True, text=True, env=env, timeout=300)


def write_corpus(root: Path) -> Path:
    docs = root / "docs"
    (docs / "inf101").mkdir(parents=True)
    (docs / "inf101" / ".campus-search.yaml").write_text("visibility: group\ngroups: [course-inf101]\n")
    (docs / "inf101" / "compilers-coursework.md").write_text(
        "# Compilers coursework\n\nThe compilers coursework deadline is week 9; submit the parser and the "
        "type checker through the course submission system.\n")
    (docs / "inf101" / "exam-board-minutes.md").write_text(
        "---\ngroups: [committee-exam-board]\n---\n# Exam board minutes\n\nThe exam board discussed the "
        "compilers coursework marks and moderation of borderline cases.\n")
    (docs / "inf101" / "course-welcome.md").write_text(
        "# Welcome to the compilers course\n\nWelcome: lectures on compilers start in week 1 in Appleton Tower.\n")
    (docs / "inf101" / "course-welcome.md.meta.yaml").write_text("visibility: public\n")
    (root / "projects.jsonl").write_text(json.dumps({
        "_id": "robotics-plan", "title": "Robotics project plan", "visibility": "group",
        "groups": ["project-robotics"], "department": "Informatics",
        "text": "The robotics project plan: the compilers for the robot controller are due in week 9."}) + "\n")
    return docs


@pytest.fixture(scope="module")
def deployment(make_database: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("groups-e2e")
    dsn = make_database()
    env = {**os.environ, "DATABASE_URL": dsn, "JWT_SECRET_KEY": TEST_SECRET, "AUDIT_HMAC_KEY": AUDIT_KEY,
           "DATA_DIR": str(tmp / "data"), "DB_POOL_MIN_SIZE": "1", "DB_POOL_MAX_SIZE": "4",
           "EMBEDDING_THREADS": "1", "REDIS_URL": "memory://", "CACHE_ENABLED": "true"}
    for name in ("REDIS_HOST", "DATABASE_READ_URL"):
        env.pop(name, None)
    docs = write_corpus(tmp)
    first = run(["ingest", str(docs), "--quiet", "--department", "Informatics"], env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.strip().splitlines()[-1])["added"] == 3
    jsonl = run(["ingest", str(tmp / "projects.jsonl"), "--quiet"], env)
    assert jsonl.returncode == 0, jsonl.stderr
    with serving(env, tmp, workers=1, threads=2) as base:
        yield {"base": base, "env": env, "dsn": dsn, "tmp": tmp}


def cli_token(env: dict[str, str], *args: str) -> str:
    out = run(["token", *args], env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def call(base: str, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def found(base: str, token: str, query: str = "compilers coursework deadline week 9") -> dict[str, list[str]]:
    status, body = call(base, "POST", "/api/search", token,
                        {"query": query, "config": {"max_results": 20, "similarity_threshold": -1}})
    assert status == 200, body
    out: dict[str, list[str]] = {}
    for hit in body["results"]:
        out.setdefault(hit["document_id"], hit["metadata"]["groups"])
    return out


def audit_rows(dsn: str, where: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"SELECT action, target, details, success FROM audit_log WHERE {where} ORDER BY seq"
                            ).fetchall()


def test_members_see_their_groups_documents_through_every_source_and_path(deployment: dict[str, Any]) -> None:
    base, env = deployment["base"], deployment["env"]
    member = cli_token(env, "--sub", "s-inf101", "--role", "student", "--group", "course-inf101")
    board = cli_token(env, "--sub", "s-board", "--role", "academic_staff", "--group", "committee-exam-board")
    robot = cli_token(env, "--sub", "s-robot", "--role", "student", "--group", "project-robotics",
                      "--group", "course-other")
    outsider = cli_token(env, "--sub", "s-none", "--role", "student")
    academic = cli_token(env, "--sub", "a-none", "--role", "academic_staff", "--department", "Informatics")
    informatics_staff = cli_token(env, "--sub", "t-inf", "--role", "professional_services",
                                  "--department", "Informatics")
    admin = cli_token(env, "--sub", "root", "--role", "it_administrator")
    every = {"inf101/compilers-coursework.md", "inf101/exam-board-minutes.md", "inf101/course-welcome.md",
             "robotics-plan"}

    # the folder file's group (with the CLI's department), front matter's own group, the sidecar's public
    # (the public welcome page keeps the folder's groups: stated, but they only matter under visibility group)
    assert found(base, member) == {"inf101/compilers-coursework.md": ["course-inf101"],
                                   "inf101/course-welcome.md": ["course-inf101"]}
    assert set(found(base, board)) == {"inf101/exam-board-minutes.md", "inf101/course-welcome.md"}
    assert found(base, robot) == {"robotics-plan": ["project-robotics"], "inf101/course-welcome.md": ["course-inf101"]}
    # not a member: no group document, whatever the role's department scope or the owning department
    for token in (outsider, academic, informatics_staff):
        assert set(found(base, token)) == {"inf101/course-welcome.md"}
    assert set(found(base, admin)) == every  # admins see all

    # explain agrees: the Python rule, the SQL predicate and the reasons
    status, body = call(base, "GET", "/api/admin/explain?document_id=inf101/compilers-coursework.md&role=student"
                        "&group=course-inf101&group=course-x", admin)
    assert status == 200, body
    assert body["visible"] is True and body["consistent"] is True and body["chunks"]["visible"] >= 1
    assert body["document"]["groups"] == ["course-inf101"] and body["user"]["group_scope"] == "member"
    assert any("user's group ['course-inf101']" in r for r in body["reasons"])
    status, body = call(base, "GET", "/api/admin/explain?document_id=inf101/compilers-coursework.md"
                        "&role=academic_staff&department=Informatics", admin)
    assert body["visible"] is False and body["consistent"] is True and body["chunks"]["visible"] == 0
    assert any("restricted to group ['course-inf101']" in r for r in body["reasons"])

    # admin API: adding a group loosens (409 without the explicit act), then applies with it
    doc = "/api/admin/documents/inf101/compilers-coursework.md"
    status, body = call(base, "PATCH", doc, admin, {"metadata": {"groups": ["course-inf101", "course-other"]}})
    assert status == 409 and body["error"]["code"] == "loosening_refused", body
    assert body["error"]["details"]["loosened"] == [{"field": "groups", "before": ["course-inf101"],
                                                     "after": ["course-inf101", "course-other"]}]
    assert "inf101/compilers-coursework.md" not in found(base, robot)  # nothing changed (and cached pages too)
    status, body = call(base, "PATCH", doc, admin, {"metadata": {"groups": ["course-inf101", "course-other"]},
                                                    "allow_loosening": True})
    assert status == 200, body
    assert found(base, robot)["inf101/compilers-coursework.md"] == ["course-inf101", "course-other"]
    # department <-> group is another audience: a loosening too
    status, body = call(base, "PATCH", doc, admin, {"metadata": {"visibility": "department"}})
    assert status == 409 and body["error"]["details"]["loosened"][0]["field"] == "visibility"
    # removing a group tightens: applies without the act, and the removed group's members lose it at once
    status, body = call(base, "PATCH", doc, admin, {"metadata": {"groups": ["course-other"]}})
    assert status == 200 and body["metadata"]["groups"] == ["course-other"]
    assert "inf101/compilers-coursework.md" not in found(base, member)
    assert "groups" in body["pinned"]

    # audit: the change's before and after groups; searches count the claim's groups and never list them
    changes = audit_rows(deployment["dsn"], "action = 'document.metadata' AND success")
    details = [json.loads(d) for _a, _t, d, _s in changes]
    assert [(d["before"]["groups"], d["after"]["groups"]) for d in details] == [
        (["course-inf101"], ["course-inf101", "course-other"]), (["course-inf101", "course-other"], ["course-other"])]
    searches = audit_rows(deployment["dsn"], "action = 'search' AND user_id = 's-robot'")
    assert searches and all(json.loads(d)["groups"] == 2 for _a, _t, d, _s in searches)
    assert not any("project-robotics" in (d or "") for _a, _t, d, _s in audit_rows(deployment["dsn"],
                                                                                    "action = 'search'"))


def test_a_malformed_groups_claim_gives_no_group_access_and_is_said(deployment: dict[str, Any]) -> None:
    base = deployment["base"]
    settings = Settings(jwt_secret_key=TEST_SECRET, data_dir="/nonexistent")
    too_many = mint_token(settings, sub="s-flood", role="student",
                          extra={"groups": ["project-robotics", *(f"g{i}" for i in range(600))]})
    assert set(found(base, too_many)) == {"inf101/course-welcome.md"}  # 200, public only: never a 500
    wrong_type = mint_token(settings, sub="s-dict", role="student", extra={"groups": {"project-robotics": 1}})
    assert set(found(base, wrong_type)) == {"inf101/course-welcome.md"}
    # a bad entry is dropped, the good ones kept
    mixed = mint_token(settings, sub="s-mixed", role="student", extra={"groups": ["project-robotics", 7, "x" * 300]})
    assert "robotics-plan" in found(base, mixed)
    problems = {user: json.loads(d).get("groups_problem") for user, d in _search_details(deployment["dsn"])}
    assert "more than 500" in problems["s-flood"] and "ignored" in problems["s-dict"]
    assert "2 groups claim entries" in problems["s-mixed"]


def test_admin_put_with_groups_json_and_front_matter(deployment: dict[str, Any]) -> None:
    base, env = deployment["base"], deployment["env"]
    admin = cli_token(env, "--sub", "root2", "--role", "it_administrator")
    member = mint_token(Settings(jwt_secret_key=TEST_SECRET, data_dir="/nonexistent"), sub="s-ethics",
                        role="student", groups=["committee-ethics"])
    text = "Ethics committee: compilers coursework deadline week 9 extensions need committee approval."
    status, body = call(base, "PUT", "/api/admin/documents/ethics-notes", admin, {
        "text": text, "metadata": {"visibility": "group", "groups": ["committee-ethics"],
                                   "department": "Informatics"}})
    assert status in (200, 201), body
    status, body = call(base, "PUT", "/api/admin/documents/ethics-agenda", admin, {
        "format": "markdown", "text": "---\nvisibility: group\ngroups: [committee-ethics]\n---\n# Agenda\n\n"
                                      "Compilers coursework deadline week 9: the committee's agenda.\n"})
    assert status in (200, 201), body
    assert {"ethics-notes", "ethics-agenda"} <= set(found(base, member))
    outsider = cli_token(env, "--sub", "s-none2", "--role", "academic_staff")
    assert not {"ethics-notes", "ethics-agenda"} & set(found(base, outsider))
    # a group visibility without groups is a 400 that says what is missing, and nothing is stored
    status, body = call(base, "PUT", "/api/admin/documents/ethics-bad", admin,
                        {"text": text, "metadata": {"visibility": "group"}})
    assert status == 400 and "needs groups" in body["error"]["message"], body


def _search_details(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT user_id, details FROM audit_log WHERE action = 'search' "
                            "AND user_id IN ('s-flood', 's-dict', 's-mixed') ORDER BY seq").fetchall()


def test_cli_ingest_holds_back_added_groups_until_allowed_and_audits_them(deployment: dict[str, Any]) -> None:
    env, tmp = deployment["env"], deployment["tmp"]
    path = tmp / "projects.jsonl"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "groups": ["project-robotics", "project-drones"]}) + "\n")
    held = run(["ingest", str(path)], env)
    assert held.returncode == 0, held.stderr
    assert json.loads(held.stdout.strip().splitlines()[-1])["held_back"] == 1
    assert "groups stays ['project-robotics']" in held.stdout + held.stderr
    done = run(["ingest", str(path), "--allow-loosening", "--quiet"], env)
    assert done.returncode == 0 and json.loads(done.stdout.strip().splitlines()[-1])["loosened"] == 1
    (details,) = [json.loads(d) for _a, _t, d, _s in audit_rows(deployment["dsn"], "action = 'ingest.loosen'")]
    assert details["before"]["groups"] == ["project-robotics"]
    assert details["after"]["groups"] == ["project-drones", "project-robotics"]
    drones = mint_token(Settings(jwt_secret_key=TEST_SECRET, data_dir="/nonexistent"), sub="s-drone",
                        role="student", groups=["project-drones"])
    assert "robotics-plan" in found(deployment["base"], drones)
