"""How long a small synchronous write takes on the disk that holds a data directory, and how often it stalls.

    .venv/bin/python bench/bench_disk.py [--dir DIR] [--seconds 60] [--rate 50]

Every ``1/rate`` seconds one 8 kB block of a 2 MB scratch file under ``--dir`` (written out and flushed
first, so every sample overwrites allocated blocks) is rewritten and flushed with ``fdatasync`` -- what a
PostgreSQL commit asks of the disk holding its WAL (``wal_sync_method = fdatasync``, segments zero-filled
when created). Reports the latency's median, p99 and maximum, and the **stalls**: flushes that took 100 ms
or more, with the seconds they covered. No server needs to run: a stall here is the disk's (or the
virtual machine's host's), not the application's. ``bench_peer.py`` runs the same probe beside each of its
load rounds, so a round whose cores went idle can be matched with the disk stalling in the same seconds.

Why it matters: a search is answered once its audit record's commit is on disk (``AUDIT_WAIT_FOR_FLUSH=true``,
the default), so a flush that stalls for half a second holds every answer waiting on it (docs/performance.md,
"Where the idle share comes from").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

#: a flush at least this slow is a stall
STALL_S = 0.1
BLOCK = 8192
#: the scratch file cycles over this many blocks (2 MB), so it never grows
BLOCKS = 256


class DiskProbe:
    """A background thread that writes and ``fdatasync``s one block every ``1/rate`` seconds in ``directory``
    and keeps each flush's latency. ``with DiskProbe(dir) as probe: ...`` then ``probe.summary()``.

    A flush that stalls delays the next ones (they are not issued in parallel), so the samples are
    spaced by at least the latency of the one before: the stall seconds are those covered by slow flushes,
    not a count of samples."""

    def __init__(self, directory: str | Path, rate: float = 20.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.directory = Path(directory)
        self.interval = 1.0 / rate
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._path: Path | None = None

    def __enter__(self) -> DiskProbe:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".disk-probe-", dir=self.directory)
        self._path = Path(name)
        try:
            # written out (not a hole, not fallocate's unwritten extents) and flushed before the first sample:
            # every probe write then overwrites allocated blocks, as PostgreSQL's WAL writes do into segments
            # it filled with zeros (wal_init_zero), so no flush also commits a block allocation
            os.write(fd, bytes(BLOCK * BLOCKS))
            os.fsync(fd)
            self._thread = threading.Thread(target=self._run, args=(fd,), name="disk-probe", daemon=True)
            self._thread.start()
        except BaseException:
            os.close(fd)
            self._path.unlink(missing_ok=True)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._path is not None:
            self._path.unlink(missing_ok=True)

    def _run(self, fd: int) -> None:
        block = os.urandom(BLOCK)
        i = 0
        try:
            nxt = time.monotonic()
            while not self._stop.is_set():
                start = time.monotonic()
                os.pwrite(fd, block, (i % BLOCKS) * BLOCK)
                os.fdatasync(fd)
                self.latencies.append(time.monotonic() - start)
                i += 1
                nxt = max(nxt + self.interval, time.monotonic())
                self._stop.wait(nxt - time.monotonic())
        finally:
            os.close(fd)

    def summary(self) -> dict[str, Any]:
        return summarise(self.latencies)


def summarise(latencies: list[float]) -> dict[str, Any]:
    """Median, p99 and maximum flush latency (ms), the stalls (flushes of STALL_S or more) and the seconds they
    covered."""
    if not latencies:
        return {"flushes": 0}
    ordered = sorted(latencies)
    stalls = [x for x in latencies if x >= STALL_S]
    return {"flushes": len(ordered), "p50_ms": round(statistics.median(ordered) * 1e3, 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3, 1),
            "max_ms": round(ordered[-1] * 1e3, 1), "stalls": len(stalls), "stall_s": round(sum(stalls), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.environ.get("DATA_DIR") or tempfile.gettempdir(),
                    help="a directory on the disk to probe (default: DATA_DIR, else the temporary directory)")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to probe (default 60)")
    ap.add_argument("--rate", type=float, default=50.0, help="flushes a second (default 50)")
    args = ap.parse_args()
    with DiskProbe(args.dir, args.rate) as probe:
        time.sleep(args.seconds)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dir": str(Path(args.dir).resolve()),
              "seconds": args.seconds, "rate": args.rate, **probe.summary()}
    print(f"{result['flushes']} flushes of {BLOCK} bytes in {args.seconds:g} s: median {result.get('p50_ms')} ms, "
          f"p99 {result.get('p99_ms')} ms, max {result.get('max_ms')} ms; {result.get('stalls')} stalls of "
          f">= {STALL_S * 1e3:g} ms covering {result.get('stall_s')} s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
