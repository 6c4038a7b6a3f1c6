"""The application factory."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, g, request

from campus_search.api import admin_stats, cache_admin, instrumentation, ops
from campus_search.api import documents as documents_api
from campus_search.api import explain as explain_api
from campus_search.api import openapi as openapi_api
from campus_search.api import search as search_api
from campus_search.api.cors import init_cors
from campus_search.api.errors import JSONProvider, register_error_handlers
from campus_search.api.ratelimit import init_rate_limits
from campus_search.config import Settings, load_settings
from campus_search.ops import logs
from campus_search.security.auth import init_auth
from campus_search.services import Services

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, services: Services | None = None) -> Flask:
    """Build the Flask app. Resolves the database and applies migrations now; pools and the model
    open lazily in each serving process (safe under gunicorn --preload)."""
    settings = settings or load_settings()
    services = services or Services(settings)
    app = Flask("campus_search")
    app.config.update(MAX_CONTENT_LENGTH=settings.max_request_bytes, JSON_SORT_KEYS=False)
    app.json = JSONProvider(app)  # keys in order; too deeply nested JSON is a 400
    app.extensions["campus_search"] = services
    init_auth(app, settings)
    register_error_handlers(app)

    @app.before_request
    def _start() -> None:
        g.start_time = time.perf_counter()
        g.request_id = logs.request_id_for(request, settings)  # a trusted proxy's X-Request-ID, or new

    @app.after_request
    def _finish(response: Any) -> Any:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    init_cors(app, settings)  # browser portals: CORS_ORIGINS only, none by default
    app.register_blueprint(openapi_api.bp)
    app.register_blueprint(search_api.bp)
    app.register_blueprint(documents_api.bp)
    app.register_blueprint(explain_api.bp)
    instrumentation.init_app(app, services)  # metrics, then the access log
    ops.init_app(app, settings)
    app.register_blueprint(admin_stats.bp)
    app.register_blueprint(cache_admin.bp)
    init_rate_limits(app, settings)  # after the hooks above: 429s get a request id, metrics and logs
    return app
