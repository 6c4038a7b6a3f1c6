"""``GET /api/admin/stats[?days=30]`` (SPEC §1): pool, cache, system and index statistics. Admin only.

Aggregates only: counts and timings, never a query, a user id or document text. Request and search
totals since the server started come from the Prometheus metrics, so under gunicorn they cover every
worker; ``audit`` summarises the audit log's searches of the last ``days`` (zero-result searches by
the searchers' departments), which survives restarts.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, jsonify, request

from campus_search import metrics
from campus_search.api import extension
from campus_search.audit.reports import search_summary
from campus_search.errors import BadRequest
from campus_search.security.auth import require_admin
from campus_search.storage.index_state import index_summary
from campus_search.storage.server_memory import server_memory

bp = Blueprint("admin_stats", __name__)

_GAUGES = {"vector_search_db_pool_size": "pool_size", "vector_search_active_connections": "active_connections",
           "vector_search_db_pool_max_size": "pool_max",
           "vector_search_db_pool_requests_waiting": "requests_waiting"}
_SAMPLES = (*_GAUGES, "vector_search_requests_total", "vector_search_request_duration_seconds_sum",
            "vector_search_request_duration_seconds_count", "vector_search_queries_total",
            "vector_search_zero_result_queries_total", "vector_search_cache_operations_total")


def _total(rows: list[tuple[dict[str, str], float]], **match: str) -> float:
    return sum(v for labels, v in rows if all(labels.get(k) == want for k, want in match.items()))


def _by(rows: list[tuple[dict[str, str], float]], label: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for labels, value in rows:
        if value:
            out[labels[label]] = out.get(labels[label], 0) + int(value)
    return dict(sorted(out.items()))


def _server(services: Any) -> dict[str, Any]:
    """How the database server that answers searches runs its shared memory: ``huge_pages`` is PostgreSQL's
    ``huge_pages_status`` (on, off; null before PostgreSQL 17), ``shared_memory_mb`` its size."""
    with services.db.connection(read=True) as conn:
        status, size_mb, _ = server_memory(conn)
    return {"huge_pages": status, "shared_memory_mb": size_mb}


def _index(services: Any) -> dict[str, Any]:
    with services.db.connection(read=True) as conn:
        return index_summary(conn)


def _cache(services: Any, rows: list[tuple[dict[str, str], float]]) -> dict[str, Any]:
    opened = services.opened  # None until this process opened its components
    stats = getattr(opened.cache if opened is not None else None, "stats", None)
    if callable(stats):
        return dict(stats())
    return {"backend": "in-process", "used_memory": None, "connected_clients": None,
            "keyspace_hits": int(_total(rows, operation="get", status="hit")),
            "keyspace_misses": int(_total(rows, operation="get", status="miss"))}


def _audit(services: Any, days: int) -> dict[str, Any] | None:
    """Searches and zero-result searches by department over the last ``days``, from the audit log."""
    with services.db.connection(read=True) as conn:
        return search_summary(conn, days)


def collect(services: Any, sampler: Any, *, days: int = 30) -> dict[str, Any]:
    services.ensure_open()
    sampler.sample(services.db)
    s = metrics.samples(_SAMPLES)
    requests = _total(s["vector_search_requests_total"])
    count = _total(s["vector_search_request_duration_seconds_count"])
    seconds = _total(s["vector_search_request_duration_seconds_sum"])
    return {
        "database": {**{key: int(_total(s[name])) for name, key in _GAUGES.items()}, **_server(services)},
        "cache": _cache(services, s["vector_search_cache_operations_total"]),
        "system": {"uptime": round(time.time() - services.started_at, 2), "requests_total": int(requests),
                   "avg_response_time": round(seconds / count, 4) if count else 0.0,
                   "metrics_multiprocess": metrics.multiprocess_mode()},
        "index": _index(services),
        "searches": {"total": int(_total(s["vector_search_queries_total"])),
                     "by_role": _by(s["vector_search_queries_total"], "user_role"),
                     "zero_results_by_department": _by(s["vector_search_zero_result_queries_total"], "department")},
        "audit": _audit(services, days),
    }


@bp.get("/api/admin/stats")
def admin_stats() -> Any:
    parts = extension.current()
    services = parts.services
    require_admin(services.settings)
    days = request.args.get("days", "30")
    if not (days.isascii() and days.isdigit()) or not 1 <= int(days) <= 366:
        raise BadRequest("days must be an integer from 1 to 366")
    return jsonify(collect(services, parts.metrics.pool_sampler,
                           days=int(days)))
