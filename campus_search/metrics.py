"""Prometheus metrics (SPEC §1): every name starts with ``vector_search_``, every label value is bounded.

Label values never carry a raw query, a user id or other free text: methods, roles, cache operations
and statuses come from small fixed sets (anything else becomes ``other``), endpoints are the view names
of Flask endpoints without their blueprint (``search_documents``, ``health_check``: the names the brief's
queries use; defined by the code; unmatched URLs are ``unmatched``), and departments are only those of a
known set (``METRICS_DEPARTMENTS`` or the departments of the indexed documents), else ``other``.

Several gunicorn workers: prometheus-client's multiprocess mode. ``PROMETHEUS_MULTIPROC_DIR`` must be
in the environment before ``prometheus_client`` is first imported (``gunicorn.conf.py`` and
``campus-search serve`` arrange it through :func:`campus_search.ops.gunicorn_hooks.prepare_metrics_dir`);
counters and histograms
then live in per-process files that every scrape sums, so totals survive worker restarts, and the
gauges here are ``livesum`` (summed over live workers; ``child_exit`` drops a dead worker's share).

The metric definitions only: this base module imports no web framework. Each request is counted by the
web layer's :mod:`campus_search.api.instrumentation`; other components report through the small
functions at the bottom (:func:`cache_op`,
:func:`rate_limited`, :func:`audit_failure`, :func:`embedding_request`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger(__name__)

#: Request durations are milliseconds to a few seconds: fine buckets where searches land.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
EMBEDDING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
ROLES = frozenset({"student", "staff", "academic", "admin", "anonymous"})
CACHE_OPERATIONS = frozenset({"get", "set", "delete", "clear"})
CACHE_STATUSES = frozenset({"hit", "miss", "ok", "error"})
EMBEDDING_PROVIDERS = frozenset({"local", "ollama", "openai"})
MAX_DEPARTMENT_LABELS = 200
OTHER = "other"

CONTENT_TYPE = CONTENT_TYPE_LATEST

REQUESTS = Counter("vector_search_requests_total", "HTTP requests by method, endpoint and status",
                   ["method", "endpoint", "status"])
DURATION = Histogram("vector_search_request_duration_seconds", "HTTP request duration in seconds, by endpoint",
                     ["endpoint"], buckets=DURATION_BUCKETS)
ACTIVE_CONNECTIONS = Gauge("vector_search_active_connections",
                           "Database connections in use (checked out of the pools), summed over workers",
                           multiprocess_mode="livesum")
POOL_SIZE = Gauge("vector_search_db_pool_size", "Open pooled database connections, summed over workers",
                  multiprocess_mode="livesum")
POOL_MAX = Gauge("vector_search_db_pool_max_size", "Most pooled connections allowed, summed over workers",
                 multiprocess_mode="livesum")
POOL_WAITING = Gauge("vector_search_db_pool_requests_waiting",
                     "Requests waiting for a pooled connection, summed over workers", multiprocess_mode="livesum")
POOL_ERRORS = Counter("vector_search_db_pool_errors_total",
                      "Pool failures: checkout_failed (timeout/error getting a connection), connect_failed, lost",
                      ["kind"])
QUERIES = Counter("vector_search_queries_total", "Searches answered, by the caller's role and department",
                  ["user_role", "department"])
ZERO_RESULTS = Counter("vector_search_zero_result_queries_total",
                       "Searches that found nothing, by the caller's department", ["department"])
CACHE_OPS = Counter("vector_search_cache_operations_total", "Result cache operations by outcome",
                    ["operation", "status"])
EMBEDDING_REQUESTS = Counter("vector_search_embedding_requests_total", "Calls to the embedding model or server",
                             ["provider", "status"])
EMBEDDING_DURATION = Histogram("vector_search_embedding_duration_seconds", "Embedding call duration in seconds",
                               ["provider"], buckets=EMBEDDING_BUCKETS)
EMBEDDING_TEXTS = Counter("vector_search_embedded_texts_total", "Texts embedded", ["provider"])
RATE_LIMITED = Counter("vector_search_rate_limited_requests_total", "Requests refused by the rate limiter, by role",
                       ["user_role"])
AUDIT_FAILURES = Counter("vector_search_audit_write_failures_total", "Audit records that could not be written")
HEALTH = Gauge("vector_search_health_check_healthy", "Last health check result per component (1 healthy)",
               ["component"], multiprocess_mode="livemostrecent")

READ_NODE = Gauge("vector_search_read_node",
                  "1 for the node that serves searches (primary, replica1, ...), 0 for the others",
                  ["node"], multiprocess_mode="livemax")
REPLICA_UP = Gauge("vector_search_replica_up", "1 if the read replica answered its last probe",
                   ["replica"], multiprocess_mode="livemin")
REPLICA_LAG = Gauge("vector_search_replica_lag_seconds",
                    "Replay lag of the read replica at its last probe (-1 while it cannot be told)",
                    ["replica"], multiprocess_mode="livemax")
READ_FALLBACKS = Counter("vector_search_read_fallbacks_total",
                         "Reads served by another node than the preferred replica, by reason "
                         "(down, lag, fence, error, conflict)", ["reason"])
READ_FALLBACK_REASONS = ("down", "lag", "fence", "error", "conflict")

_POOL_COUNTERS = {"requests_errors": "checkout_failed", "connections_errors": "connect_failed",
                  "connections_lost": "lost"}


def _init_series() -> None:
    """Create the label sets operators alert on, so they read 0 rather than being absent."""
    for operation, status in (("get", "hit"), ("get", "miss"), ("set", "ok"), ("get", "error"), ("set", "error")):
        CACHE_OPS.labels(operation, status)
    for role in ROLES:
        RATE_LIMITED.labels(role)
    for kind in _POOL_COUNTERS.values():
        POOL_ERRORS.labels(kind)
    for reason in READ_FALLBACK_REASONS:
        READ_FALLBACKS.labels(reason)


_init_series()


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def registry() -> Any:
    """The registry a scrape reads: all workers' files in multiprocess mode, else this process."""
    if multiprocess_mode():
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return reg
    return REGISTRY


def render() -> bytes:
    """The Prometheus text exposition of every metric."""
    return generate_latest(registry())


def samples(names: Iterable[str]) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Current (aggregated) samples of the given sample names, for the admin statistics."""
    wanted = set(names)
    out: dict[str, list[tuple[dict[str, str], float]]] = {n: [] for n in wanted}
    for family in registry().collect():
        for s in family.samples:
            if s.name in wanted:
                out[s.name].append((dict(s.labels), float(s.value)))
    return out


# ---- bounded label values

def method_label(method: str) -> str:
    return method if method in METHODS else OTHER


def role_label(role: str | None) -> str:
    if not role:
        return "anonymous"
    return role if role in ROLES else OTHER


class DepartmentLabels:
    """Which department names may appear as label values: configured, else those in the index.

    Department claims come from tokens, so without a bound a misconfigured identity provider (or
    anyone able to mint tokens) could create unbounded series. Refreshed from the index every few minutes.
    """

    def __init__(self, configured: Sequence[str] = (), refresh_seconds: float = 300.0,
                 read: Callable[[Any, int], Iterable[str]] | None = None) -> None:
        #: ``read(conn, limit)``: the indexed departments (storage's; this base module runs no SQL)
        self.read = read
        self.configured = frozenset(configured)
        self.refresh_seconds = refresh_seconds
        self._known: frozenset[str] = self.configured
        self._loaded_at = float("-inf")
        self._lock = threading.Lock()

    def label(self, department: str | None, db: Any = None) -> str:
        if not department:
            return "none"
        if not self.configured and db is not None and self.read is not None \
                and time.monotonic() - self._loaded_at > self.refresh_seconds:
            self._refresh(db)
        return department if department in self._known else OTHER

    def _refresh(self, db: Any) -> None:
        if not self._lock.acquire(blocking=False):
            return  # another thread is refreshing; use the current set meanwhile
        try:
            assert self.read is not None
            with db.connection(read=True) as conn:
                self._known = frozenset(self.read(conn, MAX_DEPARTMENT_LABELS))
        except Exception as exc:  # keep the previous set; metrics must never fail a request
            log.debug("department labels not refreshed: %s", exc.__class__.__name__)
        finally:
            self._loaded_at = time.monotonic()
            self._lock.release()


# ---- recording

def endpoint_label(endpoint: str | None) -> str:
    """``search.search_documents`` -> ``search_documents``: the view name, as the brief's dashboards query it
    (a test keeps view names unique across blueprints)."""
    return endpoint.rsplit(".", 1)[-1] if endpoint else "unmatched"


def observe_request(method: str, endpoint: str | None, status: int, seconds: float) -> None:
    name = endpoint_label(endpoint)
    REQUESTS.labels(method_label(method), name, str(int(status))).inc()
    DURATION.labels(name).observe(max(0.0, seconds))


def search_answered(role: str | None, department_label: str, result_count: int) -> None:
    QUERIES.labels(role_label(role), department_label).inc()
    if result_count == 0:
        ZERO_RESULTS.labels(department_label).inc()


class PoolSampler:
    """Copies a :class:`~campus_search.storage.db.Database`'s pool statistics into the gauges and counters.

    psycopg_pool keeps cumulative counters per pool; we add the change since the last sample, so other
    readers of ``get_stats()`` are unaffected.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self._last: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()
        self._interval = interval
        self._next = 0.0

    def due(self) -> bool:
        """True at most once per ``interval`` (for sampling on the request path without a per-request cost)."""
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self._interval
        return True

    def sample(self, db: Any) -> dict[str, int]:
        pools = {id(p): p for p in db.pools()}
        size = available = waiting = maximum = 0
        deltas: dict[str, int] = {}
        with self._lock:
            for key, pool in pools.items():
                s = pool.get_stats()
                size += s.get("pool_size", 0)
                available += s.get("pool_available", 0)
                waiting += s.get("requests_waiting", 0)
                maximum += pool.max_size
                for stat, kind in _POOL_COUNTERS.items():
                    now = int(s.get(stat, 0))
                    before = self._last.get((key, stat), 0)
                    if now > before:
                        deltas[kind] = deltas.get(kind, 0) + now - before
                    self._last[(key, stat)] = now
        for kind, n in deltas.items():
            POOL_ERRORS.labels(kind).inc(n)
        active = max(0, size - available)
        ACTIVE_CONNECTIONS.set(active)
        POOL_SIZE.set(size)
        POOL_MAX.set(maximum)
        POOL_WAITING.set(waiting)
        return {"pool_size": size, "pool_max": maximum, "active_connections": active, "requests_waiting": waiting}


def read_fallback(reason: str) -> None:
    """Count one read sent past the preferred replica (``reason`` in READ_FALLBACK_REASONS)."""
    READ_FALLBACKS.labels(reason if reason in READ_FALLBACK_REASONS else OTHER).inc()


def read_routing(serving: str, primary: str, replicas: Sequence[tuple[str, bool, float | None]]) -> None:
    """After each probe round: which node serves reads (``primary`` names the primary), and each
    replica's state and lag."""
    for node in (primary, *(name for name, _, _ in replicas)):
        READ_NODE.labels(node).set(1 if node == serving else 0)
    for name, up, lag in replicas:
        REPLICA_UP.labels(name).set(1 if up else 0)
        REPLICA_LAG.labels(name).set(-1 if lag is None or lag == float("inf") else lag)


def health_result(component: str, healthy: bool) -> None:
    HEALTH.labels(component).set(1 if healthy else 0)


def cache_op(operation: str, status: str) -> None:
    """Count one cache operation: ``operation`` in get/set/delete/clear, ``status`` in hit/miss/ok/error."""
    CACHE_OPS.labels(operation if operation in CACHE_OPERATIONS else OTHER,
                     status if status in CACHE_STATUSES else OTHER).inc()


def rate_limited(role: str | None) -> None:
    """Count one request refused by the rate limiter (429)."""
    RATE_LIMITED.labels(role_label(role)).inc()


def audit_failure() -> None:
    """Count one audit record that could not be written."""
    AUDIT_FAILURES.inc()


def embedding_request(provider: str, seconds: float, ok: bool, texts: int = 0) -> None:
    """Count one call to the embedding model or server and its duration."""
    name = provider if provider in EMBEDDING_PROVIDERS else OTHER
    EMBEDDING_REQUESTS.labels(name, "ok" if ok else "error").inc()
    EMBEDDING_DURATION.labels(name).observe(max(0.0, seconds))
    if texts:
        EMBEDDING_TEXTS.labels(name).inc(texts)


class InstrumentedEmbedder:
    """Wraps an :class:`~campus_search.embedding.base.Embedder`, recording each ``embed`` call."""

    def __init__(self, inner: Any, provider: str) -> None:
        self.inner = inner
        self.provider = provider
        self.model_name = inner.model_name
        self.dimension = inner.dimension

    def embed(self, texts: Sequence[str], *args: Any, **kwargs: Any) -> np.ndarray:
        return self._timed(self.inner.embed, texts, *args, **kwargs)

    def embed_query(self, texts: Sequence[str]) -> np.ndarray:
        return self._timed(self.inner.embed_query, texts)

    def _timed(self, call: Any, texts: Sequence[str], *args: Any, **kwargs: Any) -> np.ndarray:
        started = time.perf_counter()
        try:
            out = call(texts, *args, **kwargs)
        except Exception:
            embedding_request(self.provider, time.perf_counter() - started, False, len(texts))
            raise
        embedding_request(self.provider, time.perf_counter() - started, True, len(texts))
        return out

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.inner.count_tokens(texts)

    def __getattr__(self, name: str) -> Any:  # anything else the concrete embedder offers
        return getattr(self.inner, name)


def instrument_embedder(embedder: Any, provider: str) -> Any:
    """The embedder, wrapped once for metrics (idempotent)."""
    return embedder if isinstance(embedder, InstrumentedEmbedder) else InstrumentedEmbedder(embedder, provider)
