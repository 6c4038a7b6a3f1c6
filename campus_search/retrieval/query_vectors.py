"""Query vectors, so a repeated query is not embedded again: this process's LRU
(:class:`QueryEmbeddingCache`; the model is deterministic) and, with Redis, a shared tier under it
(:class:`TieredEmbeddingCache`). :func:`query_vector_cache` builds what the searcher is given."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np

from campus_search.config import Settings
from campus_search.retrieval.cache_backends import Backend, RedisBackend

EMBEDDING_NS = "emb"


class QueryVectors(Protocol):
    """What :class:`~campus_search.retrieval.search.Searcher` keeps query vectors in."""

    def get(self, key: str) -> np.ndarray | None: ...

    def put(self, key: str, value: np.ndarray) -> None: ...


class QueryEmbeddingCache:
    """Small in-process LRU of query vectors (the model is deterministic)."""

    def __init__(self, size: int = 2048) -> None:
        self.size = size
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: str, value: np.ndarray) -> None:
        value.setflags(write=False)
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)


class TieredEmbeddingCache:
    """Query vectors: this process's LRU first, then Redis (shared by all processes), then the model.
    Same ``get``/``put`` interface as :class:`QueryEmbeddingCache`."""

    def __init__(self, local: Any, backend: RedisBackend, *, model: str, dimension: int, ttl: int) -> None:
        self.local = local
        self.backend = backend
        self.dimension = dimension
        self.ttl = ttl
        self._ns = f"{backend.prefix}{EMBEDDING_NS}:"
        self._model = f"{model}\x00{dimension}\x00"

    def _key(self, text: str) -> str:
        return self._ns + hashlib.sha256((self._model + text).encode()).hexdigest()

    def get(self, text: str) -> np.ndarray | None:
        vector = self.local.get(text)
        if vector is not None:
            return vector
        raw = self.backend.get(self._key(text))
        if raw is None or len(raw) != self.dimension * 4:
            return None
        vector = np.frombuffer(raw, dtype=np.float32).copy()
        self.local.put(text, vector)
        return vector

    def put(self, text: str, vector: np.ndarray) -> None:
        self.local.put(text, vector)
        self.backend.set(self._key(text), np.asarray(vector, dtype=np.float32).tobytes(), self.ttl)


def query_vector_cache(settings: Settings, backend: Backend, embedder: Any) -> QueryVectors:
    """The searcher's query vectors: the process's LRU, with the shared Redis tier under it when the
    cache is on and Redis holds it (keyed by ``embedder``'s model and dimension, asked only then: a
    remote embedder learns its dimension from the server)."""
    local = QueryEmbeddingCache()
    if settings.cache_enabled and isinstance(backend, RedisBackend):
        return TieredEmbeddingCache(local, backend, model=embedder.model_name, dimension=embedder.dimension,
                                    ttl=settings.cache_ttl_embedding)
    return local
