"""CORS for browser-based campus portals (SPEC §1): only the origins in ``CORS_ORIGINS``, none by default.

Only ``/api/*`` is opened to browsers; health and metrics endpoints are for probes and Prometheus.
Tokens travel in the ``Authorization`` header, never in cookies, so credentials mode stays off and a
foreign page cannot ride on a user's session. Error answers (401, 429, ...) carry the CORS headers too,
so a portal can read the JSON error instead of an opaque network failure.
"""

from __future__ import annotations

import logging

from flask import Flask
from flask_cors import CORS

from campus_search.config import Settings

log = logging.getLogger(__name__)

#: Every method an /api/* route answers (the admin document API adds/replaces with PUT and changes
#: metadata with PATCH); tests/test_cors.py checks the list against the app's URL map.
ALLOWED_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
ALLOWED_HEADERS = ["Authorization", "Content-Type", "X-Request-ID"]
EXPOSED_HEADERS = ["X-Request-ID", "Retry-After", "RateLimit", "RateLimit-Policy", "WWW-Authenticate"]
PREFLIGHT_MAX_AGE = 600  # seconds a browser may reuse a preflight answer


def init_cors(app: Flask, settings: Settings) -> None:
    """Allow the configured origins to call ``/api/*`` from a browser; do nothing when none are configured."""
    origins = list(settings.cors_origins)
    if not origins:
        return
    if "*" in origins:
        log.warning("CORS_ORIGINS=* lets any web page call the API with a token it holds; list portal origins")
    CORS(app, resources={r"/api/*": {"origins": origins}}, methods=ALLOWED_METHODS,
         allow_headers=ALLOWED_HEADERS, expose_headers=EXPOSED_HEADERS, supports_credentials=False,
         max_age=PREFLIGHT_MAX_AGE, vary_header=True)
