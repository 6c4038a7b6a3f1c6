"""Precomputed chunk embeddings: exported chunk inputs out, vectors made elsewhere back in.

Embedding is the slow part of ingestion on a CPU (about 30 chunks/s here); a GPU batch job or an
embedding farm does it hundreds of times faster. The exchange keeps our own chunking, access metadata
and lexical index in charge, and only moves the model's work:

1. ``campus-search chunks PATH... -o inputs.jsonl`` parses and chunks exactly as ``ingest`` would and
   writes one line per distinct chunk: ``{"hash": H, "input": TEXT}``, where ``TEXT`` is the exact text
   the model must embed (title and section prefix included) and ``H`` the chunk's content hash, after
   a header line ``{"campus_search_chunk_inputs": 1, "model": M, "dimension": D}``.
2. The farm embeds each ``input`` with model ``M`` and writes ``{"hash": H, "embedding": [...]}`` lines
   after a header ``{"model": M, "dimension": D}`` (``.jsonl``), or an ``.npz`` with arrays ``hashes``
   (strings), ``embeddings`` (n x D float32) and ``model`` (a string).
3. ``campus-search ingest PATH... --vectors vectors.jsonl`` ingests as usual; a chunk whose hash has a
   given vector is stored with it instead of being embedded (chunks without one are embedded locally).

The file is checked before anything is written: the model must be the index's model (vectors of two
models are not comparable), every vector must have the index's dimension and finite, non-zero values.
Vectors are L2-normalised on the way in, as the local model's are.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from campus_search.errors import IngestError

HEADER_KEY = "campus_search_chunk_inputs"


def _check_model(found: Any, model: str, dimension: int, where: str, found_dim: Any) -> None:
    if found != model:
        raise IngestError(f"{where}: vectors are from model {found!r}, the index uses {model!r}; "
                          "embed the exported inputs with the index's model")
    if found_dim is not None and found_dim != dimension:
        raise IngestError(f"{where}: vectors have {found_dim} dimensions, the index has {dimension}")


def _vector(values: Any, dimension: int, where: str) -> np.ndarray:
    try:
        v = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise IngestError(f"{where}: embedding must be a list of numbers") from None
    if v.shape != (dimension,):
        raise IngestError(f"{where}: embedding has shape {v.shape}, expected ({dimension},)")
    norm = float(np.linalg.norm(v))
    if not np.isfinite(v).all() or not math.isfinite(norm) or norm == 0.0:
        raise IngestError(f"{where}: embedding has non-finite or all-zero values")
    return v / norm


def load_vectors(path: Path, *, model: str, dimension: int) -> dict[str, np.ndarray]:
    """Vectors by chunk hash from a ``.jsonl`` or ``.npz`` file, checked against the index's model and
    dimension. Raises IngestError naming the first problem (nothing is ingested then)."""
    if path.suffix.lower() == ".npz":
        return _load_npz(path, model=model, dimension=dimension)
    out: dict[str, np.ndarray] = {}
    try:
        fh = path.open(encoding="utf-8")
    except OSError as exc:
        raise IngestError(f"{path}: cannot read ({exc.strerror})") from exc
    with fh:
        header_seen = False
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise IngestError(f"{where}: invalid JSON ({exc.__class__.__name__})") from None
            if not isinstance(record, dict):
                raise IngestError(f"{where}: each line must be a JSON object")
            if not header_seen:
                if "model" not in record:
                    raise IngestError(f"{where}: the first line must be a header "
                                      '{"model": ..., "dimension": ...}')
                _check_model(record["model"], model, dimension, str(path), record.get("dimension"))
                header_seen = True
                continue
            h = record.get("hash")
            if not isinstance(h, str) or len(h) != 64:
                raise IngestError(f"{where}: \"hash\" must be a chunk hash from `campus-search chunks`")
            out[h] = _vector(record.get("embedding"), dimension, where)
    if not header_seen:
        raise IngestError(f"{path}: empty vector file")
    return out


def _load_npz(path: Path, *, model: str, dimension: int) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            found = str(data["model"]) if "model" in data else None
            hashes, embeddings = data["hashes"], data["embeddings"]
    except (OSError, ValueError, KeyError) as exc:
        raise IngestError(f"{path}: not a vector archive with 'hashes', 'embeddings' and 'model' "
                          f"({exc.__class__.__name__})") from None
    _check_model(found, model, dimension, str(path), embeddings.shape[1] if embeddings.ndim == 2 else None)
    if embeddings.ndim != 2 or len(hashes) != len(embeddings):
        raise IngestError(f"{path}: 'embeddings' must be n x {dimension}, one row per hash")
    return {str(h): _vector(v, dimension, f"{path}: row {i}")
            for i, (h, v) in enumerate(zip(hashes, embeddings, strict=True))}


def write_inputs(out: IO[str], chunks: Iterable[tuple[str, str]], *, model: str, dimension: int) -> int:
    """Write the header and one ``{"hash", "input"}`` line per distinct chunk; returns how many."""
    out.write(json.dumps({HEADER_KEY: 1, "model": model, "dimension": dimension}) + "\n")
    seen: set[str] = set()
    for h, text in chunks:
        if h in seen:
            continue
        seen.add(h)
        out.write(json.dumps({"hash": h, "input": text}, ensure_ascii=False) + "\n")
    return len(seen)


def read_inputs(path: Path) -> Iterator[tuple[str, str]]:
    """The ``(hash, input)`` pairs of a file written by :func:`write_inputs` (for tools and tests)."""
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            record: Mapping[str, Any] = json.loads(line)
            if i == 0:
                continue
            yield str(record["hash"]), str(record["input"])
