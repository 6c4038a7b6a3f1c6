"""Authentication: bearer JWT -> :class:`Principal`.

Verification is flask-jwt-extended's, PyJWT underneath (:func:`verify_token` calls its
``decode_token``): the token's algorithm must be one of ``JWT_ALGORITHMS`` (pinned), ``iss``/``aud``
are checked when configured, with a small leeway for clock skew, and ``sub`` must be a string. HS*
tokens are checked with ``JWT_SECRET_KEY``; RS*/ES* tokens with the SSO provider's JWKS (see
``jwks.py``), chosen per token by the extension's ``decode_key_loader``. On the verified claims this
module adds what the extension does not require: ``exp`` present and numeric, ``sub`` not blank, an
access token. The ``Authorization`` header is read here, in one place, with the scheme matched
case-insensitively (RFC 7235), so ``bearer`` and ``Bearer`` are the same on every request (the
extension's own header reader compares the scheme case-sensitively). Identity never comes from the
request body.

A refused token is a 401 whose ``WWW-Authenticate`` follows RFC 6750: no ``error`` attribute when the
request carried no bearer token at all (3.1), else ``error="invalid_token"`` with an
``error_description`` naming the class of problem (expired, signature, audience, issuer, malformed ...)
and the same words in the JSON message. The descriptions come from a fixed list keyed by exception
class: never a claim value, the expected audience or issuer, or the library's own exception text.

Behind a Shibboleth or OIDC proxy, identity may instead come from headers that proxy sets
(``PROXY_USER_HEADER`` and friends) -- believed only when the request's TCP peer is one of
``TRUSTED_PROXIES`` (``proxies.py``), never from anyone else. See docs/security.md.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
from flask import Flask, current_app, g, request
from flask_jwt_extended import JWTManager, decode_token
from flask_jwt_extended.exceptions import JWTDecodeError, JWTExtendedException

from campus_search.config import Settings
from campus_search.errors import Forbidden, Unauthorized
from campus_search.expiring import ExpiringLRU
from campus_search.security.access import clean_groups
from campus_search.security.proxies import from_identity_proxy
from campus_search.security.roles import Principal, map_role, role_table, sso_value_for

if TYPE_CHECKING:
    from campus_search.security.jwks import JwksCache

log = logging.getLogger(__name__)

REALM = "campus-search"
TOKEN_REQUIRED = "a bearer token is required"
#: (error class, description), most specific first: InvalidSignatureError is a DecodeError, and PyJWT
#: checks the signature before any claim, so a claim problem is only ever reported for a token whose
#: signature verified. flask-jwt-extended lets PyJWT's errors through unwrapped.
_DESCRIPTIONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet"),
    (jwt.InvalidSignatureError, "the token signature does not verify"),
    (jwt.InvalidAudienceError, "the token was issued for another audience"),
    (jwt.InvalidIssuerError, "the token was issued by an issuer this service does not accept"),
    (jwt.InvalidAlgorithmError, "the token signing algorithm is not accepted"),
    (jwt.InvalidKeyError, "the token signing key is not known to this service"),
    (jwt.exceptions.InvalidSubjectError, "the token subject (sub) is invalid"),
    (jwt.exceptions.InvalidIssuedAtError, "the token issue time (iat) is invalid"),
    (jwt.DecodeError, "the token is malformed"),
)


class InvalidToken(Unauthorized):
    """A bearer token was presented and refused (RFC 6750 ``invalid_token``)."""

    def __init__(self, description: str) -> None:
        super().__init__(description, headers=challenge("invalid_token", description))
        self.description = description


def challenge(error: str | None = None, description: str | None = None) -> dict[str, str]:
    """The ``WWW-Authenticate`` header of a 401 (RFC 6750 3). ``description`` comes from this module's
    fixed texts, which hold none of the characters the quoted-string syntax forbids."""
    value = f'Bearer realm="{REALM}"'
    if error:
        value += f', error="{error}"'
        if description:
            value += f', error_description="{description}"'
    return {"WWW-Authenticate": value}


def token_required() -> Unauthorized:
    """401 for a request without a bearer token: no error code (RFC 6750 3.1)."""
    return Unauthorized(TOKEN_REQUIRED, headers=challenge())


def describe_rejection(exc: Exception) -> str:
    """A fixed, safe description of why flask-jwt-extended (or PyJWT under it) refused a token."""
    if isinstance(exc, jwt.MissingRequiredClaimError) and exc.claim in ("exp", "sub", "iss", "aud"):
        return f"the token lacks the required {exc.claim} claim"
    if isinstance(exc, JWTDecodeError) and str(exc) == "Missing claim: sub":  # the extension's identity check
        return "the token lacks the required sub claim"
    for cls, text in _DESCRIPTIONS:
        if isinstance(exc, cls):
            return text
    return "the token is invalid"


@dataclass(frozen=True)
class Authentication:
    """What :func:`init_auth` sets up per app (held by the app's ``CampusSearch`` extension)."""

    manager: JWTManager  # flask-jwt-extended, its decoding key chosen per token
    jwks: JwksCache | None  # the SSO provider's signing keys (OIDC_JWKS_URL), or None
    verified_tokens: VerifiedTokens  # bearer tokens this process verified recently


def init_auth(app: Flask, settings: Settings) -> Authentication:
    """flask-jwt-extended configured from ``settings``, its key chosen per token (``JWT_SECRET_KEY`` or
    the SSO provider's JWKS), and the per-process verified-token cache."""
    app.config.update(
        JWT_SECRET_KEY=settings.jwt_secret_key,
        JWT_ALGORITHM=settings.jwt_algorithms[0],
        JWT_DECODE_ALGORITHMS=list(settings.jwt_algorithms),
        JWT_TOKEN_LOCATION=["headers"],
        JWT_IDENTITY_CLAIM="sub",
        JWT_VERIFY_SUB=True,  # sub must be a string (PyJWT); not blank is checked in verify_token
        JWT_DECODE_LEEWAY=settings.jwt_leeway,
        JWT_DECODE_AUDIENCE=settings.jwt_audience,
        JWT_DECODE_ISSUER=settings.jwt_issuer,
        JWT_ERROR_MESSAGE_KEY="message",
    )
    manager = JWTManager(app)
    jwks = None
    if settings.oidc_jwks_url:
        from campus_search.security.jwks import JwksCache  # requests, only when an SSO provider is used

        jwks = JwksCache(settings.oidc_jwks_url, timeout=min(settings.embedding_timeout, 5.0),
                         max_age=settings.oidc_jwks_cache_seconds,
                         min_refresh_interval=settings.oidc_jwks_refresh_interval)

    @manager.decode_key_loader
    def _key(header: Mapping[str, Any], _claims: Mapping[str, Any]) -> Any:
        # the algorithm is checked before a key is chosen: `none` and HS/RS confusion never get a key
        alg = header.get("alg")
        if alg not in settings.jwt_algorithms:
            raise jwt.InvalidAlgorithmError("algorithm not allowed")
        if str(alg).startswith("HS"):
            if not settings.jwt_secret_key:
                raise jwt.InvalidKeyError("no JWT_SECRET_KEY configured")
            return settings.jwt_secret_key
        if jwks is None:
            raise jwt.InvalidKeyError("no JWKS configured")
        return jwks.key_for(header.get("kid"), alg)  # ServiceUnavailable (503) if never obtained

    return Authentication(manager, jwks, VerifiedTokens(settings.jwt_verified_cache_seconds))


def verify_token(token: str) -> dict[str, Any]:
    """The claims of a valid access token, verified by flask-jwt-extended in the current app; raises
    :class:`InvalidToken` saying what is wrong (or ServiceUnavailable when the SSO provider's keys were
    never obtained)."""
    try:
        claims: dict[str, Any] = decode_token(token)
    except (JWTExtendedException, jwt.PyJWTError) as exc:
        raise InvalidToken(describe_rejection(exc)) from None
    if "exp" not in claims:  # the extension verifies exp only when present
        raise InvalidToken("the token lacks the required exp claim")
    exp = claims["exp"]
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise InvalidToken("the token is malformed")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.strip():
        raise InvalidToken("the token has an empty subject (sub)")
    if claims.get("type", "access") != "access":
        raise InvalidToken("the token is not an access token")
    return claims


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
    groups, problem = clean_groups(claims.get(settings.claim_groups))
    if problem:
        log.warning("token of %s: %s", str(claims["sub"])[:64], problem)
    return Principal(user_id=str(claims["sub"]), role=role, departments=departments[:50],
                     campus=campus if isinstance(campus, str) else None, claims=dict(claims), groups=groups,
                     groups_problem=problem)


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
    groups: tuple[str, ...] = ()
    problem = None
    if settings.proxy_groups_header:
        raw = [v.strip() for v in _header(settings.proxy_groups_header).split(sep) if v.strip()]
        groups, problem = clean_groups(raw)
        if problem:
            log.warning("proxy identity %s: %s", user_id[:64], problem)
    return Principal(user_id=user_id[:256], role=role, departments=tuple(values(settings.proxy_department_header)),
                     campus=campus[0] if campus else None, claims={"source": "proxy", "roles": roles},
                     groups=groups, groups_problem=problem)


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
        self._entries: ExpiringLRU[str, Principal] = ExpiringLRU(size, clock=time.time)  # exp is epoch time

    def get(self, token: str) -> Principal | None:
        return self._entries.get(token)

    def put(self, token: str, principal: Principal, exp: Any) -> None:
        if self.seconds <= 0 or not isinstance(exp, int | float):
            return
        self._entries.put(token, principal, min(float(exp), time.time() + self.seconds))


def _verified_tokens() -> VerifiedTokens | None:
    """The app's verified-token cache: ``CampusSearch.auth`` (api/extension.py, which imports this module,
    so it is reached through the app rather than imported). None in an app without it."""
    extension = current_app.extensions.get("campus_search")
    auth = getattr(extension, "auth", None)
    return auth.verified_tokens if isinstance(auth, Authentication) else None


def bearer_token(header: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; the scheme is case-insensitive (RFC 7235
    2.1). None when the header is absent or uses another scheme."""
    scheme, _, value = header.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def authenticate(settings: Settings) -> Principal:
    """The caller of the current request: a trusted proxy's headers, else the bearer token. Raises
    Unauthorized (401) on a missing or bad token, unless anonymous access is allowed and the request
    carries no Authorization header at all (a bad token is a 401 even then)."""
    if "principal" in g:
        return g.principal
    if "auth_error" in g:  # already refused (the rate limiter asks first): same answer, one log line
        raise g.auth_error
    principal = principal_from_proxy(settings)
    if principal is None and settings.allow_anonymous and "Authorization" not in request.headers:
        principal = anonymous_principal(settings)
    if principal is None:
        token = bearer_token(request.headers.get("Authorization", ""))
        if not token:
            g.auth_error = token_required()
            raise g.auth_error  # an everyday event (probes, first requests): not logged
        verified = _verified_tokens()
        principal = verified.get(token) if verified is not None else None
        if principal is None:
            try:
                claims = verify_token(token)
            except InvalidToken as exc:
                log.info("rejected token: %s", exc.description)
                g.auth_error = exc
                raise
            principal = principal_from_claims(claims, settings)
            if verified is not None:
                verified.put(token, principal, claims.get("exp"))
    g.principal = principal
    return principal


def token_role_claim(settings: Settings, role: str) -> tuple[str, str | None]:
    """(the role claim a locally minted token carries, a note for the person minting it).

    The server gives a role only through ROLE_MAPPING, so a token asked for as ``staff`` carries the SSO
    value that ROLE_MAPPING maps to staff (``professional_services`` by default) and is honoured exactly
    like the provider's own tokens. A value that nothing maps is minted as given, with a warning: the
    server will treat it as a student."""
    claim = sso_value_for(role, settings.role_mapping)
    if claim is None:
        return role, (f"warning: {role!r} is neither a key of ROLE_MAPPING nor a role it maps to; the server "
                      "will treat this token as a student")
    if claim != role:
        return claim, f"role {role}: the token carries the SSO role {claim!r} (ROLE_MAPPING {claim}={role})"
    return claim, None


def mint_token(settings: Settings, *, sub: str, role: str, departments: Iterable[str] = (),
               campus: str | None = None, ttl: int | None = None, extra: Mapping[str, Any] | None = None,
               groups: Iterable[str] = ()) -> str:
    """An HS256 token for local use (``campus-search token``, tests). ``role`` is a role name or an SSO
    role value; the token carries the SSO value (:func:`token_role_claim`)."""
    if not settings.jwt_secret_key:
        raise Unauthorized("no JWT_SECRET_KEY configured")
    alg = next((a for a in settings.jwt_algorithms if a.startswith("HS")), None)
    if alg is None:
        raise Unauthorized("JWT_ALGORITHMS accepts no HS* algorithm; tokens come from the SSO provider")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "nbf": now, "exp": now + int(ttl or settings.jwt_token_ttl),
                              "jti": uuid.uuid4().hex, "type": "access",
                              settings.claim_role: token_role_claim(settings, role)[0]}
    depts = list(departments)
    if depts:
        claims[settings.claim_departments] = depts
    if campus:
        claims[settings.claim_campus] = campus
    if groups := list(groups):
        claims[settings.claim_groups] = groups
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
