"""Operations: structured logs, health checks, the server launcher, gunicorn hooks and worker, and the
load-test client.

May import: everything below the web layer; ``flask`` where it instruments requests.
"""
