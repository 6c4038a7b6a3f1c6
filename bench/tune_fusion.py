"""Tune BM25 parameters and the fusion of dense + lexical retrieval on a BEIR train split.

Runs every query once per BM25 setting through ``Searcher.hybrid_candidates`` (the production SQL,
as a user who may see everything), then scores fusion variants offline on those candidates, at
document level (a document ranks by its best chunk), exactly as ``campus-search eval`` does.

    DATA_DIR=/tmp/cs-scifact .venv/bin/python bench/tune_fusion.py \\
        --queries ../shared/data/scifact/queries-train.jsonl --qrels ../shared/data/scifact/qrels-train.tsv

The corpus must already be ingested in the configured database (``campus-search ingest`` or ``eval``).
Tune on train only; report train figures as train figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

from campus_search.config import load_settings
from campus_search.retrieval.evaluation import load_qrels, load_queries, ndcg_at_k, recall_at_k
from campus_search.retrieval.fusion import FusionConfig, fuse
from campus_search.retrieval.lexical import BM25
from campus_search.security.roles import superuser
from campus_search.services import Services


def collect(services: Services, queries: dict[str, str], bm25: BM25, k: int) -> dict[str, list[tuple]]:
    searcher = services.searcher
    searcher.bm25 = bm25
    user = superuser("tune")
    out = {}
    for qid, text in queries.items():
        vector = searcher.embed_query(text)
        hits = searcher.hybrid_candidates(user, vector, text, {}, k)
        out[qid] = [(h.document_id, h.similarity, h.bm25 or 0.0, h.in_dense, h.in_lexical) for h in hits]
    return out


def score(cands: dict[str, list[tuple]], qrels: dict, config: FusionConfig) -> tuple[float, float]:
    ndcgs, recalls = [], []
    for qid, rows in cands.items():
        rel = fuse([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows], config)
        order = sorted(range(len(rows)), key=lambda i: -rel[i])
        ranked: dict[str, None] = {}
        for i in order:
            ranked.setdefault(rows[i][0], None)
        docs = list(ranked)
        ndcgs.append(ndcg_at_k(docs, qrels[qid], 10))
        recalls.append(recall_at_k(docs, qrels[qid], 100))
    return statistics.fmean(ndcgs), statistics.fmean(recalls)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--qrels", required=True)
    ap.add_argument("--k", type=int, default=200, help="candidates per list (chunks)")
    ap.add_argument("--k1", type=float, nargs="*", default=[0.9, 1.2])
    ap.add_argument("--b", type=float, nargs="*", default=[0.4, 0.75])
    ap.add_argument("--alpha", type=float, nargs="*", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    ap.add_argument("--rrf-k", type=int, nargs="*", default=[20, 60])
    args = ap.parse_args()
    services = Services(load_settings()).ensure_open()
    qrels = load_qrels(Path(args.qrels))
    queries = {q: t for q, t in load_queries(Path(args.queries)).items() if q in qrels}
    results = []
    for k1, b in itertools.product(args.k1, args.b):
        cands = collect(services, queries, BM25(k1, b), args.k)
        configs = ([FusionConfig("dense"), FusionConfig("lexical")]
                   + [FusionConfig("convex", alpha=a) for a in args.alpha]
                   + [FusionConfig("rrf", rrf_k=r) for r in args.rrf_k])
        for config in configs:
            ndcg, recall = score(cands, qrels, config)
            row = {"k1": k1, "b": b, **config.describe(), "ndcg@10": round(ndcg, 4), "recall@100": round(recall, 4)}
            results.append(row)
            print(json.dumps(row), flush=True)
    best = max((r for r in results if r["fusion"] in ("convex", "rrf")), key=lambda r: r["ndcg@10"])
    print("best:", json.dumps(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
