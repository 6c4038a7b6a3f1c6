"""JWKS key cache for SSO tokens (RS256/ES256), refreshed on an unknown ``kid``, rate-limited.

A key rotation at the identity provider shows up as a token with a ``kid`` we have not seen: we
fetch the JWKS once more, but at most once per ``min_refresh_interval`` seconds, so a stream of
tokens with random ``kid`` values cannot turn into a stream of requests to the provider.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import jwt
import requests

log = logging.getLogger(__name__)


class JwksCache:
    def __init__(self, url: str, *, timeout: float = 5.0, max_age: float = 3600.0,
                 min_refresh_interval: float = 30.0) -> None:
        self.url = url
        self.timeout = timeout
        self.max_age = max_age
        self.min_refresh_interval = min_refresh_interval
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = 0.0
        self._last_attempt = -1e9
        self._lock = threading.Lock()
        self.fetches = 0

    def _fetch(self) -> None:
        self._last_attempt = time.monotonic()
        self.fetches += 1
        try:
            response = requests.get(self.url, timeout=self.timeout)
            response.raise_for_status()
            data = response.json()
            keys = {}
            for jwk in data.get("keys", []):
                try:
                    key = jwt.PyJWK(jwk)
                except jwt.PyJWTError:
                    continue  # unsupported key type: skip it, keep the others
                if key.key_id:
                    keys[key.key_id] = key
        except (requests.RequestException, ValueError, AttributeError) as exc:
            log.warning("JWKS fetch from %s failed: %s", self.url, exc.__class__.__name__)
            return  # keep the keys we had
        self._keys = keys
        self._fetched_at = time.monotonic()

    def key_for(self, kid: Any, alg: Any) -> Any:
        if not isinstance(kid, str) or not kid:
            raise jwt.InvalidKeyError("token has no kid")
        with self._lock:
            stale = time.monotonic() - self._fetched_at > self.max_age
            may_refresh = time.monotonic() - self._last_attempt >= self.min_refresh_interval
            if (kid not in self._keys or stale) and may_refresh:
                self._fetch()
            key = self._keys.get(kid)
        if key is None:
            raise jwt.InvalidKeyError("unknown kid")
        if key.algorithm_name and alg != key.algorithm_name:
            raise jwt.InvalidAlgorithmError("token algorithm does not match its key")
        return key.key
