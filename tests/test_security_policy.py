"""Policy: the visibility rule in SQL agrees with the Python reference, roles come from configuration,
client input cannot widen access, admin endpoints are admin-only, the explain endpoint, trusted-proxy
identity headers, and production start-up refusing weak secrets."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import TEST_SECRET, make_settings
from werkzeug.datastructures import Headers

from campus_search.app import create_app
from campus_search.config import load_settings
from campus_search.errors import ConfigError
from campus_search.security.proxies import client_ip, from_trusted_proxy
from campus_search.security.roles import (
    ANONYMOUS_ROLE,
    DEFAULT_ROLES,
    Principal,
    build_roles,
    is_visible,
    map_role,
    visible_sql,
)
from campus_search.services import Services

STAFF_GUIDE = "it-staff-password-management.md"  # IT Services, department visibility, clearance 3
DISCIPLINARY = "staff-disciplinary-procedure.md"  # clearance 5


def search(client: Any, auth: str | None, body: dict[str, Any], **kw: Any) -> Any:
    return client.post("/api/search", json=body, headers={"Authorization": auth} if auth else {}, **kw)


# --- the rule: SQL predicate == Python reference ----------------------------------------------------

def principals() -> Iterator[Principal]:
    for role in [*DEFAULT_ROLES.values(), ANONYMOUS_ROLE]:
        for depts in ((), ("A",), ("B", "C"), ("A", "B", "C")):
            yield Principal(f"{role.name}-{len(depts)}", role, depts)


def test_visible_sql_agrees_with_is_visible_on_every_combination(demo_services: Any) -> None:
    chunks = [{"id": i, "clearance_level": c, "visibility": v, "department": d}
              for i, (c, v, d) in enumerate(itertools.product(range(1, 6), ("public", "department"),
                                                              ("A", "B", "C", "D", None)))]
    with psycopg.connect(demo_services.settings.database_url) as conn:
        conn.execute("CREATE TEMP TABLE t (id int, clearance_level int, visibility text, department text)")
        with conn.cursor().copy("COPY t FROM STDIN") as copy:
            for ch in chunks:
                copy.write_row((ch["id"], ch["clearance_level"], ch["visibility"], ch["department"]))
        checked = 0
        for user in principals():
            clause, params = visible_sql(user, "c")
            in_sql = {r[0] for r in conn.execute(f"SELECT id FROM t c WHERE {clause}", params)}
            in_python = {ch["id"] for ch in chunks if is_visible(ch, user)}
            assert in_sql == in_python, user
            checked += len(chunks)
    assert checked == len(chunks) * 20  # 5 roles x 4 department sets
    # spot checks of the rule itself (SPEC §2)
    student = Principal("s", DEFAULT_ROLES["student"], ("A",))
    assert not is_visible({"clearance_level": 1, "visibility": "department", "department": "A"}, student)
    staff = Principal("t", DEFAULT_ROLES["staff"], ("A",))
    assert is_visible({"clearance_level": 3, "visibility": "department", "department": "A"}, staff)
    assert not is_visible({"clearance_level": 4, "visibility": "public", "department": "A"}, staff)
    assert not is_visible({"clearance_level": 1, "visibility": "department", "department": "B"}, staff)


# --- roles from configuration ----------------------------------------------------------------------

def test_role_table_defaults_overrides_and_validation() -> None:
    table = build_roles({"staff": {"max_results": 80}, "visitor": {
        "clearance": 1, "per_minute": 5, "per_hour": 50, "max_results": 5, "department_scope": "none"}})
    assert table["staff"].max_results == 80 and table["staff"].clearance == 3
    assert table["visitor"].clearance == 1 and table["student"] == DEFAULT_ROLES["student"]
    for bad, fragment in [({"staff": {"clearance": 9}}, "clearance"), ({"staff": {"colour": "red"}}, "unknown"),
                          ({"visitor": {"clearance": 1}}, "every field"),
                          ({"staff": {"department_scope": "some"}}, "department_scope"),
                          ({"Bad Name": {}}, "role name"), ({"staff": {"max_results": True}}, "positive")]:
        with pytest.raises(ValueError, match=fragment):
            build_roles(bad)
    roles = build_roles()
    mapping = {"it_administrator": "admin"}
    assert map_role("it_administrator", mapping, roles).name == "admin"
    # a role's own name is not an SSO value: only ROLE_MAPPING gives a role (issue 10)
    for name in ("staff", "academic", "admin"):
        assert map_role(name, mapping, roles).name == "student"
    assert map_role("staff", {"staff": "staff"}, roles).name == "staff"  # unless the mapping says so
    assert map_role("anonymous", mapping, roles).name == "student"  # never from a claim
    assert map_role(["student", "it_administrator"], mapping, roles).name == "admin"
    assert map_role(None, mapping, roles).name == "student"


def test_roles_and_mapping_from_environment(tmp_path: Any) -> None:
    env = {"DATA_DIR": str(tmp_path), "JWT_SECRET_KEY": TEST_SECRET,
           "ROLES_JSON": '{"visitor": {"clearance": 1, "per_minute": 5, "per_hour": 50, "max_results": 3, '
                         '"department_scope": "none"}, "staff": {"max_results": 7}}',
           "ROLE_MAPPING": "guest=visitor,professional_services=staff"}
    settings = load_settings(env)
    assert settings.roles_json["staff"] == {"max_results": 7}
    for broken, fragment in [({"ROLES_JSON": "{not json"}, "ROLES_JSON"),
                             ({"ROLES_JSON": "[1]"}, "JSON object"),
                             ({"ROLES_JSON": '{"staff": {"clearance": 0}}'}, "clearance"),
                             ({"ROLE_MAPPING": "guest=visitor"}, "unknown roles")]:
        with pytest.raises(ConfigError, match=fragment):
            load_settings({**env, **broken, **({"ROLES_JSON": ""} if "ROLE_MAPPING" in broken else {})})


def test_configured_role_caps_apply_to_searches(demo_services: Any, data_dir: Any, token: Any) -> None:
    roles = {"staff": {"max_results": 2},
             "visitor": {"clearance": 1, "per_minute": 5, "per_hour": 50, "max_results": 3,
                         "department_scope": "none"}}
    settings = make_settings(demo_services.settings.database_url, data_dir, roles_json=roles,
                             role_mapping={"guest": "visitor", "professional_services": "staff"})
    services = Services(settings, embedder=demo_services.embedder).ensure_open()
    try:
        c = create_app(services).test_client()
        body = {"query": "library", "config": {"max_results": 50, "similarity_threshold": -1}}
        assert search(c, token("professional_services"), body).get_json()["count"] == 2
        visitor = search(c, token("guest"), body).get_json()
        assert visitor["count"] == 3
        assert all(h["metadata"]["clearance_level"] == 1 and h["metadata"]["visibility"] == "public"
                   for h in visitor["results"])
    finally:
        services.close()


def test_bm25_scores_only_for_configured_roles(client: Any, demo_services: Any, data_dir: Any, token: Any) -> None:
    """scores.bm25 comes from corpus-wide statistics that count hidden chunks (docs/ranking.md): by
    default only admins see it, cached answers included; SCORES_BM25_ROLES widens or empties that."""
    body = {"query": "password reset instructions", "config": {"max_results": 5, "similarity_threshold": -1}}

    def bm25_shown(c: Any, auth: str) -> list[bool]:
        r = search(c, auth, body)
        assert r.status_code == 200 and r.get_json()["count"] > 0
        assert all("relevance" in h["scores"] for h in r.get_json()["results"])
        return ["bm25" in h["scores"] for h in r.get_json()["results"]]

    for _ in range(2):  # computed, then from the cache: the same answer
        assert not any(bm25_shown(client, token("student", sub="bm25-s")))
        assert not any(bm25_shown(client, token("professional_services", sub="bm25-t", departments=["IT Services"])))
        assert all(bm25_shown(client, token("admin", sub="bm25-a")))
    settings = make_settings(demo_services.settings.database_url, data_dir, scores_bm25_roles=("student",))
    services = Services(settings, embedder=demo_services.embedder).ensure_open()
    try:
        c = create_app(services).test_client()
        assert all(bm25_shown(c, token("student", sub="bm25-s2")))
        assert not any(bm25_shown(c, token("admin", sub="bm25-a2")))
    finally:
        services.close()
    with pytest.raises(ConfigError, match="SCORES_BM25_ROLES"):
        load_settings({"DATA_DIR": str(data_dir), "JWT_SECRET_KEY": TEST_SECRET, "SCORES_BM25_ROLES": "admn"})
    with pytest.raises(ConfigError, match="FROM_CACHE_ROLES"):
        load_settings({"DATA_DIR": str(data_dir), "JWT_SECRET_KEY": TEST_SECRET, "FROM_CACHE_ROLES": "root"})


# --- client input never widens access --------------------------------------------------------------

def test_body_user_cannot_escalate(client: Any, token: Any) -> None:
    student = token("student", sub="s1")
    q = "staff disciplinary procedure gross misconduct hearing"
    for body_user in ({"user_id": "admin1", "role": "admin"}, {"user_id": "s2"}):
        r = search(client, student, {"query": q, "user": body_user})
        assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
    # the caller's own id with an admin role claimed in the body: tolerated and ignored
    r = search(client, student, {"query": q, "config": {"max_results": 20, "similarity_threshold": -1},
                                 "user": {"user_id": "s1", "role": "admin", "clearance_level": 5,
                                          "departments": ["Human Resources"]}})
    assert r.status_code == 200
    assert all(h["metadata"]["clearance_level"] <= 2 and h["metadata"]["visibility"] == "public"
               for h in r.get_json()["results"])


@pytest.mark.parametrize("role,own,above", [("student", 2, 3), ("staff", 3, 4), ("academic_staff", 4, 5)])
def test_over_clearance_filter_is_403(client: Any, token: Any, role: str, own: int, above: int) -> None:
    auth = token(role, departments=["IT Services"])
    r = search(client, auth, {"query": "password", "filters": {"clearance_level": above}})
    assert r.status_code == 403
    assert r.get_json()["error"]["message"] == f"clearance level {above} is above your clearance ({own})"
    ok = search(client, auth, {"query": "password", "filters": {"clearance_level": own},
                               "config": {"similarity_threshold": -1, "max_results": 20}})
    assert ok.status_code == 200 and ok.get_json()["count"] > 0


def test_filters_only_narrow(client: Any, token: Any) -> None:
    # a student asking for department content or another department's documents gets nothing hidden
    auth = token("student", departments=["IT Services"])
    for filters in ({"visibility": "department"}, {"department": "IT Services", "visibility": "department"}):
        r = search(client, auth, {"query": "password reset", "filters": filters,
                                  "config": {"similarity_threshold": -1}})
        assert r.status_code == 200 and r.get_json()["count"] == 0


# --- admin endpoints -------------------------------------------------------------------------------

def admin_routes(app: Any) -> list[tuple[str, str]]:
    routes = []
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/admin"):
            path = rule.rule
            for arg in rule.arguments:
                path = path.replace(f"<{arg}>", "x").replace(f"<path:{arg}>", "x").replace(f"<int:{arg}>", "1")
            routes += [(m, path) for m in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"})]
    return routes


def test_admin_endpoints_refuse_everybody_else(demo_app: Any, client: Any, token: Any) -> None:
    routes = admin_routes(demo_app)
    assert ("GET", "/api/admin/explain") in routes and len(routes) >= 2
    for method, path in routes:
        r = client.open(path, method=method, json={})
        assert r.status_code == 401, (method, path)
        assert set(r.get_json()["error"]) == {"code", "message", "request_id"}
        for role in ("student", "professional_services", "academic_staff"):
            r = client.open(path, method=method, json={}, query_string={"document_id": STAFF_GUIDE, "role": "staff"},
                            headers={"Authorization": token(role, departments=["IT Services"])})
            assert r.status_code == 403, (method, path, role)
            assert r.get_json()["error"]["code"] == "forbidden"


# --- explain ---------------------------------------------------------------------------------------

def explain(client: Any, auth: str, **params: Any) -> Any:
    return client.get("/api/admin/explain", query_string=params, headers={"Authorization": auth})


def test_explain_answers_why(client: Any, token: Any) -> None:
    admin = token("it_administrator")
    r = explain(client, admin, document_id=STAFF_GUIDE, role="professional_services", sub="staff123",
                department="IT Services")
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["visible"] is True and body["consistent"] is True
    assert body["user"]["role"] == "staff" and "ROLE_MAPPING" in body["user"]["role_resolution"]
    assert body["chunks"]["visible"] == body["chunks"]["total"] > 0
    assert any("user's department 'IT Services'" in reason for reason in body["reasons"])

    other = explain(client, admin, document_id=STAFF_GUIDE, role="staff", department="Library").get_json()
    assert other["visible"] is False and other["consistent"] and other["chunks"]["visible"] == 0
    assert any("restricted to department 'IT Services'" in reason for reason in other["reasons"])

    student = explain(client, admin, document_id=STAFF_GUIDE, role="student", department="IT Services").get_json()
    assert student["visible"] is False
    assert any("above the user's clearance 2" in reason for reason in student["reasons"])

    unknown = explain(client, admin, document_id=DISCIPLINARY, role="vice_chancellor").get_json()
    assert unknown["user"]["role"] == "student" and "not in ROLE_MAPPING" in unknown["user"]["role_resolution"]
    assert explain(client, admin, document_id=DISCIPLINARY, role="admin").get_json()["visible"] is True


def test_explain_bad_input(client: Any, token: Any) -> None:
    admin = token("admin")
    assert explain(client, admin, document_id="no-such-doc", role="staff").status_code == 404
    assert explain(client, admin, role="staff").status_code == 400
    assert explain(client, admin, document_id=STAFF_GUIDE).status_code == 400
    r = explain(client, admin, document_id=STAFF_GUIDE, role="staff", clearance="5")
    assert r.status_code == 400 and "clearance" in r.get_json()["error"]["message"]


# --- trusted proxy headers -------------------------------------------------------------------------

@pytest.fixture
def proxied(demo_services: Any, data_dir: Any) -> Iterator[Any]:
    settings = make_settings(demo_services.settings.database_url, data_dir, identity_proxies=("10.0.0.0/8",),
                             trusted_proxies=("172.16.0.0/12",), proxy_user_header="X-Remote-User")
    services = Services(settings, embedder=demo_services.embedder).ensure_open()
    yield create_app(services).test_client()
    services.close()


IDENTITY = {"X-Remote-User": "s1234567@ed.ac.uk", "X-Remote-Role": "student;it_administrator",
            "X-Remote-Department": "IT Services;Library", "X-Remote-Campus": "King's Buildings"}
Q5 = {"query": "staff disciplinary procedure gross misconduct hearing", "config": {"max_results": 5}}


def test_identity_headers_from_a_trusted_proxy(proxied: Any) -> None:
    r = proxied.post("/api/search", json=Q5, headers=IDENTITY, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert r.status_code == 200
    body = r.get_json()
    assert body["user_id"] == "s1234567@ed.ac.uk"
    assert any(h["metadata"]["clearance_level"] == 5 for h in body["results"])  # admin via the role list


def test_identity_headers_from_anyone_else_are_ignored(proxied: Any, token: Any) -> None:
    r = proxied.post("/api/search", json=Q5, headers=IDENTITY, environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert r.status_code == 401
    r = proxied.post("/api/search", json=Q5, headers={**IDENTITY, "Authorization": token("student", sub="me")},
                     environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert r.status_code == 200 and r.get_json()["user_id"] == "me"
    assert all(h["metadata"]["clearance_level"] <= 2 for h in r.get_json()["results"])
    # a forwarding proxy (nginx, TRUSTED_PROXIES) is not an identity proxy: its identity headers are ignored
    r = proxied.post("/api/search", json=Q5, headers=IDENTITY, environ_base={"REMOTE_ADDR": "172.16.0.5"})
    assert r.status_code == 401
    # a trusted proxy that sends no user: the bearer token decides
    r = proxied.post("/api/search", json=Q5, headers={"Authorization": token("student", sub="me")},
                     environ_base={"REMOTE_ADDR": "10.9.9.9"})
    assert r.get_json()["user_id"] == "me"


def test_proxy_header_values_decoded_and_mapped(proxied: Any) -> None:
    headers = {"X-Remote-User": "m\u00fcller".encode().decode("latin-1"), "X-Remote-Role": "professional_services",
               "X-Remote-Department": "IT Services"}
    r = proxied.post("/api/search", json={"query": "password reset procedures", "config": {"max_results": 20}},
                     headers=headers, environ_base={"REMOTE_ADDR": "10.0.0.1"})
    assert r.status_code == 200 and r.get_json()["user_id"] == "m\u00fcller"
    assert any(h["metadata"]["visibility"] == "department" for h in r.get_json()["results"])


class _Req:
    def __init__(self, remote: str, xff: list[str] | None = None) -> None:
        self.remote_addr = remote
        self.headers = Headers([("X-Forwarded-For", v) for v in xff or []])


def test_client_ip_trusts_forwarded_for_only_from_proxies() -> None:
    s = load_settings({"DATA_DIR": "/tmp", "JWT_SECRET_KEY": TEST_SECRET, "AUDIT_HMAC_KEY": TEST_SECRET,
                       "TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1"})
    assert client_ip(_Req("203.0.113.9", ["1.2.3.4"]), s) == "203.0.113.9"  # not a proxy: header ignored
    assert client_ip(_Req("10.0.0.2", ["1.2.3.4"]), s) == "1.2.3.4"
    # the client's own claims to the left of the real hop are skipped; proxy hops are skipped from the right
    assert client_ip(_Req("10.0.0.2", ["6.6.6.6, 1.2.3.4, 192.168.1.1"]), s) == "1.2.3.4"
    assert client_ip(_Req("10.0.0.2", ["6.6.6.6", "1.2.3.4"]), s) == "1.2.3.4"
    assert client_ip(_Req("::ffff:10.0.0.2", ["2001:db8::1"]), s) == "2001:db8::1"
    assert client_ip(_Req("10.0.0.2", ["garbage"]), s) == "10.0.0.2"
    assert client_ip(_Req("10.0.0.2"), s) == "10.0.0.2"
    assert from_trusted_proxy(_Req("10.255.0.1"), s) and not from_trusted_proxy(_Req("11.0.0.1"), s)
    none = s.replace(trusted_proxies=())
    assert client_ip(_Req("10.0.0.2", ["1.2.3.4"]), none) == "10.0.0.2"


def test_proxy_settings_validated(tmp_path: Any) -> None:
    base = {"DATA_DIR": str(tmp_path), "JWT_SECRET_KEY": TEST_SECRET}
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES"):
        load_settings({**base, "TRUSTED_PROXIES": "10.0.0.0/33"})
    with pytest.raises(ConfigError, match="PROXY_USER_HEADER needs IDENTITY_PROXIES"):
        load_settings({**base, "PROXY_USER_HEADER": "X-Remote-User", "TRUSTED_PROXIES": "10.0.0.1"})
    with pytest.raises(ConfigError, match="IDENTITY_PROXIES"):
        load_settings({**base, "IDENTITY_PROXIES": "not-an-address"})


# --- production start-up ---------------------------------------------------------------------------

STRONG = "p" * 48


@pytest.mark.parametrize("jwt_secret,audit_key,fragment", [
    (None, STRONG, "JWT_SECRET_KEY"),
    ("change-in-production", STRONG, "JWT_SECRET_KEY"),
    ("secure_jwt_key_64_characters_minimum_length_required", STRONG, "JWT_SECRET_KEY"),
    ("short-secret", STRONG, "JWT_SECRET_KEY"),
    (STRONG, None, "AUDIT_HMAC_KEY"),
    (STRONG, "changeme", "AUDIT_HMAC_KEY"),
])
def test_production_refuses_missing_or_placeholder_secrets(tmp_path: Any, jwt_secret: str | None,
                                                           audit_key: str | None, fragment: str) -> None:
    env = {"FLASK_ENV": "production", "DATA_DIR": str(tmp_path), "DATABASE_URL": "postgresql://db/x"}
    if jwt_secret is not None:
        env["JWT_SECRET_KEY"] = jwt_secret
    if audit_key is not None:
        env["AUDIT_HMAC_KEY"] = audit_key
    with pytest.raises(ConfigError, match=fragment):
        load_settings(env)
    assert not (tmp_path / "secrets").exists()  # production never generates secrets


def test_production_accepts_strong_secrets_and_sso_only(tmp_path: Any) -> None:
    env = {"FLASK_ENV": "production", "DATA_DIR": str(tmp_path), "AUDIT_HMAC_KEY": STRONG}
    assert load_settings({**env, "JWT_SECRET_KEY": "q" * 40}).production
    sso = {**env, "JWT_ALGORITHMS": "RS256", "OIDC_JWKS_URL": "https://idp.ed.ac.uk/jwks"}
    assert load_settings(sso).jwt_algorithms == ("RS256",)  # no HS secret needed
    with pytest.raises(ConfigError, match="https"):
        load_settings({**sso, "OIDC_JWKS_URL": "http://idp.ed.ac.uk/jwks"})
    with pytest.raises(ConfigError, match="mix"):
        load_settings({**sso, "JWT_ALGORITHMS": "RS256,HS256", "JWT_SECRET_KEY": "q" * 40})
