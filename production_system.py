"""Campus Search — production entry point.

    python production_system.py            # runs the API (embedded PostgreSQL when none is configured)
    gunicorn --bind 0.0.0.0:5100 --workers 4 --worker-class gthread --threads 2 --timeout 60 \\
        --keepalive 10 --preload production_system:create_production_app

gunicorn is given ``create_production_app`` itself (no parentheses), so it calls it as a WSGI
application; with no arguments it is the application factory. Either way one app is built per
process tree (in the master under --preload: gunicorn.conf.py's ``when_ready`` hook builds it there)
and shared by the workers, which open their own pools and model after the fork.

The parts: ``campus_search.config`` (settings), ``campus_search.services.Services`` (database, searcher,
ingester, cache, auditor, model: opened per process), ``campus_search.app.create_app`` (auth, errors,
request ids, CORS, the API blueprints, metrics, logs, health, rate limits; kept in one
``CampusSearch`` extension), and gunicorn.conf.py's hooks (campus_search.ops.gunicorn_hooks).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

_app: Any = None
_lock = threading.Lock()


def default_app() -> Any:
    """The process's app, built once from the environment's settings."""
    global _app
    if _app is None:
        with _lock:
            if _app is None:
                # Imported here, not at the top: `python production_system.py` must set up the metrics
                # directory (campus-search serve) before anything imports prometheus_client.
                from campus_search.app import create_app
                from campus_search.config import load_settings
                from campus_search.ops.logs import configure_logging
                from campus_search.services import Services

                settings = load_settings()  # environment (+ CAMPUS_SEARCH_CONFIG file), validated
                configure_logging(settings, replace=True)  # this process is ours: JSON lines in production
                services = Services(settings)  # database resolved, migrations applied; nothing opened yet
                _app = create_app(services)  # app.py: every part, in order, on these services' settings
    return _app


def create_production_app(environ: dict[str, Any] | None = None, start_response: Any = None) -> Any:
    """Factory when called without arguments; the WSGI entry when gunicorn calls it."""
    if environ is None:
        return default_app()
    return default_app()(environ, start_response)


if __name__ == "__main__":
    from campus_search.cli.main import main

    sys.exit(main(["serve", *sys.argv[1:]]))
