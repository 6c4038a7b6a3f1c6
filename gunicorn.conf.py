"""gunicorn configuration, read automatically from the working directory by the brief's command:

    gunicorn --bind 0.0.0.0:5100 --workers 4 --worker-class gthread --threads 2 --timeout 60 \\
        --keepalive 10 --preload production_system:create_production_app

Command-line flags win over the values here. The values are ``campus_search.ops.gunicorn_hooks.server_options``,
the same that ``campus-search serve`` runs with (tests/test_gunicorn.py compares the two): gthread,
2 threads, timeout 60, keep-alive 10, preload, graceful timeout 30, heartbeat files on /dev/shm, error
log on stderr (JSON lines when the app logs JSON), the hooks; ``HOST``/``PORT`` the address (default
127.0.0.1:5100; the image sets HOST=0.0.0.0) and ``WEB_CONCURRENCY`` the workers (default 2). See
docs/operations.md.
"""

from campus_search.ops import gunicorn_hooks

# Must happen before the application (and so prometheus_client) is imported: with --preload that is
# right after this file is read, in the master.
gunicorn_hooks.prepare_metrics_dir()

globals().update(gunicorn_hooks.server_options(gunicorn_hooks.load_server_settings()))
