"""Campus Search side by side with what a team would build instead: Flask + the same model + Chroma.

    .venv/bin/python bench/bench_peer.py [--docs 5183] [--data-dir DIR] [--chroma-venv DIR]

In one run, on the same SciFact chunks and the same vectors, all on 127.0.0.1:

- **ours**: Campus Search under the brief's command (``gunicorn --workers 4 --worker-class gthread
  --threads 2 --timeout 60 --keepalive 10 --preload production_system:create_production_app``) on
  the embedded PostgreSQL in ``--data-dir``; hybrid search (the configured fusion, default convex),
  permissions, audit, metrics and logs as shipped; result cache OFF and rate limits off;
- **peer**: ``bench/peer_app.py`` under the same gunicorn settings: it embeds the query with the same
  int8 ONNX all-MiniLM-L6-v2 (``LocalMiniLM``, one thread per worker) and asks a Chroma server
  (``chroma run``) for the nearest chunks over Chroma's HTTP API. No BM25, no permissions, no audit.

Steps: ingest the first ``--docs`` SciFact documents (idempotent: a kept ``--data-dir`` skips it);
read every chunk's id, text and embedding from Campus Search's database and load exactly those into
a Chroma collection with cosine distance (kept under ``--data-dir/chroma``; reloaded only when the
chunks change); check the peer against an exact cosine search over the same vectors (recall@10);
then measure both with distinct queries (SciFact train questions, each made unique with a suffix, so
no cache of either side can answer):

1. concurrency 1: one keep-alive connection per server, ``--sequential`` requests each, the two
   servers taking turns request by request -> median / p95;
2. concurrency ``--concurrency``: ``wrk`` (closed loop, 2 threads), ``--rounds`` rounds (default 8) of
   ``--duration`` s (default 8) per server in the order ours, peer, peer, ours, ... (many short rounds: this
   machine's speed drifts within a run, by a third at times, and each side must see the same phases)
   -> requests/s over all rounds, p50 / p90 / p99,
   and for each round the share of the cores busy and the stalls of the disk under the data directory
   (``bench_disk.py``'s probe, 20 flushes a second beside the round): our answers wait for their audit
   record's flush (``AUDIT_WAIT_FOR_FLUSH``, default true), the peer's write nothing, so a round in which
   the disk stalled idles our cores and not the peer's. ``--ours-env NAME=VALUE`` runs ours with a setting
   changed (e.g. ``AUDIT_WAIT_FOR_FLUSH=false``).

``--prepare-host`` first prepares this machine as docs/deployment.md prepares a database host: it reserves
the huge pages the embedded PostgreSQL's shared memory needs (``shared_memory_size_in_huge_pages``; as root,
``/proc/sys/vm/nr_hugepages``) before the cluster starts, and gives them back after the run. Without it the
host is measured as it is. Either way the figures record whether PostgreSQL ran in huge pages and whether
this run reserved them (docs/operations.md, "Huge pages": 3-11 % less PostgreSQL CPU a search with them).

Chroma lives in its own virtualenv (``--chroma-venv``; created with ``pip install chromadb`` when
missing), never in the project's. If chromadb cannot be installed or started the peer is skipped
with a message and only Campus Search is measured. Needs ``wrk`` (``apt-get install wrk``).
Prints a table and, last, one JSON line with the ratios ours/peer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_disk.py, beside this script
from bench_disk import DiskProbe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCIFACT = next((p for p in (Path(os.environ.get("SCIFACT_DIR", "")), ROOT.parent / "shared/data/scifact")
                if (p / "corpus.jsonl").is_file()), Path("/work/shared/data/scifact"))
SECRET = "bench-secret-" + "x" * 40
CHROMA_VERSION = "chromadb==1.5.9"  # the release this script was written against (HTTP API v2)
COLLECTION = "campus_search_peer"
CHROMA_DB = "api/v2/tenants/default_tenant/databases/default_database"
#: the wrk script (shared with bench_search.py)
LUA = Path(__file__).resolve().parent / "search.lua"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pct(ordered: list[float], p: float) -> float:
    return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 2)


def parse_wrk(output: str) -> dict[str, float]:
    out: dict[str, float] = {}
    units = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
    for line in output.splitlines():
        parts = line.split()
        if line.strip().startswith(("50%", "75%", "90%", "99%")) and len(parts) == 2:
            for unit in ("us", "ms", "s"):
                if parts[1].endswith(unit):
                    out[f"p{parts[0].rstrip('%')}_ms"] = round(float(parts[1][: -len(unit)]) * units[unit], 2)
                    break
        elif line.strip().startswith("requests in") or " requests in " in line:
            out["requests"] = float(parts[0])
        elif line.startswith("Requests/sec:"):
            out["requests_per_s"] = round(float(parts[1]), 1)
        elif "Non-2xx" in line or "Socket errors" in line:
            out["errors"] = out.get("errors", 0) + sum(float(x.rstrip(",")) for x in parts if x.rstrip(",").isdigit())
    return out


def exact_top(matrix: np.ndarray, vectors: np.ndarray, k: int) -> list[set[int]]:
    """Row indexes of the k chunks with the highest cosine similarity (unit vectors: dot product)."""
    scores = vectors @ matrix.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return [set(map(int, row)) for row in top]


# ---------------------------------------------------------------- corpus and vectors


def ingest(data_dir: Path, docs: int, env: dict[str, str]) -> None:
    corpus = data_dir / "scifact.jsonl"  # one source path, so growing --docs adds to the same source
    with (SCIFACT / "corpus.jsonl").open(encoding="utf-8") as src:
        lines = [line for _, line in zip(range(docs), src, strict=False)]
    text = "".join(lines)
    if not corpus.exists() or corpus.read_text(encoding="utf-8") != text:
        corpus.write_text(text, encoding="utf-8")
    say(f"ingesting {len(lines)} SciFact documents into {data_dir} (skips what is already there) ...")
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "campus-search"), "ingest", "--visibility", "public",
                    str(corpus)], env=env, check=True, stdout=subprocess.DEVNULL)
    say(f"  ingestion done in {time.perf_counter() - started:.0f} s")


def read_chunks(data_dir: Path) -> tuple[list[str], list[str], np.ndarray, int, dict[str, Any]]:
    """Every chunk's id, text and embedding, as Campus Search stores them; the document count; and how the
    PostgreSQL server runs its shared memory (reported with the figures)."""
    import psycopg
    from pgvector.psycopg import register_vector

    sys.path.insert(0, str(ROOT))
    from campus_search.storage.embedded_pg import ensure_embedded_database

    with psycopg.connect(ensure_embedded_database(str(data_dir))) as conn:
        register_vector(conn)
        rows = conn.execute("SELECT id, text, embedding FROM chunks ORDER BY id").fetchall()
        (documents,) = conn.execute("SELECT count(*) FROM documents").fetchone() or (0,)
        from campus_search.storage.server_memory import server_memory

        status, size_mb, _ = server_memory(conn)
        say(f"PostgreSQL: huge pages {status}, {size_mb} MB of shared memory (docs/operations.md, \"Huge pages\")")
    matrix = np.asarray([np.asarray(getattr(r[2], "to_numpy", lambda v=r[2]: v)(), dtype=np.float32)
                          for r in rows], dtype=np.float32)
    return ([str(r[0]) for r in rows], [r[1] for r in rows], matrix, int(documents),
            {"huge_pages": status, "shared_memory_mb": size_mb})


NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
MEMINFO = Path("/proc/meminfo")


def huge_pages_to_add(needed: int, free: int) -> int:
    """How many huge pages to add to the host's pool so that ``needed`` are free: none when enough are."""
    return max(0, needed - free)


def free_huge_pages() -> int:
    """The host's free huge pages (``HugePages_Free`` in /proc/meminfo); 0 when it has none."""
    for line in MEMINFO.read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


def shared_memory_pages(data_dir: Path, env: dict[str, str]) -> int | None:
    """``shared_memory_size_in_huge_pages`` of the embedded cluster under ``data_dir``, read in a child process
    that starts it and, exiting, stops it (so the next start maps its shared memory afresh)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[2]); import psycopg; "
            "from campus_search.storage.embedded_pg import ensure_embedded_database; "
            "from campus_search.storage.server_memory import server_memory; "
            "conn = psycopg.connect(ensure_embedded_database(sys.argv[1])); "
            "print(json.dumps(server_memory(conn)[2])); conn.close()")
    out = subprocess.run([sys.executable, "-c", code, str(data_dir), str(ROOT)], env=env, capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"could not read the embedded PostgreSQL's shared memory size: {out.stderr.strip()[-500:]}")
    pages = json.loads(out.stdout.strip().splitlines()[-1])
    return int(pages) if pages else None


def reserve_huge_pages(needed: int) -> tuple[int, int] | None:
    """Reserve ``needed`` free huge pages on this host (root); returns (the pool's size before, pages added) to
    give back with :func:`release_huge_pages`, or None when enough were free already."""
    free = free_huge_pages()
    add = huge_pages_to_add(needed, free)
    if add == 0:
        return None
    if os.geteuid() != 0:
        raise SystemExit(f"--prepare-host reserves {add} huge pages in /proc/sys/vm/nr_hugepages: run as root, or "
                         f"reserve them first (sysctl -w vm.nr_hugepages=...)")
    before = int(NR_HUGEPAGES.read_text())
    NR_HUGEPAGES.write_text(str(before + add))
    if free_huge_pages() < needed:  # memory too fragmented for the kernel to find them
        NR_HUGEPAGES.write_text(str(before))
        raise SystemExit(f"the kernel could not reserve {needed} free huge pages (memory fragmented?)")
    return before, add


def release_huge_pages(reserved: tuple[int, int] | None) -> None:
    """Give back what :func:`reserve_huge_pages` added. Pages PostgreSQL still maps become surplus and return to
    the kernel when it stops."""
    if reserved is not None:
        NR_HUGEPAGES.write_text(str(reserved[0]))
        say(f"host: gave back the {reserved[1]} huge pages this run reserved (vm.nr_hugepages {reserved[0]})")


# ---------------------------------------------------------------- Chroma


def chroma_binary(venv: Path) -> Path | None:
    """The ``chroma`` command of a virtualenv with chromadb, created and installed when missing."""
    binary = venv / "bin" / "chroma"
    if binary.exists():
        return binary
    say(f"installing {CHROMA_VERSION} into its own virtualenv {venv} (never the project's) ...")
    try:
        if not (venv / "bin" / "python").exists():
            subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", CHROMA_VERSION], check=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as exc:
        say(f"PEER SKIPPED: chromadb could not be installed into {venv}: {exc}")
        return None
    return binary if binary.exists() else None


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode}:\n"
                             + log.read_text(errors="replace")[-3000:])
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s (log: {log})")


def load_chroma(base: str, ids: list[str], texts: list[str], matrix: np.ndarray) -> str:
    """The id of a cosine collection holding exactly these chunks; (re)loaded only when they changed."""
    digest = hashlib.sha256()
    for cid, vector in zip(ids, matrix, strict=True):
        digest.update(cid.encode())
        digest.update(vector.tobytes())
    fingerprint = digest.hexdigest()[:32]
    http = requests.Session()
    url = f"{base}/{CHROMA_DB}/collections"
    found = http.get(f"{url}/{COLLECTION}", timeout=30)
    if found.status_code == 200:
        meta = found.json().get("metadata") or {}
        cid = found.json()["id"]
        count = http.get(f"{url}/{cid}/count", timeout=30).json()
        if meta.get("fingerprint") == fingerprint and count == len(ids):
            say(f"chroma: collection {COLLECTION} already holds these {count} chunks")
            return str(cid)
        http.delete(f"{url}/{COLLECTION}", timeout=60).raise_for_status()
    created = http.post(url, json={"name": COLLECTION, "metadata": {"fingerprint": fingerprint},
                                   "configuration": {"hnsw": {"space": "cosine"}, "spann": None,
                                                     "embedding_function": {"type": "legacy"}}}, timeout=60)
    created.raise_for_status()
    collection = created.json()
    space = (collection.get("configuration_json") or {}).get("hnsw", {}).get("space")
    if space != "cosine":
        raise SystemExit(f"chroma created the collection with space {space!r}, not cosine: {collection}")
    cid = collection["id"]
    started = time.perf_counter()
    for start in range(0, len(ids), 500):
        http.post(f"{url}/{cid}/add", json={"ids": ids[start:start + 500], "documents": texts[start:start + 500],
                                            "embeddings": matrix[start:start + 500].tolist()},
                  timeout=600).raise_for_status()
    count = http.get(f"{url}/{cid}/count", timeout=30).json()
    if count != len(ids):
        raise SystemExit(f"chroma holds {count} chunks after loading {len(ids)}")
    say(f"chroma: loaded {count} chunks in {time.perf_counter() - started:.0f} s (cosine)")
    return str(cid)


def peer_recall(base: str, cid: str, ids: list[str], matrix: np.ndarray, queries: list[str], k: int = 10) -> float:
    """Recall@k of Chroma's answers against an exact cosine search over the same vectors."""
    sys.path.insert(0, str(ROOT))
    from campus_search.embedding.local import LocalMiniLM

    vectors = LocalMiniLM(threads=1).embed([" ".join(q.split()) for q in queries])
    exact = exact_top(matrix, vectors, k)
    row = {cid: i for i, cid in enumerate(ids)}
    http = requests.Session()
    hits = 0
    for vector, truth in zip(vectors, exact, strict=True):
        answer = http.post(f"{base}/{CHROMA_DB}/collections/{cid}/query",
                           json={"query_embeddings": [vector.tolist()], "n_results": k, "include": ["distances"]},
                           timeout=30)
        answer.raise_for_status()
        found = {row[x] for x in answer.json()["ids"][0]}
        hits += len(found & truth)
    return round(hits / (k * len(queries)), 4)


# ---------------------------------------------------------------- where the CPU goes

TICK = os.sysconf("SC_CLK_TCK")
BUCKETS = (  # py-spy stack keyword -> bucket; the first match from the top of this list wins
    ("embedding (ONNX, tokenizer)", ("campus_search/embedding/", "onnxruntime")),
    ("audit", ("campus_search/audit/",)),
    ("SQL (psycopg, pool)", ("psycopg", "campus_search/storage/")),
    ("JWT / auth", ("jwt", "security/auth.py")),
    ("metrics / logs", ("prometheus_client", "metrics.py", "campus_search/ops/logs.py", "logging/")),
    ("JSON", ("json/", "jsonify")),
    ("chroma client (requests)", ("requests/", "urllib3", "http/client.py")),
    ("gunicorn / socket I/O", ("gunicorn/",)),
)


def processes() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far) for every process we can read."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
    return table


def machine_busy() -> float:
    """CPU seconds every core together spent busy since boot (/proc/stat)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK  # all but idle and iowait


def cpu_snapshot(roots: dict[str, int]) -> dict[str, float]:
    table = processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[str, float] = {}
    for name, root in roots.items():
        stack, total = [root], 0.0
        while stack:
            pid = stack.pop()
            total += table.get(pid, (0, 0.0))[1]
            stack.extend(children.get(pid, ()))
        out[name] = total
    import resource

    out["load generator (wrk)"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime + \
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime
    out["machine"] = machine_busy()
    return out


def cpu_per_request(before: dict[str, float], after: dict[str, float], requests_done: float) -> dict[str, float]:
    """CPU milliseconds per request of each process group; 'other processes' is the rest of the machine."""
    per = {name: round(1000 * (after[name] - before[name]) / max(requests_done, 1), 2) for name in before}
    per["other processes"] = round(per.pop("machine") - sum(per.values()), 2)
    return per


def summarise_profile(raw: Path, within: str = "") -> dict[str, float]:
    """Share of a py-spy ``--format raw`` profile (collapsed stacks) per bucket; with ``within``, only
    the stacks that contain it (e.g. ``flask/app.py``: time inside a request)."""
    counts: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit() or within not in stack:
            continue
        total += int(n)
        bucket = next((name for name, keys in BUCKETS if any(k in stack for k in keys)), "other Python")
        counts[bucket] = counts.get(bucket, 0) + int(n)
    return {name: round(100 * n / max(total, 1), 1) for name, n in sorted(counts.items(), key=lambda kv: -kv[1])}


# ---------------------------------------------------------------- measurement


def sequential(servers: dict[str, str], token: str, queries: list[str], n: int,
               returned: dict[str, int]) -> dict[str, list[float]]:
    """Concurrency 1: one keep-alive connection per server; the servers take turns, request by request.
    ``returned`` counts the results each server gave back."""
    sessions = {name: requests.Session() for name in servers}
    latencies: dict[str, list[float]] = {name: [] for name in servers}
    headers = {"Authorization": f"Bearer {token}"}
    for i in range(n):
        for name, url in servers.items():
            body = {"query": f"{queries[i % len(queries)]} (s{name[0]}{i})", "config": {"max_results": 10}}
            started = time.perf_counter()
            r = sessions[name].post(url + "/api/search", json=body, headers=headers, timeout=60)
            elapsed = (time.perf_counter() - started) * 1000
            if r.status_code != 200 or not isinstance(r.json().get("results"), list):
                raise SystemExit(f"{name}: search failed: {r.status_code} {r.text[:300]}")
            latencies[name].append(elapsed)
            returned[name] = returned.get(name, 0) + len(r.json()["results"])
    return latencies


def run_wrk(url: str, token: str, qfile: str, connections: int, seconds: int, tag: str) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "30s",
                          "-s", str(LUA), url],
                         env={**os.environ, "BENCH_QUERIES": qfile, "BENCH_TOKEN": token, "BENCH_TAG": tag},
                         capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise SystemExit(f"wrk failed: {out.stderr}")
    figures = parse_wrk(out.stdout)
    figures["seconds"] = seconds
    return figures


def gunicorn_command(port: int, app: str, workers: int, threads: int) -> list[str]:
    # the workers' heartbeat files on /dev/shm for both: ours sets that in its own gunicorn configuration
    # (ops/gunicorn_hooks.py); gunicorn's default, a file on the disk, blocks a worker when the disk stalls
    tmp = ["--worker-tmp-dir", "/dev/shm"] if os.path.isdir("/dev/shm") else []
    return [str(Path(sys.executable).parent / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
            "--worker-class", "gthread", "--threads", str(threads), "--timeout", "60", "--keepalive", "10",
            *tmp, "--preload", app]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=5183, help="first N SciFact documents (default: all 5183)")
    ap.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "campus-search-bench-peer"),
                    help="embedded PostgreSQL, corpus file and Chroma data; kept, so re-runs skip ingestion")
    ap.add_argument("--chroma-venv", default=os.path.join(tempfile.gettempdir(), "campus-search-chroma-venv"),
                    help=f"virtualenv with chromadb (created with pip install {CHROMA_VERSION} when missing)")
    ap.add_argument("--queries", default=str(SCIFACT / "queries-train.jsonl"),
                    help="questions (BEIR queries .jsonl); each request makes its question unique")
    ap.add_argument("--fusion", default="convex", choices=("convex", "rrf", "dense", "lexical"),
                    help="Campus Search's ranking (SEARCH_FUSION; default convex, the shipped default)")
    ap.add_argument("--sequential", type=int, default=300, help="requests per server at concurrency 1")
    ap.add_argument("--concurrency", type=int, default=32, help="wrk connections (closed loop)")
    ap.add_argument("--duration", type=int, default=8, help="seconds per wrk round")
    ap.add_argument("--rounds", type=int, default=8,
                    help="wrk rounds per server (ours, peer, peer, ours, ...): many short rounds, so the machine's "
                         "phases, which move a round's CPU a request by ±10 %% and drift within a run, fall on both")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-peer", action="store_true", help="measure Campus Search alone")
    ap.add_argument("--prepare-host", action="store_true",
                    help="as docs/deployment.md prepares a database host: reserve the huge pages the embedded "
                         "PostgreSQL needs for this run (root), give them back after")
    ap.add_argument("--ours-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment setting for Campus Search only, e.g. AUDIT_WAIT_FOR_FLUSH=false (repeatable; "
                         "recorded with the figures)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy (installed into --chroma-venv when missing) samples each server's workers during "
                         "its first concurrent round; the share of Python time per part is reported")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed for the concurrent run: apt-get install -y wrk")
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(args.queries, encoding="utf-8") as f:
        queries = [json.loads(line)["text"].replace("\n", " ") for line in f if line.strip()]
    env = {**os.environ, "DATA_DIR": str(data_dir / "data"), "JWT_SECRET_KEY": SECRET,
           "SEARCH_FUSION": args.fusion, "CACHE_ENABLED": "false",
           "RATE_LIMITS_ENABLED": "false", "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1",
           "ANONYMIZED_TELEMETRY": "False"}
    for name in ("REDIS_URL", "DATABASE_URL", "CAMPUS_SEARCH_CONFIG"):
        env.pop(name, None)
    if any("=" not in item or not item.split("=", 1)[0] for item in args.ours_env):
        raise SystemExit("--ours-env takes NAME=VALUE")
    ours_env = dict(item.split("=", 1) for item in args.ours_env)
    if len(ours_env) != len(args.ours_env):
        raise SystemExit("--ours-env names a setting twice")

    ingest(data_dir, args.docs, env)
    reserved = None
    if args.prepare_host:
        pages = shared_memory_pages(data_dir / "data", env)
        if not pages:
            raise SystemExit("--prepare-host: the embedded PostgreSQL does not report shared_memory_size_in_huge_pages")
        reserved = reserve_huge_pages(pages)
        say(f"host: {pages} huge pages for PostgreSQL's shared memory; "
            + (f"reserved {reserved[1]} for this run" if reserved else "enough were free already"))
    try:
        return measure(args, data_dir, env, ours_env, queries, reserved)
    finally:
        release_huge_pages(reserved)


def measure(args: argparse.Namespace, data_dir: Path, env: dict[str, str], ours_env: dict[str, str],
            queries: list[str], reserved: tuple[int, int] | None) -> int:
    ids, texts, matrix, documents, memory = read_chunks(data_dir / "data")
    memory["huge_pages_reserved_by_this_run"] = reserved[1] if reserved else 0
    say(f"corpus: {documents} documents, {len(ids)} chunks, dimension {matrix.shape[1]}")
    if documents != args.docs:
        say(f"NOTE: the database holds {documents} documents, not --docs {args.docs} (a data dir from another run)")

    procs: list[subprocess.Popen[bytes]] = []
    logs = data_dir / "logs"
    logs.mkdir(exist_ok=True)
    servers: dict[str, str] = {}
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "documents": documents,
                              "chunks": len(ids), "fusion": args.fusion, "result_cache": "off",
                              "queries": "SciFact train, each request unique", "workers": args.workers,
                              "threads": args.threads, "cpus": os.cpu_count(), "load_before": os.getloadavg()[0],
                              "postgres": memory, "ours_env": ours_env}
    try:
        port = free_port()
        with (logs / "ours.log").open("wb") as log:
            procs.append(subprocess.Popen(gunicorn_command(port, "production_system:create_production_app",
                                                           args.workers, args.threads),
                                          cwd=ROOT, env={**env, **ours_env}, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        servers["ours"] = f"http://127.0.0.1:{port}"
        wait_http(servers["ours"] + "/health/ready", procs[-1], logs / "ours.log")
        roots = {"ours gunicorn": procs[-1].pid,
                 "postgres": int((data_dir / "data/pgdata/postmaster.pid").read_text().split()[0])}

        binary = None if args.skip_peer else chroma_binary(Path(args.chroma_venv))
        if binary is not None:
            chroma_port = free_port()
            with (logs / "chroma.log").open("wb") as log:
                procs.append(subprocess.Popen([str(binary), "run", "--host", "127.0.0.1", "--port", str(chroma_port),
                                               "--path", str(data_dir / "chroma")], env=env, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
            roots["chroma"] = procs[-1].pid
            chroma = f"http://127.0.0.1:{chroma_port}"
            wait_http(f"{chroma}/api/v2/heartbeat", procs[-1], logs / "chroma.log")
            version = requests.get(f"{chroma}/api/v2/version", timeout=10).json()
            cid = load_chroma(chroma, ids, texts, matrix)
            result["chroma_api_version"] = version
            result["chromadb_package"] = subprocess.run(
                [str(Path(args.chroma_venv) / "bin/python"), "-c",
                 "import importlib.metadata as m; print(m.version('chromadb'))"],
                capture_output=True, text=True).stdout.strip()
            if args.profile and not (Path(args.chroma_venv) / "bin/py-spy").exists():
                subprocess.run([str(Path(args.chroma_venv) / "bin/pip"), "install", "-q", "py-spy"], check=False)
            result["peer_recall_at_10_vs_exact"] = peer_recall(chroma, cid, ids, matrix, queries[:100])
            peer_port = free_port()
            with (logs / "peer.log").open("wb") as log:
                procs.append(subprocess.Popen(
                    gunicorn_command(peer_port, "peer_app:create_app()", args.workers, args.threads),
                    cwd=ROOT / "bench", env={**env, "PEER_CHROMA_URL": chroma, "PEER_COLLECTION_ID": cid},
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            roots["peer gunicorn"] = procs[-1].pid
            servers["peer"] = f"http://127.0.0.1:{peer_port}"
            wait_http(servers["peer"] + "/health", procs[-1], logs / "peer.log")

        token = subprocess.check_output([str(Path(sys.executable).parent / "campus-search"), "token", "--sub",
                                         "bench", "--role", "admin"], env=env, text=True).strip()
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as qfile:
            qfile.write("\n".join(queries))
        say("warming up (every worker loads its model) ...")
        for name, url in servers.items():
            run_wrk(url, token, qfile.name, args.concurrency, 4, f"w{name[0]}")

        say(f"concurrency 1: {args.sequential} requests per server, taking turns ...")
        returned: dict[str, int] = {}
        spies = []
        if args.profile and (Path(args.chroma_venv) / "bin/py-spy").exists():
            # wall-clock: --idle keeps the samples of a request thread waiting on PostgreSQL, Chroma or a flush
            for name in servers:
                spies.append((name, subprocess.Popen(
                    [str(Path(args.chroma_venv) / "bin/py-spy"), "record", "--pid", str(roots[f"{name} gunicorn"]),
                     "--subprocesses", "--nonblocking", "--idle", "--rate", "200", "--format", "raw",
                     "-o", str(logs / f"{name}.c1.pyspy.txt")], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)))
        c1 = sequential(servers, token, queries, args.sequential, returned)
        for name, sampler in spies:
            sampler.send_signal(signal.SIGINT)
            sampler.wait(timeout=120)
            if (logs / f"{name}.c1.pyspy.txt").exists():
                result.setdefault("c1_wall_profile_percent", {})[name] = summarise_profile(
                    logs / f"{name}.c1.pyspy.txt", within="flask/app.py")
        order = [name for r in range(args.rounds) for name in (list(servers) if r % 2 == 0 else list(servers)[::-1])]
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        profiles: dict[str, Path] = {}
        for i, name in enumerate(order):
            say(f"concurrency {args.concurrency}: {name}, round {len(rounds[name]) + 1} ({args.duration} s) ...")
            spy = None
            if args.profile and name not in profiles and (Path(args.chroma_venv) / "bin/py-spy").exists():
                profiles[name] = logs / f"{name}.pyspy.txt"
                spy = subprocess.Popen([str(Path(args.chroma_venv) / "bin/py-spy"), "record", "--pid",
                                        str(roots[f"{name} gunicorn"]), "--subprocesses", "--nonblocking",
                                        "--rate", "200", "--duration", str(args.duration), "--format", "raw",
                                        "-o", str(profiles[name])],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            before, started = cpu_snapshot(roots), time.monotonic()
            # the disk under the WAL, probed beside the round: a stall there holds every answer whose audit
            # record waits for its flush (bench_disk.py)
            with DiskProbe(data_dir / "data", rate=20) as probe:
                figures = run_wrk(servers[name], token, qfile.name, args.concurrency, args.duration,
                                  f"r{i}{name[0]}")
            after, elapsed = cpu_snapshot(roots), time.monotonic() - started
            # over the window the CPU was read in (the probe's start and end and wrk's included)
            figures["busy_percent"] = round(100 * (after["machine"] - before["machine"])
                                            / ((os.cpu_count() or 1) * elapsed), 1)
            figures["disk"] = probe.summary()  # type: ignore[assignment]
            figures["cpu_ms_per_request"] = cpu_per_request(before, after,  # type: ignore[assignment]
                                                            figures.get("requests", 0))
            rounds[name].append(figures)
            if spy is not None:
                spy.wait(timeout=120)
        for name in servers:
            ordered = sorted(c1[name])
            total = sum(r.get("requests", 0) for r in rounds[name])
            seconds = sum(r["seconds"] for r in rounds[name])
            result[name] = {
                "c1_median_ms": round(statistics.median(ordered), 2), "c1_p95_ms": pct(ordered, 0.95),
                "c1_requests": len(ordered), "c1_mean_results": round(returned[name] / len(ordered), 2),
                f"c{args.concurrency}_requests_per_s": round(total / seconds, 1),
                f"c{args.concurrency}_p50_ms": round(statistics.median(r["p50_ms"] for r in rounds[name]), 1),
                f"c{args.concurrency}_p90_ms": round(statistics.median(r["p90_ms"] for r in rounds[name]), 1),
                f"c{args.concurrency}_p99_ms": round(statistics.median(r["p99_ms"] for r in rounds[name]), 1),
                f"c{args.concurrency}_errors": sum(r.get("errors", 0) for r in rounds[name]),
                "cpu_ms_per_request": {k: round(statistics.mean(r["cpu_ms_per_request"][k]  # type: ignore[index]
                                                                for r in rounds[name]), 2)
                                       for k in rounds[name][0]["cpu_ms_per_request"]},  # type: ignore[attr-defined]
                "rounds": rounds[name],
            }
            if name in profiles and profiles[name].exists():
                result[name]["python_profile_percent"] = summarise_profile(profiles[name])
        result["load_after"] = os.getloadavg()[0]
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)

    c = args.concurrency
    print(f"\n{'server':<8}{'c1 p50 ms':>11}{'c1 p95 ms':>11}{f'c{c} req/s':>12}{f'c{c} p50 ms':>12}"
          f"{f'c{c} p90 ms':>12}{f'c{c} p99 ms':>12}{'errors':>8}")
    for name in servers:
        r = result[name]
        print(f"{name:<8}{r['c1_median_ms']:>11}{r['c1_p95_ms']:>11}{r[f'c{c}_requests_per_s']:>12}"
              f"{r[f'c{c}_p50_ms']:>12}{r[f'c{c}_p90_ms']:>12}{r[f'c{c}_p99_ms']:>12}{r[f'c{c}_errors']:>8}")
    print(f"\nrounds at concurrency {c} (in the order run): requests/s, machine busy, "
          "the disk's stalls (flushes >= 100 ms)")
    for name in servers:
        print(f"{name:<8}" + "; ".join(f"{r.get('requests_per_s')} req/s, {r['busy_percent']} % busy, "
                                       f"{r['disk'].get('stalls', 0)} stalls {r['disk'].get('stall_s', 0)} s"
                                       for r in result[name]["rounds"]))
    print(f"\nCPU ms per request at concurrency {c} (mean of rounds; 'other processes' = the rest of the machine)")
    groups = sorted({k for name in servers for k in result[name]["cpu_ms_per_request"]})
    print(f"{'':<8}" + "".join(f"{g[:22]:>24}" for g in groups))
    for name in servers:
        print(f"{name:<8}" + "".join(f"{result[name]['cpu_ms_per_request'].get(g, 0.0):>24}" for g in groups))
    for name, shares in result.get("c1_wall_profile_percent", {}).items():
        print(f"{name}: concurrency 1, share of wall time inside a request: {shares}")
    for name in servers:
        if "python_profile_percent" in result[name]:
            print(f"{name}: share of the workers' active Python samples: {result[name]['python_profile_percent']}")
    if "peer" in servers:
        ours, peer = result["ours"], result["peer"]
        result["throughput_ours_over_peer"] = round(ours[f"c{c}_requests_per_s"] / peer[f"c{c}_requests_per_s"], 2)
        result["c1_median_ours_over_peer"] = round(ours["c1_median_ms"] / peer["c1_median_ms"], 2)
        result["targets_met"] = {"throughput_ge_1_2x": result["throughput_ours_over_peer"] >= 1.2,
                                 "c1_median_no_worse": result["c1_median_ours_over_peer"] <= 1.0}
        print(f"throughput ours/peer {result['throughput_ours_over_peer']}x (target >= 1.2x); "
              f"c1 median ours/peer {result['c1_median_ours_over_peer']}x (target <= 1.0x); "
              f"peer recall@10 vs exact {result['peer_recall_at_10_vs_exact']}")
    else:
        print("peer skipped: only Campus Search was measured")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
