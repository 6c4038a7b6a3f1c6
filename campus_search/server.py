"""``campus-search serve``: gunicorn (gthread workers) embedded, with the app built once in the master."""

from __future__ import annotations

import sys
from typing import Any

from gunicorn.app.base import BaseApplication

from .config import Settings


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, app: Any, options: dict[str, Any]) -> None:
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self.application


def banner(settings: Settings, workers: int, threads: int) -> str:
    s = settings
    db = "embedded PostgreSQL in " + s.data_dir if s.embedded_database else "PostgreSQL (configured)"
    cache = "Redis" if s.redis_dsn() else "in-process"
    lines = [
        "=" * 72,
        "CAMPUS SEARCH — University of Edinburgh vector search",
        "=" * 72,
        f"Listening:   http://{s.host}:{s.port}  ({workers} workers x {threads} threads, {s.env})",
        f"Database:    {db}; pool {s.db_pool_min_size}-{s.db_pool_max_size} per worker",
        f"Cache:       {cache}; search TTL {s.cache_ttl_search}s",
        f"Security:    JWT {', '.join(s.jwt_algorithms)}; anonymous {'allowed' if s.allow_anonymous else 'refused'}",
        f"Embedding:   {s.embedding_provider} {s.embedding_model}",
        "Endpoints:   POST /api/search   GET /health   GET /metrics   GET /api/admin/stats",
        "             POST /api/admin/cache/clear   GET /api/openapi.json",
        "=" * 72,
    ]
    return "\n".join(lines)


def serve(settings: Settings, *, workers: int = 2, threads: int = 2) -> int:
    from .app import create_app

    app = create_app(settings)
    print(banner(settings, workers, threads), file=sys.stderr, flush=True)
    options = {
        "bind": f"{settings.host}:{settings.port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        "timeout": 60,
        "keepalive": 10,
        "graceful_timeout": 30,
        "accesslog": None,
        "errorlog": "-",
    }
    _Gunicorn(app, options).run()
    return 0
