"""bench/bench_peer.py's arithmetic: wrk parsing, exact top-k, CPU per request, profile buckets, the
host's huge pages (--prepare-host, on stand-in /proc files).

The benchmark itself needs Chroma and minutes of load; these are the parts whose mistakes would
silently skew its figures."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("bench_peer", ROOT / "bench" / "bench_peer.py")
assert spec and spec.loader
bench_peer = importlib.util.module_from_spec(spec)
sys.modules["bench_peer"] = bench_peer
spec.loader.exec_module(bench_peer)

WRK = """Running 15s test @ http://127.0.0.1:40000
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   401.22ms  150.10ms   1.20s    70.00%
  Latency Distribution
     50%  386.00ms
     75%  480.12ms
     90%  681.00ms
     99%    1.10s
  1381 requests in 15.02s, 9.80MB read
  Non-2xx or 3xx responses: 3
Requests/sec:     91.94
Transfer/sec:    668.20KB
"""


def test_parse_wrk_reads_percentiles_in_any_unit_the_count_and_errors() -> None:
    out = bench_peer.parse_wrk(WRK)
    assert out["p50_ms"] == 386.0
    assert out["p90_ms"] == 681.0
    assert out["p99_ms"] == 1100.0  # seconds converted
    assert out["requests"] == 1381
    assert out["requests_per_s"] == 91.9
    assert out["errors"] == 3


def test_exact_top_is_the_highest_cosine() -> None:
    rng = np.random.default_rng(7)
    matrix = rng.normal(size=(50, 8)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    query = matrix[[3, 17]] + 0.01  # nearest to rows 3 and 17
    top = bench_peer.exact_top(matrix, query, 5)
    assert 3 in top[0] and 17 in top[1]
    expected = set(np.argsort(-(matrix @ query[0]))[:5].tolist())
    assert top[0] == expected


def test_cpu_per_request_splits_the_machine_into_groups_and_the_rest() -> None:
    before = {"ours gunicorn": 10.0, "postgres": 5.0, "load generator (wrk)": 1.0, "machine": 100.0}
    after = {"ours gunicorn": 12.0, "postgres": 5.5, "load generator (wrk)": 1.1, "machine": 104.0}
    per = bench_peer.cpu_per_request(before, after, 100)
    assert per == {"ours gunicorn": 20.0, "postgres": 5.0, "load generator (wrk)": 1.0, "other processes": 14.0}


def test_profile_buckets_take_the_first_matching_part(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text(
        "run (gunicorn/workers/gthread.py:1);search (campus_search/retrieval/search.py:2);"
        "embed (campus_search/embedding/local.py:3) 6\n"
        "run (gunicorn/workers/gthread.py:1);append (campus_search/audit/records.py:9);"
        "execute (psycopg/cursor.py:4) 3\n"
        "run (gunicorn/workers/gthread.py:1);accept (gunicorn/workers/gthread.py:5) 1\n")
    assert bench_peer.summarise_profile(raw) == {"embedding (ONNX, tokenizer)": 60.0, "audit": 30.0,
                                                 "gunicorn / socket I/O": 10.0}


def test_the_disk_probe_counts_stalls_and_the_seconds_they_cover(tmp_path: Path) -> None:
    """bench_disk.py (run beside every peer round): a flush of 100 ms or more is a stall, and the stall
    seconds are the sum of those flushes, not a count of samples; a real probe flushes and cleans up."""
    import bench_disk

    summary = bench_disk.summarise([0.0004, 0.0005, 0.25, 0.0006, 0.1, 0.0999, 0.0003])
    assert (summary["flushes"], summary["stalls"], summary["stall_s"]) == (7, 2, 0.35)  # 99.9 ms is no stall
    assert summary["p50_ms"] == 0.6 and summary["max_ms"] == 250.0
    assert bench_disk.summarise([]) == {"flushes": 0}
    with bench_disk.DiskProbe(tmp_path, rate=50) as probe:
        deadline = time.monotonic() + 5
        while len(probe.latencies) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert probe.summary()["flushes"] >= 3
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone


def test_huge_pages_are_added_only_to_make_up_what_is_not_free() -> None:
    assert bench_peer.huge_pages_to_add(2196, 0) == 2196
    assert bench_peer.huge_pages_to_add(2196, 2000) == 196
    assert bench_peer.huge_pages_to_add(2196, 2400) == 0


def _fake_host(tmp_path: Path, monkeypatch: Any, total: int, free: int, kernel_gives: bool = True) -> Path:
    """/proc/sys/vm/nr_hugepages and /proc/meminfo as files; the "kernel" frees what the pool grew by, or not."""
    nr = tmp_path / "nr_hugepages"
    nr.write_text(str(total))
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: 24000000 kB\nHugePages_Total: {total}\nHugePages_Free: {free}\n")
    monkeypatch.setattr(bench_peer, "NR_HUGEPAGES", nr)
    monkeypatch.setattr(bench_peer, "MEMINFO", meminfo)
    monkeypatch.setattr(bench_peer.os, "geteuid", lambda: 0)
    if kernel_gives:
        monkeypatch.setattr(bench_peer, "free_huge_pages", lambda: free + int(nr.read_text()) - total)
    return nr


def test_free_huge_pages_are_read_from_meminfo(tmp_path: Path, monkeypatch: Any) -> None:
    _fake_host(tmp_path, monkeypatch, total=100, free=40, kernel_gives=False)
    assert bench_peer.free_huge_pages() == 40
    (tmp_path / "meminfo").write_text("MemTotal: 24000000 kB\n")  # a kernel without huge pages
    assert bench_peer.free_huge_pages() == 0


def test_a_run_reserves_the_missing_huge_pages_and_gives_them_back(tmp_path: Path, monkeypatch: Any) -> None:
    nr = _fake_host(tmp_path, monkeypatch, total=100, free=40)
    assert bench_peer.free_huge_pages() == 40
    reserved = bench_peer.reserve_huge_pages(2196)
    assert reserved == (100, 2156) and nr.read_text() == "2256"
    bench_peer.release_huge_pages(reserved)
    assert nr.read_text() == "100"


def test_a_host_with_enough_free_huge_pages_is_left_alone(tmp_path: Path, monkeypatch: Any) -> None:
    nr = _fake_host(tmp_path, monkeypatch, total=3000, free=2500)
    assert bench_peer.reserve_huge_pages(2196) is None
    bench_peer.release_huge_pages(None)
    assert nr.read_text() == "3000"


def test_huge_pages_the_kernel_cannot_find_are_not_left_reserved(tmp_path: Path, monkeypatch: Any) -> None:
    nr = _fake_host(tmp_path, monkeypatch, total=0, free=0, kernel_gives=False)
    with pytest.raises(SystemExit, match="could not reserve 2196"):
        bench_peer.reserve_huge_pages(2196)
    assert nr.read_text() == "0"


def test_only_root_may_reserve_huge_pages(tmp_path: Path, monkeypatch: Any) -> None:
    nr = _fake_host(tmp_path, monkeypatch, total=0, free=0)
    monkeypatch.setattr(bench_peer.os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit, match="run as root"):
        bench_peer.reserve_huge_pages(2196)
    assert nr.read_text() == "0"
