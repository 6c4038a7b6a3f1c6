"""JWKS key cache for SSO tokens (RS256/ES256), refreshed on an unknown ``kid``, rate-limited.

A key rotation at the identity provider shows up as a token with a ``kid`` we have not seen: we
fetch the JWKS once more, but at most once per ``min_refresh_interval`` seconds, so a stream of
tokens with random ``kid`` values cannot turn into a stream of requests to the provider. Concurrent
requests that miss together share one fetch (single flight). Known keys are served without taking
the lock; after ``max_age`` the set is re-fetched, and a failed fetch keeps the keys we had.
(redash's JWT cache, filled once and never refreshed, is the pitfall this avoids.)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import jwt
import requests

from campus_search.errors import ServiceUnavailable

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 1 << 20  # a JWKS is a few KB; refuse to buffer anything absurd

# Key type each algorithm family needs: a JWK without an ``alg`` member is accepted for any of them.
_KTY = {"RS": "RSA", "PS": "RSA", "ES": "EC"}
_CURVE = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


class JwksCache:
    """Signing keys of one OIDC provider, by ``kid``. Thread-safe; one per process."""

    def __init__(self, url: str, *, timeout: float = 5.0, max_age: float = 3600.0,
                 min_refresh_interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.timeout = timeout
        self.max_age = max_age
        self.min_refresh_interval = min_refresh_interval
        self._clock = clock
        self._keys: dict[str, tuple[jwt.PyJWK, dict[str, Any]]] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._last_attempt: float | None = None
        self._lock = threading.Lock()
        self.fetches = 0  # attempts, successful or not (tests and metrics read it)

    def _fetch(self) -> None:
        self._last_attempt = self._clock()
        self.fetches += 1
        try:
            with requests.get(self.url, timeout=self.timeout, stream=True,
                              headers={"Accept": "application/json"}) as response:
                response.raise_for_status()
                body = response.raw.read(MAX_JWKS_BYTES + 1, decode_content=True)
            if len(body) > MAX_JWKS_BYTES:
                raise ValueError("JWKS document too large")
            data = json.loads(body)
            entries = data.get("keys") if isinstance(data, dict) else None
            if not isinstance(entries, list):
                raise ValueError("JWKS document has no keys list")
        except (requests.RequestException, ValueError) as exc:
            log.warning("JWKS fetch from %s failed: %s", self.url, exc.__class__.__name__)
            return  # keep the keys we had
        keys = {}
        for jwk in entries:
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig" or not jwk.get("kid"):
                continue  # encryption keys and keys we could never select are not signing keys for us
            try:
                keys[str(jwk["kid"])] = (jwt.PyJWK(jwk), jwk)
            except (jwt.PyJWTError, ValueError, TypeError, KeyError):
                continue  # unsupported key type: skip it, keep the others
        if not keys:
            log.warning("JWKS from %s holds no usable signing keys; keeping the previous set", self.url)
            return
        self._keys = keys
        self._fetched_at = self._clock()

    def _may_refresh(self, now: float) -> bool:
        return self._last_attempt is None or now - self._last_attempt >= self.min_refresh_interval

    def key_for(self, kid: Any, alg: Any) -> Any:
        """The verification key for a token's ``kid`` and ``alg``; raises a PyJWT error when there is
        none (-> 401), or ServiceUnavailable when the provider's keys were never obtained (-> 503)."""
        if not isinstance(kid, str) or not kid:
            raise jwt.InvalidKeyError("token has no kid")
        arrived = self._clock()
        entry = self._keys.get(kid)
        fresh = self._fetched_at is not None and arrived - self._fetched_at <= self.max_age
        # An unknown kid waits for the (single) refresh; a known but stale key is used while another
        # thread refreshes, so verification never queues behind the provider.
        if (entry is None or not fresh) and self._lock.acquire(blocking=entry is None):
            try:
                # Somebody else may have fetched while we waited for the lock: use their result.
                fetched_since = self._last_attempt is not None and self._last_attempt >= arrived
                if not fetched_since and self._may_refresh(self._clock()):
                    self._fetch()
            finally:
                self._lock.release()
            entry = self._keys.get(kid)
        if entry is None:
            if self._fetched_at is None:
                raise ServiceUnavailable("the identity provider's signing keys are unavailable",
                                         headers={"Retry-After": str(max(1, int(self.min_refresh_interval)))})
            raise jwt.InvalidKeyError("unknown kid")
        key, jwk = entry
        _check_algorithm(str(alg), jwk)
        return key.key


def _check_algorithm(alg: str, jwk: dict[str, Any]) -> None:
    """A key is used only with the algorithm it declares, or (no ``alg``) one its type supports."""
    declared = jwk.get("alg")
    if declared:
        if declared != alg:
            raise jwt.InvalidAlgorithmError("token algorithm does not match its key")
        return
    if _KTY.get(alg[:2]) != jwk.get("kty"):
        raise jwt.InvalidAlgorithmError("token algorithm does not match its key type")
    if alg in _CURVE and jwk.get("crv") != _CURVE[alg]:
        raise jwt.InvalidAlgorithmError("token algorithm does not match its key's curve")
