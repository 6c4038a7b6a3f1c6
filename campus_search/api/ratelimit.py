"""Per-user, per-role rate limits (SPEC §2), counted by flask-limiter.

- **Who is counted**: an authenticated caller by token subject (hashed), from whatever address;
  anonymous callers, and requests whose token is missing or invalid, by client IP
  (:func:`campus_search.security.proxies.client_ip`: ``X-Forwarded-For`` only from ``TRUSTED_PROXIES``).
- **How much**: the caller's role's ``per_minute`` and ``per_hour`` together (``RATE_LIMIT_PER_MINUTE``
  overrides every role's per-minute figure), one budget across the ``/api/`` endpoints.
- **Where**: Redis (``REDIS_URL``, or the embedded Redis under ``DATA_DIR`` when none is configured;
  keys under ``REDIS_KEY_PREFIX`` + ``rl:``). Each hit is one atomic server-side increment, so counts are
  exact across gunicorn workers and app replicas. With the default ``fixed-window`` strategy the same call
  returns the count and the window's end (:class:`HitReportingFixedWindow`), so the headers cost no
  further round trip: one per limit (per minute, per hour) and request. With ``REDIS_URL=memory://``, in
  memory per process (a single-process demo is exact; N workers allow up to N times the limit).
- **Answer**: 429 in the one error shape with ``Retry-After``; every limited response carries the
  IETF ``RateLimit-Policy`` and ``RateLimit`` fields (draft-ietf-httpapi-ratelimit-headers), e.g.
  ``RateLimit-Policy: "per-minute";q=30;w=60, "per-hour";q=500;w=3600`` and
  ``RateLimit: "per-minute";r=29;t=60``.
- **Redis down**: ``RATE_LIMIT_FAIL_OPEN=true`` (default) keeps serving with flask-limiter's
  in-memory fallback (per-process counts) and re-checks Redis with backoff, switching back by itself;
  ``false`` answers 503 with ``Retry-After``, skipping Redis for ``REDIS_RETRY_AFTER`` seconds after a
  failure (circuit breaker) so a dead Redis costs no timeouts.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import redis
from flask import Flask, g, has_request_context, request
from flask_limiter import Limiter, RequestLimit
from flask_limiter.errors import RateLimitExceeded
from limits import RateLimitItem
from limits.errors import StorageError
from limits.storage import RedisStorage
from limits.strategies import FixedWindowRateLimiter
from limits.util import WindowStats
from redis.backoff import NoBackoff
from redis.retry import Retry

from campus_search import metrics
from campus_search.api.errors import error_response
from campus_search.breaker import CircuitBreaker
from campus_search.config import Settings
from campus_search.errors import CampusSearchError, ServiceUnavailable
from campus_search.security.auth import authenticate
from campus_search.security.proxies import client_ip
from campus_search.security.roles import Role, role_table

log = logging.getLogger(__name__)

#: Paths under /api/ that are not counted (the API description is static and cheap).
EXEMPT_PATHS = frozenset({"/api/openapi.json"})


@dataclass(frozen=True)
class Caller:
    key: str  # the bucket: "user:<hash of sub>" or "ip:<address>"
    role: Role


def current_caller(settings: Settings) -> Caller:
    """Who the current request is counted as (memoised on ``g``)."""
    found = g.get("rate_limit_caller")
    if found is not None:
        return found
    try:
        principal = authenticate(settings)
    except CampusSearchError:
        principal = None  # the view answers 401 itself; meanwhile bad tokens are counted by address
    if principal is None or principal.anonymous:
        role = principal.role if principal is not None else role_table(settings.roles_json)["anonymous"]
        caller = Caller("ip:" + (client_ip(request, settings) or "unknown"), role)
    else:
        caller = Caller("user:" + hashlib.sha256(principal.user_id.encode()).hexdigest()[:32], principal.role)
    g.rate_limit_caller = caller
    return caller


def limits_for(role: Role, settings: Settings) -> tuple[int, int]:
    """(per minute, per hour) for a role; RATE_LIMIT_PER_MINUTE overrides the per-minute figure."""
    return settings.rate_limit_per_minute or role.per_minute, role.per_hour


def _exempt() -> bool:
    return request.method == "OPTIONS" or not request.path.startswith("/api/") or request.path in EXEMPT_PATHS


def _policy_name(item: RateLimitItem) -> str:
    return f"per-{item.GRANULARITY.name}" if item.multiples == 1 else f"per-{item.multiples}-{item.GRANULARITY.name}"


def _window(limit: RequestLimit) -> tuple[int, int]:
    """(remaining, seconds until the window resets) for one evaluated limit (reads the storage)."""
    reset_at, remaining = limit.window
    return max(0, int(remaining)), max(1, math.ceil(reset_at - time.time()))


#: limits' fixed-window hit (its incr_expire.lua: INCRBY, and EXPIRE on the window's first hit) that also
#: returns the key's remaining lifetime, so the hit alone tells the count and the window's end.
_HIT_AND_TTL = """
local current = redis.call("incrby", KEYS[1], ARGV[2])
if tonumber(current) == tonumber(ARGV[2]) then
    redis.call("expire", KEYS[1], ARGV[1])
end
return {current, redis.call("pttl", KEYS[1])}
"""


class HitReportingFixedWindow(FixedWindowRateLimiter):
    """The ``fixed-window`` strategy on Redis, counting exactly as limits' own (the same key, the same atomic
    increment and expiry), whose hit also reads the window's remaining lifetime in the same call and keeps
    count and end for the rest of the request. The ``RateLimit`` header and a 429's ``Retry-After`` are
    then answered from the hit (remaining after this request's deduction), not from a GET and a TTL
    afterwards: one Redis round trip per limit and request instead of two more for the header."""

    def __init__(self, storage: RedisStorage) -> None:
        super().__init__(storage)
        self.redis = storage
        self._script = storage.get_connection().register_script(_HIT_AND_TTL.encode())

    def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        key = item.key_for(*identifiers)
        try:
            current, pttl = self._script([self.redis.prefixed_key(key)], [item.get_expiry(), cost])
        except self.redis.base_exceptions as exc:  # as limits' storage methods report it (wrap_exceptions)
            raise StorageError(exc) from exc
        if has_request_context():
            g.setdefault("rate_limit_windows", {})[key] = (int(current), time.time() + max(0, int(pttl)) / 1000)
        return int(current) <= item.amount

    def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        seen = g.get("rate_limit_windows", {}).get(item.key_for(*identifiers)) if has_request_context() else None
        if seen is None:  # not hit in this request: read the storage as limits does
            return super().get_window_stats(item, *identifiers)
        current, reset_at = seen
        return WindowStats(reset_at, max(0, item.amount - current))


def storage_options(settings: Settings) -> tuple[str, dict[str, Any]]:
    """flask-limiter storage URI and options: Redis with short timeouts, or memory://."""
    from campus_search.storage.embedded_redis import resolve

    url, _ = resolve(settings)
    if not url:
        return "memory://", {}
    if url.startswith("unix://"):  # the embedded Redis's socket; limits spells the scheme redis+unix
        url = "redis+unix://" + url.removeprefix("unix://")
    return url, {"key_prefix": settings.redis_key_prefix + "rl", "wrap_exceptions": True,
                 "socket_timeout": settings.redis_timeout, "socket_connect_timeout": settings.redis_timeout,
                 "retry": Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))}


def init_rate_limits(app: Flask, settings: Settings) -> Limiter:
    """Attach the limiter, the 429 answer and the RateLimit headers to ``app``."""
    uri, options = storage_options(settings)
    redis_backed = uri != "memory://"
    fail_open = settings.rate_limit_fail_open
    limiter = Limiter(
        key_func=lambda: current_caller(settings).key,
        application_limits=[lambda: "{} per 1 minute; {} per 1 hour".format(
            *limits_for(current_caller(settings).role, settings))],
        application_limits_exempt_when=_exempt,
        storage_uri=uri, storage_options=options, strategy=settings.rate_limit_strategy,
        headers_enabled=False,  # we write the IETF fields instead of X-RateLimit-*
        swallow_errors=fail_open, in_memory_fallback_enabled=redis_backed and fail_open,
        enabled=settings.rate_limits_enabled)
    limiter.init_app(app)
    if not limiter.enabled:
        return limiter
    if settings.rate_limit_strategy == "fixed-window" and isinstance(limiter.storage, RedisStorage):
        limiter._limiter = HitReportingFixedWindow(limiter.storage)  # flask-limiter has no hook for its strategy
    breaker = CircuitBreaker(settings.redis_retry_after) if redis_backed and not fail_open else None
    retry_after = str(max(1, math.ceil(settings.redis_retry_after)))

    if breaker is not None:
        @limiter.request_filter
        def _closed_while_redis_down() -> bool:
            if _exempt():
                return True
            if not breaker.allow():
                raise ServiceUnavailable("rate limiting is unavailable; try again shortly",
                                         headers={"Retry-After": retry_after})
            return False

        @app.errorhandler(StorageError)
        def _storage_down(exc: StorageError) -> Any:
            breaker.failure(exc)
            g.rate_limit_storage_failed = True
            return error_response(503, "service_unavailable", "rate limiting is unavailable; try again shortly",
                                  headers={"Retry-After": retry_after})

    @app.errorhandler(RateLimitExceeded)
    def _too_many(exc: RateLimitExceeded) -> Any:
        item = exc.limit.limit
        retry = item.get_expiry()
        current = limiter.current_limit
        if current is not None:
            try:
                retry = _window(current)[1]
            except Exception:  # the storage failed between the hit and now: the full window is safe
                log.debug("rate-limit window unavailable")
        metrics.rate_limited(current_caller(settings).role.name)
        return error_response(429, "rate_limited", f"rate limit exceeded ({item}); retry in {retry} s",
                              headers={"Retry-After": str(retry)})

    @app.after_request
    def _rate_limit_headers(response: Any) -> Any:
        if breaker is not None and not g.get("rate_limit_storage_failed") and limiter.current_limits:
            breaker.success()  # the request reached Redis and got an answer
        limits = limiter.current_limits
        if not limits:
            return response
        response.headers["RateLimit-Policy"] = ", ".join(
            f'"{_policy_name(rl.limit)}";q={rl.limit.amount};w={rl.limit.get_expiry()}' for rl in limits)
        current = limiter.current_limit or limits[0]
        try:
            remaining, reset = _window(current)
        except Exception:  # Redis went away mid-request: leave the live counters out, keep the policy
            return response
        response.headers["RateLimit"] = f'"{_policy_name(current.limit)}";r={remaining};t={reset}'
        if response.status_code == 429:
            response.headers["Retry-After"] = str(reset)
        return response

    return limiter
