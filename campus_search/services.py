"""The components one process needs, wired from settings, opened after fork.

gunicorn ``--preload`` imports and builds the app in the master process; sockets (pools, Redis
clients) and the ONNX session must not be shared across fork. So :class:`Services` resolves the
database (starting the embedded cluster if needed) and runs migrations at build time, but opens pools
and loads the model lazily in each process (:meth:`ensure_open`, keyed on the pid).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from campus_search import metrics
from campus_search.config import Settings
from campus_search.embedding.base import Embedder
from campus_search.embedding.factory import MODEL_DIMENSIONS, get_embedder, index_model
from campus_search.ingest.formats import ParseLimits
from campus_search.ingest.pipeline import Ingester
from campus_search.retrieval.cache import ResultCache, build_cache
from campus_search.retrieval.cache_backends import RedisBackend, build_backend
from campus_search.retrieval.fusion import FusionConfig
from campus_search.retrieval.lexical import BM25
from campus_search.retrieval.params import SearchParams
from campus_search.retrieval.query_vectors import query_vector_cache
from campus_search.retrieval.results import Hit, SearchOutcome
from campus_search.retrieval.search import Searcher
from campus_search.security.roles import Principal
from campus_search.storage.db import Database, migrate, resolve_dsns
from campus_search.storage.replicas import ReplicaFailed

log = logging.getLogger(__name__)


def fusion_config(settings: Settings) -> FusionConfig:
    return FusionConfig(settings.search_fusion, alpha=settings.fusion_alpha, rrf_k=settings.rrf_k)


class Services:
    def __init__(self, settings: Settings, *, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.started_at = time.time()
        self.dsn, self.read_dsn = resolve_dsns(settings)
        self._embedder = embedder
        dimension = embedder.dimension if embedder else self._expected_dimension()
        model = embedder.model_name if embedder else index_model(settings)
        self.schema_version = migrate(self.dsn, model=model, dimension=dimension)
        self._pid: int | None = None
        self._lock = threading.Lock()
        self.db: Database
        self.searcher: Searcher
        self.ingester: Ingester
        self.cache: ResultCache
        self._seen = (0, 0)  # (write epoch, write fence) at the last search
        self.auditor: Any = None  # audit.auditor_of creates it on first use

    def _expected_dimension(self) -> int:
        if self.settings.embedding_provider == "local":
            return MODEL_DIMENSIONS["all-MiniLM-L6-v2"]
        return self.embedder.dimension  # remote: ask the server once

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = get_embedder(self.settings)
        return self._embedder

    def ensure_open(self, *, wait: bool = True) -> Services:
        """Open pools and load the model in this process (idempotent, fork-aware). ``wait``: until the
        pools hold their first connections (raising if the database cannot be reached); without it the
        pools connect in the background and requests meanwhile get 503 "database unavailable"."""
        if self._pid == os.getpid():
            return self
        with self._lock:
            if self._pid == os.getpid():
                return self
            if self._pid is not None:
                # inherited from a parent process: forget its objects without closing its sockets
                self._embedder = None if self.settings.embedding_provider == "local" else self._embedder
            self.db = Database(self.settings, self.dsn, self.read_dsn)
            self.db.open(wait=wait)
            embedder = metrics.instrument_embedder(self.embedder, self.settings.embedding_provider)
            backend = build_backend(self.settings)  # the result cache's and the query vectors' store
            self.searcher = Searcher(self.db, embedder, ef_search=self.settings.hnsw_ef_search,
                                     exact_max_fraction=self.settings.dense_exact_fraction,
                                     fusion=fusion_config(self.settings), bm25=BM25(self.settings.bm25_k1,
                                                                                   self.settings.bm25_b),
                                     query_vectors=query_vector_cache(self.settings, backend, embedder))
            self.ingester = Ingester(self.db, embedder, default_visibility=self.settings.default_visibility,
                                     limits=ParseLimits.from_settings(self.settings),
                                     max_chunks=self.settings.max_document_chunks)
            self.cache = build_cache(self.settings, self.db, backend, self.searcher.describe())
            if self.db.router is not None and isinstance(self.cache.backend, RedisBackend):
                fence = self.db.router.fence  # shared by every process of every instance (replicas.py)
                fence.shared_get, fence.shared_advance = self.cache.backend.fence_get, self.cache.backend.fence_advance
            self._seen = (0, 0)
            self._pid = os.getpid()
            log.info("services open in pid %s", self._pid)
        return self

    def run_search(self, user: Principal, params: SearchParams) -> SearchOutcome:
        """One search as the API runs it: cache-aside (cache.py), scoped to the caller's permissions."""
        self.ensure_open()
        show_bm25 = user.role.name in self.settings.scores_bm25_roles

        def compute() -> list[Hit]:
            hits = self.searcher.search(user, params)
            if not show_bm25:
                # BM25 uses corpus-wide statistics that count hidden chunks: not shown to this role
                # (SCORES_BM25_ROLES). Dropped before caching; the role is part of the cache key.
                for hit in hits:
                    hit.bm25 = None
            return hits

        router = self.db.router
        if router is not None:
            router.fence.sync()  # another process's write (replicas.py: read-your-writes)
        seen = (self.db.write_epoch, router.fence.lsn if router else 0)
        if seen != self._seen:  # a write since the last search: no cached answer from before it
            self._seen = seen
            self.cache.generation.invalidate()
        attempts = 1 + (len(router.replicas) if router else 0)
        for attempt in range(attempts):
            try:
                return self.cache.fetch(user, params, compute)
            except ReplicaFailed:
                if attempt == attempts - 1:
                    raise
                log.info("search retried on the next node after a replica failed")
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._pid == os.getpid():
            auditor = getattr(self, "auditor", None)
            if auditor is not None:
                auditor.close()  # its writer thread writes what is queued, then ends
                self.auditor = None
            self.cache.close()
            self.db.close()
            self._pid = None

