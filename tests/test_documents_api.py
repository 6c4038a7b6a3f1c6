"""Admin document API on a fresh real database: list, upsert (JSON and file upload), metadata-only
updates, delete, permissions, bad input, and the audit trail."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docfiles import write_docx, write_pdf

from campus_search.retrieval.params import SearchParams
from campus_search.security.roles import DEFAULT_ROLES, Principal

GUIDE = ("# Printing Guide\n\n## Printing from a laptop\n\nInstall the Papercut client, then print to the "
         "follow-me queue and release the job at any university printer with your staff card.\n\n"
         "## Costs\n\nBlack and white pages cost five pence; colour pages cost twenty pence.\n")
STUDENT = Principal("s1", DEFAULT_ROLES["student"])


@pytest.fixture
def app_env(settings_factory: Any, embedder: Any) -> Iterator[tuple[Any, Any]]:
    from campus_search.app import create_app
    from campus_search.services import Services

    # documents nobody restricts are public here, as before DEFAULT_VISIBILITY existed
    # (tests/test_access_writes.py covers the shipped default, department)
    settings = settings_factory(max_document_bytes=200_000, rate_limits_enabled=False, default_visibility="public")
    services = Services(settings, embedder=embedder).ensure_open()
    app = create_app(services)
    app.config["TESTING"] = True
    yield app.test_client(), services
    services.close()


@pytest.fixture
def admin(token: Any) -> dict[str, str]:
    return {"Authorization": token("it_administrator", sub="admin-7")}


def visible_titles(services: Any, query: str, user: Principal = STUDENT) -> list[str]:
    return [h.document_title for h in services.searcher.search(user, SearchParams(query, max_results=10))]


def test_only_admins(app_env: Any, token: Any) -> None:
    client, _ = app_env
    assert client.get("/api/admin/documents").status_code == 401
    for role in ("student", "academic_staff", "professional_services"):
        r = client.put("/api/admin/documents/x", json={"text": "Hello."}, headers={"Authorization": token(role)})
        assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
        assert client.delete("/api/admin/documents/x", headers={"Authorization": token(role)}).status_code == 403


def test_upsert_then_unchanged_then_metadata_only(app_env: Any, admin: dict[str, str]) -> None:
    client, services = app_env
    r = client.put("/api/admin/documents/it/printing", json={"text": GUIDE}, headers=admin)
    assert r.status_code == 201, r.get_json()
    body = r.get_json()
    assert body["status"] == "added" and body["chunk_count"] == body["chunks_embedded"] == 2
    assert body["metadata"]["visibility"] == "public" and body["metadata"]["clearance_level"] == 1
    assert "Printing Guide" in visible_titles(services, "how much does colour printing cost")

    again = client.put("/api/admin/documents/it/printing", json={"text": GUIDE}, headers=admin).get_json()
    assert (again["status"], again["chunks_embedded"]) == ("unchanged", 0)

    raised = client.put("/api/admin/documents/it/printing", headers=admin, json={
        "text": GUIDE, "metadata": {"clearance_level": 3, "department": "IT Services"}}).get_json()
    assert (raised["status"], raised["chunks_embedded"]) == ("metadata_updated", 0)
    assert "Printing Guide" not in visible_titles(services, "how much does colour printing cost")

    # new text without metadata keeps the stored access metadata (never silently public again)
    edited = GUIDE.replace("five pence", "six pence")
    r = client.put("/api/admin/documents/it/printing", json={"text": edited}, headers=admin).get_json()
    assert (r["status"], r["chunks_embedded"], r["chunk_count"]) == ("updated", 1, 2)
    assert r["metadata"]["clearance_level"] == 3 and r["metadata"]["department"] == "IT Services"


def test_patch_metadata_only(app_env: Any, admin: dict[str, str]) -> None:
    client, services = app_env
    client.put("/api/admin/documents/guide", json={"text": GUIDE}, headers=admin)
    row_versions = ("SELECT (SELECT array_agg(xmin::text || ctid::text ORDER BY id) FROM chunks), "
                    "(SELECT array_agg(xmin::text || ctid::text ORDER BY term, chunk_id) FROM lexical_postings)")
    with services.db.connection(read=True) as conn:
        before = conn.execute(row_versions).fetchone()
    r = client.patch("/api/admin/documents/guide", headers=admin,
                     json={"metadata": {"clearance_level": 4, "priority": 5, "last_reviewed": "2025-01-31"}})
    assert r.status_code == 200, r.get_json()
    meta = r.get_json()["metadata"]
    assert (meta["clearance_level"], meta["priority"], meta["last_reviewed"]) == (4, 5, "2025-01-31T00:00:00")
    assert "Printing Guide" not in visible_titles(services, "print to the follow-me queue")
    with services.db.connection(read=True) as conn:
        # access by reference (migration 017): the document row changed, no chunk row and no posting was
        # rewritten (so no vector index entry either): that is what keeps a large change fast and atomic
        assert conn.execute("SELECT clearance_level FROM documents WHERE external_id = 'guide'").fetchone()[0] == 4
        assert conn.execute(row_versions).fetchone() == before

    for bad, message in [({"metadata": {"colour": "red"}}, "unknown metadata key 'colour'"),
                         ({"metadata": {"clearance_level": 9}}, "clearance_level must be between 1 and 5"),
                         ({"metadata": {"visibility": "department"}}, "needs a department"),
                         ({"clearance_level": 2}, "send {\"metadata\""), ([1], "send {\"metadata\"")]:
        r = client.patch("/api/admin/documents/guide", json=bad, headers=admin)
        assert r.status_code == 400 and message in r.get_json()["error"]["message"], (bad, r.get_json())
    r = client.patch("/api/admin/documents/missing", json={"metadata": {"priority": 1}}, headers=admin)
    assert r.status_code == 404


def test_file_uploads_pdf_and_docx(app_env: Any, admin: dict[str, str], tmp_path: Path) -> None:
    client, services = app_env
    pdf = write_pdf(tmp_path / "fees.pdf", [["Tuition fees are due in two instalments each year."],
                                            ["Refunds of overpaid fees take ten working days."]],
                    title="Fees Policy", bookmarks=[("Payment", 0), ("Refunds", 1)])
    r = client.put("/api/admin/documents/finance/fees", headers=admin, content_type="multipart/form-data", data={
        "file": (io.BytesIO(pdf.read_bytes()), "fees.pdf"),
        "metadata": json.dumps({"department": "Finance", "visibility": "department", "clearance_level": 2})})
    assert r.status_code == 201, r.get_json()
    doc = client.get("/api/admin/documents/finance/fees", headers=admin).get_json()
    assert doc["title"] == "Fees Policy" and doc["last_page"] == 2 and doc["sections"] == ["Payment", "Refunds"]
    assert doc["metadata"]["department"] == "Finance" and doc["source"] == "api:fees.pdf"
    staff = Principal("f1", DEFAULT_ROLES["staff"], departments=("Finance",))
    hits = services.searcher.search(staff, SearchParams("how long do fee refunds take", max_results=3))
    assert (hits[0].document_title, hits[0].page_number, hits[0].section_title) == ("Fees Policy", 2, "Refunds")

    docx_file = write_docx(tmp_path / "leave.docx", "Annual Leave", [("Entitlement", ["Thirty days a year."])])
    r = client.put("/api/admin/documents/hr/leave", headers=admin, content_type="multipart/form-data",
                   data={"file": (io.BytesIO(docx_file.read_bytes()), "leave.docx"), "title": "Leave Policy"})
    assert r.status_code == 201 and r.get_json()["metadata"]["visibility"] == "public"
    assert client.get("/api/admin/documents/hr/leave", headers=admin).get_json()["title"] == "Leave Policy"


def test_bad_uploads_are_4xx_and_change_nothing(app_env: Any, admin: dict[str, str]) -> None:
    client, _ = app_env
    client.put("/api/admin/documents/keep", json={"text": GUIDE}, headers=admin)
    cases = [
        ({"data": {"file": (io.BytesIO(b"%PDF-1.4 garbage"), "x.pdf")}, "content_type": "multipart/form-data"},
         422, "not a readable PDF"),
        ({"data": {"file": (io.BytesIO(b"MZ"), "tool.exe")}, "content_type": "multipart/form-data"},
         400, "unsupported file type .exe"),
        ({"data": {"file": (io.BytesIO(b"# T\n\nx"), "a.md"), "colour": "red"},
          "content_type": "multipart/form-data"}, 400, "unknown form fields"),
        ({"json": {"text": ""}}, 400, "text must be a non-empty string"),
        ({"json": {"text": "x", "format": "rtf"}}, 400, "format must be one of"),
        ({"json": {"text": "x", "format": {}}}, 400, "format must be one of"),  # schemathesis found a 500
        ({"json": {"text": "x", "owner": "me"}}, 400, "unknown fields ['owner']"),
        ({"json": {"text": "x", "metadata": {"priority": "high"}}}, 400, "priority must be an integer"),
        ({"data": "not json", "content_type": "application/json"}, 400, "send a JSON object"),
        ({"json": {"text": "   \n\n  "}}, 400, "text must be a non-empty string"),
        ({"json": {"text": "---\nclearance_level: 1\n---\n"}}, 422, "no text found"),
        ({"json": {"text": "x" * 300_000}}, 413, "MAX_DOCUMENT_BYTES"),
    ]
    for kwargs, status, message in cases:
        r = client.put("/api/admin/documents/keep", headers=admin, **kwargs)
        body = r.get_json()
        assert r.status_code == status and message in body["error"]["message"], (kwargs.get("json"), body)
        assert "Traceback" not in json.dumps(body)
    doc = client.get("/api/admin/documents/keep", headers=admin).get_json()
    assert doc["title"] == "Printing Guide" and doc["chunk_count"] == 2


def test_list_and_delete(app_env: Any, admin: dict[str, str]) -> None:
    client, services = app_env
    for i, dept in enumerate(["IT Services", "Library", "IT Services"]):
        client.put(f"/api/admin/documents/doc-{i}", headers=admin,
                   json={"text": f"# Doc {i}\n\nBody {i} about topic {i}.", "metadata": {"department": dept}})
    listing = client.get("/api/admin/documents?limit=2", headers=admin).get_json()
    assert listing["total"] == 3 and [d["document_id"] for d in listing["documents"]] == ["doc-0", "doc-1"]
    assert listing["documents"][0]["chunk_count"] == 1
    page2 = client.get("/api/admin/documents?limit=2&offset=2", headers=admin).get_json()
    assert [d["document_id"] for d in page2["documents"]] == ["doc-2"]
    it = client.get("/api/admin/documents?department=IT%20Services", headers=admin).get_json()
    assert [d["document_id"] for d in it["documents"]] == ["doc-0", "doc-2"]
    assert client.get("/api/admin/documents?q=doc%201", headers=admin).get_json()["total"] == 1
    for bad in ("limit=0", "limit=x", "offset=-1", "sort=title"):
        assert client.get(f"/api/admin/documents?{bad}", headers=admin).status_code == 400

    r = client.delete("/api/admin/documents/doc-1", headers=admin)
    assert r.status_code == 200 and r.get_json()["deleted"] is True
    assert client.delete("/api/admin/documents/doc-1", headers=admin).status_code == 404
    assert client.get("/api/admin/documents/doc-1", headers=admin).status_code == 404
    assert "Doc 1" not in visible_titles(services, "body about topic 1")
    assert client.get("/api/admin/documents", headers=admin).get_json()["total"] == 2


def test_changes_are_audited(app_env: Any, admin: dict[str, str]) -> None:
    client, services = app_env
    client.put("/api/admin/documents/a", json={"text": GUIDE}, headers=admin)
    client.patch("/api/admin/documents/a", json={"metadata": {"priority": 5}}, headers=admin)
    client.delete("/api/admin/documents/a", headers=admin)
    client.delete("/api/admin/documents/a", headers=admin)  # 404: audited as a failure
    with services.db.connection(read=True) as conn:
        rows = conn.execute("SELECT action, target, user_id, success, status, details FROM audit_log "
                            "WHERE kind = 'admin' ORDER BY seq").fetchall()
    assert [(a, t, u, s) for a, t, u, s, _, _ in rows] == [
        ("document.upsert", "a", "admin-7", True), ("document.metadata", "a", "admin-7", True),
        ("document.delete", "a", "admin-7", True), ("document.delete", "a", "admin-7", False)]
    assert json.loads(rows[0][5])["status"] == "added" and rows[3][4] == 404
