"""Operations endpoints: ``GET /health``, ``/health/live``, ``/health/ready`` and ``/metrics``.

They need no token: load balancers, orchestrators and Prometheus call them. None of them returns
document text, queries, user ids or secrets -- only component states, counts and timings.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, jsonify

from campus_search import metrics
from campus_search.api import extension
from campus_search.ops.health import HealthMonitor

bp = Blueprint("ops", __name__)


def monitor() -> HealthMonitor:
    return extension.current().health


@bp.get("/health")
def health_check() -> Any:
    """SPEC §1 health report; 503 when any component is unhealthy."""
    report = monitor().report()
    return jsonify(report), 200 if report["overall_healthy"] else 503


@bp.get("/health/live")
def liveness() -> Any:
    """The process is up and answering (no dependency is consulted)."""
    services = extension.services()
    return jsonify({"alive": True, "uptime": round(time.time() - services.started_at, 3)})


@bp.get("/health/ready")
def readiness() -> Any:
    """Ready to serve searches: database reachable and embedding model loaded; 503 otherwise."""
    result = monitor().readiness()
    return jsonify(result), 200 if result["ready"] else 503


@bp.get("/metrics", endpoint="metrics")
def metrics_endpoint() -> Any:
    """Prometheus text exposition (all gunicorn workers' samples in multiprocess mode)."""
    parts = extension.current()
    opened = parts.services.opened  # None until this process opened its pools
    if opened is not None:
        parts.metrics.pool_sampler.sample(opened.db)
    return Response(metrics.render(), mimetype=None, content_type=metrics.CONTENT_TYPE)


def init_app(app: Any, services: Any) -> HealthMonitor:
    """The health and metrics endpoints, and the monitor behind /health (kept by the app's extension)."""
    app.register_blueprint(bp)
    return HealthMonitor(services)
