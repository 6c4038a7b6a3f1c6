"""Query vectors, so a repeated query is not embedded again: this process's LRU
(:class:`QueryEmbeddingCache`; the model is deterministic) and, with Redis, a shared tier under it
(:class:`TieredEmbeddingCache`). :func:`query_vector_cache` builds what the searcher is given."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
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


class _Request:
    """What one thread's :meth:`TieredEmbeddingCache.request` block collects."""

    __slots__ = ("absent", "writes")

    def __init__(self) -> None:
        self.absent: set[str] = set()  # texts whose key Redis was just asked for and did not hold
        self.writes: list[tuple[str, bytes, int]] = []  # (key, value, ttl) not sent yet


class TieredEmbeddingCache:
    """Query vectors: this process's LRU first, then Redis (shared by all processes), then the model.
    Same ``get``/``put`` interface as :class:`QueryEmbeddingCache`.

    The result cache saves this tier its own round trips on a search it has to compute
    (:meth:`ResultCache.fetch`): within its :meth:`request` block it reads the query's vector in the same
    MGET as the result (:meth:`seed`), and writes a newly embedded one in the same pipeline as the
    result."""

    def __init__(self, local: Any, backend: RedisBackend, *, model: str, dimension: int, ttl: int) -> None:
        self.local = local
        self.backend = backend
        self.dimension = dimension
        self.ttl = ttl
        self._ns = f"{backend.prefix}{EMBEDDING_NS}:"
        self._model = f"{model}\x00{dimension}\x00"
        self._thread = threading.local()

    def key(self, text: str) -> str:
        """The Redis key of ``text``'s vector."""
        return self._ns + hashlib.sha256((self._model + text).encode()).hexdigest()

    def _decode(self, raw: bytes | None) -> np.ndarray | None:
        if raw is None or len(raw) != self.dimension * 4:
            return None
        return np.frombuffer(raw, dtype=np.float32).copy()

    def _request(self) -> _Request | None:
        return getattr(self._thread, "request", None)

    def get(self, text: str) -> np.ndarray | None:
        vector = self.local.get(text)
        if vector is not None:
            return vector
        request = self._request()
        if request is not None and text in request.absent:
            return None  # Redis was asked a moment ago, in this request
        vector = self._decode(self.backend.get(self.key(text)))
        if vector is not None:
            self.local.put(text, vector)
        return vector

    def seed(self, text: str, raw: bytes | None) -> None:
        """``raw`` is the value of :meth:`key` for ``text``, read by the caller's own call: a vector goes
        into this process's LRU; a miss (or garbage) is remembered until the end of the :meth:`request`
        block, so neither costs the next :meth:`get` a round trip."""
        vector = self._decode(raw)
        if vector is not None:
            self.local.put(text, vector)
            return
        request = self._request()
        if request is not None:
            request.absent.add(text)

    def put(self, text: str, vector: np.ndarray) -> None:
        self.local.put(text, vector)
        item = (self.key(text), np.asarray(vector, dtype=np.float32).tobytes(), self.ttl)
        request = self._request()
        if request is not None:
            request.writes.append(item)
        else:
            self.backend.set(*item)

    @contextlib.contextmanager
    def request(self) -> Iterator[list[tuple[str, bytes, int]]]:
        """A block for one search on this thread: Redis writes of new vectors are collected in the yielded
        list instead of sent (the caller writes them; the local LRU is written at once), and what
        :meth:`seed` found missing is not asked for again."""
        request = _Request()
        self._thread.request = request
        try:
            yield request.writes
        finally:
            self._thread.request = None


def query_vector_cache(settings: Settings, backend: Backend, embedder: Any) -> QueryVectors:
    """The searcher's query vectors: the process's LRU, with the shared Redis tier under it when the
    cache is on and Redis holds it (keyed by ``embedder``'s model and dimension, asked only then: a
    remote embedder learns its dimension from the server)."""
    local = QueryEmbeddingCache()
    if settings.cache_enabled and isinstance(backend, RedisBackend):
        # the query graph is part of the model: vectors of the int8 and float32 graphs, or of two recipes of
        # the int8 one (servers of two versions on one Redis, during an upgrade), are not mixed
        graph = getattr(embedder, "query_graph_id", None) or getattr(embedder, "query_graph", None)
        model = embedder.model_name if graph in (None, "float32") else f"{embedder.model_name}/{graph}"
        return TieredEmbeddingCache(local, backend, model=model, dimension=embedder.dimension,
                                    ttl=settings.cache_ttl_embedding)
    return local
