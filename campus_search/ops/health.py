"""Health checks: the full ``/health`` report (SPEC §1) and the cheap readiness probe.

``/health`` checks each dependency the way a search uses it -- the database (a pooled connection and
the exact chunk count the index triggers maintain, no scan, and which node serves reads), the read
replicas when configured (state and lag; not required, since searches then read from the primary), the
embedding model or server (one probe text), the cache, and an end-to-end search through
:meth:`Services.run_search` as a superuser -- and reports each with ``healthy`` and
``response_time``. Results are reused for ``HEALTH_CACHE_SECONDS`` and concurrent checks wait for the
one in progress, so however often probes arrive, dependencies see at most one check per process per
interval. Failures are reported with a fixed, short reason; exception text (which may carry hosts,
SQL or paths) never leaves the process.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from campus_search import metrics
from campus_search.retrieval.params import SearchParams
from campus_search.security.roles import superuser
from campus_search.storage.db import ping, statement_timeout_sql
from campus_search.storage.index_state import chunk_count
from campus_search.storage.replicas import ReplicaFailed

log = logging.getLogger(__name__)

PROBE_TEXT = "health check: how do I reset my university password"


def _timed(check: Callable[[], dict[str, Any]], failure: str) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        result = check()
    except Exception as exc:
        log.warning("health check failed: %s (%s)", failure, exc.__class__.__name__)
        result = {"healthy": False, "error": failure}
    return {"healthy": result.pop("healthy"), "response_time": round(time.perf_counter() - started, 4), **result}


class _Cached:
    """A value recomputed at most once per ``ttl`` seconds; callers arriving meanwhile wait for it."""

    def __init__(self, ttl: float, compute: Callable[[], dict[str, Any]]) -> None:
        self.ttl = ttl
        self.compute = compute
        self._value: dict[str, Any] | None = None
        self._at = float("-inf")
        self._lock = threading.Lock()

    def get(self) -> dict[str, Any]:
        with self._lock:
            if self._value is None or time.monotonic() - self._at >= self.ttl:
                self._value = self.compute()
                self._at = time.monotonic()
            return self._value


class HealthMonitor:
    def __init__(self, services: Any) -> None:
        self.services = services
        settings = services.settings
        self.timeout = settings.health_timeout
        self._report = _Cached(settings.health_cache_seconds, self._check_all)
        self._ready = _Cached(settings.health_cache_seconds, self._check_ready)

    # ---- public

    def report(self) -> dict[str, Any]:
        """The SPEC §1 health document (possibly a few seconds old)."""
        return self._report.get()

    def readiness(self) -> dict[str, Any]:
        """``{"ready": bool, "checks": {"database": bool, "model": bool}}``."""
        return self._ready.get()

    # ---- checks

    def _pooled_query(self, read: Callable[[Any], Any]) -> Any:
        """``read(conn)`` (one statement of the storage layer's) on a pooled read connection, waiting at
        most ``HEALTH_TIMEOUT``."""
        db = self.services.ensure_open().db
        # Through the pool's circuit breaker: while the database is known to be down this fails at once.
        try:
            with db.connection(read=True, timeout=self.timeout) as conn:
                conn.execute(statement_timeout_sql(self.timeout))
                return read(conn)
        except ReplicaFailed:
            pass  # a replica that failed since its last probe, now marked down: like searches, read elsewhere
        with db.connection(read=True, timeout=self.timeout) as conn:
            conn.execute(statement_timeout_sql(self.timeout))
            return read(conn)

    def _database(self) -> dict[str, Any]:
        chunks = int(self._pooled_query(chunk_count))  # exact, and a few rows read (index_state.py)
        stats = self.services.db.stats()
        return {"healthy": True, "chunk_count": chunks, "pool_size": stats.get("pool_size"),
                "pool_max": stats.get("pool_max"), "active_connections": stats.get("active_connections"),
                "reads": self.services.db.reads()}

    def _replicas(self) -> dict[str, Any]:
        """Read replicas: each one's state and lag. Not required: searches read from the primary while
        no replica is fit to (replicas.py), so a replica that is down or behind degrades the service."""
        reads = self.services.ensure_open().db.reads()
        fit = [r for r in reads["replicas"] if r["up"] and r["lag_seconds"] is not None
               and r["lag_seconds"] <= r["lag_bound_seconds"]]
        return {"healthy": len(fit) == len(reads["replicas"]), "required": False, **reads}

    def _embedding(self) -> dict[str, Any]:
        embedder = self.services.embedder
        vector = np.asarray(embedder.embed_query([PROBE_TEXT])[0], dtype=np.float64)  # as a search does
        norm = float(np.linalg.norm(vector))
        ok = vector.shape == (embedder.dimension,) and math.isfinite(norm) and abs(norm - 1.0) < 1e-3
        return {"healthy": ok, "embedding_length": int(vector.shape[0]),
                "provider": self.services.settings.embedding_provider, "model": embedder.model_name,
                "query_graph": getattr(embedder, "query_graph", None)}

    def _cache(self) -> dict[str, Any]:
        opened = self.services.opened  # None until this process opened its components
        cache = opened.cache if opened is not None else None
        probe = getattr(cache, "health", None)
        if callable(probe):
            result = dict(probe())
            result.setdefault("healthy", bool(result.get("connection_active", True)))
            result.pop("response_time", None)  # ours is measured around the call
            return result
        # No shared cache configured: results are cached in this process, which is up if we are.
        return {"healthy": True, "connection_active": False, "backend": "in-process"}

    def _search(self, chunk_count: int | None) -> dict[str, Any]:
        params = SearchParams(query=PROBE_TEXT, max_results=1, similarity_threshold=-1.0)
        probe = superuser("health-check")
        outcome = self.services.run_search(probe, params)
        hits = outcome.hits
        if outcome.from_cache:  # the API path works; now prove retrieval itself still does
            hits = self.services.searcher.search(probe, params)
        # With no similarity threshold, any non-empty index must return something.
        functional = len(hits) > 0 or chunk_count == 0
        return {"healthy": functional, "results_returned": len(hits), "end_to_end_functional": functional,
                "from_cache": bool(outcome.from_cache)}

    def _check_all(self) -> dict[str, Any]:
        database = _timed(self._database, "database unreachable or not answering")
        components: dict[str, Any] = {
            "database": database,
            "embedding_service": _timed(self._embedding, "embedding model unavailable"),
            "cache": _timed(self._cache, "cache unavailable"),
        }
        if self.services.ensure_open().db.router is not None:
            components["read_replicas"] = _timed(self._replicas, "read replicas unknown")
            components["read_replicas"].setdefault("required", False)
        if database["healthy"]:
            components["search_functionality"] = _timed(lambda: self._search(database.get("chunk_count")),
                                                        "search failed")
        else:  # a search would only wait for the same database again
            components["search_functionality"] = {"healthy": False, "response_time": 0.0,
                                                  "end_to_end_functional": False,
                                                  "error": "skipped: database unavailable"}
        components["search_functionality"].setdefault("end_to_end_functional", False)
        components["cache"].setdefault("connection_active", False)
        for name, result in components.items():
            metrics.health_result(name, bool(result["healthy"]))
        # A component that reports ``required: False`` (the cache: searches run uncached without it)
        # degrades the service but does not make it unhealthy, so load balancers keep sending traffic.
        failing = [name for name, c in components.items() if not c["healthy"]]
        required = [name for name in failing if components[name].get("required", True)]
        return {"overall_healthy": not required, "degraded": bool(failing) and not required,
                "timestamp": round(time.time(), 3), "components": components}

    def _check_ready(self) -> dict[str, Any]:
        checks = {"database": False, "model": False}
        try:
            checks["database"] = self._pooled_query(ping) == 1
            checks["model"] = self.services.embedder.dimension > 0
        except Exception as exc:
            log.info("not ready: %s", exc.__class__.__name__)
        return {"ready": all(checks.values()), "checks": checks}
