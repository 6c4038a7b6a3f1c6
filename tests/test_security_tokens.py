"""Token verification against attacks and mistakes: HS256 with the configured secret, RS256/ES256 from a
local JWKS server (key rotation, unknown kid, outages), pinned algorithms, exp/iss/aud, anonymous access,
and error bodies that leak nothing."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from conftest import TEST_SECRET, make_settings
from jwks_server import AUDIENCE, ISSUER, JwksServer, generate_key, raw_token

from campus_search.app import create_app
from campus_search.security.jwks import JwksCache
from campus_search.services import Services

QUERY = {"query": "password reset", "config": {"max_results": 3}}
# RFC 6750 descriptions: what is wrong, from a fixed list (never a claim value or the expected audience)
TOKEN_REQUIRED = "a bearer token is required"
EXPIRED = "the token has expired"
NOT_YET = "the token is not valid yet"
SIGNATURE = "the token signature does not verify"
WRONG_AUDIENCE = "the token was issued for another audience"
WRONG_ISSUER = "the token was issued by an issuer this service does not accept"
ALGORITHM = "the token signing algorithm is not accepted"
UNKNOWN_KEY = "the token signing key is not known to this service"
MALFORMED = "the token is malformed"
EMPTY_SUB = "the token has an empty subject (sub)"
NOT_ACCESS = "the token is not an access token"


def lacks(claim: str) -> str:
    return f"the token lacks the required {claim} claim"


def post(client: Any, auth: str | None = None, body: Any = None, **headers: str) -> Any:
    if auth:
        headers["Authorization"] = auth
    return client.post("/api/search", json=body or QUERY, headers=headers)


def assert_clean_401(r: Any, description: str | None, *secrets: str) -> None:
    """401 with RFC 6750's challenge: no error attribute without a token (3.1), else invalid_token with
    ``description``, the same words as the JSON message; nothing secret in the answer."""
    assert r.status_code == 401, r.get_data(as_text=True)
    body = r.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["code"] == "unauthorized"
    assert body["error"]["message"] == (description or TOKEN_REQUIRED)
    challenge = 'Bearer realm="campus-search"'
    if description:
        challenge += f', error="invalid_token", error_description="{description}"'
    assert r.headers["WWW-Authenticate"] == challenge
    text = r.get_data(as_text=True) + str(r.headers)
    for secret in (TEST_SECRET, ISSUER, *secrets):  # (the audience equals the realm here)
        assert secret not in text


def hs(claims: dict[str, Any], key: str = TEST_SECRET, alg: str = "HS256") -> str:
    now = int(time.time())
    return "Bearer " + jwt.encode({"sub": "u1", "role": "staff", "iat": now, "exp": now + 600, **claims}, key,
                                  algorithm=alg)


@pytest.fixture
def app_factory(demo_services: Any, data_dir: Any) -> Iterator[Any]:
    """create_app on the demo corpus with extra settings (its own Services, so its own settings)."""
    opened: list[Services] = []

    def make(**overrides: Any) -> Any:
        settings = make_settings(demo_services.settings.database_url, data_dir, **overrides)
        services = Services(settings, embedder=demo_services.embedder).ensure_open()
        opened.append(services)
        app = create_app(services)
        app.config["TESTING"] = True
        return app.test_client()

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def idp() -> Iterator[JwksServer]:
    with JwksServer() as server:
        server.add_key("rsa-1", "RS256")
        server.add_key("ec-1", "ES256")
        server.publish("rsa-1", "ec-1")
        yield server


@pytest.fixture
def sso_client(app_factory: Any, idp: JwksServer) -> Any:
    return app_factory(jwt_algorithms=("RS256", "ES256"), jwt_secret_key=None, oidc_jwks_url=idp.url,
                       jwt_issuer=ISSUER, jwt_audience=AUDIENCE)


# --- HS256 -----------------------------------------------------------------------------------------

def test_valid_hs256_token_is_accepted(client: Any) -> None:
    r = post(client, hs({"sub": "staff123", "departments": ["IT Services"]}))
    assert r.status_code == 200 and r.get_json()["user_id"] == "staff123"


def test_forged_signature_is_401(client: Any) -> None:
    forged = hs({"role": "admin"}, key="not-the-server-secret-" + "y" * 30)
    assert_clean_401(post(client, forged), SIGNATURE)
    # a real token with its payload swapped for an admin one keeps the old signature: refused
    header, _, sig = hs({}).removeprefix("Bearer ").split(".")
    payload = hs({"role": "admin"}).removeprefix("Bearer ").split(".")[1]
    assert_clean_401(post(client, f"Bearer {header}.{payload}.{sig}"), SIGNATURE)


def test_alg_none_is_401(client: Any) -> None:
    now = int(time.time())
    for alg in ("none", "None", "NONE"):
        token = raw_token({"alg": alg, "typ": "JWT"}, {"sub": "eve", "role": "admin", "exp": now + 600})
        assert_clean_401(post(client, "Bearer " + token), ALGORITHM)


def test_unlisted_hs_algorithm_is_401(client: Any) -> None:
    assert_clean_401(post(client, hs({}, alg="HS384")), ALGORITHM)  # right secret, algorithm not pinned


def test_expired_and_exp_less_tokens_are_401(client: Any) -> None:
    now = int(time.time())
    assert_clean_401(post(client, hs({"exp": now - 3600})), EXPIRED)
    no_exp = jwt.encode({"sub": "u1", "role": "admin", "iat": now}, TEST_SECRET, algorithm="HS256")
    assert_clean_401(post(client, "Bearer " + no_exp), lacks("exp"))
    bad_exp = jwt.encode({"sub": "u1", "role": "admin", "exp": "tomorrow"}, TEST_SECRET, algorithm="HS256")
    assert_clean_401(post(client, "Bearer " + bad_exp), MALFORMED)


def test_clock_skew_leeway(client: Any) -> None:
    now = int(time.time())
    assert post(client, hs({"exp": now - 5})).status_code == 200  # within JWT_LEEWAY (30 s)
    assert_clean_401(post(client, hs({"exp": now - 300})), EXPIRED)
    assert_clean_401(post(client, hs({"nbf": now + 600})), NOT_YET)  # not valid yet


def test_refresh_tokens_and_missing_sub_are_401(client: Any) -> None:
    assert_clean_401(post(client, hs({"type": "refresh"})), NOT_ACCESS)
    now = int(time.time())
    no_sub = jwt.encode({"role": "admin", "exp": now + 600}, TEST_SECRET, algorithm="HS256")
    assert_clean_401(post(client, "Bearer " + no_sub), lacks("sub"))


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Negotiate abc"])
def test_no_bearer_token_is_401_without_error_code(client: Any, header: str) -> None:
    # RFC 6750 3.1: a request without bearer credentials (or with another scheme) gets no error code
    assert_clean_401(post(client, header), None)


@pytest.mark.parametrize("header", ["Bearer a.b", "Bearer a.b.c", "bearer a.b.c", "Bearer " + "A" * 5000,
                                    "Bearer bm90IGpzb24.e30.c2ln"])
def test_malformed_token_is_invalid_token(client: Any, header: str) -> None:
    assert_clean_401(post(client, header), MALFORMED)


def test_issuer_and_audience_checked_when_configured(app_factory: Any) -> None:
    c = app_factory(jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    assert post(c, hs({"iss": ISSUER, "aud": AUDIENCE})).status_code == 200
    assert post(c, hs({"iss": ISSUER, "aud": [AUDIENCE, "other"]})).status_code == 200
    assert_clean_401(post(c, hs({"iss": ISSUER, "aud": "another-service"})), WRONG_AUDIENCE)
    assert_clean_401(post(c, hs({"iss": "https://evil.example", "aud": AUDIENCE})), WRONG_ISSUER)
    assert_clean_401(post(c, hs({"aud": AUDIENCE})), lacks("iss"))  # iss missing
    assert_clean_401(post(c, hs({"iss": ISSUER})), lacks("aud"))  # aud missing


# --- RS256 / ES256 via JWKS ------------------------------------------------------------------------

def test_sso_tokens_verified_against_jwks(sso_client: Any, idp: JwksServer) -> None:
    rs = idp.sign({"sub": "s1234567", "role": "academic_staff", "departments": ["Informatics"]}, "rsa-1")
    es = idp.sign({"sub": "s7654321", "role": "it_administrator"}, "ec-1")
    r = post(sso_client, "Bearer " + rs)
    assert r.status_code == 200 and r.get_json()["user_id"] == "s1234567"
    assert post(sso_client, "Bearer " + es).status_code == 200
    assert idp.hits == 1  # keys cached: one fetch for both tokens


def test_hs_rs_algorithm_confusion_is_401(sso_client: Any, idp: JwksServer, client: Any) -> None:
    now = int(time.time())
    claims = {"sub": "eve", "role": "it_administrator", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600}
    # The classic attack: HS256 "signed" with the server's RSA public key as the HMAC secret.
    for pem in (idp.public_pem("rsa-1"), idp.public_pem("rsa-1").strip()):
        forged = raw_token({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims, hmac_key=pem)
        assert_clean_401(post(sso_client, "Bearer " + forged), ALGORITHM)
    # and the reverse: an HS-configured server given a validly signed RS256 token
    assert_clean_401(post(client, "Bearer " + idp.sign({"sub": "eve", "role": "admin"}, "rsa-1")), ALGORITHM)


def test_token_algorithm_must_match_its_key(sso_client: Any, idp: JwksServer) -> None:
    # ES256 header naming an RSA key's kid, signed with an attacker's EC key
    attacker = generate_key("ES256")
    token = idp.sign({"sub": "eve", "role": "admin"}, "rsa-1", alg="ES256", key=attacker)
    assert_clean_401(post(sso_client, "Bearer " + token), ALGORITHM)


def test_sso_token_with_wrong_audience_or_expired_is_401(sso_client: Any, idp: JwksServer) -> None:
    assert_clean_401(post(sso_client, "Bearer " + idp.sign({"sub": "a", "aud": "other-app"}, "rsa-1")),
                     WRONG_AUDIENCE)
    assert_clean_401(post(sso_client, "Bearer " + idp.sign({"sub": "a", "iss": "https://evil"}, "rsa-1")),
                     WRONG_ISSUER)
    assert_clean_401(post(sso_client, "Bearer " + idp.sign({"sub": "a"}, "rsa-1", ttl=-3600)), EXPIRED)


def test_key_rotation_unknown_kid_triggers_one_refresh(app_factory: Any, idp: JwksServer) -> None:
    # JWT_VERIFIED_CACHE_SECONDS=0: every request is verified against the keys (the bounded window of
    # the verified-token cache is tested on its own below)
    c = app_factory(jwt_algorithms=("RS256",), jwt_secret_key=None, oidc_jwks_url=idp.url, jwt_issuer=ISSUER,
                    jwt_audience=AUDIENCE, oidc_jwks_refresh_interval=0.0, jwt_verified_cache_seconds=0)
    assert post(c, "Bearer " + idp.sign({"sub": "a"}, "rsa-1")).status_code == 200
    assert idp.hits == 1
    idp.add_key("rsa-2")
    idp.publish("rsa-1", "rsa-2")  # the provider rotates: new key published, then used
    assert post(c, "Bearer " + idp.sign({"sub": "a"}, "rsa-2")).status_code == 200
    assert idp.hits == 2
    assert post(c, "Bearer " + idp.sign({"sub": "a"}, "rsa-2")).status_code == 200
    assert idp.hits == 2  # cached now
    idp.publish("rsa-2")  # old key retired
    attacker = generate_key()
    forged = idp.sign({"sub": "eve", "role": "admin"}, "rsa-9", key=attacker)
    assert_clean_401(post(c, "Bearer " + forged), UNKNOWN_KEY)  # unknown kid: one refresh, still unknown
    assert idp.hits == 3
    assert_clean_401(post(c, "Bearer " + idp.sign({"sub": "a"}, "rsa-1")), UNKNOWN_KEY)  # the refresh dropped rsa-1


def test_verified_token_cache_is_bounded_by_window_and_exp(app_factory: Any, idp: JwksServer) -> None:
    # JWKS re-read on every verification, so each verification is visible as a hit on the provider
    settings = dict(jwt_algorithms=("RS256",), jwt_secret_key=None, oidc_jwks_url=idp.url, jwt_issuer=ISSUER,
                    jwt_audience=AUDIENCE, oidc_jwks_refresh_interval=0.0, oidc_jwks_cache_seconds=0.001,
                    jwt_leeway=0)
    c = app_factory(**settings, jwt_verified_cache_seconds=2)
    token = "Bearer " + idp.sign({"sub": "a"}, "rsa-1")
    assert post(c, token).status_code == 200
    verified = idp.hits
    idp.add_key("rsa-2")
    idp.publish("rsa-2")  # rsa-1 withdrawn
    assert post(c, token).status_code == 200  # remembered for at most JWT_VERIFIED_CACHE_SECONDS ...
    assert idp.hits == verified  # ... without verifying again
    time.sleep(2.2)
    assert_clean_401(post(c, token), UNKNOWN_KEY)  # verified again: its key is gone
    assert idp.hits > verified
    # never past the token's own exp, whatever the window
    c = app_factory(**settings, jwt_verified_cache_seconds=600)
    short = "Bearer " + idp.sign({"sub": "b"}, "rsa-2", ttl=2)
    assert post(c, short).status_code == 200
    time.sleep(2.5)
    assert_clean_401(post(c, short), EXPIRED)
    # a forged token is never remembered: the same string is rejected every time
    forged = "Bearer " + idp.sign({"sub": "eve", "role": "admin"}, "rsa-2", key=generate_key())
    assert_clean_401(post(c, forged), SIGNATURE)
    assert_clean_401(post(c, forged), SIGNATURE)


def test_unknown_kid_storm_does_not_reach_the_provider(app_factory: Any, idp: JwksServer) -> None:
    c = app_factory(jwt_algorithms=("RS256",), jwt_secret_key=None, oidc_jwks_url=idp.url, jwt_issuer=ISSUER,
                    jwt_audience=AUDIENCE)  # default refresh interval (10 s)
    assert post(c, "Bearer " + idp.sign({"sub": "a"}, "rsa-1")).status_code == 200
    attacker = generate_key()
    statuses: list[int] = []

    def storm() -> None:
        for _ in range(10):
            token = idp.sign({"sub": "eve"}, uuid.uuid4().hex, key=attacker)
            statuses.append(post(c, "Bearer " + token).status_code)

    threads = [threading.Thread(target=storm) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [401] * 40
    assert idp.hits == 1  # no refresh: the last one was within OIDC_JWKS_REFRESH_INTERVAL


def test_jwks_cache_single_flight_and_rate_limit() -> None:
    """The refresh policy itself, with a controllable clock: one fetch per interval, however many
    unknown kids arrive, and a burst of concurrent misses shares one fetch."""
    now = [1000.0]
    with JwksServer() as server:
        server.add_key("k1")
        server.publish("k1")
        cache = JwksCache(server.url, min_refresh_interval=30, max_age=3600, clock=lambda: now[0])
        assert cache.key_for("k1", "RS256") is not None
        assert server.hits == 1
        for i in range(20):
            with pytest.raises(jwt.InvalidKeyError):
                cache.key_for(f"random-{i}", "RS256")
        assert server.hits == 1
        now[0] += 31
        server.add_key("k2")
        server.publish("k1", "k2")
        errors: list[Exception] = []

        def lookup() -> None:
            try:
                cache.key_for("k2", "RS256")
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=lookup) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and server.hits == 2
        now[0] += 3601  # stale: refreshed once, keys kept when the provider fails
        server.status = 500
        assert cache.key_for("k1", "RS256") is not None
        assert server.hits == 3
        with pytest.raises(jwt.InvalidAlgorithmError):
            cache.key_for("k1", "ES256")


def test_jwks_unreachable_from_the_start_is_503(app_factory: Any, idp: JwksServer) -> None:
    idp.status = 500
    c = app_factory(jwt_algorithms=("RS256",), jwt_secret_key=None, oidc_jwks_url=idp.url, jwt_issuer=ISSUER,
                    jwt_audience=AUDIENCE)
    r = post(c, "Bearer " + idp.sign({"sub": "a"}, "rsa-1"))
    assert r.status_code == 503 and r.headers.get("Retry-After")
    assert set(r.get_json()["error"]) == {"code", "message", "request_id"}
    assert "500" not in r.get_json()["error"]["message"] and idp.url not in r.get_data(as_text=True)


# --- claims, roles, anonymous ----------------------------------------------------------------------

def test_claim_names_and_role_mapping_are_configurable(app_factory: Any) -> None:
    c = app_factory(claim_role="eduPersonAffiliation", claim_departments="ou", claim_campus="site",
                    role_mapping={"faculty": "academic", "member": "student", "it_administrator": "admin"})
    now = int(time.time())

    def tok(claims: dict[str, Any]) -> str:
        return "Bearer " + jwt.encode({"sub": "u", "exp": now + 600, **claims}, TEST_SECRET, algorithm="HS256")

    q = {"query": "staff disciplinary procedure gross misconduct hearing", "config": {"max_results": 10}}
    academic = post(c, tok({"eduPersonAffiliation": ["member", "faculty"]}), q).get_json()["results"]
    assert any(h["metadata"]["clearance_level"] == 4 for h in academic)
    member = post(c, tok({"eduPersonAffiliation": "member"}), q).get_json()["results"]
    assert all(h["metadata"]["clearance_level"] <= 2 and h["metadata"]["visibility"] == "public" for h in member)
    # the default claim name means nothing here, and an unknown SSO role is the least-privileged role
    for claims in ({"role": "it_administrator"}, {"eduPersonAffiliation": "vice-chancellor"},
                   {"eduPersonAffiliation": {"role": "admin"}}):
        results = post(c, tok(claims), q).get_json()["results"]
        assert all(h["metadata"]["clearance_level"] <= 2 for h in results), claims


def test_anonymous_access_when_allowed(app_factory: Any) -> None:
    c = app_factory(allow_anonymous=True)
    r = post(c, None, {"query": "password reset", "config": {"max_results": 50, "similarity_threshold": -1}})
    assert r.status_code == 200
    body = r.get_json()
    assert body["user_id"] == "anonymous" and body["count"] > 0
    for hit in body["results"]:
        assert hit["metadata"]["clearance_level"] == 1 and hit["metadata"]["visibility"] == "public"
    assert body["count"] <= 20  # the anonymous role's cap
    assert_clean_401(post(c, hs({}, key="wrong-" + "z" * 40)), SIGNATURE)  # a bad token is not anonymous
    forbidden = post(c, None, {"query": "x", "filters": {"clearance_level": 2}})
    assert forbidden.status_code == 403


def test_anonymous_refused_by_default(client: Any) -> None:
    assert_clean_401(post(client, None), None)


def test_token_command_mints_an_accepted_token(client: Any, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    from campus_search.cli.main import main

    monkeypatch.setenv("JWT_SECRET_KEY", TEST_SECRET)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    assert main(["token", "--sub", "cli-user", "--role", "professional_services", "--department", "IT Services",
                 "--ttl", "120"]) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, TEST_SECRET, algorithms=["HS256"])
    assert claims["role"] == "professional_services" and claims["exp"] - claims["iat"] == 120
    r = post(client, "Bearer " + token)
    assert r.status_code == 200 and r.get_json()["user_id"] == "cli-user"


# --- one rule for the scheme and the subject (issue 16) ----------------------------------------------

def test_scheme_is_case_insensitive_on_every_request(app_factory: Any, token: Any) -> None:
    """RFC 7235: ``bearer``, ``BEARER`` and ``Bearer`` are the same scheme -- on the first request of a
    token as on any later one, whatever the verified-token cache holds."""
    for cache_seconds in (60, 0):
        c = app_factory(jwt_verified_cache_seconds=cache_seconds)
        value = token("student", sub=f"case-{cache_seconds}").removeprefix("Bearer ")
        for scheme in ("bearer", "BEARER", "Bearer", "bEaReR"):
            r = post(c, f"{scheme} {value}")
            assert r.status_code == 200, (cache_seconds, scheme, r.get_json())
            assert r.get_json()["user_id"] == f"case-{cache_seconds}"


@pytest.mark.parametrize("sub", ["", "   ", 42, None])
def test_token_with_empty_or_non_string_subject_is_401(client: Any, sub: Any) -> None:
    now = int(time.time())
    tok = jwt.encode({"sub": sub, "role": "student", "exp": now + 600}, TEST_SECRET, algorithm="HS256")
    r = post(client, "Bearer " + tok)
    assert r.status_code == 401
    assert r.get_json()["error"]["message"] in (EMPTY_SUB, "the token subject (sub) is invalid", lacks("sub"))


def test_probes_and_tokenless_requests_log_no_rejected_token(app_factory: Any,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    client = app_factory(rate_limits_enabled=True)  # the limiter authenticates first, the view again
    with caplog.at_level(logging.DEBUG, logger="campus_search"):
        for path in ("/health/live", "/health/ready", "/health", "/metrics"):
            client.get(path)
        assert_clean_401(post(client, None), None)
        assert not [r for r in caplog.records if "rejected token" in r.getMessage()]
        # a presented bad token is worth one line, saying why and nothing else
        assert_clean_401(post(client, hs({"exp": int(time.time()) - 3600})), EXPIRED)
    lines = [r.getMessage() for r in caplog.records if "rejected token" in r.getMessage()]
    assert lines == [f"rejected token: {EXPIRED}"]


# --- SSO role mapping (issue 10) ---------------------------------------------------------------------

def admin_stats(c: Any, auth: str) -> int:
    return int(c.get("/api/admin/stats", headers={"Authorization": auth}).status_code)


DISCIPLINARY_QUERY = {"query": "staff disciplinary procedure gross misconduct hearing",
                      "config": {"max_results": 20, "similarity_threshold": -1}}


def sees_only_public_clearance_2(c: Any, auth: str) -> bool:
    r = post(c, auth, DISCIPLINARY_QUERY)
    assert r.status_code == 200
    results = r.get_json()["results"]
    assert results
    return all(h["metadata"]["clearance_level"] <= 2 and h["metadata"]["visibility"] == "public" for h in results)


def test_role_claim_equal_to_a_role_name_is_not_that_role(app_factory: Any) -> None:
    """ROLE_MAPPING is the only way to a role: the claim "admin" is a student when ROLE_MAPPING says
    it_administrator=admin, through HS tokens as through the real HTTP app."""
    c = app_factory(role_mapping={"it_administrator": "admin"})
    now = int(time.time())

    def tok(role: Any) -> str:
        return "Bearer " + jwt.encode({"sub": "u", "exp": now + 600, "role": role}, TEST_SECRET, algorithm="HS256")

    assert admin_stats(c, tok("it_administrator")) == 200
    for claim in ("admin", "academic", "staff", ["admin", "staff"], "anonymous"):
        assert admin_stats(c, tok(claim)) == 403, claim
        assert sees_only_public_clearance_2(c, tok(claim)), claim
    # and with the shipped mapping (SPEC §2): role names are not SSO values either
    default = app_factory()
    assert admin_stats(default, tok("it_administrator")) == 200
    assert admin_stats(default, tok("admin")) == 403
    assert sees_only_public_clearance_2(default, tok("academic"))
    assert not sees_only_public_clearance_2(default, tok("academic_staff"))


def test_sso_role_claim_equal_to_a_role_name_is_a_student(app_factory: Any, idp: JwksServer) -> None:
    c = app_factory(jwt_algorithms=("RS256",), jwt_secret_key=None, oidc_jwks_url=idp.url, jwt_issuer=ISSUER,
                    jwt_audience=AUDIENCE, role_mapping={"it_administrator": "admin"})
    assert admin_stats(c, "Bearer " + idp.sign({"sub": "a1", "role": "it_administrator"}, "rsa-1")) == 200
    forged_role = "Bearer " + idp.sign({"sub": "a2", "role": "admin"}, "rsa-1")
    assert admin_stats(c, forged_role) == 403
    assert sees_only_public_clearance_2(c, forged_role)


def test_token_command_mints_the_mapped_sso_value_and_warns_about_unmapped_roles(
        app_factory: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    from campus_search.cli.main import main

    monkeypatch.setenv("JWT_SECRET_KEY", TEST_SECRET)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ROLE_MAPPING", "it_administrator=admin,professional_services=staff,student=student")
    c = app_factory(role_mapping={"it_administrator": "admin", "professional_services": "staff",
                                  "student": "student"})

    def mint(role: str) -> tuple[str, str]:
        assert main(["token", "--sub", f"cli-{role}", "--role", role, "--ttl", "120"]) == 0
        out, err = capsys.readouterr()
        return out.strip(), err

    admin, note = mint("admin")
    assert jwt.decode(admin, TEST_SECRET, algorithms=["HS256"])["role"] == "it_administrator"
    assert "it_administrator" in note
    assert admin_stats(c, "Bearer " + admin) == 200
    staff, _ = mint("staff")
    assert jwt.decode(staff, TEST_SECRET, algorithms=["HS256"])["role"] == "professional_services"
    professor, warning = mint("professor")
    assert jwt.decode(professor, TEST_SECRET, algorithms=["HS256"])["role"] == "professor"
    assert "will treat this token as a student" in warning
    assert admin_stats(c, "Bearer " + professor) == 403
    assert sees_only_public_clearance_2(c, "Bearer " + professor)
    academic, warning = mint("academic")  # a role, but nothing in this ROLE_MAPPING maps to it
    assert "will treat this token as a student" in warning
    assert sees_only_public_clearance_2(c, "Bearer " + academic)


# --- flask-jwt-extended is the verification layer (SPEC §0) ------------------------------------------

def test_every_token_is_verified_through_flask_jwt_extended(app_factory: Any, idp: JwksServer, token: Any) -> None:
    """HS and SSO tokens alike go through the extension (its decode_token asks its decode_key_loader for
    the key), accepted or refused, whatever the scheme's case and with the verified-token cache off."""
    sso = {"jwt_algorithms": ("RS256",), "jwt_secret_key": None, "oidc_jwks_url": idp.url,
           "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE}
    cases = (({}, token("student", sub="fjwe-hs"), hs({}, key="not-the-server-secret-" + "y" * 30), "HS256"),
             (sso, "Bearer " + idp.sign({"sub": "fjwe-rs"}, "rsa-1"),
              "Bearer " + idp.sign({"sub": "eve", "role": "admin"}, "rsa-1", key=generate_key()), "RS256"))
    for overrides, good, forged, alg in cases:
        c = app_factory(jwt_verified_cache_seconds=0, **overrides)
        manager = c.application.extensions["flask-jwt-extended"]
        real, asked = manager._decode_key_callback, []

        def spy(header: dict[str, Any], claims: dict[str, Any], real: Any = real, asked: list[str] = asked) -> Any:
            asked.append(header["alg"])
            return real(header, claims)

        manager.decode_key_loader(spy)
        value = good.removeprefix("Bearer ")
        assert post(c, "Bearer " + value).status_code == 200
        assert post(c, "bearer " + value).status_code == 200
        assert_clean_401(post(c, forged), SIGNATURE)
        assert asked == [alg] * 3
