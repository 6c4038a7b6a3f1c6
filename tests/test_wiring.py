"""The wiring: an app has one settings source (its Services), one typed extension holding every per-app
component, and Services declares what it holds, opened per process with a clear error before that."""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

import pytest
from flask_jwt_extended import JWTManager
from flask_limiter import Limiter

from campus_search.api.extension import CampusSearch
from campus_search.api.instrumentation import RequestMetrics
from campus_search.app import create_app
from campus_search.audit.records import Auditor
from campus_search.ops.health import HealthMonitor
from campus_search.security.auth import Authentication
from campus_search.services import NotOpen, Opened, Services

PORTAL = "https://portal.example.ac.uk"


def test_create_app_has_one_settings_source(demo_services: Any) -> None:
    """create_app(settings, services=...) let the app's settings and its services' settings disagree
    (tests/test_health.py's ops_app did: its health TTL came from one, everything the services did from
    the other). Now the app is built from Services alone, and settings are not accepted beside them."""
    assert list(inspect.signature(create_app).parameters) == ["services"]
    with pytest.raises(TypeError):
        create_app(demo_services.settings.replace(cors_origins=(PORTAL,)), services=demo_services)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="create_app takes the Services"):
        create_app(demo_services.settings)  # type: ignore[arg-type]


def test_every_part_reads_the_services_settings(demo_services_with: Any) -> None:
    """An app built on Services with unusual settings: each part of the app shows those settings."""
    services = demo_services_with(health_cache_seconds=123.0, cors_origins=(PORTAL,), jwt_leeway=7,
                                  max_request_bytes=12345, rate_limits_enabled=False)
    app = create_app(services)
    part = app.extensions["campus_search"]
    assert part.settings is services.settings
    assert part.health._report.ttl == 123.0
    assert app.config["JWT_DECODE_LEEWAY"] == 7 and app.config["MAX_CONTENT_LENGTH"] == 12345
    assert part.limiter.enabled is False
    preflight = app.test_client().options("/api/search", headers={
        "Origin": PORTAL, "Access-Control-Request-Method": "POST"})
    assert preflight.headers.get("Access-Control-Allow-Origin") == PORTAL


def test_one_typed_extension_holds_every_part(demo_app: Any, demo_services: Any) -> None:
    ours = {key for key in demo_app.extensions if key.startswith("campus_search")}
    assert ours == {"campus_search"}, "one registration, not one string key per component"
    part = demo_app.extensions["campus_search"]
    assert isinstance(part, CampusSearch)
    assert part.services is demo_services
    assert isinstance(part.auth, Authentication) and part.auth.manager is demo_app.extensions["flask-jwt-extended"]
    assert isinstance(part.metrics, RequestMetrics)
    assert isinstance(part.health, HealthMonitor) and part.health.services is demo_services
    assert isinstance(part.limiter, Limiter)
    assert isinstance(part.auth.manager, JWTManager)
    with pytest.raises(RuntimeError, match="already has"):
        part.register(demo_app)


def test_services_declare_what_they_hold(settings_factory: Any, embedder: Any) -> None:
    """Before ensure_open the per-process parts raise NotOpen naming what to call (not AttributeError);
    after it they are this process's; after close, NotOpen again; nothing is attached on the way."""
    services = Services(settings_factory(), embedder=embedder)
    declared = set(vars(services))
    for name in ("db", "searcher", "ingester", "cache", "auditor"):
        with pytest.raises(NotOpen, match=rf"Services\.{name} is opened per process: call ensure_open\(\)"):
            getattr(services, name)
    assert services.opened is None
    try:
        services.ensure_open()
        opened = services.opened
        assert isinstance(opened, Opened) and opened.pid == os.getpid()
        assert [f.name for f in dataclasses.fields(Opened)] == ["pid", "db", "searcher", "ingester", "cache",
                                                                "auditor"]
        assert services.db is opened.db and services.cache is opened.cache and services.auditor is opened.auditor
        assert isinstance(services.auditor, Auditor) and services.auditor.db is services.db
        with pytest.raises(AttributeError):
            services.auditor = None  # type: ignore[misc]  # a property: nothing is attached from outside
        assert set(vars(services)) == declared
    finally:
        services.close()
    with pytest.raises(NotOpen):
        services.db  # noqa: B018


def test_a_forked_child_does_not_use_its_parents_components(settings_factory: Any, embedder: Any) -> None:
    """After a fork (gunicorn workers), the parent's pools are not the child's: NotOpen until it opens its
    own, never the parent's sockets."""
    services = Services(settings_factory(), embedder=embedder).ensure_open()
    try:
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code only
            code = 0
            try:
                if services.opened is not None:
                    code = 2
                services.db  # noqa: B018
                code = 3
            except NotOpen:
                pass
            except BaseException:
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert services.opened is not None  # the parent's are untouched
    finally:
        services.close()
