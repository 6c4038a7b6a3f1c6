"""The app's one extension: :class:`CampusSearch`, registered once as ``app.extensions["campus_search"]``
by the app factory (app.py), holding every per-app component, typed. Views and hooks reach it with
:func:`current`.

May import: the components it holds (services, security.auth, ops.health, api.instrumentation, flask-limiter).
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app
from flask_limiter import Limiter

from campus_search.api.instrumentation import RequestMetrics
from campus_search.config import Settings
from campus_search.ops.health import HealthMonitor
from campus_search.security.auth import Authentication
from campus_search.services import Services

KEY = "campus_search"


@dataclass(frozen=True)
class CampusSearch:
    """Everything an app built by ``create_app`` holds. ``settings`` are the services' own: an app has one
    settings source."""

    services: Services  # database, searcher, ingester, cache, auditor, model: opened per process
    auth: Authentication  # bearer tokens: flask-jwt-extended, the SSO provider's keys, verified tokens
    metrics: RequestMetrics  # request counting: department labels, pool sampler
    health: HealthMonitor  # /health and /health/ready, results reused HEALTH_CACHE_SECONDS
    limiter: Limiter  # per-role rate limits (flask-limiter)

    @property
    def settings(self) -> Settings:
        return self.services.settings

    def register(self, app: Flask) -> None:
        if KEY in app.extensions:
            raise RuntimeError(f"app {app.name!r} already has a {KEY!r} extension")
        app.extensions[KEY] = self


def current() -> CampusSearch:
    """The current app's extension (in a request or app context)."""
    extension = current_app.extensions[KEY]
    if not isinstance(extension, CampusSearch):
        raise TypeError(f"app.extensions[{KEY!r}] is a {type(extension).__name__}, not CampusSearch")
    return extension


def services() -> Services:
    """The current app's :class:`Services`."""
    return current().services
