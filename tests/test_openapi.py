"""The OpenAPI document (campus_search/openapi.json, served at /api/openapi.json) is true to the running
app: a valid OpenAPI 3.1 document, every route documented and every documented operation routed, and
real answers of real requests validate against the documented response schemas."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from campus_search import __version__
from campus_search.api.openapi import openapi_document
from campus_search.app import create_app

BASE = "urn:campus-search:openapi"
IGNORED_METHODS = {"HEAD", "OPTIONS"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return openapi_document()


@pytest.fixture(scope="module")
def registry(spec: dict[str, Any]) -> Registry:
    return Registry().with_resource(BASE, Resource.from_contents(spec, default_specification=DRAFT202012))


def pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def check(spec: dict[str, Any], registry: Registry, method: str, path: str, response: Any) -> dict[str, Any]:
    """Assert the status is documented for the operation and the JSON body matches its schema."""
    operation = spec["paths"][path][method.lower()]
    status = str(response.status_code)
    documented = operation["responses"].get(status)
    assert documented is not None, f"{method} {path} answered {status}, which is not documented"
    where = ("paths", path, method.lower(), "responses", status)
    if "$ref" in documented:
        name = documented["$ref"].rsplit("/", 1)[1]
        documented = spec["components"]["responses"][name]
        where = ("components", "responses", name)
    for name, header in documented.get("headers", {}).items():  # string-valued headers: the value itself
        value = response.headers.get(name)
        assert value is not None or not header.get("required"), f"{method} {path} {status}: no {name} header"
        if value is not None and header["schema"].get("type") == "string":
            assert not list(Draft202012Validator(header["schema"]).iter_errors(value)), (name, value)
    body = response.get_json()
    schema_ref = {"$ref": f"{BASE}#/{pointer(*where, 'content', 'application/json', 'schema')}"}
    errors = sorted(Draft202012Validator(schema_ref, registry=registry).iter_errors(body), key=str)
    assert not errors, f"{method} {path} {status}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
    return body


def flask_routes(app: Any) -> set[tuple[str, str]]:
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        out |= {(method, path) for method in rule.methods - IGNORED_METHODS}
    return out


def documented_routes(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in spec["paths"].items() for method in item
            if method in ("get", "put", "post", "patch", "delete")}


def test_document_is_valid_openapi_3_1(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1.")
    validate_spec(spec)


def test_document_is_served(client: Any, spec: dict[str, Any]) -> None:
    r = client.get("/api/openapi.json")
    assert r.status_code == 200
    assert r.mimetype == "application/json"
    served = r.get_json()
    assert served == json.loads(json.dumps(spec))
    assert served["info"]["version"] == __version__


def test_every_route_is_documented_and_every_documented_operation_exists(demo_app: Any, spec: dict[str, Any]) -> None:
    routes, documented = flask_routes(demo_app), documented_routes(spec)
    assert not routes - documented, f"undocumented routes: {sorted(routes - documented)}"
    assert not documented - routes, f"documented but not served: {sorted(documented - routes)}"


def test_every_operation_documents_success_and_its_refs_resolve(spec: dict[str, Any]) -> None:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            assert any(code.startswith("2") for code in operation["responses"]), f"{method} {path}"
            assert operation.get("operationId"), f"{method} {path} has no operationId"
    text = json.dumps(spec)
    for ref in set(re.findall(r'"\$ref": "#/([^"]+)"', text)):
        node: Any = spec
        for part in ref.split("/"):
            node = node[part]


def test_search_and_operations_answers_match_the_schemas(client: Any, token: Any, spec: dict[str, Any],
                                                        registry: Registry) -> None:
    def post(body: Any, auth: str | None = None) -> Any:
        return client.post("/api/search", json=body, headers={"Authorization": auth} if auth else {})

    staff = token("staff", departments=["IT Services"], campus="King's Buildings")
    body = check(spec, registry, "POST", "/api/search",
                 post({"query": "password reset instructions for staff",
                       "filters": {"department": "IT Services", "min_priority": 3},
                       "config": {"max_results": 5, "similarity_threshold": 0.3}}, staff))
    assert body["count"] > 0
    check(spec, registry, "POST", "/api/search", post({"query": ""}, staff))
    check(spec, registry, "POST", "/api/search", post({"query": "x", "filters": {"colour": "red"}}, staff))
    check(spec, registry, "POST", "/api/search", post({"query": "x"}))
    for bad in ("Bearer a.b.c", "bearer " + token("staff", extra={"exp": 1}).removeprefix("Bearer ")):
        check(spec, registry, "POST", "/api/search", post({"query": "x"}, bad))
    check(spec, registry, "POST", "/api/search", post({"query": "x", "filters": {"clearance_level": 5}}, staff))
    big = client.post("/api/search", data=b'{"query": "' + b"a" * 200_000 + b'"}',
                      headers={"Authorization": staff, "Content-Type": "application/json"})
    check(spec, registry, "POST", "/api/search", big)
    for path in ("/health", "/health/live", "/health/ready"):
        check(spec, registry, "GET", path, client.get(path))
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "vector_search_requests_total" in metrics.get_data(as_text=True)
    admin = token("admin")
    for url, auth in (("/api/admin/stats", admin), ("/api/admin/stats", staff), ("/api/admin/stats?days=0", admin),
                      ("/api/admin/stats", None)):
        body = check(spec, registry, "GET", "/api/admin/stats",
                     client.get(url, headers={"Authorization": auth} if auth else {}))
        if auth == admin and url.endswith("stats"):
            assert body["database"]["pool_size"] >= 1
    explain = "/api/admin/explain?document_id=it-staff-password-management.md&role=student"
    body = check(spec, registry, "GET", "/api/admin/explain", client.get(explain, headers={"Authorization": admin}))
    assert body["visible"] is False
    check(spec, registry, "GET", "/api/admin/explain",
          client.get("/api/admin/explain?document_id=nope&role=staff", headers={"Authorization": admin}))
    check(spec, registry, "GET", "/api/admin/explain", client.get(explain, headers={"Authorization": staff}))


@pytest.fixture
def writable_client(settings_factory: Callable[..., Any], services_factory: Callable[[Any], Any]) -> Any:
    """An app on its own empty database: these requests change documents."""
    services = services_factory(settings_factory())
    app = create_app(services)
    app.config["TESTING"] = True
    return app.test_client()


def test_admin_answers_match_the_schemas(writable_client: Any, token: Any, spec: dict[str, Any],
                                         registry: Registry) -> None:
    c, admin = writable_client, {"Authorization": token("admin")}
    path = "/api/admin/documents/{doc_id}"
    text = "# Parking permits\n\nStaff apply for a parking permit through the Estates portal each August."
    added = check(spec, registry, "PUT", path, c.put("/api/admin/documents/estates/parking.md", headers=admin,
                                                      json={"text": text, "metadata": {"department": "Estates"}}))
    assert added["status"] == "added"
    same = check(spec, registry, "PUT", path, c.put("/api/admin/documents/estates/parking.md", headers=admin,
                                                     json={"text": text}))
    assert same["status"] == "unchanged"
    upload = c.put("/api/admin/documents/notes.txt", headers=admin, content_type="multipart/form-data",
                   data={"file": (io.BytesIO(b"Library opening hours in summer."), "notes.txt"),
                         "metadata": json.dumps({"priority": 4, "visibility": "public"})})
    assert check(spec, registry, "PUT", path, upload)["status"] == "added"
    check(spec, registry, "PUT", path, c.put("/api/admin/documents/x", headers=admin, json={"text": ""}))
    check(spec, registry, "PUT", path, c.put("/api/admin/documents/x", json={"text": "t"}))
    listing = check(spec, registry, "GET", "/api/admin/documents", c.get("/api/admin/documents", headers=admin))
    assert listing["total"] == 2
    check(spec, registry, "GET", "/api/admin/documents", c.get("/api/admin/documents?colour=1", headers=admin))
    doc = check(spec, registry, "GET", path, c.get("/api/admin/documents/estates/parking.md", headers=admin))
    assert doc["metadata"]["department"] == "Estates"
    check(spec, registry, "GET", path, c.get("/api/admin/documents/missing", headers=admin))
    check(spec, registry, "GET", path, c.get("/api/admin/documents/estates/parking.md",
                                             headers={"Authorization": token("academic")}))
    patched = check(spec, registry, "PATCH", path, c.patch("/api/admin/documents/estates/parking.md", headers=admin,
                                                           json={"metadata": {"priority": 5}}))
    assert patched["metadata"]["priority"] == 5 and patched["pinned"] == ["priority"]
    refused = c.patch("/api/admin/documents/estates/parking.md", headers=admin,
                      json={"metadata": {"visibility": "public"}})
    assert check(spec, registry, "PATCH", path, refused)["error"]["code"] == "loosening_refused"
    loosened = check(spec, registry, "PATCH", path, c.patch(
        "/api/admin/documents/estates/parking.md", headers=admin,
        json={"metadata": {"visibility": "public", "campus": None}, "allow_loosening": True, "unpin": ["priority"]}))
    assert loosened["loosened"][0] == {"field": "visibility", "before": "department", "after": "public"}
    assert loosened["pinned"] == ["campus", "visibility"]
    check(spec, registry, "PATCH", path, c.patch("/api/admin/documents/missing", headers=admin,
                                                 json={"metadata": {"priority": 5}}))
    found = check(spec, registry, "POST", "/api/search",
                  c.post("/api/search", headers=admin, json={"query": "parking permit"}))
    assert found["results"][0]["document_id"] == "estates/parking.md"
    cleared = check(spec, registry, "POST", "/api/admin/cache/clear", c.post("/api/admin/cache/clear", headers=admin))
    assert cleared["cleared"] is True
    check(spec, registry, "POST", "/api/admin/cache/clear",
          c.post("/api/admin/cache/clear", headers={"Authorization": token("staff")}))
    deleted = check(spec, registry, "DELETE", path, c.delete("/api/admin/documents/estates/parking.md", headers=admin))
    assert deleted["deleted"] is True
    check(spec, registry, "DELETE", path, c.delete("/api/admin/documents/estates/parking.md", headers=admin))


def test_documented_bounds_are_the_enforced_ones(client: Any, token: Any, spec: dict[str, Any]) -> None:
    """The schema's limits are the code's: list paging, the id grammar (textrules.py), titles, and the
    search body's ``user`` (an object or nothing)."""
    from campus_search.ingest.textrules import MAX_TITLE_CHARS, id_problem

    admin = {"Authorization": token("admin")}
    params = {p["name"]: p["schema"] for p in spec["paths"]["/api/admin/documents"]["get"]["parameters"]}
    for name, low in (("limit", 1), ("offset", 0)):
        top = params[name]["maximum"]
        assert client.get(f"/api/admin/documents?{name}={top}", headers=admin).status_code == 200
        assert client.get(f"/api/admin/documents?{name}={top + 1}", headers=admin).status_code == 400
        assert client.get(f"/api/admin/documents?{name}={low - 1}", headers=admin).status_code == 400
    id_schema = spec["paths"]["/api/admin/documents/{doc_id}"]["parameters"][0]["schema"]
    pattern = re.compile(id_schema["pattern"])
    samples = ["a", "it/printing.md", "a b", "café", " a", "a ", "a\n", "\na", "a\x0cb", "a\tb", "a\x7f", "a\x85b",
               "a\u2028b", "a\u00a0", "\u3000a", "x" * 500, "x" * 501, ""]  # (a surrogate is not UTF-8: a 400)
    for sample in samples:
        fits = (bool(pattern.search(sample)) and id_schema["minLength"] <= len(sample) <= id_schema["maxLength"])
        assert fits == (id_problem(sample) is None), repr(sample)
    schemas = spec["components"]["schemas"]
    assert schemas["DocumentUpsert"]["properties"]["title"]["maxLength"] == MAX_TITLE_CHARS
    assert schemas["DocumentUpload"]["properties"]["title"]["maxLength"] == MAX_TITLE_CHARS
    assert schemas["SearchRequest"]["properties"]["user"]["type"] == "object"
    assert schemas["MetadataPatch"]["properties"]["metadata"] == {"$ref": "#/components/schemas/MetadataInput"}


def test_access_schemas_follow_the_access_declaration(spec: dict[str, Any]) -> None:
    """The access model is declared once (security/access.py); the OpenAPI document names the same
    visibilities, metadata fields and role scopes, and explain's documented parameters are the accepted ones."""
    from campus_search.api.explain import PARAMS as EXPLAIN_PARAMS
    from campus_search.security.access import METADATA_FIELDS, ROLE_SCOPES, VISIBILITIES

    schemas = spec["components"]["schemas"]
    assert schemas["Visibility"]["enum"] == list(VISIBILITIES)
    assert set(schemas["Metadata"]["properties"]) == set(METADATA_FIELDS)
    assert set(schemas["MetadataInput"]["properties"]) == set(METADATA_FIELDS)
    user = schemas["Explanation"]["properties"]["user"]["properties"]
    for scope, values in ROLE_SCOPES.items():
        assert user[scope]["enum"] == list(values)
    documented = {p["name"] for p in spec["paths"]["/api/admin/explain"]["get"]["parameters"]}
    assert documented == set(EXPLAIN_PARAMS)
