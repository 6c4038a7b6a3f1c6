"""BEIR-style retrieval evaluation through the production search path (``campus-search eval``).

Where: by default in a *scratch database* of its own -- on the same PostgreSQL as the configured index
(with the embedded database, another database in the same cluster), named after the corpus file and the
embedding model, and kept, so a second run finds the corpus already ingested and only runs the queries.
A server's index is never written to: evaluating it needs ``--live``, which opens it read-only
(``default_transaction_read_only``) and ingests nothing.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import re
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from campus_search.errors import ConfigError, IngestError
from campus_search.retrieval.params import SearchParams
from campus_search.retrieval.search import Searcher
from campus_search.security.roles import superuser

SCRATCH_PREFIX = "campus_search_eval_"


def scratch_database_name(corpus: Path, model: str) -> str:
    """``campus_search_eval_<corpus folder>_<file>_<hash>``: one per corpus file and model, at most 63
    characters (PostgreSQL's limit), lower case and safe to quote."""
    path = corpus.resolve()
    slug = re.sub(r"[^a-z0-9]+", "_", f"{path.parent.name}_{path.stem}".lower()).strip("_")[:32]
    digest = hashlib.sha256(f"{path}\x00{model}".encode()).hexdigest()[:8]
    return f"{SCRATCH_PREFIX}{slug}_{digest}"


def ensure_scratch_database(dsn: str, name: str) -> tuple[str, bool]:
    """Create database ``name`` beside the one ``dsn`` names (if missing); return its DSN and whether it was
    created now. The configured database is only connected to, never written."""
    if conninfo_to_dict(dsn).get("dbname") == name:
        raise ConfigError(f"the configured database is {name}: it cannot also be the scratch database")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            created = False
            if not exists:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # a concurrent run won the race
                    conn.execute(f'CREATE DATABASE "{name}"')
                    created = True
    except psycopg.Error as exc:
        raise ConfigError(f"cannot create the scratch database {name} for the evaluation on the configured "
                          f"server ({exc.__class__.__name__}): give --database-url for one, or --live to evaluate "
                          "the configured index read-only") from None
    return make_conninfo(dsn, dbname=name), created


def read_only(dsn: str) -> str:
    """``dsn`` with every transaction read-only, enforced by the server."""
    options = conninfo_to_dict(dsn).get("options") or ""
    return make_conninfo(dsn, options=f"{options} -c default_transaction_read_only=on".strip())


def load_queries(path: Path) -> dict[str, str]:
    queries = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                    queries[str(record["_id"])] = str(record["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise IngestError(f"{path}:{lineno}: expected {{\"_id\", \"text\"}}") from exc
    return queries


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.reader(fh, delimiter="\t"):
            if len(row) < 3 or row[0] in ("query-id", "query_id", "qid"):
                continue
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    return qrels


def ndcg_at_k(ranked: list[str], relevant: Mapping[str, int], k: int) -> float:
    dcg = sum(relevant.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(rel / math.log2(i + 2) for i, rel in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: list[str], relevant: Mapping[str, int], k: int) -> float:
    positives = {d for d, r in relevant.items() if r > 0}
    return len(positives & set(ranked[:k])) / len(positives) if positives else 0.0


def rank_documents(searcher: Searcher, query: str, depth: int) -> list[str]:
    """Document ids in rank order (a document ranks by its best chunk)."""
    hits = searcher.search(superuser("eval"), SearchParams(query=query, max_results=depth * 2,
                                                         similarity_threshold=-1.0))
    seen: dict[str, None] = {}
    for h in hits:
        seen.setdefault(h.document_id, None)
    return list(seen)[:depth]


def evaluate(searcher: Searcher, queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]],
             k: int = 10, depth: int = 100, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run every judged query; ``progress(done, total)`` after each."""
    ndcgs: list[float] = []
    ndcg10: list[float] = []
    recalls: list[float] = []
    latencies: list[float] = []
    evaluated: list[str] = [q for q in queries if q in qrels]
    for done, qid in enumerate(evaluated, 1):
        started = time.perf_counter()
        ranked = rank_documents(searcher, queries[qid], max(depth, k))
        latencies.append((time.perf_counter() - started) * 1000)
        ndcgs.append(ndcg_at_k(ranked, qrels[qid], k))
        ndcg10.append(ndcg_at_k(ranked, qrels[qid], 10))
        recalls.append(recall_at_k(ranked, qrels[qid], depth))
        if progress:
            progress(done, len(evaluated))
    n = len(ndcgs)
    return {
        "ndcg@10": round(statistics.fmean(ndcg10), 4) if n else 0.0,
        f"ndcg@{k}": round(statistics.fmean(ndcgs), 4) if n else 0.0,
        f"recall@{depth}": round(statistics.fmean(recalls), 4) if n else 0.0,
        "queries": n,
        "mean_latency_ms": round(statistics.fmean(latencies), 2) if n else 0.0,
        "p50_latency_ms": round(statistics.median(latencies), 2) if n else 0.0,
    }
