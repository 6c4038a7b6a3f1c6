"""Stopping the server the way a terminal does (Ctrl-C / SIGTERM to the whole process group, as after
``make run``) is clean: every process exits 0 promptly, and nothing aborts.

The bug this guards: ``serve --demo`` ingested in the master, which loaded onnxruntime there. Its
process-wide native thread does not survive ``fork``, so at each worker's exit onnxruntime's exit-time
destructors failed on the missing thread: ``terminate called after throwing an instance of
'std::system_error'`` and ``Worker (pid:N) was sent SIGABRT!``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ROOT, TEST_SECRET


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stopping_serve_demo_is_clean(demo_services: Any, tmp_path: Path, sig: signal.Signals) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PROMETHEUS", "CAMPUS_SEARCH", "DB_", "DATABASE", "REDIS", "LOG_", "WEB_"))}
    # The shared demo database: --demo finds every document unchanged, but still runs the ingest path.
    env.update(DATABASE_URL=demo_services.settings.database_url, DATA_DIR=str(tmp_path / "data"),
               JWT_SECRET_KEY=TEST_SECRET, AUDIT_HMAC_KEY="audit-" + "k" * 40, HOST="127.0.0.1", PORT=str(port),
               DB_POOL_MIN_SIZE="1", DB_POOL_MAX_SIZE="2", LOG_FORMAT="text")
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "campus_search.cli.main", "serve", "--demo", "--workers", "2"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:  # ready, and both workers past post_fork (pools open, model loaded)
            assert proc.poll() is None, log_path.read_text()
            try:
                ready = requests.get(f"http://127.0.0.1:{port}/health/ready", timeout=5).status_code == 200
            except requests.ConnectionError:
                ready = False
            if ready and log_path.read_text().split("Booting worker", 1)[-1].count("services open in pid") >= 2:
                break
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        # The root cause, checked directly: the master never loaded onnxruntime (its workers did).
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "onnxruntime" not in maps, "the master loaded onnxruntime before forking its workers"
        os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C (or `kill -TERM -PGID`) does
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log_path.read_text(errors="replace")
    assert "terminate called" not in text and "std::system_error" not in text, text[-3000:]
    assert "SIGABRT" not in text and "SIGKILL" not in text and "Traceback" not in text, text[-3000:]
    assert "demo corpus:" in text and "unchanged" in text
    assert text.count("Worker exiting") >= 1, text[-3000:]  # 2 but for a rare double-signal race in gunicorn
    assert code == 0, text[-3000:]


class _FakeArbiter:
    """What post_fork reads of gunicorn's master object: the signal queue (gunicorn 27: a SimpleQueue)
    and the app. ``opened`` records whether the worker went on to open its services."""

    def __init__(self, *queued: int) -> None:
        import queue

        self.SIG_QUEUE: Any = queue.SimpleQueue()
        for sig in queued:
            self.SIG_QUEUE.put_nowait(sig)
        self.opened = False
        outer = self

        class Services:
            settings = None  # post_fork's slow-client guard falls back to its defaults

            def ensure_open(self) -> None:
                outer.opened = True

        class CampusSearch:  # the app's extension (campus_search/api/extension.py)
            services = Services()

        class App:
            extensions = {"campus_search": CampusSearch()}

        class Loader:
            def wsgi(self) -> Any:
                return App()

        self.app = Loader()


@pytest.fixture
def saved_signal_handlers() -> Any:
    from campus_search.ops.gunicorn_hooks import STOP_SIGNALS

    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGQUIT])
def test_a_stop_signal_during_worker_start_up_is_not_lost(saved_signal_handlers: Any, sig: int) -> None:
    """A Ctrl-C that reaches a worker between fork and gunicorn's own worker handlers lands in the
    inherited master handler's queue; the worker must act on it (exit) rather than run on until the
    master kills it after graceful_timeout ("Worker was sent SIGKILL!")."""
    from campus_search.ops.gunicorn_hooks import post_fork

    arbiter = _FakeArbiter(signal.SIGWINCH, sig)
    with pytest.raises(SystemExit) as exited:
        post_fork(arbiter, object())
    assert exited.value.code == 0
    assert not arbiter.opened  # no model load or pools for a worker that is going away
    # ... and one that arrives while it opens its services ends it right after, cleanly.
    arbiter = _FakeArbiter()
    arbiter.app.wsgi().extensions["campus_search"].services.ensure_open = lambda: os.kill(os.getpid(), sig)
    with pytest.raises(SystemExit):
        post_fork(arbiter, object())
    # No stop signal: the worker opens its services and carries on.
    arbiter = _FakeArbiter(signal.SIGWINCH)
    post_fork(arbiter, object())
    assert arbiter.opened


def test_a_second_stop_signal_cannot_interrupt_a_worker_on_its_way_out(saved_signal_handlers: Any) -> None:
    """Ctrl-C to the process group reaches each worker, and the master's SIGQUIT follows: once a quick
    stop is under way (gunicorn's worker_int hook), further stop signals are ignored, so the exit path
    (worker_exit closing the pools, the "Worker exiting" line) is not cut short by a second SystemExit."""
    from campus_search.config import Settings
    from campus_search.ops.gunicorn_hooks import HOOKS, STOP_SIGNALS, server_options

    assert server_options(Settings(data_dir="/x"))["worker_int"] is HOOKS["worker_int"]
    HOOKS["worker_int"](object())
    from campus_search.ops.gunicorn_hooks import _ignore

    assert all(signal.getsignal(sig) is _ignore for sig in STOP_SIGNALS)  # Python no-ops, not SIG_IGN
    os.kill(os.getpid(), signal.SIGQUIT)  # ignored: no SystemExit, no "ignored due to race condition"
