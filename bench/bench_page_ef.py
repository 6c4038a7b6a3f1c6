"""What ``hnsw.ef_search`` does to the page a search returns: dense recall against an exact search, and the
API path's nDCG@10, by ef_search, on any data directory.

    .venv/bin/python bench/bench_page_ef.py DATA_DIR --queries QUERIES [--qrels QRELS] [--database NAME]
        [--ef 40,64,100,200] [--limit N]

``QUERIES`` is BEIR's ``queries.jsonl`` (``_id``, ``text``) or plain text, one query a line. For each ef, as
an admin (every chunk allowed) with the shipped settings otherwise:

- ``recall@10`` / ``recall@40``: the HNSW plan's dense top 10 / top 40 (the candidates of a 10-result
  page) against the exact scan's, the same query vectors;
- ``ndcg@10`` (with ``--qrels``, BEIR's ``qrels/*.tsv``): ``Searcher.search`` as the API runs it (10 results,
  40 candidates, fusion and business score), documents ranked by their first chunk; unlike ``campus-search
  eval``, which asks for 200 results and so searches with ef 200 whatever the setting;
- ``same_pages``: how many top-10 pages are identical to the first ef's.

``--database``: a scratch database beside DATA_DIR's (``campus-search eval`` keeps SciFact in
``campus_search_eval_<corpus>_<hash>``). One JSON line per ef. Figures: docs/performance.md, "Answers held
without a thread, and a page's graph search".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any


def read_queries(path: Path, limit: int) -> list[tuple[str, str]]:
    """(id, text): BEIR's queries.jsonl as ``campus-search eval`` reads it, or plain text, one a line."""
    from campus_search.retrieval.evaluation import load_queries

    lines = path.read_text(encoding="utf-8").splitlines()
    if next((line for line in lines if line.strip()), "").lstrip().startswith("{"):
        out = list(load_queries(path).items())
    else:
        out = [(str(n), line.strip()) for n, line in enumerate(lines) if line.strip()]
    return out[:limit] if limit else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir")
    ap.add_argument("--queries", required=True, type=Path)
    ap.add_argument("--qrels", type=Path)
    ap.add_argument("--database", help="a scratch database beside DATA_DIR's (campus-search eval's)")
    ap.add_argument("--ef", default="40,64,100,200")
    ap.add_argument("--limit", type=int, default=0, help="the first N queries (default: all)")
    args = ap.parse_args()
    os.environ.update(DATA_DIR=args.data_dir, CACHE_ENABLED="false", RATE_LIMITS_ENABLED="false",
                      LOG_LEVEL="WARNING")
    for name in ("DATABASE_URL", "REDIS_URL"):
        os.environ.pop(name, None)
    from campus_search.config import load_settings
    from campus_search.retrieval.evaluation import ensure_scratch_database, load_qrels, ndcg_at_k
    from campus_search.retrieval.params import SearchParams
    from campus_search.retrieval.search import CANDIDATE_FLOOR, Searcher
    from campus_search.security.auth import principal_from_claims
    from campus_search.services import Services
    from campus_search.storage.db import resolve_dsns

    settings = load_settings()
    if args.database:
        target, _ = ensure_scratch_database(resolve_dsns(settings)[0], args.database)
        settings = settings.replace(database_url=target, database_read_url=None, db_host=None)
    services = Services(settings).ensure_open()
    admin = principal_from_claims({"sub": "bench-admin", "role": "admin"}, settings)
    queries = read_queries(args.queries, args.limit)
    qrels = load_qrels(args.qrels) if args.qrels else {}
    searcher = services.searcher
    vectors = {text: searcher.embed_query(text) for _, text in queries}  # embedded once, for every ef
    exact = Searcher(services.db, services.embedder, exact_max_fraction=0.0)
    truth = {text: [h.chunk_id for h in exact.dense_candidates(admin, vectors[text], {}, CANDIDATE_FLOOR, exact=True)]
             for _, text in queries}
    first: list[list[int]] | None = None
    for ef in [int(x) for x in args.ef.split(",")]:
        hnsw = Searcher(services.db, services.embedder, ef_search=ef, exact_max_fraction=0.0)
        r10, r40 = [], []
        for _, text in queries:
            got = [h.chunk_id for h in hnsw.dense_candidates(admin, vectors[text], {}, CANDIDATE_FLOOR)]
            r10.append(len(set(got[:10]) & set(truth[text][:10])) / max(1, min(10, len(truth[text]))))
            r40.append(len(set(got) & set(truth[text])) / max(1, len(truth[text])))
        searcher.ef_search = ef
        pages, scores = [], []
        for qid, text in queries:
            hits = searcher.search(admin, SearchParams(query=text, max_results=10))
            pages.append([h.chunk_id for h in hits])
            if qid in qrels:
                documents: list[str] = []
                for h in hits:
                    if h.document_id not in documents:
                        documents.append(h.document_id)
                scores.append(ndcg_at_k(documents, qrels[qid], 10))
        first = first or pages
        out: dict[str, Any] = {"ef_search": ef, "queries": len(queries), "recall@10": round(statistics.mean(r10), 4),
                               "recall@40": round(statistics.mean(r40), 4),
                               "same_pages": sum(a == b for a, b in zip(first, pages, strict=True))}
        if scores:
            out["ndcg@10"] = round(statistics.mean(scores), 4)
        print(json.dumps(out), flush=True)
    services.close()


if __name__ == "__main__":
    main()
