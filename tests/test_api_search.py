"""POST /api/search against the real demo corpus in PostgreSQL + pgvector."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

STAFF_GUIDE = "IT Staff Password Management Guide"


def search(client: Any, auth: str | None, body: Any, **kw: Any) -> Any:
    headers = {"Authorization": auth} if auth else {}
    return client.post("/api/search", json=body, headers=headers, **kw)


def test_staff_finds_their_department_guide(client: Any, token: Any) -> None:
    auth = token("professional_services", sub="staff123", departments=["IT Services"], campus="King's Buildings")
    r = search(client, auth, {"query": "password reset instructions for staff",
                              "filters": {"department": "IT Services", "min_priority": 3},
                              "config": {"max_results": 5, "similarity_threshold": 0.3}})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert set(body) >= {"results", "count", "query", "response_time", "from_cache", "request_id", "user_id",
                         "timestamp"}
    assert body["user_id"] == "staff123"
    assert body["request_id"].startswith("req_")
    assert body["count"] == len(body["results"]) > 0
    top = body["results"][0]
    assert top["document_title"] == STAFF_GUIDE
    assert top["section_title"] == "Password Reset Procedures"
    assert set(top["metadata"]) >= {"department", "priority", "campus", "clearance_level", "last_reviewed"}
    assert top["metadata"]["last_reviewed"] == "2024-08-15T10:30:00"
    for hit in body["results"]:
        assert hit["metadata"]["department"] == "IT Services"
        assert hit["metadata"]["priority"] >= 3
        assert hit["similarity"] >= 0.3
    scores = [h["combined_score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_campus_bonus_and_priority_in_combined_score(client: Any, token: Any) -> None:
    body = {"query": "password reset instructions for staff", "config": {"max_results": 3}}
    kb = search(client, token("staff", departments=["IT Services"], campus="King's Buildings"), body).get_json()
    eb = search(client, token("staff", departments=["IT Services"], campus="Easter Bush"), body).get_json()
    top_kb = kb["results"][0]
    top_eb = next(h for h in eb["results"] if h["text"] == top_kb["text"])
    assert top_kb["similarity"] == top_eb["similarity"]
    # King's Buildings document, priority 4: +0.1 campus bonus only for the King's Buildings user
    assert top_kb["combined_score"] - top_eb["combined_score"] == pytest.approx(0.1, abs=1e-3)
    # Priority: over a page whose documents have different priorities, every combined score is the
    # relevance plus 0.03 per priority step from 3, the campus bonus and the freshness term (docs/ranking.md).
    wide = search(client, token("admin", campus="King's Buildings"),
                  {"query": "university services", "config": {"max_results": 30, "similarity_threshold": -1}})
    hits = wide.get_json()["results"]
    assert len({h["metadata"]["priority"] for h in hits}) >= 3, "the page must vary priority"
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    for h in hits:
        md = h["metadata"]
        bonus = {"King's Buildings": 0.10}.get(md["campus"], 0.0)
        age = (now - dt.datetime.fromisoformat(md["last_reviewed"])).total_seconds() / 86400 \
            if md["last_reviewed"] else None
        fresh = 0.02 * max(0.0, 1 - max(0.0, age) / 730) if age is not None else 0.0
        expected = h["scores"]["relevance"] + 0.03 * (md["priority"] - 3) + bonus + fresh
        assert h["combined_score"] == pytest.approx(expected, abs=2e-4), h["document_title"]
    scores = [h["combined_score"] for h in hits]
    assert scores == sorted(scores, reverse=True)


def test_student_never_sees_department_content(client: Any, token: Any) -> None:
    r = search(client, token("student", departments=["IT Services"]),
               {"query": "password reset instructions for staff", "config": {"max_results": 20}})
    assert r.status_code == 200
    results = r.get_json()["results"]
    assert results, "public password guidance exists"
    for hit in results:
        assert hit["document_title"] != STAFF_GUIDE
        assert hit["metadata"]["clearance_level"] <= 2
        assert hit["metadata"]["visibility"] == "public"


def test_staff_of_another_department_gets_only_public_it_content(client: Any, token: Any) -> None:
    r = search(client, token("staff", departments=["Library"]),
               {"query": "password reset procedures", "config": {"max_results": 20}})
    assert r.status_code == 200
    results = r.get_json()["results"]
    assert results, "public password guidance exists"
    assert any(h["metadata"]["department"] == "IT Services" for h in results), "public IT content is found"
    for hit in results:
        md = hit["metadata"]
        assert md["visibility"] == "public" or md["department"] == "Library"
        assert md["clearance_level"] <= 3
        assert hit["document_title"] != STAFF_GUIDE  # IT Services' department-only guide
    # ... which IT staff do get for the same query
    it = search(client, token("staff", departments=["IT Services"]),
                {"query": "password reset procedures", "config": {"max_results": 20}}).get_json()["results"]
    assert any(h["document_title"] == STAFF_GUIDE for h in it)


def test_admin_sees_clearance_five(client: Any, token: Any) -> None:
    q = {"query": "staff disciplinary procedure gross misconduct hearing", "config": {"max_results": 5}}
    admin = search(client, token("it_administrator"), q).get_json()["results"]
    top_secret = {h["document_title"] for h in admin if h["metadata"]["clearance_level"] == 5}
    assert top_secret
    academic = search(client, token("academic_staff"), q).get_json()["results"]
    assert academic, "academics still get the content at their clearance"
    assert all(h["metadata"]["clearance_level"] <= 4 for h in academic)
    assert not top_secret & {h["document_title"] for h in academic}


def test_filters_narrow_and_threshold_applies(client: Any, token: Any) -> None:
    auth = token("admin")
    filters = {"campus": "Central Campus", "visibility": "public", "last_reviewed_after": "2023-01-01"}
    unfiltered = search(client, auth, {"query": "library", "config": {"max_results": 50, "similarity_threshold": 0.25}})
    r = search(client, auth, {"query": "library", "filters": filters,
                              "config": {"max_results": 50, "similarity_threshold": 0.25}})
    assert r.status_code == 200
    results = r.get_json()["results"]
    assert results, "public Central Campus library content reviewed since 2023 exists"
    for hit in results:
        assert hit["metadata"]["campus"] == "Central Campus"
        assert hit["metadata"]["visibility"] == "public"
        assert hit["metadata"]["last_reviewed"] >= "2023-01-01"
        assert hit["similarity"] >= 0.25
    everything = unfiltered.get_json()["results"]
    assert len(results) < len(everything)  # the filters removed something ...
    assert any(h["metadata"]["campus"] != "Central Campus" or h["metadata"]["visibility"] != "public"
               for h in everything)  # ... that the unfiltered search returns
    assert min(h["similarity"] for h in everything) >= 0.25
    assert any(h["similarity"] < 0.25 for h in search(client, auth, {
        "query": "library", "config": {"max_results": 50, "similarity_threshold": -1}}).get_json()["results"])
    none = search(client, auth, {"query": "library", "config": {"similarity_threshold": 0.99}}).get_json()
    assert none["count"] == 0 and none["results"] == []


def test_max_results_clamped_to_role_cap(client: Any, token: Any) -> None:
    r = search(client, token("student"), {"query": "university", "config": {"max_results": 500,
                                                                              "similarity_threshold": -1}})
    assert r.status_code == 200
    body = r.get_json()
    assert body["count"] == 20  # student cap
    # said out loud: the value used, the one asked for, and that it was cut
    assert body["applied"] == {"max_results": 20, "requested_max_results": 500, "max_results_cap": 20,
                               "clamped": True, "similarity_threshold": -1.0}
    within = search(client, token("student"), {"query": "university", "config": {"max_results": 5}}).get_json()
    assert within["applied"]["max_results"] == 5 and within["applied"]["clamped"] is False
    default = search(client, token("staff"), {"query": "university"}).get_json()["applied"]
    assert default == {"max_results": 10, "requested_max_results": None, "max_results_cap": 50, "clamped": False,
                       "similarity_threshold": 0.2}


def test_department_and_campus_filters_ignore_letter_case(client: Any, token: Any) -> None:
    query = {"query": "password reset instructions for staff", "config": {"max_results": 5}}
    auth = token("staff", departments=["IT Services"], campus="King's Buildings")
    exact = search(client, auth, {**query, "filters": {"department": "IT Services", "campus": "King's Buildings"}})
    typed = search(client, auth, {**query, "filters": {"department": "It services", "campus": "king's BUILDINGS"}})
    assert typed.status_code == 200
    assert typed.get_json()["count"] > 0
    assert [h["text"] for h in typed.get_json()["results"]] == [h["text"] for h in exact.get_json()["results"]]
    assert typed.get_json()["results"][0]["document_title"] == STAFF_GUIDE
    # The permission rule stays exact: a token whose department is spelt differently from the documents'
    # sees no department-restricted content, whatever the filter says.
    other = search(client, token("staff", departments=["it services"]), {**query, "filters": {
        "department": "IT Services"}}).get_json()["results"]
    assert other and all(h["metadata"]["visibility"] == "public" for h in other)


# A body `user` that differs from the token, and clearance filters above the caller's own: one test
# each in test_security_policy.py (test_body_user_cannot_escalate, test_over_clearance_filter_is_403).


@pytest.mark.parametrize("body,fragment", [
    ({}, "query is required"),
    ({"query": None, "config": {"max_results": 3}}, "query is required"),
    ({"query": ""}, "must not be empty"),
    ({"query": "   "}, "must not be empty"),
    ({"query": 42}, "query must be a string"),
    ({"query": ["a"]}, "query must be a string"),
    ({"query": "a" * 10_000}, "longer than"),
    ({"query": "ok", "unexpected": 1}, "unknown fields"),
    ({"query": "ok", "filters": {"colour": "red"}}, "unknown filters"),
    ({"query": "ok", "filters": []}, "filters must be an object"),
    ({"query": "ok", "filters": {"min_priority": "3"}}, "min_priority"),
    ({"query": "ok", "filters": {"min_priority": 9}}, "min_priority"),
    ({"query": "ok", "filters": {"last_reviewed_after": "yesterday"}}, "ISO 8601"),
    ({"query": "ok", "config": {"max_results": 0}}, "max_results"),
    ({"query": "ok", "config": {"max_results": True}}, "max_results"),
    ({"query": "ok", "config": {"similarity_threshold": "high"}}, "similarity_threshold"),
    ({"query": "ok", "config": {"similarity_threshold": 2}}, "similarity_threshold"),
    ({"query": "ok", "config": {"top_k": 3}}, "unknown config"),
    ([1, 2], "JSON object"),
    ({"query": "lone \ud800 surrogate"}, "invalid Unicode"),
    ({"query": "ok", "filters": {"department": "\udfff"}}, "invalid Unicode"),
    ({"query": "ok", "filters": {"department": "IT\u0000Services"}}, "control characters"),
    ({"query": "ok", "filters": {"last_reviewed_after": "0001-01-01T00:00:00+05:00"}}, "out of range"),
])
def test_bad_input_is_a_clear_400(client: Any, token: Any, body: Any, fragment: str) -> None:
    r = search(client, token("staff", departments=["IT Services"]), body)
    assert r.status_code == 400, r.get_json()
    error = r.get_json()["error"]
    assert error["code"] == "bad_request"
    assert fragment in error["message"]
    assert error["request_id"].startswith("req_")


def test_malformed_json_and_huge_body(client: Any, token: Any) -> None:
    auth = token("staff")
    r = client.post("/api/search", data="{not json", headers={"Authorization": auth,
                                                              "Content-Type": "application/json"})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "bad_request"
    r = client.post("/api/search", data="x" * (1024 * 1024), headers={"Authorization": auth,
                                                                       "Content-Type": "application/json"})
    assert r.status_code == 413 and r.get_json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer not-a-jwt", "Basic dXNlcjpwYXNz",
                                    "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0."])
def test_missing_or_bad_token_is_401(client: Any, header: str | None) -> None:
    r = search(client, header, {"query": "password"})
    assert r.status_code == 401
    body = r.get_json()
    assert body["error"]["code"] == "unauthorized"
    assert "Traceback" not in r.get_data(as_text=True)


def test_unknown_endpoint_and_method_are_json(client: Any) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found"
    r = client.get("/api/search")
    assert r.status_code == 405 and r.get_json()["error"]["code"] == "method_not_allowed"
    assert "POST" in r.headers["Allow"]


@pytest.mark.parametrize("path", ["/api/admin/documents?q=a%00b", "/api/admin/documents?department=a%00b",
                                  "/api/admin/explain?document_id=a%00b&role=staff",
                                  "/api/admin/stats?days=%C2%B2"])
def test_values_the_database_refuses_are_400_not_500(client: Any, token: Any, path: str) -> None:
    r = client.get(path, headers={"Authorization": token("admin")})
    assert r.status_code == 400, r.get_data(as_text=True)
    assert r.get_json()["error"]["code"] == "bad_request"
