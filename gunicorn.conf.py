"""gunicorn configuration, read automatically from the working directory by the brief's command:

    gunicorn --bind 0.0.0.0:5100 --workers 4 --worker-class gthread --threads 2 --timeout 60 \\
        --keepalive 10 --preload production_system:create_production_app

Command-line flags win over the values here; these are the same defaults, so a plain
``gunicorn production_system:create_production_app`` behaves alike (``WEB_CONCURRENCY`` sets the
worker count, ``HOST``/``PORT`` the address). See docs/operations.md.
"""

import os

from campus_search import gunicorn_hooks
from campus_search.logs import resolve_format

# Must happen before the application (and so prometheus_client) is imported: with --preload that is
# right after this file is read, in the master.
gunicorn_hooks.prepare_metrics_dir()

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '5100')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
worker_class = "gthread"
threads = 2
timeout = 60
keepalive = 10
preload_app = True
# SIGTERM: stop accepting, let in-flight requests finish for up to this long, then exit.
graceful_timeout = 30
# Heartbeat files on tmpfs: a worker never stalls on a slow disk just to say it is alive.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# The app writes one access record per request (campus_search.access); gunicorn's own is off unless
# --access-logfile asks for it.
errorlog = "-"

if resolve_format(os.environ.get("LOG_FORMAT", "auto").lower(),
                  os.environ.get("FLASK_ENV", os.environ.get("CAMPUS_SEARCH_ENV", "")).lower() == "production") \
        == "json":
    # gunicorn's own messages as JSON lines too, so a log pipeline reads one format.
    _json_handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "campus_search.logs.JsonFormatter"}},
        "handlers": {"error_console": _json_handler, "console": dict(_json_handler)},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
            # The app writes its own JSON access record per request (with request id and user).
            "gunicorn.access": {"level": "WARNING", "handlers": ["console"], "propagate": False},
        },
        "root": {"level": "INFO", "handlers": []},
    }

when_ready = gunicorn_hooks.when_ready
post_fork = gunicorn_hooks.post_fork
worker_exit = gunicorn_hooks.worker_exit
child_exit = gunicorn_hooks.child_exit
on_exit = gunicorn_hooks.on_exit
