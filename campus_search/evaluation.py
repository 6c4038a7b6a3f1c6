"""BEIR-style retrieval evaluation through the production search path (``campus-search eval``)."""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import IngestError
from .search import Searcher, SearchParams
from .security.roles import superuser


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
             k: int = 10, depth: int = 100) -> dict[str, Any]:
    ndcgs: list[float] = []
    ndcg10: list[float] = []
    recalls: list[float] = []
    latencies: list[float] = []
    evaluated: Iterable[str] = [q for q in queries if q in qrels]
    for qid in evaluated:
        started = time.perf_counter()
        ranked = rank_documents(searcher, queries[qid], max(depth, k))
        latencies.append((time.perf_counter() - started) * 1000)
        ndcgs.append(ndcg_at_k(ranked, qrels[qid], k))
        ndcg10.append(ndcg_at_k(ranked, qrels[qid], 10))
        recalls.append(recall_at_k(ranked, qrels[qid], depth))
    n = len(ndcgs)
    return {
        "ndcg@10": round(statistics.fmean(ndcg10), 4) if n else 0.0,
        f"ndcg@{k}": round(statistics.fmean(ndcgs), 4) if n else 0.0,
        f"recall@{depth}": round(statistics.fmean(recalls), 4) if n else 0.0,
        "queries": n,
        "mean_latency_ms": round(statistics.fmean(latencies), 2) if n else 0.0,
        "p50_latency_ms": round(statistics.median(latencies), 2) if n else 0.0,
    }
