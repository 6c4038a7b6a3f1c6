"""The peer in ``bench_peer.py``: the minimal semantic search service a team might build instead.

A Flask app that embeds the query with Campus Search's own int8 ONNX all-MiniLM-L6-v2
(:class:`campus_search.embedding.local.LocalMiniLM`, the same model files, one ONNX thread per worker) and
asks a Chroma server for the nearest chunks over Chroma's HTTP API (v2), with a kept-alive
``requests`` session per thread. No BM25, no permissions, no audit, no cache, no metrics, no logs.

It answers the same request shape as Campus Search (``POST /api/search`` with
``{"query": ..., "config": {"max_results": N}}``), so one load generator drives both. Served by
gunicorn with the brief's settings, for example::

    PEER_CHROMA_URL=http://127.0.0.1:8000 PEER_COLLECTION_ID=<uuid> \\
        .venv/bin/gunicorn --chdir bench --bind 127.0.0.1:PORT --workers 4 --worker-class gthread \\
        --threads 2 --timeout 60 --keepalive 10 --preload 'peer_app:create_app()'

This is a benchmark fixture, not part of the product.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import requests
from flask import Flask, jsonify, request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from campus_search.embedding.local import LocalMiniLM  # noqa: E402  (the checkout, not an installed copy)

MAX_RESULTS = 50


def create_app() -> Flask:
    base = os.environ["PEER_CHROMA_URL"].rstrip("/")
    collection = os.environ["PEER_COLLECTION_ID"]
    query_url = (f"{base}/api/v2/tenants/default_tenant/databases/default_database/"
                 f"collections/{collection}/query")
    app = Flask(__name__)
    local = threading.local()
    models: dict[int, LocalMiniLM] = {}
    lock = threading.Lock()

    def model() -> LocalMiniLM:
        # one session per worker process, made after the fork (an ONNX session must not cross a fork)
        pid = os.getpid()
        with lock:
            if pid not in models:
                models.clear()
                models[pid] = LocalMiniLM(threads=1)
            return models[pid]

    def chroma() -> requests.Session:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        return session

    @app.post("/api/search")
    def search() -> Any:
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("query"), str) or not body["query"].strip():
            return jsonify(error="query must be a non-empty string"), 400
        config = body.get("config") or {}
        k = config.get("max_results", 10) if isinstance(config, dict) else 10
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_RESULTS:
            return jsonify(error=f"max_results must be an integer from 1 to {MAX_RESULTS}"), 400
        query = body["query"]
        vector = model().embed([" ".join(query.split())])[0]
        answer = chroma().post(query_url, json={"query_embeddings": [vector.tolist()], "n_results": k,
                                                "include": ["documents", "distances"]}, timeout=30)
        if answer.status_code != 200:
            return jsonify(error=f"chroma answered {answer.status_code}"), 502
        data = answer.json()
        results = [{"chunk_id": cid, "text": text, "similarity": round(1.0 - distance, 6)}
                   for cid, text, distance in zip(data["ids"][0], data["documents"][0], data["distances"][0],
                                                  strict=True)]
        return jsonify(query=query, results=results, total_results=len(results))

    @app.get("/health")
    def health() -> Any:
        return jsonify(status="ok")

    return app
