"""The start-up banner: the configuration that matters to an operator (no secrets) and the endpoints
served, as text on stderr in development or one structured record with JSON logs."""

from __future__ import annotations

import logging
import sys
from typing import Any

from campus_search.config import Settings
from campus_search.ops.logs import resolve_format
from campus_search.storage.embedded_redis import describe as describe_cache

#: What the banner says about the main endpoints; others are described by their view's docstring.
DESCRIPTIONS = {
    "POST /api/search": "search (bearer token)",
    "GET /health": "health report (503 when unhealthy)",
    "GET /health/live": "liveness probe",
    "GET /health/ready": "readiness probe",
    "GET /metrics": "Prometheus metrics",
    "GET /api/admin/stats": "statistics (admin)",
    "POST /api/admin/cache/clear": "clear the result cache (admin)",
    "GET /api/openapi.json": "OpenAPI description",
    "GET /api/admin/documents": "list documents (admin)",
    "GET /api/admin/documents/<docid:doc_id>": "one document and its metadata (admin)",
    "PUT /api/admin/documents/<docid:doc_id>": "add or replace a document (admin)",
    "PATCH /api/admin/documents/<docid:doc_id>": "change access metadata, no re-embedding (admin)",
    "DELETE /api/admin/documents/<docid:doc_id>": "delete a document (admin)",
    "GET /api/admin/explain": "why a user can or cannot see a document (admin)",
}


def endpoints(app: Any) -> list[tuple[str, str, str]]:
    """(method, path, description) of every route the app serves, from its URL map."""
    out = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        view = app.view_functions.get(rule.endpoint)
        doc = ((view.__doc__ or "").strip().splitlines() or [""])[0] if view else ""
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            out.append((method, rule.rule, DESCRIPTIONS.get(f"{method} {rule.rule}", doc.rstrip("."))))
    return sorted(out, key=lambda e: (e[1], e[0]))


def summary(settings: Settings, *, workers: int, threads: int, bind: str | None = None,
            metrics_dir: str | None = None) -> dict[str, Any]:
    """The configuration that matters to an operator, without secrets (URLs lose their passwords)."""
    s = settings
    public = s.public_summary()
    database = "embedded PostgreSQL in " + s.data_dir if s.embedded_database else \
        public.get("database_url") or f"{s.db_host}:{s.db_port}/{s.db_name}"
    return {
        "listening": bind or f"{s.host}:{s.port}", "workers": workers, "threads": threads, "env": s.env,
        "database": database, "read_replica": public.get("database_read_url"),
        "pool": f"{s.db_pool_min_size}-{s.db_pool_max_size} per worker",
        "cache": describe_cache(s),
        "cache_ttl_search": s.cache_ttl_search,
        "jwt_algorithms": list(s.jwt_algorithms), "jwt_secret": public.get("jwt_secret_key"),
        "oidc_jwks_url": s.oidc_jwks_url, "anonymous": s.allow_anonymous,
        "rate_limits": "on" if s.rate_limits_enabled else "off",
        "trusted_proxies": list(getattr(s, "trusted_proxies", ()) or ()),
        "embedding": f"{s.embedding_provider} {s.embedding_model}",
        "log_format": _log_format(s), "metrics_dir": metrics_dir, "data_dir": s.data_dir,
    }


def _log_format(settings: Settings) -> str:
    return resolve_format(settings.log_format, settings.production)


def banner(settings: Settings, workers: int, threads: int, *, app: Any = None, **extra: Any) -> str:
    info = summary(settings, workers=workers, threads=threads, **extra)
    routes = endpoints(app) if app is not None else [(*k.split(" ", 1), v) for k, v in DESCRIPTIONS.items()]
    lines = [
        "=" * 72,
        "CAMPUS SEARCH — University of Edinburgh vector search",
        "=" * 72,
        f"Listening:   http://{info['listening']}  ({workers} workers x {threads} threads, {settings.env})",
        f"Database:    {info['database']}; pool {info['pool']}"
        + (f"; reads from {info['read_replica']}" if info["read_replica"] else ""),
        f"Cache:       {info['cache']}; search TTL {settings.cache_ttl_search}s",
        f"Data dir:    {settings.data_dir} (set DATA_DIR to move it)",
        f"Security:    JWT {', '.join(settings.jwt_algorithms)} (secret {info['jwt_secret']}); anonymous "
        f"{'allowed' if settings.allow_anonymous else 'refused'}; rate limits {info['rate_limits']}; "
        f"trusted proxies {', '.join(info['trusted_proxies']) or 'none'}",
        f"Embedding:   {info['embedding']}",
        f"Logs:        {info['log_format']}; metrics dir {info['metrics_dir'] or '(single process)'}",
        "Endpoints:",
        *(f"  {method:<6} {path:<36} {what}" for method, path, what in routes),
        "=" * 72,
    ]
    return "\n".join(lines)


def announce(settings: Settings, *, workers: int, threads: int, app: Any = None, **extra: Any) -> None:
    """Start-up banner: text on stderr in development, one structured record with JSON logs."""
    if _log_format(settings) == "json":
        info = summary(settings, workers=workers, threads=threads, **extra)
        routes = endpoints(app) if app is not None else [(*k.split(" ", 1), "") for k in DESCRIPTIONS]
        info["endpoints"] = [f"{method} {path}" for method, path, _ in routes]
        logging.getLogger("campus_search.ops.server").info("campus-search ready", extra={"fields": info})
    else:
        print(banner(settings, workers, threads, app=app, **extra), file=sys.stderr, flush=True)
