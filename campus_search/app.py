"""The application factory: the wiring diagram of one app, in the order the parts are attached.

One settings source: the app is built from a :class:`Services`, and every part reads that Services'
settings (``CampusSearch.settings``). Every per-app component is kept in one typed object,
:class:`~campus_search.api.extension.CampusSearch`, registered once as ``app.extensions["campus_search"]``.
"""

from __future__ import annotations

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
from campus_search.api.extension import CampusSearch
from campus_search.api.ratelimit import init_rate_limits
from campus_search.config import load_settings
from campus_search.ops import logs
from campus_search.ops.held import HoldAnswers
from campus_search.security.auth import init_auth
from campus_search.services import Services


def create_app(services: Services | None = None) -> Flask:
    """Build the Flask app on ``services`` (default: built from the environment's settings). Building
    Services resolves the database and applies migrations; pools and the model open lazily in each serving
    process (safe under gunicorn --preload)."""
    if services is None:
        services = Services(load_settings())
    elif not isinstance(services, Services):
        raise TypeError(f"create_app takes the Services to serve (they carry the app's one Settings), "
                        f"not a {type(services).__name__}: create_app(Services(settings))")
    settings = services.settings
    app = Flask("campus_search")
    app.config.update(MAX_CONTENT_LENGTH=settings.max_request_bytes, JSON_SORT_KEYS=False)
    app.json = JSONProvider(app)  # keys in order; too deeply nested JSON is a 400

    # 1. identity: bearer tokens (HS256 secret or the SSO provider's JWKS), verified-token cache
    auth = init_auth(app, settings)
    # 2. one JSON error shape for every error, ours and Flask's
    register_error_handlers(app)

    # 3. every request: a start time and a request id (a trusted proxy's X-Request-ID, or new)
    @app.before_request
    def _start() -> None:
        g.start_time = time.perf_counter()
        g.request_id = logs.request_id_for(request, settings)

    @app.after_request
    def _finish(response: Any) -> Any:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    # 4. browser portals: CORS_ORIGINS only, none by default
    init_cors(app, settings)
    # 5. the API: OpenAPI document, search (audited: one record per search), documents, explain
    app.register_blueprint(openapi_api.bp)
    app.register_blueprint(search_api.bp)
    app.register_blueprint(documents_api.bp)
    app.register_blueprint(explain_api.bp)
    # 6. Prometheus request metrics and access log lines (api/instrumentation), /health and /metrics
    request_metrics = instrumentation.init_app(app, services)  # metrics, then the access log
    health = ops.init_app(app, services)
    # 7. admin statistics and cache administration
    app.register_blueprint(admin_stats.bp)
    app.register_blueprint(cache_admin.bp)
    # 8. per-role rate limits, after the hooks above: 429s get a request id, metrics and logs
    limiter = init_rate_limits(app, settings)

    CampusSearch(services=services, auth=auth, metrics=request_metrics, health=health,
                 limiter=limiter).register(app)
    # 9. a search's answer held without a thread until its audit record is committed, where the server
    #    can hold it (ops/held.py: the gunicorn worker); other servers wait in the thread, as before
    app.wsgi_app = HoldAnswers(app.wsgi_app)  # type: ignore[method-assign]
    return app
