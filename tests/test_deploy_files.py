"""The production stack's files (docker-compose.prod.yml, Dockerfile, nginx, pgbouncer, PostgreSQL,
Prometheus, Grafana) are consistent with each other and with the app. Docker cannot run here, so these
are syntactic and cross-reference checks, plus the real PostgreSQL 18 binary judging postgresql.conf
and, where nginx is installed, ``nginx -t``."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT
from packaging.requirements import Requirement

from campus_search.config import Settings
from campus_search.storage.backup import bundled_bin_dirs
from campus_search.storage.db import prepare_threshold

BRIEF_COMMAND = ("gunicorn --bind 0.0.0.0:5100 --workers 4 --worker-class gthread --threads 2 --timeout 60 "
                 "--keepalive 10 --preload production_system:create_production_app")


def load_yaml(name: str) -> Any:
    return yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml("docker-compose.prod.yml")


def substitute(value: str) -> str:
    """Compose's ${VAR:?msg} / ${VAR:-default} with placeholder values."""
    return re.sub(r"\$\{(\w+)(?::[?-][^}]*)?\}", lambda m: f"<{m.group(1)}>", value)


# --- docker compose ----------------------------------------------------------------------------------

def test_compose_has_the_whole_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"primary", "replica", "pgbouncer", "redis", "app", "nginx", "prometheus", "grafana"} <= set(services)
    assert "replicas" in services["app"]["deploy"]
    assert substitute(str(services["app"]["deploy"]["replicas"])) in ("<APP_REPLICAS>", "3")
    assert "ports" not in services["app"], "app replicas are reached through nginx only"
    assert {"80:80", "443:443"} <= set(services["nginx"]["ports"])
    for name in ("prometheus", "grafana"):
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), f"{name} must not be public"
    assert compose["networks"]["data"]["internal"] is True


def test_compose_mounts_files_that_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    assert (ROOT / compose["services"]["app"]["build"]["dockerfile"]).exists()


def test_every_required_secret_is_in_env_example(compose: dict[str, Any]) -> None:
    text = (ROOT / "docker-compose.prod.yml").read_text(encoding="utf-8")
    required = set(re.findall(r"\$\{(\w+):\?", text))
    example = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
               if "=" in line and not line.startswith("#")}
    assert required and required <= example
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_app_talks_to_pgbouncer_without_prepared_statements(compose: dict[str, Any]) -> None:
    env = compose["services"]["app"]["environment"]
    assert env["FLASK_ENV"] == "production"
    for key in ("DATABASE_URL", "DATABASE_READ_URL"):
        url = substitute(env[key])
        assert "@pgbouncer:6432/" in url
        url = url.replace("<", "").replace(">", "")
        assert prepare_threshold(Settings(data_dir="/x", database_url=url), url) is None
    pgb = pgbouncer_ini()
    for key in ("DATABASE_URL", "DATABASE_READ_URL"):
        assert env[key].rsplit("/", 1)[1] in pgb["databases"], f"{key} names a database pgbouncer lacks"
    # only nginx's fixed address may set forwarding headers
    nginx_ip = compose["services"]["nginx"]["networks"]["edge"]["ipv4_address"]
    assert env["TRUSTED_PROXIES"] == nginx_ip


def test_dockerfile_runs_the_brief_command_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    joined = re.sub(r"\\\n\s*", " ", text)
    cmd = re.search(r"^CMD (\[.*\])$", joined, re.M)
    assert cmd, "exec-form CMD"
    argv = json.loads(cmd.group(1))
    # the brief's command as written: its --keepalive reaches gunicorn as --keep-alive through the
    # start-up hook the package installs (setup.py, campus_search_gunicorn_keepalive.pth)
    assert " ".join(argv) == BRIEF_COMMAND
    from gunicorn.config import Config

    rewritten = ["--keep-alive" if a == "--keepalive" else a for a in argv[1:]]
    parsed = Config().parser().parse_args(rewritten)
    assert (parsed.workers, parsed.threads, parsed.keepalive, parsed.preload_app) == (4, 2, 10, True)
    gunicorn = Path(sys.executable).parent / "gunicorn"
    check = subprocess.run([str(gunicorn), *argv[1:], "--check-config"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stderr  # the installed gunicorn accepts the brief's spelling
    # ... and so will the image's: it builds the wheel from setup.py, which carries the start-up hook
    copied = " ".join(re.findall(r"^COPY (.+)$", text, re.M))
    assert "setup.py" in copied and "campus_search_gunicorn_keepalive.pth" in copied
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "COPY production_system.py gunicorn.conf.py" in text
    assert (ROOT / "gunicorn.conf.py").exists() and (ROOT / "production_system.py").exists()
    assert "/health/live" in text and "requirements-prod.txt" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".env"} <= set(ignored)


def test_healthcheck_path_is_a_real_route(demo_app: Any) -> None:
    routes = {r.rule for r in demo_app.url_map.iter_rules()}
    assert "/health/live" in routes


# --- requirements ------------------------------------------------------------------------------------

def test_requirements_prod_pins_every_dependency() -> None:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements-prod.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert m, f"not an exact pin: {line!r}"
        name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
        assert name not in pins, f"pinned twice: {name}"
        pins[name] = m.group(2)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        req = Requirement(dep)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is not pinned in requirements-prod.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req.specifier}"


def test_flask_floor_has_the_per_request_body_limit_the_document_api_sets() -> None:
    """api/documents.py raises the body limit for uploads with ``request.max_content_length = ...``,
    which Flask made settable in 3.1 (3.0's is a read-only property): the declared floor must not
    admit a Flask where uploads would crash with AttributeError."""
    from flask import Request

    source = (ROOT / "campus_search" / "api" / "documents.py").read_text(encoding="utf-8")
    assert re.search(r"request\.max_content_length\s*=", source)
    prop = Request.__dict__["max_content_length"]
    assert isinstance(prop, property) and prop.fset is not None  # the installed Flask has the setter
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (flask,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name.lower() == "flask"]
    for too_old in ("3.0.0", "3.0.3"):
        assert not flask.specifier.contains(too_old), f"{flask} admits Flask {too_old} (no settable limit)"
    assert flask.specifier.contains("3.1.0")


def test_the_customers_packages_are_declared_and_pinned() -> None:
    """SPEC §0's design card: each package the customer chose is a runtime dependency, pinned."""
    chosen = {"flask", "flask-limiter", "flask-jwt-extended", "psycopg", "psycopg-pool", "pgvector", "redis",
              "prometheus-client", "requests", "gunicorn"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.sub(r"[-_.]+", "-", Requirement(dep).name).lower() for dep in project["dependencies"]}
    assert chosen <= declared, f"not declared: {sorted(chosen - declared)}"
    pinned = {re.sub(r"[-_.]+", "-", line.split("==", 1)[0]).lower()
              for line in (ROOT / "requirements-prod.txt").read_text().splitlines() if "==" in line}
    assert chosen <= pinned, f"not pinned: {sorted(chosen - pinned)}"


# --- pgbouncer ---------------------------------------------------------------------------------------

def pgbouncer_ini() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(comment_prefixes=(";", "#"), inline_comment_prefixes=None, strict=True)
    parser.read_string((ROOT / "pgbouncer" / "pgbouncer.ini").read_text(encoding="utf-8"))
    return parser


def test_pgbouncer_pools_transactions_to_primary_and_replica() -> None:
    ini = pgbouncer_ini()
    assert ini["pgbouncer"]["pool_mode"] == "transaction"
    assert ini["pgbouncer"]["auth_type"] == "scram-sha-256"
    assert "host=primary" in ini["databases"]["campus_search"]
    assert "host=replica" in ini["databases"]["campus_search_ro"]
    entry = (ROOT / "pgbouncer" / "entrypoint.sh").read_text()
    assert ini["pgbouncer"]["auth_file"] in entry, "the entrypoint writes the auth file pgbouncer reads"


def test_shell_scripts_parse() -> None:
    for script in ("postgres/init-primary.sh", "postgres/replica-entrypoint.sh", "pgbouncer/entrypoint.sh",
                   "nginx/make-dev-cert.sh"):
        shell = "bash" if "bash" in (ROOT / script).read_text().splitlines()[0] else "sh"
        proc = subprocess.run([shell, "-n", str(ROOT / script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


# --- PostgreSQL ----------------------------------------------------------------------------------------

def conf_settings(path: Path) -> dict[str, str]:
    return conf_settings_text(path.read_text(encoding="utf-8"))


def test_postgresql_conf_is_accepted_by_postgresql_18(tmp_path: Path) -> None:
    conf = ROOT / "postgresql.conf"
    settings = conf_settings(conf)
    assert settings["wal_level"] == "replica"
    assert int(settings["max_wal_senders"]) >= 2 and settings["hot_standby"] == "on"
    assert {"shared_buffers", "maintenance_work_mem", "effective_cache_size", "max_replication_slots"} <= set(settings)
    postgres = bundled_bin_dirs()[0] / "postgres"
    known = {line.split("\t", 1)[0].lower() for line in subprocess.run(
        [str(postgres), "--describe-config"], capture_output=True, text=True, check=True).stdout.splitlines()}
    unknown = [k for k in settings if k.lower() not in known and "." not in k]  # names are case-insensitive
    assert not unknown, f"not PostgreSQL parameters: {unknown}"
    # The server parses the whole file and every value; a bad one makes it exit non-zero.
    proc = subprocess.run([str(postgres), "-C", "maintenance_work_mem", "-c", f"config_file={conf}",
                           "-D", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(3 * 1024 * 1024)  # kB


# --- nginx ---------------------------------------------------------------------------------------------

def test_nginx_terminates_tls_and_proxies_to_the_app() -> None:
    text = (ROOT / "nginx" / "nginx.conf").read_text(encoding="utf-8")
    assert text.count("{") == text.count("}")
    assert re.search(r"listen 443 ssl;", text) and "ssl_certificate " in text and "ssl_certificate_key" in text
    assert re.search(r"ssl_protocols TLSv1\.2 TLSv1\.3;", text)
    assert re.search(r"upstream campus_search_app \{[^}]*server app:5100", text, re.S)
    assert "proxy_pass http://campus_search_app;" in text
    for header in ("X-Forwarded-For", "X-Forwarded-Proto", "X-Real-IP", "Host", "X-Request-ID"):
        assert f"proxy_set_header {header} " in text
    for header in ("Strict-Transport-Security", "X-Content-Type-Options", "X-Frame-Options", "Referrer-Policy"):
        assert f"add_header {header} " in text
    assert re.search(r"client_max_body_size \d+[km];", text)
    assert re.search(r"return 308 https://", text)
    # searches (read-only) are re-sent to another replica even after one died holding them (deploy/rehearse)
    search = re.search(r"location = /api/search \{([^}]*)\}", text)
    assert search and "non_idempotent" in search.group(1) and "proxy_pass http://campus_search_app;" in search.group(1)
    rest = re.search(r"location / \{([^}]*)\}", text.split("listen 443", 1)[1])
    assert rest and "non_idempotent" not in rest.group(1)  # admin POST/PATCH are never re-sent


def test_no_private_key_is_committed() -> None:
    tracked = subprocess.run(["git", "ls-files", "nginx"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert not [f for f in tracked if f.endswith((".pem", ".key", ".crt"))]
    assert "*" in (ROOT / "nginx" / "certs" / ".gitignore").read_text().split()


NGINX_MISSING = not shutil.which("nginx") or not shutil.which("openssl")


def local_nginx_conf(tmp_path: Path, *, app_port: int = 5100, http_port: int | None = None,
                     https_port: int | None = None, upstream: str | None = None) -> Path:
    """The real nginx.conf, adapted only where this machine differs from the container: certificates
    from make-dev-cert.sh, `app` -> ``upstream`` (default 127.0.0.1:app_port), files under tmp_path,
    optionally loopback ports instead of 80/443, and directives newer than the local nginx (`resolve`
    needs 1.27.3, `http2 on` 1.25.1) dropped when the local one is older."""
    work = tmp_path / "nginx"
    shutil.copytree(ROOT / "nginx", work, ignore=shutil.ignore_patterns("certs"))
    subprocess.run(["sh", str(work / "make-dev-cert.sh"), "test.local"], check=True, capture_output=True)
    version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr
    major, minor, patch = (int(x) for x in re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version).groups())  # type: ignore[union-attr]
    text = (work / "nginx.conf").read_text()
    text = text.replace("/etc/nginx/certs/", f"{work}/certs/")
    text = text.replace("server app:5100", f"server {upstream or f'127.0.0.1:{app_port}'}")
    if (major, minor, patch) < (1, 27, 3):
        text = text.replace(" resolve max_fails", " max_fails")
    if (major, minor, patch) < (1, 25, 1):
        text = text.replace("        http2 on;\n", "")
    if http_port is not None:
        text = text.replace("listen [::]:80;", "").replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    if https_port is not None:
        text = text.replace("listen [::]:443 ssl;", "")
        text = text.replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
    text = text.replace("access_log /dev/stdout main;", f"access_log {tmp_path}/access.log main;")
    text = text.replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;")
    conf = work / "nginx.conf"
    conf.write_text(text)
    return conf


@pytest.mark.skipif(NGINX_MISSING, reason="nginx/openssl not installed")
def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    """``nginx -t`` on the real file (adapted as :func:`local_nginx_conf` says)."""
    conf = local_nginx_conf(tmp_path)
    proc = subprocess.run(["nginx", "-t", "-c", str(conf), "-p", str(conf.parent), "-g",
                           f"error_log {tmp_path}/e.log;"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "test is successful" in proc.stderr


def test_nginx_body_limits_match_the_app() -> None:
    """Every request the app accepts fits through nginx: search bodies up to MAX_REQUEST_BYTES, document
    uploads (/api/admin/documents/) up to MAX_DOCUMENT_BYTES plus multipart framing."""
    text = (ROOT / "nginx" / "nginx.conf").read_text(encoding="utf-8")
    units = {"k": 1024, "m": 1024 * 1024, "g": 1024 ** 3}

    def size(block: str) -> int:
        m = re.search(r"client_max_body_size (\d+)([kmg]?);", block)
        assert m, block[:200]
        return int(m.group(1)) * units.get(m.group(2), 1)

    default = Settings(data_dir="/x")
    documents = re.search(r"location \^~ /api/admin/documents/ \{([^}]*)\}", text)
    assert documents, "document uploads need their own body limit"
    assert size(documents.group(1)) >= default.max_document_bytes + 64 * 1024
    assert "proxy_pass http://campus_search_app;" in documents.group(1)
    assert size(text) >= default.max_request_bytes  # the first one: the http-level default


class _Upstream:
    """A stand-in for the app behind nginx that answers every request with the body size it received."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received: list[tuple[str, str, int]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                remaining = n
                while remaining:
                    remaining -= len(self.rfile.read(min(remaining, 1 << 20)))
                received.append((self.command, self.path, n))
                body = json.dumps({"received": n}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_PUT = do_POST = do_GET = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.skipif(NGINX_MISSING, reason="nginx/openssl not installed")
def test_nginx_passes_document_uploads_and_refuses_large_search_bodies(tmp_path: Path) -> None:
    """The real nginx with the real file on loopback ports: a 5 MiB document upload reaches the app whole;
    a 2 MiB search body and a document above the upload limit are refused by nginx with 413."""
    import requests
    import urllib3

    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    upstream = _Upstream()
    http_port, https_port = _free_ports(2)
    conf = local_nginx_conf(tmp_path, app_port=upstream.port, http_port=http_port, https_port=https_port)
    # `user root`: as root, nginx's workers would otherwise run as nobody and could not write request
    # bodies into the private temporary directory (without root the directive is ignored with a warning).
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(conf.parent), "-g",
                             f"daemon off; user root; error_log {tmp_path}/e.log;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"https://127.0.0.1:{https_port}"
    try:
        import time

        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "e.log").read_text() if (tmp_path / "e.log").exists() else ""
            try:
                requests.get(base + "/health/live", verify=False, timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.1)
        doc = b"x" * (5 * 1024 * 1024)
        r = requests.put(base + "/api/admin/documents/handbook", data=doc, verify=False, timeout=60,
                         headers={"Content-Type": "text/plain"})
        assert r.status_code == 200, r.text[:300]
        assert r.json() == {"received": len(doc)}
        r = requests.post(base + "/api/search", data=b"x" * (2 * 1024 * 1024), verify=False, timeout=60,
                          headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        r = requests.put(base + "/api/admin/documents/huge", data=b"x" * (22 * 1024 * 1024), verify=False,
                         timeout=60, headers={"Content-Type": "text/plain"})
        assert r.status_code == 413
        assert [(m, p) for m, p, _ in upstream.received if p != "/health/live"] == [
            ("PUT", "/api/admin/documents/handbook")]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        upstream.close()


@pytest.mark.skipif(NGINX_MISSING, reason="nginx/openssl not installed")
def test_nginx_answers_what_it_refuses_itself_in_json(tmp_path: Path) -> None:
    """The real nginx.conf running on loopback (HTTPS on a free port, the app's address a closed port):
    an oversize URL, header or body, /metrics and an unreachable app are answered in the API's JSON
    error shape, never nginx's HTML pages."""
    import json
    import socket
    import ssl
    import time

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    https_port, closed_port = free_port(), free_port()
    conf = local_nginx_conf(tmp_path, upstream=f"127.0.0.1:{closed_port}")
    text = conf.read_text().replace("listen [::]:80;", "").replace("listen [::]:443 ssl;", "")
    text = text.replace("listen 80;", f"listen 127.0.0.1:{free_port()};")
    conf.write_text(text.replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(conf.parent), "-g",
                             f"daemon off; error_log {tmp_path}/e.log;"], stderr=subprocess.DEVNULL)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE

    def exchange(raw: bytes) -> tuple[int, str, dict]:
        with socket.create_connection(("127.0.0.1", https_port), timeout=10) as plain, \
                context.wrap_socket(plain, server_hostname="test.local") as sock:
            sock.sendall(raw)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        content_type = next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                             if line.lower().startswith(b"content-type:")), "")
        return status, content_type, json.loads(body)

    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", https_port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "e.log").read_text()
                time.sleep(0.1)
        cases = [
            (b"GET /health/live?q=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, "request_uri_too_long"),
            (b"GET /health/live HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + b"x" * 10000 + b"\r\n\r\n",
             400, "bad_request"),
            (b"POST /api/search HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
             b"Content-Length: 2000000\r\nConnection: close\r\n\r\n{}", 413, "payload_too_large"),
            (b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 404, "not_found"),
            # the app is down: nginx's 502 keeps its status, with the JSON body
            (b"GET /health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 502, "service_unavailable"),
        ]
        for raw, status, code in cases:
            got, content_type, body = exchange(raw)
            assert (got, content_type) == (status, "application/json"), (raw[:60], got, body)
            assert body["error"]["code"] == code and body["error"]["message"]
            assert len(body["error"]["request_id"]) == 32  # nginx's $request_id, also sent to the app
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# --- Prometheus, alerts, Grafana -----------------------------------------------------------------------

PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "by", "without", "and", "or", "unless", "on",
    "ignoring", "group_left", "group_right", "rate", "irate", "increase", "histogram_quantile", "clamp_min",
    "clamp_max", "abs", "absent", "delta", "deriv", "le", "bool", "offset",
}


def exported_metric_names(demo_app: Any, token: Any) -> set[str]:
    client = demo_app.test_client()
    client.post("/api/search", json={"query": "library opening hours"}, headers={"Authorization": token("admin")})
    text = client.get("/metrics").get_data(as_text=True)
    names = set(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    out = set()
    for name, kind in names:
        out.add(name)
        if kind == "histogram":
            out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        if kind == "counter" and not name.endswith("_total"):
            out.add(f"{name}_total")
    return out


def check_promql(expr: str, metrics: set[str]) -> None:
    used = set(re.findall(r"\bvector_search_\w+", expr))
    assert used, expr
    assert used <= metrics, f"unknown metrics {sorted(used - metrics)} in {expr}"
    functions = set(re.findall(r"\b([a-z_]+)\s*\(", expr))
    assert functions <= PROMQL_WORDS, f"unknown PromQL functions {sorted(functions - PROMQL_WORDS)} in {expr}"
    assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")


def test_prometheus_scrapes_the_app_and_loads_the_rules(compose: dict[str, Any]) -> None:
    prom = load_yaml("prometheus.yml")
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "campus-search"]
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"][0]["names"] == ["app"] and job["dns_sd_configs"][0]["port"] == 5100
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"] if v.startswith("./"))
    assert mounts["./prometheus/alerts.yml"] in prom["rule_files"]


def test_alert_rules_use_real_metrics_and_name_a_runbook(demo_app: Any, token: Any) -> None:
    metrics = exported_metric_names(demo_app, token)
    runbook = (ROOT / "docs" / "runbook.md").read_text(encoding="utf-8")
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", runbook, re.M)}
    rules = [r for g in load_yaml("prometheus/alerts.yml")["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    for wanted in ("SearchLatencyHigh", "SearchErrorRateHigh", "DatabasePoolExhausted", "CacheHitRateLow",
                   "RateLimitingSpike", "AuditWriteFailures"):
        assert wanted in names
    for rule in rules:
        if rule["alert"] == "AppReplicaDown":
            assert rule["expr"].startswith("up{")
        else:
            check_promql(rule["expr"], metrics)
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"]
        link = rule["annotations"]["runbook"]
        assert link.startswith("docs/runbook.md")
        if "#" in link:
            assert link.split("#", 1)[1] in anchors, f"{rule['alert']}: no runbook section {link}"


def test_grafana_dashboard_uses_the_provisioned_datasource_and_real_metrics(demo_app: Any, token: Any) -> None:
    metrics = exported_metric_names(demo_app, token)
    source = load_yaml("grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert source["url"] == "http://prometheus:9090"
    provider = load_yaml("grafana/provisioning/dashboards/campus-search.yml")["providers"][0]
    compose_mounts = load_yaml("docker-compose.prod.yml")["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in compose_mounts
    dashboard = json.loads((ROOT / "grafana" / "dashboards" / "campus-search.json").read_text())
    assert dashboard["panels"]
    covered: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"]
        for target in panel["targets"]:
            check_promql(target["expr"], metrics)
            covered |= set(re.findall(r"\bvector_search_\w+", target["expr"]))
    base = {re.sub(r"_(bucket|sum|count)$", "", m) for m in covered}
    for family in ("vector_search_requests_total", "vector_search_request_duration_seconds",
                   "vector_search_cache_operations_total", "vector_search_rate_limited_requests_total",
                   "vector_search_audit_write_failures_total", "vector_search_active_connections"):
        assert family in base, f"dashboard lacks {family}"


def test_wheel_carries_the_keepalive_start_up_hook(tmp_path: Path) -> None:
    """A non-editable install (the Docker image, `pip install .`) must get the hook at site-packages' root."""
    import zipfile

    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path),
                            str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(tmp_path.glob("campus_search-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "campus_search_gunicorn_keepalive.pth" in names
    hook = zipfile.ZipFile(wheel).read("campus_search_gunicorn_keepalive.pth").decode()
    env = {"argv": ["/usr/bin/gunicorn", "--keepalive", "10", "--keepalive=5", "--bind", "x"]}
    exec(hook.replace("import sys; ", ""), {"sys": type("S", (), env)})  # the hook's one line, on a fake argv
    assert env["argv"][1:] == ["--keep-alive", "10", "--keep-alive=5", "--bind", "x"]


def test_make_run_keeps_its_data_with_the_checkout() -> None:
    """Two checkouts on one machine must not share one database: `make run` uses .data/ in the checkout
    (git-ignored) unless DATA_DIR is given, and says so."""
    env = {k: v for k, v in os.environ.items() if k != "DATA_DIR"}
    dry = subprocess.run(["make", "-n", "run"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert f'DATA_DIR="{ROOT}/.data" .venv/bin/campus-search serve --demo' in dry.stdout
    assert f"make run: data in {ROOT}/.data" in dry.stdout
    given = subprocess.run(["make", "-n", "run"], cwd=ROOT, env={**env, "DATA_DIR": "/srv/cs"},
                           capture_output=True, text=True, check=True)
    assert 'DATA_DIR="/srv/cs" .venv/bin/campus-search serve --demo' in given.stdout
    assert ".data/" in (ROOT / ".gitignore").read_text().splitlines()


def test_readme_command_table_names_ingest_demo_and_eval_live() -> None:
    """The options a new operator needs first are in the README's command table, as `--help` has them."""
    from campus_search.cli.main import build_parser

    rows = {line.split("`")[1].split()[1]: line for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("| `campus-search ")}
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command, flag in (("ingest", "--demo"), ("eval", "--live"), ("loadtest", "--fail-under")):
        assert flag in sub[command].format_help()
        assert flag in rows[command], f"README's {command} row does not mention {flag}"


def test_the_banner_describes_every_route(demo_app: Any) -> None:
    """Each endpoint the start-up banner lists has a description (a route renamed without its entry in
    banner.DESCRIPTIONS, or a view without a docstring, showed an empty one)."""
    from campus_search.ops.banner import endpoints

    routes = endpoints(demo_app)
    assert any(path.startswith("/api/admin/documents/") for _, path, _ in routes)
    assert [(m, p) for m, p, d in routes if not d.strip()] == []


def test_the_cli_and_make_run_share_the_checkouts_data_dir() -> None:
    """README's "Try it" mints a token with `.venv/bin/campus-search token` (no DATA_DIR) for the server
    `make run` started on `.data/`: both must read the same development secret, so the CLI's default
    DATA_DIR in a source checkout is that checkout's `.data/` (an installed wheel keeps the per-user one)."""
    from campus_search.config.loading import _default_data_dir

    env = {k: v for k, v in os.environ.items() if k != "DATA_DIR"}
    dry = subprocess.run(["make", "-n", "run"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert f'DATA_DIR="{_default_data_dir()}" ' in dry.stdout
    assert _default_data_dir() == str(ROOT / ".data")


def test_nginx_blanks_every_identity_header_a_proxy_could_set() -> None:
    """Identity headers (security/auth.py) count only from TRUSTED_PROXIES, and nginx is that proxy:
    it must blank each one a client could send, the groups header included, even while it is off."""
    from campus_search.config import Settings

    text = (ROOT / "nginx" / "nginx.conf").read_text(encoding="utf-8")
    defaults = Settings()
    headers = {defaults.proxy_role_header, defaults.proxy_department_header, defaults.proxy_campus_header,
               "X-Remote-User", "X-Remote-Groups"}  # the documented values of the two settings off by default
    for header in sorted(headers):
        assert f'proxy_set_header {header} "";' in text, header


def test_embedded_cluster_memory_follows_the_machine() -> None:
    """Embedded mode sizes PostgreSQL's memory from the machine's RAM (storage/embedded_pg.py), as
    postgresql.conf's comments say for production: shared_buffers a quarter, within 128MB-4GB;
    effective_cache_size a half. Every other line stays fixed."""
    from campus_search.storage.embedded_pg import tuning

    def memory(ram_gb: float) -> tuple[str, str]:
        s = conf_settings_text(tuning(int(ram_gb * 2**30)))
        return s["shared_buffers"], s["effective_cache_size"]

    assert memory(0.25) == ("128MB", "512MB")  # floors: a tiny container still gets a working cluster
    assert memory(2) == ("512MB", "1024MB")
    assert memory(8) == ("2048MB", "4096MB")
    assert memory(24) == ("4096MB", "12288MB")  # this machine: postgresql.conf's 4GB, its 12GB
    assert memory(64) == ("4096MB", "32768MB")  # capped: beyond 4GB the OS cache does the rest
    fixed = {k: v for k, v in conf_settings_text(tuning(8 * 2**30)).items()
             if k not in {"shared_buffers", "effective_cache_size"} and not k.startswith("autovacuum")}
    assert fixed == {"jit": "off", "maintenance_work_mem": "1GB", "max_connections": "200",
                     "random_page_cost": "1.1", "max_wal_size": "4GB", "checkpoint_timeout": "15min"}


def test_embedded_cluster_vacuums_as_production_does() -> None:
    """Embedded mode's autovacuum settings are production's (postgresql.conf): when it runs and what it
    takes. Not its workers and memory: the embedded cluster keeps PostgreSQL's 3 workers and uses its
    maintenance_work_mem (1GB), sized for a development machine."""
    from campus_search.storage.embedded_pg import tuning

    production = {k: v for k, v in conf_settings_text((ROOT / "postgresql.conf").read_text(encoding="utf-8")).items()
                  if k.startswith("autovacuum") and k not in {"autovacuum", "autovacuum_max_workers",
                                                             "autovacuum_work_mem"}}
    embedded = {k: v for k, v in conf_settings_text(tuning(8 * 2**30)).items() if k.startswith("autovacuum")}
    assert production and embedded == production


def test_a_large_buffer_pool_without_huge_pages_is_said_out_loud() -> None:
    """The process that starts the embedded cluster tells the operator how many huge pages its shared memory
    needs when it runs in 4 kB pages and is large (storage/embedded_pg.py); nothing otherwise."""
    from campus_search.storage.server_memory import HUGE_PAGES_WORTH_MB, huge_pages_hint

    hint = huge_pages_hint("off", 4392, 2196)
    assert hint is not None and "sysctl -w vm.nr_hugepages=2196" in hint and "4392 MB" in hint
    assert huge_pages_hint("on", 4392, 2196) is None  # it has them
    assert huge_pages_hint("unknown", 4392, 2196) is None  # huge_pages=try before the server decided
    assert huge_pages_hint("off", HUGE_PAGES_WORTH_MB - 1, 500) is None  # small: the TLB covers it
    assert huge_pages_hint(None, None, None) is None  # a server too old to say
    assert "vm.nr_hugepages`" in (huge_pages_hint("off", 4392, None) or "")  # no count reported: the setting


def conf_settings_text(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, value = (part.strip() for part in line.split("=", 1))
            out[key] = value.strip("'")
    return out


def test_the_image_derives_the_query_graph_where_its_model_cache_dir_points(tmp_path: Path) -> None:
    """The Dockerfile derives the int8 query graph at build time (no 2 s derivation at each container's first
    start, no write at run time) into the directory its MODEL_CACHE_DIR names; the command it runs works."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    run = re.search(r"^RUN python -m campus_search\.embedding\.quantized (\S+)$", text, re.M)
    env = re.search(r"MODEL_CACHE_DIR=(\S+)", text)
    assert run and env and run.group(1) == env.group(1)
    done = subprocess.run([sys.executable, "-m", "campus_search.embedding.quantized", str(tmp_path / "models")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    names = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert len(names) == 2 and names[1] == names[0] + ".sha256" and done.stdout.strip().endswith(names[0])
