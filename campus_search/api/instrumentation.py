"""Each request, counted and logged: the Flask hooks that feed the Prometheus metrics
(:mod:`campus_search.metrics` holds their definitions, free of the web framework) and write one access
log record (:mod:`campus_search.ops.logs` formats it), and the reader that gives every log record
written while a request is handled that request's id."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from flask import Flask, g, has_request_context, request

from campus_search import metrics
from campus_search.ops import logs
from campus_search.ops.held import HELD_KEY
from campus_search.storage.index_state import indexed_departments

#: the loggers these hooks used before they moved here, kept so log filters and tests still match
_metrics_log = logging.getLogger("campus_search.metrics")
_logs_log = logging.getLogger("campus_search.ops.logs")

SEARCH_ENDPOINT = "search.search_documents"


def _current_request_id() -> str | None:
    return g.get("request_id") if has_request_context() else None


def _result_count(response: Any) -> int | None:
    outcome = g.get("search_outcome")  # left by the search view for the audit record
    if outcome is not None:
        return int(outcome.count)
    try:
        body = response.get_json(silent=True)
    except Exception:
        return None
    count = body.get("count") if isinstance(body, dict) else None
    return count if isinstance(count, int) else None


@dataclass(frozen=True)
class RequestMetrics:
    """What :func:`init_metrics` keeps per app: the allowed department label values and the pool sampler."""

    departments: metrics.DepartmentLabels
    pool_sampler: metrics.PoolSampler


def init_app(app: Flask, services: Any) -> RequestMetrics:
    """Count every request and sample this process's pool (:func:`init_metrics`), then log one access
    record per request (:func:`init_access_log`), in that order."""
    request_metrics = init_metrics(app, services)
    init_access_log(app)
    return request_metrics


def init_metrics(app: Flask, services: Any) -> RequestMetrics:
    """Count every request (after its response is built) and sample this process's pool."""
    departments = metrics.DepartmentLabels(services.settings.metrics_departments, read=indexed_departments)
    sampler = metrics.PoolSampler()

    @app.after_request
    def _record(response: Any) -> Any:
        try:
            started = g.get("start_time")
            method, endpoint = request.method, request.endpoint
            opened = services.opened  # None until this process opened its pools
            db = opened.db if opened is not None else None
            principal = g.get("principal")
            answered = None
            if endpoint == SEARCH_ENDPOINT and principal is not None:
                count = _result_count(response)
                answered = (principal.role.name, departments.label(principal.primary_department, db),
                            count if count is not None else -1)

            def observe(status: int) -> None:
                metrics.observe_request(method, endpoint, status, time.perf_counter() - started if started else 0.0)
                if answered is not None and status == 200:
                    metrics.search_answered(*answered)

            when_sent(response, observe)
            if db is not None and sampler.due():
                sampler.sample(db)  # at most once a second per process; /metrics samples on every scrape
        except Exception:  # metrics must never turn a good response into an error
            _metrics_log.debug("metrics not recorded", exc_info=True)
        return response

    return RequestMetrics(departments, sampler)


def init_access_log(app: Flask) -> None:
    """Log one access record per request (after the response is built), and let every record logged
    while a request is handled carry its id."""
    logs.read_request_ids_with(_current_request_id)

    @app.after_request
    def _access(response: Any) -> Any:
        try:
            started = g.get("start_time")
            principal = g.get("principal")
            method, path, endpoint = request.method[:16], request.path[:200], request.endpoint
            request_id = g.get("request_id")

            def log_line(status: int) -> None:
                latency_ms = round((time.perf_counter() - started) * 1000, 2) if started else None
                level = logging.DEBUG if endpoint in logs.QUIET_ENDPOINTS and status < 400 else logging.INFO
                if logs.access_log.isEnabledFor(level):
                    logs.access_log.log(level, "%s %s %s %sms", method, path, status, latency_ms, extra={
                        "method": method, "path": path, "endpoint": endpoint, "status": status,
                        "latency_ms": latency_ms, "user_id": getattr(principal, "user_id", None),
                        "role": getattr(getattr(principal, "role", None), "name", None),
                        "request_id": request_id})

            when_sent(response, log_line)
        except Exception:  # logging must never turn a good response into an error
            _logs_log.debug("access log failed", exc_info=True)
        return response


def when_sent(response: Any, callback: Any) -> None:
    """``callback(status)`` with the status the client gets: now, or -- for an answer held until its audit
    record's outcome is known (``ops/held.py``), whose status may still become a 503 -- once it is sent."""
    hold = request.environ.get(HELD_KEY)
    if hold is None:
        callback(response.status_code)
    else:
        hold.after(callback)
