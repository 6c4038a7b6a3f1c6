"""Campus Search at scale: a deterministic synthetic corpus of N chunks, loaded and searched.

    .venv/bin/python bench/bench_scale.py --chunks 100000 [--data-dir DIR] [--queries 100]

The corpus is generated from SciFact (../shared/data/scifact or SCIFACT_DIR) so that it behaves like
real data on both retrieval paths:

- text: each chunk recombines 3-5 sentences of one SciFact abstract (its *topic*) with 1-2 sentences of
  another, so term statistics (document frequencies, lengths, a long tail of rare terms and very common
  ones) are those of prose, and a query's terms match many chunks at every size;
- vectors: ``normalise(0.75 v_topic + 0.25 v_other + noise)`` where ``v`` are real all-MiniLM-L6-v2
  vectors of the source abstracts (embedded once with the shipped model and kept in the data dir), so
  the HNSW graph sees the clustered geometry of real embeddings, not uniform noise;
- access metadata: documents of 5 chunks; departments skewed as in ``bench_permissions.py``, 4 % public,
  clearance 1-5 — a student sees ~1 %, a member of a 4 % department ~6 %, an admin everything.

It reports, in one run: the database-side load rate (COPY through the same triggers as ingestion,
postings and statistics included; vectors given, nothing embedded) with the HNSW index built after the
bulk load (its build time separately) and an incremental batch with the index in place; disk per chunk
(table, HNSW, lexical postings); RSS of PostgreSQL and of this process (a worker's search path);
dense, lexical and hybrid latency p50/p95/p99 at concurrency 1 and 8 for admin, a 4 %-department staff
member and a student, through ``Searcher`` with precomputed query vectors (the engine's figure, not the
model's); dense recall@10 against an exact allowed-only scan; and the time for a metadata change of
``--change-chunks`` chunks (one department's visibility) to be visible in search. Everything runs on
127.0.0.1 (an embedded PostgreSQL under --data-dir). Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SCIFACT = next((p for p in (Path(os.environ.get("SCIFACT_DIR", "")),
                            ROOT.parent / "shared/data/scifact")
                if (p / "corpus.jsonl").is_file()), Path("/work/shared/data/scifact"))
SECRET = "bench-secret-" + "x" * 40
DEPARTMENTS = [("Medicine", 35), ("Informatics", 25), ("Library", 15), ("Estates", 10), ("Human Resources", 8),
               ("Finance", 4), ("Vet School", 2), ("Chaplaincy", 1)]
CAMPUSES = ("Central Campus", "King's Buildings", "Easter Bush", "Western General")
CHUNKS_PER_DOC = 5
RECALL_TIE = 1e-4  # cosine distance within which a result ties with the exact 10th (see the recall section)
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def postgres_rss_mb(data_dir: Path) -> float:
    """RSS of the cluster under ``data_dir``: its postmaster and every child (shared buffers are counted
    once per process that touched them, so this overstates; it is the sum ``top`` shows)."""
    pidfile = next(data_dir.rglob("postmaster.pid"), None)
    if pidfile is None:
        return 0.0
    master = int(pidfile.read_text().split()[0])
    total = rss_mb(master)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                total += rss_mb(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return total


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


class Material:
    """SciFact abstracts split into sentences, with one real model vector per abstract."""

    def __init__(self, data_dir: Path, embed: Callable[[list[str]], np.ndarray], limit: int = 0) -> None:
        docs = []
        with (SCIFACT / "corpus.jsonl").open(encoding="utf-8") as fh:
            for line in fh:
                d = json.loads(line)
                sentences = [s.strip() for s in SENTENCE.split(d["text"]) if len(s.strip()) > 20]
                if sentences:  # every abstract with any text: all 5,183 of SciFact's are material
                    docs.append((d["title"], sentences))
                if len(docs) == limit:
                    break
        self.titles = [t for t, _ in docs]
        self.sentences = [s for _, s in docs]
        cache = data_dir / f"scifact-vectors-{len(docs)}.npy"
        if cache.exists():
            self.vectors = np.load(cache)
        else:
            started = time.perf_counter()
            texts = [f"{t}\n{' '.join(s)}" for t, s in docs]
            self.vectors = np.vstack([embed(texts[i:i + 64]) for i in range(0, len(texts), 64)]).astype(np.float32)
            np.save(cache, self.vectors)
            print(f"embedded {len(texts)} source abstracts in {time.perf_counter() - started:.0f}s", file=sys.stderr)


def _weighted(rng: np.random.Generator, choices: list[tuple[Any, int]]) -> Any:
    weights = np.array([w for _, w in choices], dtype=float)
    return choices[int(rng.choice(len(choices), p=weights / weights.sum()))][0]


#: Noise, as a share of a unit vector's length: each document gets its own offset from its topic (so
#: documents on one topic are distinct points, not ~N/5,183 near-duplicates) and each chunk its own on
#: top. Measured on 20,000 generated chunks: chunks of one document at cosine 0.85 on average, a chunk's
#: nearest chunk of another document at 0.59; real SciFact abstracts' nearest neighbours are at 0.68.
DOC_NOISE = 0.45
CHUNK_NOISE = 0.30


def generate(material: Material, start_doc: int, n_docs: int, seed: int = 7):
    """Documents ``start_doc .. start_doc + n_docs``: (external_id, title, metadata, [(text, vector)]).
    Deterministic: document ``d`` depends only on (seed, d) and the material."""
    n_src = len(material.titles)
    dim = material.vectors.shape[1]
    for d in range(start_doc, start_doc + n_docs):
        rng = np.random.default_rng((seed, d))
        topic = int(rng.integers(n_src))
        meta = {"department": _weighted(rng, DEPARTMENTS),
                "visibility": "public" if rng.random() < 0.04 else "department",
                "clearance_level": _weighted(rng, [(1, 15), (2, 15), (3, 30), (4, 25), (5, 15)]),
                "campus": CAMPUSES[int(rng.integers(4))], "priority": int(rng.integers(1, 6))}
        doc_offset = DOC_NOISE * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
        chunks = []
        for _ in range(CHUNKS_PER_DOC):
            other = int(rng.integers(n_src))
            own = material.sentences[topic]
            take = min(len(own), int(rng.integers(3, 6)))
            first = int(rng.integers(max(1, len(own) - take + 1)))
            extra = material.sentences[other]
            pick = [own[(first + i) % len(own)] for i in range(take)]
            pick += [extra[int(j)] for j in rng.choice(len(extra), size=min(len(extra), int(rng.integers(1, 3))),
                                                       replace=False)]
            noise = CHUNK_NOISE * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
            v = 0.75 * material.vectors[topic] + 0.25 * material.vectors[other] + doc_offset + noise
            chunks.append((" ".join(pick), (v / np.linalg.norm(v)).astype(np.float32)))
        yield f"scale-{d:07d}", material.titles[topic], meta, chunks


def load(conn_factory: Callable[[], Any], material: Material, start_doc: int, n_docs: int, batch_docs: int,
         progress: bool = True) -> float:
    """COPY documents and chunks (the ingestion path's statements; triggers keep postings and statistics)
    in transactions of ``batch_docs`` documents. Returns seconds spent in the database."""
    from campus_search.storage.index_state import compact_lexical as compact

    db_seconds = 0.0
    done = 0
    total_started = time.perf_counter()
    while done < n_docs:
        n = min(batch_docs, n_docs - done)
        docs = list(generate(material, start_doc + done, n))
        started = time.perf_counter()
        with conn_factory() as conn:
            with conn.cursor().copy(
                    "COPY documents (external_id, title, source, content_hash, department, visibility, "
                    "clearance_level, campus, priority) FROM STDIN") as copy:
                for ext, title, meta, _ in docs:
                    copy.write_row((ext, title, "bench_scale", ext, meta["department"], meta["visibility"],
                                    meta["clearance_level"], meta["campus"], meta["priority"]))
            ids = dict(conn.execute("SELECT external_id, id FROM documents WHERE external_id = ANY(%s)",
                                    ([d[0] for d in docs],)).fetchall())
            with conn.cursor().copy(
                    "COPY chunks (document_id, chunk_index, section_title, page_number, text, content_hash, "
                    "embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(["int8", "int4", "text", "int4", "text", "text", "vector"])
                for ext, _, _meta, chunks in docs:
                    for i, (text, vector) in enumerate(chunks):
                        copy.write_row((ids[ext], i, None, None, text, f"{ext}:{i}", vector))
            conn.execute("UPDATE index_state SET generation = generation + 1")
        with conn_factory() as conn:
            compact(conn)  # fold the statistics deltas, as ingestion does after each batch
        db_seconds += time.perf_counter() - started
        done += n
        if progress:
            elapsed = time.perf_counter() - total_started
            print(f"\r  loaded {done * CHUNKS_PER_DOC:,} chunks, {done * CHUNKS_PER_DOC / db_seconds:,.0f} "
                  f"chunks/s in the database, ETA {elapsed / done * (n_docs - done):.0f}s   ",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return db_seconds


def load_parallel(conn_factory: Callable[[], Any], material: Material, start_doc: int, n_docs: int,
                  batch_docs: int, loaders: int) -> float:
    """``loaders`` concurrent loads of disjoint, contiguous document ranges (as separate ingest processes
    on disjoint document sets would run), each on its own connection. Returns the wall-clock seconds
    (generating the texts included: ~0.3 ms a chunk of this process's CPU, beside the database's)."""
    bounds = [start_doc + n_docs * i // loaders for i in range(loaders + 1)]
    errors: list[BaseException] = []

    def one(lo: int, hi: int) -> None:
        try:
            load(conn_factory, material, lo, hi - lo, batch_docs, progress=False)
        except BaseException as exc:  # reported below, after every loader stopped
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(bounds[i], bounds[i + 1])) for i in range(loaders)]
    started = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def quality_at_scale(n: int, queries: list[str], qvecs: np.ndarray, user: Any,
                     searcher: Callable[[str, Any], Any]) -> dict[str, Any]:
    """nDCG@10 (binary: a chunk counts when its document's title is a relevant abstract's) of the first ``n``
    of ``queries`` that have train qrels, for dense, BM25-only and hybrid search, BM25 bounded and exhaustive."""
    from campus_search.retrieval.lexical import BM25
    from campus_search.retrieval.params import SearchParams
    from campus_search.retrieval.querytext import normalise_query

    title_ids: dict[str, set[str]] = {}
    with (SCIFACT / "corpus.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)
            title_ids.setdefault(d["title"], set()).add(d["_id"])
    qrels: dict[str, set[str]] = {}
    for line in (SCIFACT / "qrels-train.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        qid, cid, _ = line.split("\t")
        qrels.setdefault(qid, set()).add(cid)
    ids = [json.loads(line)["_id"] for line in (SCIFACT / "queries-train.jsonl").read_text(encoding="utf-8")
           .splitlines() if line.strip()]
    judged = [(ids[i], queries[i], qvecs[i]) for i in range(len(queries)) if ids[i] in qrels][:n]
    ideal = sum(1 / np.log2(i + 2) for i in range(10))
    out: dict[str, Any] = {"queries": len(judged)}
    for fusion, cut in (("dense", "bounded"), ("lexical", "bounded"), ("lexical", "exhaustive"),
                        ("convex", "bounded"), ("convex", "exhaustive")):
        # bounded: the bounded read at any --chunks (below BM25_WHOLE_CHUNKS production reads every posting)
        s = searcher(fusion, BM25(whole_chunks=0) if cut == "bounded" else BM25(cut_df=2**62, whole_chunks=0))
        scores, times = [], []
        for qid, text, v in judged:
            s.query_vectors.put(normalise_query(text), np.asarray(v, dtype=np.float32))
            t = time.perf_counter()
            hits = s.search(user, SearchParams(text, {}, 10, 0.0))
            times.append((time.perf_counter() - t) * 1000)
            rel = [1 if title_ids.get(h.document_title, set()) & qrels[qid] else 0 for h in hits]
            scores.append(sum(r / np.log2(i + 2) for i, r in enumerate(rel)) / ideal)
        name = "dense" if fusion == "dense" else f"{'hybrid' if fusion == 'convex' else 'bm25'}_{cut}"
        out[name] = {"ndcg@10": round(float(statistics.mean(scores)), 4), "p50_ms": round(statistics.median(times), 1)}
        print(f"  quality at scale {name:18} nDCG@10 {out[name]['ndcg@10']:.4f}  p50 {out[name]['p50_ms']} ms",
              file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=100_000, help="corpus size in chunks (default 100000)")
    ap.add_argument("--queries", type=int, default=100, help="queries per principal and mode (default 100)")
    ap.add_argument("--change-chunks", type=int, default=0,
                    help="chunks moved by the metadata-change test (default: 5%% of the corpus, 50000 at 1M)")
    ap.add_argument("--source-docs", type=int, default=0,
                    help="SciFact abstracts used as material (default 0: all 5,183)")
    ap.add_argument("--recall-queries", type=int, default=100, help="queries for dense recall (default 100)")
    ap.add_argument("--quality-queries", type=int, default=50,
                    help="queries (those of the first --queries/--recall-queries with train qrels) for nDCG@10 at "
                         "scale, bounded against exhaustive BM25 (default 50; 0 skips it)")
    ap.add_argument("--ef-search", type=int, default=0, help="hnsw.ef_search (default: HNSW_EF_SEARCH's value)")
    ap.add_argument("--exact-fraction", type=float, default=-1.0,
                    help="the dense plan's exact-scan threshold (default: DENSE_EXACT_FRACTION's value)")
    ap.add_argument("--skip-change", action="store_true", help="skip the metadata-change measurement")
    ap.add_argument("--load-only", action="store_true", help="load and index the corpus, print its figures, stop")
    ap.add_argument("--batch-docs", type=int, default=500, help="documents per load transaction")
    ap.add_argument("--loaders", type=int, default=1,
                    help="concurrent loaders for the bulk load, on disjoint document ranges (default 1); the "
                         "rate is then chunks over wall-clock time; an interrupted parallel load is not "
                         "resumed: use a new --data-dir)")
    ap.add_argument("--data-dir", default=None, help="embedded PostgreSQL; kept, so a re-run skips the load "
                    "(default: a folder per size under the temp dir)")
    args = ap.parse_args()
    data_dir = Path(args.data_dir or Path(tempfile.gettempdir()) / f"campus-search-bench-scale-{args.chunks}")
    data_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(DATA_DIR=str(data_dir), JWT_SECRET_KEY=SECRET, AUDIT_HMAC_KEY=SECRET + "audit",
                      CACHE_ENABLED="false", RATE_LIMITS_ENABLED="false", DB_POOL_MAX_SIZE="10",
                      DB_STATEMENT_TIMEOUT_MS="3600000")  # bulk statements run longer than a search may
    os.environ.pop("DATABASE_URL", None)

    from campus_search.config import load_settings
    from campus_search.retrieval.fusion import FusionConfig
    from campus_search.retrieval.lexical import BM25, allowed_top_sql
    from campus_search.retrieval.params import SearchParams
    from campus_search.retrieval.querytext import normalise_query
    from campus_search.retrieval.search import Searcher, _where
    from campus_search.security.auth import principal_from_claims
    from campus_search.services import Services

    settings = load_settings()
    services = Services(settings).ensure_open()
    db = services.db
    material = Material(data_dir, services.embedder.embed, args.source_docs)
    n_docs = args.chunks // CHUNKS_PER_DOC
    result: dict[str, Any] = {"chunks_target": args.chunks}

    with db.connection() as conn:
        have = conn.execute("SELECT count(*) FROM documents WHERE source = 'bench_scale'").fetchall()[0][0]
    increment_docs = min(1000, max(100, n_docs // 100))  # the incremental batch, loaded with the index in place
    bulk_docs = n_docs - increment_docs
    with db.connection() as conn:
        indexed = conn.execute("SELECT to_regclass('chunks_embedding_hnsw') IS NOT NULL").fetchall()[0][0]
    if have < n_docs:
        # a fresh corpus, or the rest of an interrupted bulk load (the index is built after it)
        if have and indexed:
            raise SystemExit(f"{data_dir} holds a partial corpus with its index built: use a new --data-dir")
        if have and args.loaders > 1:
            raise SystemExit(f"{data_dir} holds a partial corpus: a parallel load starts afresh, use a new --data-dir")
        print(f"loading {args.chunks:,} chunks from document {have:,} (HNSW index dropped for the bulk load, "
              "built after)", file=sys.stderr)
        with db.connection() as conn:
            # rebuilt after the load exactly as the migrations defined it (020: m 24, ef_construction 128)
            row = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'chunks_embedding_hnsw'").fetchone()
            if row:
                (data_dir / "hnsw-indexdef.sql").write_text(row[0])
            conn.execute("DROP INDEX IF EXISTS chunks_embedding_hnsw")
        indexdef = (data_dir / "hnsw-indexdef.sql").read_text()
        bulk = max(0, bulk_docs - have)
        if args.loaders > 1 and bulk:
            result["loaders"] = args.loaders
            result["load_seconds"] = load_parallel(db.connection, material, have, bulk, args.batch_docs, args.loaders)
        else:
            result["load_seconds"] = load(db.connection, material, have, bulk, args.batch_docs) if bulk else 0.0
        result["load_chunks_per_s"] = round(bulk * CHUNKS_PER_DOC / result["load_seconds"]) if bulk else None
        started = time.perf_counter()
        with db.connection() as conn:
            # the 1M graph (m 24) takes ~2.5 GB in memory; one that does not fit builds many times slower
            conn.execute("SET LOCAL maintenance_work_mem = '4GB'")
            conn.execute(indexdef)
        result["hnsw_index"] = indexdef.split(" WITH ", 1)[-1]
        result["hnsw_build_seconds"] = round(time.perf_counter() - started, 1)
        start = max(have, bulk_docs)
        seconds = load(db.connection, material, start, n_docs - start, 200, progress=False)
        result["incremental_chunks_per_s_with_index"] = round((n_docs - start) * CHUNKS_PER_DOC / seconds)
        import psycopg

        with psycopg.connect(services.dsn, autocommit=True) as conn:
            for table in ("chunks", "lexical_postings", "lexical_terms", "documents"):
                conn.execute(f"VACUUM ANALYZE {table}")
        print(f"load {result['load_chunks_per_s']} chunks/s, HNSW {result['hnsw_build_seconds']}s, incremental "
              f"{result['incremental_chunks_per_s_with_index']} chunks/s", file=sys.stderr)
    else:
        print(f"corpus present ({have:,} documents): load figures are from the run that built it", file=sys.stderr)
    if args.load_only:
        print(json.dumps(result))
        services.close()
        return 0

    with db.connection() as conn:
        total = conn.execute("SELECT count(*) FROM chunks").fetchall()[0][0]
        postings = conn.execute("SELECT count(*) FROM lexical_postings").fetchall()[0][0]
        sizes = dict(conn.execute(
            "SELECT 'chunks_table', pg_table_size('chunks') UNION ALL "
            "SELECT 'hnsw', pg_relation_size('chunks_embedding_hnsw') UNION ALL "
            "SELECT 'chunks_other_indexes', pg_indexes_size('chunks') - pg_relation_size('chunks_embedding_hnsw') "
            "UNION ALL SELECT 'postings', pg_total_relation_size('lexical_postings') UNION ALL "
            "SELECT 'postings_impact_index', pg_relation_size('lexical_postings_impact') UNION ALL "
            "SELECT 'terms', pg_total_relation_size('lexical_terms') UNION ALL "
            "SELECT 'documents', pg_total_relation_size('documents') UNION ALL "
            "SELECT 'database', pg_database_size(current_database())").fetchall())
    result.update(chunks=total, postings=postings,
                  bytes_per_chunk={k: round(v / total) for k, v in sizes.items()},
                  database_gb=round(sizes["database"] / 2**30, 2))

    # principals: admin, staff of a 4 % department, student (public, clearance 2); role claims are the SSO
    # values ROLE_MAPPING maps (a claim "admin" is a student)
    principals = {
        "admin": principal_from_claims({"sub": "admin", "role": "it_administrator"}, settings),
        "staff:Finance": principal_from_claims({"sub": "s", "role": "professional_services",
                                                "departments": ["Finance"]}, settings),
        "student": principal_from_claims({"sub": "u", "role": "student"}, settings),
    }
    share = {}
    with db.connection() as conn:
        for label, user in principals.items():
            where, params = _where(user, {})
            share[label] = round(conn.execute(f"SELECT count(*) FROM documents d JOIN chunks c "
                                              f"ON c.document_id = d.id WHERE {where}", params)
                                 .fetchall()[0][0] / total, 4)
    result["visible_share"] = share
    assert share["admin"] == 1.0 > share["staff:Finance"] > share["student"], share  # three distinct principals

    lines = (SCIFACT / "queries-train.jsonl").read_text(encoding="utf-8").splitlines()
    queries = [json.loads(line)["text"] for line in lines if line.strip()][:max(args.queries, args.recall_queries)]
    qcache = data_dir / f"query-vectors-{len(queries)}.npy"
    if qcache.exists():
        qvecs = np.load(qcache)
    else:
        qvecs = services.embedder.embed(queries)
        np.save(qcache, qvecs)
    ef = args.ef_search or settings.hnsw_ef_search
    fraction = args.exact_fraction if args.exact_fraction >= 0 else settings.dense_exact_fraction
    result.update(ef_search=ef, dense_exact_fraction=fraction)
    searchers = {mode: Searcher(db, services.embedder, ef_search=ef, exact_max_fraction=fraction,
                                fusion=FusionConfig(method=mode if mode != "hybrid" else "convex"))
                 for mode in ("dense", "hybrid")}
    for s in searchers.values():
        for q, v in zip(queries, qvecs, strict=True):
            s.query_vectors.put(normalise_query(q), np.asarray(v, dtype=np.float32))

    def lexical(user: Any, q: str) -> int:
        """The hybrid statement's BM25 half alone, as production runs it (Searcher.lexical_sql: rare terms
        read whole, common ones in impact order and cut, migration 018): the best 40 the principal may see."""
        ctes, params = searchers["hybrid"].lexical_sql(user, {})
        with db.connection(read=True) as conn:
            return len(conn.execute(f"WITH {ctes} SELECT id FROM lex_top", {"qtext": q, "k": 40, **params}).fetchall())

    def run(mode: str, user: Any, q: str) -> int:
        if mode == "lexical":
            return lexical(user, q)
        return len(searchers[mode].search(user, SearchParams(q, {}, 10, 0.0)))

    latency: dict[str, Any] = {}
    for mode in ("dense", "lexical", "hybrid"):
        for label, user in principals.items():
            for q in queries[:3]:
                run(mode, user, q)  # warm the plans and the cache of this mode
            times = []
            for q in queries[:args.queries]:
                t = time.perf_counter()
                run(mode, user, q)
                times.append((time.perf_counter() - t) * 1000)
            # concurrency 8: threads on the pool, each its share of the queries
            conc: list[float] = []
            lock = threading.Lock()

            def worker(part: list[str], user: Any = user, mode: str = mode, conc: list[float] = conc,
                       lock: threading.Lock = lock) -> None:
                for q in part:
                    t = time.perf_counter()
                    run(mode, user, q)
                    with lock:
                        conc.append((time.perf_counter() - t) * 1000)

            threads = [threading.Thread(target=worker, args=(queries[:args.queries][i::8],)) for i in range(8)]
            t0 = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t0
            latency[f"{mode}/{label}"] = {
                "c1_p50": round(statistics.median(times), 1), "c1_p95": round(pct(times, .95), 1),
                "c1_p99": round(pct(times, .99), 1), "c8_p50": round(statistics.median(conc), 1),
                "c8_p95": round(pct(conc, .95), 1), "c8_p99": round(pct(conc, .99), 1),
                "c8_per_s": round(len(conc) / wall, 1)}
            print(f"  {mode:8} {label:14} c1 p50 {latency[f'{mode}/{label}']['c1_p50']:7} p95 "
                  f"{latency[f'{mode}/{label}']['c1_p95']:7}  c8 p95 {latency[f'{mode}/{label}']['c8_p95']:7} "
                  f"{latency[f'{mode}/{label}']['c8_per_s']:6}/s", file=sys.stderr)
    result["latency_ms"] = latency

    # BM25 bounded (production) against exhaustive, paired query by query at concurrency 1 so both see the
    # same machine load: exhaustive = every posting of every query term scored (the statement before
    # migration 018 for lexical; the hybrid searcher with BM25_CUT_DF above the corpus size for hybrid)
    exhaustive = Searcher(db, services.embedder, ef_search=ef, exact_max_fraction=fraction,
                          fusion=FusionConfig(method="convex"),
                          bm25=BM25(searchers["hybrid"].bm25.k1, searchers["hybrid"].bm25.b, cut_df=2**62,
                                    whole_chunks=0))
    exhaustive.query_vectors = searchers["hybrid"].query_vectors

    def lexical_exhaustive(user: Any, q: str) -> int:
        where, params = _where(user, {})
        sql = (f"WITH {exhaustive.bm25.scored_cte()}, top AS ({allowed_top_sql('lex_scores', where)}) "
               f"SELECT id FROM top")
        with db.connection(read=True) as conn:
            return len(conn.execute(sql, {"qtext": q, "k": 40, **params}).fetchall())

    paired_runs: dict[str, Callable[[Any, str], int]] = {
        "lexical": lexical, "lexical_exhaustive": lexical_exhaustive,
        "hybrid": lambda u, q: run("hybrid", u, q),
        "hybrid_exhaustive": lambda u, q: len(exhaustive.search(u, SearchParams(q, {}, 10, 0.0)))}
    paired: dict[str, Any] = {}
    for label, user in principals.items():
        times_by: dict[str, list[float]] = {name: [] for name in paired_runs}
        for i, q in enumerate(queries[:args.queries]):
            order = list(paired_runs.items())
            for name, fn in (order if i % 2 == 0 else order[::-1]):
                t = time.perf_counter()
                fn(user, q)
                times_by[name].append((time.perf_counter() - t) * 1000)
        for name, times in times_by.items():
            paired[f"{name}/{label}"] = {"c1_p50": round(statistics.median(times), 1),
                                         "c1_p95": round(pct(times, .95), 1)}
            print(f"  paired {name:18} {label:14} c1 p50 {paired[f'{name}/{label}']['c1_p50']:7} "
                  f"p95 {paired[f'{name}/{label}']['c1_p95']:7}", file=sys.stderr)
    result["bm25_paired_ms"] = paired
    result["load_average"] = os.getloadavg()

    # dense recall@10 against an exact allowed-only scan, on the production plan (the plan the principal's
    # visible share picks, with the production candidate depth k = CANDIDATE_FLOOR, first 10 compared).
    # strict: |approx top 10 & exact top 10| / 10. tolerant: an approximate result also counts when its
    # exact cosine distance is within RECALL_TIE (1e-4) of the exact 10th distance: a tie or a near-duplicate
    # of the 10th, which no ranking can tell apart. Also the HNSW plan's recall for every principal.
    from campus_search.retrieval.search import CANDIDATE_FLOOR

    recall: dict[str, Any] = {}
    plan_ms: dict[str, Any] = {}  # each dense plan's candidate query, timed, for every principal
    plans = {label: searchers["dense"].dense_plan(user, {}) for label, user in principals.items()}
    result["dense_plan"] = plans
    for label, user in principals.items():
        t_exact, t_hnsw = [], []
        scores: dict[str, list[float]] = {"strict": [], "tolerant": [], "hnsw_strict": [], "hnsw_tolerant": []}
        for v in qvecs[:args.recall_queries]:
            t = time.perf_counter()
            exact = searchers["dense"].dense_candidates(user, v, {}, CANDIDATE_FLOOR, exact=True)
            t_exact.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            hnsw = searchers["dense"].dense_candidates(user, v, {}, CANDIDATE_FLOOR, exact=False)
            t_hnsw.append((time.perf_counter() - t) * 1000)
            exact = exact[:10]
            if not exact:
                continue
            tenth = 1 - exact[-1].similarity
            chosen = exact if plans[label] == "exact" else hnsw[:10]
            for prefix, got in (("", chosen), ("hnsw_", hnsw[:10])):
                scores[prefix + "strict"].append(len({h.chunk_id for h in got} & {h.chunk_id for h in exact})
                                                 / len(exact))
                scores[prefix + "tolerant"].append(sum(1 for h in got if 1 - h.similarity <= tenth + RECALL_TIE)
                                                   / len(exact))
        recall[label] = {"plan": plans[label], **{k: round(statistics.mean(v), 4) for k, v in scores.items()}}
        plan_ms[label] = {"exact_p50": round(statistics.median(t_exact), 1), "exact_p95": round(pct(t_exact, .95), 1),
                          "hnsw_p50": round(statistics.median(t_hnsw), 1), "hnsw_p95": round(pct(t_hnsw, .95), 1)}
        print(f"  dense plans {label:14} chosen {plans[label]:5} recall {recall[label]}  {plan_ms[label]}",
              file=sys.stderr)
    result["dense_plan_ms"] = plan_ms
    result["dense_recall_at_10"] = recall
    result["ef_search_used"] = searchers["dense"].ef_search_for(CANDIDATE_FLOOR)  # raised with the corpus

    # Retrieval quality at scale, as an admin, with SciFact's train relevance judgements: a chunk is relevant
    # to a query when its document's topic abstract is (generate() titles each document with its topic's
    # title). nDCG@10 of the production search (bounded BM25, lexical.py) against the same search with
    # exhaustive BM25, hybrid and BM25 alone, and dense alone: what the cut costs (or not) in quality, which
    # top-10 overlap alone cannot say (~200 chunks recombine each abstract, so many near-equal scores).
    if args.quality_queries:
        result["quality_at_scale"] = quality_at_scale(
            args.quality_queries, queries, qvecs, principals["admin"],
            lambda fusion, bm25: Searcher(db, services.embedder, ef_search=ef, exact_max_fraction=fraction,
                                          fusion=FusionConfig(method=fusion), bm25=bm25))

    # a metadata change moving --change-chunks chunks (one department's documents become public), timed
    # from the start of the change until a principal who could not see them finds one
    change = 0 if args.skip_change else args.change_chunks or max(CHUNKS_PER_DOC, total // 20)
    if not change:  # --skip-change: the figures so far are the run's
        print(json.dumps(result))
        services.close()
        return 0
    with db.connection() as conn:
        doc_ids = [r[0] for r in conn.execute(
            "SELECT id FROM documents WHERE source = 'bench_scale' AND department = 'Medicine' AND "
            "visibility = 'department' AND clearance_level <= 2 ORDER BY id LIMIT %s",
            (change // CHUNKS_PER_DOC,)).fetchall()]
        probe_text, probe_vec = conn.execute(
            "SELECT text, embedding FROM chunks WHERE document_id = %s AND chunk_index = 0",
            (doc_ids[-1],)).fetchall()[0]
    probe_vec = np.asarray(probe_vec.to_numpy() if hasattr(probe_vec, "to_numpy") else probe_vec, dtype=np.float32)
    student = principals["student"]
    target_doc = None
    with db.connection() as conn:
        target_doc = conn.execute("SELECT external_id FROM documents WHERE id = %s", (doc_ids[-1],)).fetchall()[0][0]
    assert target_doc not in {h.document_id for h in searchers["dense"].dense_candidates(student, probe_vec, {}, 10)}
    # the change goes through ingestion's own writer (Ingester._write_metadata: what a sync's metadata-only
    # changes and the admin API's PATCH run), all documents in one transaction
    import dataclasses

    from campus_search.ingest.metadata import AccessMetadata
    from campus_search.security.access import METADATA_FIELDS, columns

    with db.connection() as conn:
        rows = conn.execute(f"SELECT id, {columns()}, source FROM documents WHERE id = ANY(%s)", (doc_ids,)).fetchall()
        moved = conn.execute("SELECT count(*) FROM chunks WHERE document_id = ANY(%s)", (doc_ids,)).fetchall()[0][0]
    n_meta = len(METADATA_FIELDS)
    changes = [(r[0], dataclasses.replace(AccessMetadata.from_row(r[1:1 + n_meta]), visibility="public"), r[-1])
               for r in rows]
    started = time.perf_counter()
    with db.connection() as conn:
        services.ingester._write_metadata(conn, changes)
        db.bump_generation(conn)
    committed = time.perf_counter() - started
    while True:
        if target_doc in {h.document_id for h in searchers["dense"].dense_candidates(student, probe_vec, {}, 10)}:
            break
        if time.perf_counter() - started > 120:
            raise SystemExit("metadata change not visible after 120 s")
        time.sleep(0.05)
    visible_after = time.perf_counter() - started
    with db.connection() as conn:  # put it back, so a re-run measures the same change
        conn.execute("UPDATE documents SET visibility = 'department' WHERE id = ANY(%s)", (doc_ids,))
        conn.execute("UPDATE index_state SET generation = generation + 1")
    result["metadata_change"] = {"chunks": moved, "documents": len(doc_ids), "commit_seconds": round(committed, 2),
                                 "visible_after_seconds": round(visible_after, 2)}
    del probe_text

    result["rss_mb"] = {"postgres_all_processes": round(postgres_rss_mb(data_dir)),
                        "this_process": round(rss_mb(os.getpid()))}
    from campus_search.storage.server_memory import server_memory

    with db.connection() as conn:  # how PostgreSQL ran its buffer pool (docs/operations.md, "Huge pages")
        status, size_mb, _ = server_memory(conn)
    result["postgres"] = {"huge_pages": status, "shared_memory_mb": size_mb}
    services.close()

    print(f"\n{total:,} chunks, {postings:,} postings, database {result['database_gb']} GB")
    print("bytes per chunk: " + ", ".join(f"{k} {v}" for k, v in result["bytes_per_chunk"].items()))
    print("visible share: " + ", ".join(f"{k} {v:.1%}" for k, v in share.items()))
    print(f"\n{'mode/principal':24} {'c1 p50':>7} {'p95':>7} {'p99':>7} {'c8 p50':>7} {'p95':>7} {'req/s':>7}")
    for key, row in latency.items():
        print(f"{key:24} {row['c1_p50']:>7} {row['c1_p95']:>7} {row['c1_p99']:>7} {row['c8_p50']:>7} "
              f"{row['c8_p95']:>7} {row['c8_per_s']:>7}")
    print(f"\ndense plan: {plans}; recall@10 vs exact: {recall}")
    print(f"metadata change: {result['metadata_change']}")
    print(f"RSS: {result['rss_mb']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
