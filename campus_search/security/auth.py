"""Authentication: bearer JWT -> :class:`Principal`.

Verification is flask-jwt-extended's (PyJWT underneath): algorithms pinned from configuration,
``exp`` required, ``iss``/``aud`` checked when configured, a small leeway for clock skew. HS* tokens
are checked with ``JWT_SECRET_KEY``; RS*/ES* tokens with the SSO provider's JWKS (see ``jwks.py``).
Identity never comes from the request body.

Behind a Shibboleth or OIDC proxy, identity may instead come from headers that proxy sets
(``PROXY_USER_HEADER`` and friends) -- believed only when the request's TCP peer is one of
``TRUSTED_PROXIES`` (``proxies.py``), never from anyone else. See docs/security.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import jwt
from flask import Flask, current_app, g, request
from flask_jwt_extended import JWTManager, get_jwt, verify_jwt_in_request
from flask_jwt_extended.exceptions import JWTExtendedException

from ..config import Settings
from ..errors import Forbidden, Unauthorized
from ..proxies import from_identity_proxy
from .roles import Principal, map_role, role_table

log = logging.getLogger(__name__)


def init_auth(app: Flask, settings: Settings) -> JWTManager:
    app.config.update(
        JWT_SECRET_KEY=settings.jwt_secret_key,
        JWT_ALGORITHM=settings.jwt_algorithms[0],
        JWT_DECODE_ALGORITHMS=list(settings.jwt_algorithms),
        JWT_TOKEN_LOCATION=["headers"],
        JWT_IDENTITY_CLAIM="sub",
        JWT_DECODE_LEEWAY=settings.jwt_leeway,
        JWT_DECODE_AUDIENCE=settings.jwt_audience,
        JWT_DECODE_ISSUER=settings.jwt_issuer,
        JWT_ERROR_MESSAGE_KEY="message",
    )
    manager = JWTManager(app)
    jwks = None
    if settings.oidc_jwks_url:
        from .jwks import JwksCache

        jwks = JwksCache(settings.oidc_jwks_url, timeout=min(settings.embedding_timeout, 5.0),
                         max_age=settings.oidc_jwks_cache_seconds,
                         min_refresh_interval=settings.oidc_jwks_refresh_interval)
    app.extensions["campus_search.jwks"] = jwks
    app.extensions["campus_search.verified_tokens"] = VerifiedTokens(settings.jwt_verified_cache_seconds)

    @manager.decode_key_loader
    def _key(header: Mapping[str, Any], _claims: Mapping[str, Any]) -> Any:
        alg = header.get("alg")
        if alg not in settings.jwt_algorithms:
            raise jwt.InvalidAlgorithmError("algorithm not allowed")
        if str(alg).startswith("HS"):
            return settings.jwt_secret_key
        if jwks is None:
            raise jwt.InvalidKeyError("no JWKS configured")
        return jwks.key_for(header.get("kid"), alg)

    @manager.token_verification_loader
    def _require_exp(_header: Mapping[str, Any], claims: Mapping[str, Any]) -> bool:
        return isinstance(claims.get("exp"), int | float)

    return manager


def principal_from_claims(claims: Mapping[str, Any], settings: Settings) -> Principal:
    """A verified token's claims -> Principal (role through ROLE_MAPPING; claim names configurable)."""
    role = map_role(claims.get(settings.claim_role), settings.role_mapping, role_table(settings.roles_json))
    raw_depts = claims.get(settings.claim_departments)
    if raw_depts is None and settings.claim_departments == "departments":
        raw_depts = claims.get("department")  # common singular spelling
    if isinstance(raw_depts, str):
        departments: tuple[str, ...] = (raw_depts,)
    elif isinstance(raw_depts, list):
        departments = tuple(str(d) for d in raw_depts if isinstance(d, str) and d)
    else:
        departments = ()
    campus = claims.get(settings.claim_campus)
    return Principal(user_id=str(claims["sub"]), role=role, departments=departments[:50],
                     campus=campus if isinstance(campus, str) else None, claims=dict(claims))


def anonymous_principal(settings: Settings) -> Principal:
    """The caller without a token, when ALLOW_ANONYMOUS: public content at the anonymous role's clearance."""
    return Principal(user_id="anonymous", role=role_table(settings.roles_json)["anonymous"])


def _header(name: str) -> str:
    raw = request.headers.get(name, "")
    # WSGI hands headers over as latin-1; Shibboleth sends UTF-8 (e.g. "Économie")
    with contextlib.suppress(UnicodeEncodeError, UnicodeDecodeError):
        raw = raw.encode("latin-1").decode("utf-8")
    return raw.strip()


def principal_from_proxy(settings: Settings) -> Principal | None:
    """Identity from a trusted proxy's headers, or None when not configured, not from a trusted proxy,
    or the proxy sent no user. Headers from anybody else are ignored, whatever they say."""
    if not settings.proxy_user_header or not from_identity_proxy(request, settings):
        return None
    user_id = _header(settings.proxy_user_header)
    if not user_id:
        return None
    sep = settings.proxy_value_separator

    def values(name: str) -> list[str]:
        return [v.strip() for v in _header(name).split(sep) if v.strip()][:50]

    roles = values(settings.proxy_role_header)
    role = map_role(roles, settings.role_mapping, role_table(settings.roles_json))
    campus = values(settings.proxy_campus_header)
    return Principal(user_id=user_id[:256], role=role, departments=tuple(values(settings.proxy_department_header)),
                     campus=campus[0] if campus else None, claims={"source": "proxy", "roles": roles})


class VerifiedTokens:
    """Principals of bearer tokens this process verified recently, keyed by the exact token string.

    A portal sends the same token with every request; verifying its signature and claims each time is
    the largest cost of a cached search. An entry is used until the token's own ``exp`` or
    ``JWT_VERIFIED_CACHE_SECONDS`` after verification, whichever is first, so a token is never accepted
    longer than it is valid; a signing key withdrawn from the JWKS stops being accepted within that
    many seconds. Only tokens that passed full verification are stored.
    """

    def __init__(self, seconds: float, size: int = 10_000) -> None:
        self.seconds = seconds
        self.size = size
        self._entries: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, token: str) -> Principal | None:
        with self._lock:
            entry = self._entries.get(token)
            if entry is None:
                return None
            if entry[0] <= time.time():
                del self._entries[token]
                return None
            self._entries.move_to_end(token)
            return entry[1]

    def put(self, token: str, principal: Principal, exp: Any) -> None:
        if self.seconds <= 0 or not isinstance(exp, int | float):
            return
        until = min(float(exp), time.time() + self.seconds)
        with self._lock:
            self._entries[token] = (until, principal)
            self._entries.move_to_end(token)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


def _bearer(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def authenticate(settings: Settings) -> Principal:
    """The caller of the current request: a trusted proxy's headers, else the bearer token. Raises
    Unauthorized (401) on a missing or bad token, unless anonymous access is allowed and the request
    carries no Authorization header at all (a bad token is a 401 even then)."""
    if "principal" in g:
        return g.principal
    principal = principal_from_proxy(settings)
    if principal is None and settings.allow_anonymous and "Authorization" not in request.headers:
        principal = anonymous_principal(settings)
    if principal is None:
        verified: VerifiedTokens | None = current_app.extensions.get("campus_search.verified_tokens")
        token = _bearer(request.headers.get("Authorization", ""))
        principal = verified.get(token) if verified is not None and token else None
        if principal is None:
            try:
                verify_jwt_in_request()
            except (JWTExtendedException, jwt.PyJWTError) as exc:
                log.info("rejected token: %s", exc.__class__.__name__)
                raise Unauthorized("missing, invalid or expired bearer token",
                                   headers={"WWW-Authenticate": 'Bearer realm="campus-search"'}) from None
            claims = get_jwt()
            principal = principal_from_claims(claims, settings)
            if verified is not None and token:
                verified.put(token, principal, claims.get("exp"))
    g.principal = principal
    return principal


def mint_token(settings: Settings, *, sub: str, role: str, departments: Iterable[str] = (),
               campus: str | None = None, ttl: int | None = None, extra: Mapping[str, Any] | None = None) -> str:
    """An HS256 token for local use (``campus-search token``, tests)."""
    if not settings.jwt_secret_key:
        raise Unauthorized("no JWT_SECRET_KEY configured")
    alg = next((a for a in settings.jwt_algorithms if a.startswith("HS")), None)
    if alg is None:
        raise Unauthorized("JWT_ALGORITHMS accepts no HS* algorithm; tokens come from the SSO provider")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "nbf": now, "exp": now + int(ttl or settings.jwt_token_ttl),
                              "jti": uuid.uuid4().hex, "type": "access", settings.claim_role: role}
    depts = list(departments)
    if depts:
        claims[settings.claim_departments] = depts
    if campus:
        claims[settings.claim_campus] = campus
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    claims.update(extra or {})
    return jwt.encode(claims, settings.jwt_secret_key, algorithm=alg)


def require_admin(settings: Settings) -> Principal:
    """The caller, who must be an admin: 401 without a valid token, 403 for any other role."""
    principal = authenticate(settings)
    if not principal.is_admin:
        raise Forbidden("this endpoint requires the admin role")
    return principal
