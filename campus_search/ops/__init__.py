"""Operations: structured logs, health checks, the start-up banner, the server launcher, gunicorn hooks
and worker, and the load-test client.

May import: everything below the web layer. Never ``flask``, ``werkzeug``, ``api``, ``app`` or ``cli``:
requests are counted and logged by ``api.instrumentation``, and the command line builds the app that
``server`` serves.
"""
