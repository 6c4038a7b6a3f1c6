"""CORS: browser portals on configured origins may call /api/*; nobody else, and nothing by default."""

from __future__ import annotations

from typing import Any

import pytest

from campus_search.app import create_app

PORTAL = "https://portal.ed.ac.uk"
EVIL = "https://evil.example"
BODY = {"query": "library book renewal", "config": {"max_results": 2}}


@pytest.fixture(scope="module")
def cors_client(demo_services_with: Any) -> Any:
    app = create_app(demo_services_with(cors_origins=(PORTAL, "https://www.ed.ac.uk")))
    app.config["TESTING"] = True
    return app.test_client()


def preflight(client: Any, origin: str, path: str = "/api/search", method: str = "POST") -> Any:
    return client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                         "Access-Control-Request-Headers": "authorization, content-type"})


def test_no_cors_by_default(client: Any, token: Any) -> None:
    r = preflight(client, PORTAL)
    assert "Access-Control-Allow-Origin" not in r.headers
    r = client.post("/api/search", json=BODY, headers={"Origin": PORTAL, "Authorization": token("student")})
    assert r.status_code == 200
    assert "Access-Control-Allow-Origin" not in r.headers


def test_preflight_from_a_configured_origin(cors_client: Any) -> None:
    r = preflight(cors_client, PORTAL)
    assert r.status_code == 200  # no token needed, not rate limited
    assert r.headers["Access-Control-Allow-Origin"] == PORTAL
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert r.headers["Access-Control-Max-Age"] == "600"
    assert "Access-Control-Allow-Credentials" not in r.headers  # bearer tokens, never cookies


def test_search_from_a_configured_origin(cors_client: Any, token: Any) -> None:
    r = cors_client.post("/api/search", json=BODY, headers={"Origin": PORTAL, "Authorization": token("student")})
    assert r.status_code == 200
    assert r.get_json()["count"] > 0
    assert r.headers["Access-Control-Allow-Origin"] == PORTAL
    assert "Origin" in r.headers["Vary"]
    exposed = {h.strip().lower() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"x-request-id", "retry-after"} <= exposed


def test_errors_are_readable_by_the_portal(cors_client: Any) -> None:
    r = cors_client.post("/api/search", json=BODY, headers={"Origin": PORTAL})  # no token
    assert r.status_code == 401
    assert r.headers["Access-Control-Allow-Origin"] == PORTAL
    assert r.get_json()["error"]["code"] == "unauthorized"


def test_other_origins_get_no_cors_headers(cors_client: Any, token: Any) -> None:
    assert "Access-Control-Allow-Origin" not in preflight(cors_client, EVIL).headers
    r = cors_client.post("/api/search", json=BODY, headers={"Origin": EVIL, "Authorization": token("student")})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_only_the_api_is_opened_to_browsers(cors_client: Any) -> None:
    r = cors_client.get("/health/live", headers={"Origin": PORTAL})
    assert "Access-Control-Allow-Origin" not in r.headers
    r = cors_client.get("/api/openapi.json", headers={"Origin": PORTAL})
    assert r.headers["Access-Control-Allow-Origin"] == PORTAL


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "GET"])
def test_preflight_allows_every_document_api_method(cors_client: Any, method: str) -> None:
    """The admin document API adds/replaces with PUT and changes metadata with PATCH: a portal's
    preflight for those must be answered with the method allowed, or the browser never sends it."""
    r = preflight(cors_client, PORTAL, "/api/admin/documents/handbook-1", method=method)
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == PORTAL
    allowed = {m.strip().upper() for m in r.headers["Access-Control-Allow-Methods"].split(",")}
    assert method in allowed


def test_cors_allows_every_method_an_api_route_answers(cors_client: Any) -> None:
    """No /api/* route may answer a method the preflight does not allow (a new route's method would
    otherwise be silently unusable from a portal)."""
    from campus_search.api.cors import ALLOWED_METHODS

    used = {m for rule in cors_client.application.url_map.iter_rules() if rule.rule.startswith("/api/")
            for m in (rule.methods or set())} - {"HEAD"}
    assert used <= set(ALLOWED_METHODS), sorted(used - set(ALLOWED_METHODS))
    r = preflight(cors_client, PORTAL, "/api/admin/documents/x", method="PATCH")
    assert {m.strip() for m in r.headers["Access-Control-Allow-Methods"].split(",")} >= used
