"""``campus-search serve``'s server: gunicorn (gthread workers) embedded, serving an app built once in the
master (the command line builds it: this layer does not import the web app)."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from campus_search.config import Settings
from campus_search.ops.gunicorn_hooks import server_options
from campus_search.ops.logs import configure_logging


class _Gunicorn(BaseApplication):
    def __init__(self, app: Any, options: dict[str, Any], settings: Settings | None = None) -> None:
        self.application = app
        self.options = options
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # Called in the master (preload) after gunicorn configured logging, which with JSON logs leaves
        # the root logger without handlers: the app's handler goes back on, as production_system's does.
        if self.settings is not None:
            configure_logging(self.settings, replace=True)
        return self.application


def gunicorn_server(settings: Settings, app: Any, *, workers: int | None = None,
                    threads: int | None = None) -> _Gunicorn:
    """The embedded gunicorn ``serve`` runs: :func:`gunicorn_hooks.server_options`, as gunicorn.conf.py."""
    return _Gunicorn(app, server_options(settings, workers=workers, threads=threads), settings)
