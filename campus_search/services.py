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
from dataclasses import dataclass

from campus_search import metrics
from campus_search.audit.records import Auditor
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


def bm25_config(settings: Settings) -> BM25:
    return BM25(settings.bm25_k1, settings.bm25_b, depth=settings.bm25_depth, cut_df=settings.bm25_cut_df,
                scan=settings.bm25_scan, whole_chunks=settings.bm25_whole_chunks)


@dataclass(frozen=True)
class Opened:
    """What :class:`Services` opens in one process: never shared across fork."""

    pid: int
    db: Database  # write and read pools
    searcher: Searcher
    ingester: Ingester
    cache: ResultCache  # result cache and query-vector cache (Redis, embedded Redis or in-process)
    auditor: Auditor  # audit records through one writer thread (started on first write)


class NotOpen(RuntimeError):
    """A per-process component was asked for before :meth:`Services.ensure_open` in this process."""


class Services:
    """Everything one process needs to serve, built from one :class:`Settings`.

    Built (in the gunicorn master under --preload): ``settings``, ``dsn``/``read_dsn`` (the embedded
    cluster started if none is configured), ``schema_version`` (migrations applied), ``started_at``.
    Opened per process by :meth:`ensure_open` (:class:`Opened`): ``db``, ``searcher``, ``ingester``,
    ``cache``, ``auditor``; asking for one before that raises :class:`NotOpen` naming the component.
    The embedding model is loaded on first use (``embedder``)."""

    def __init__(self, settings: Settings, *, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.started_at = time.time()
        self.dsn, self.read_dsn = resolve_dsns(settings)
        self._embedder: Embedder | None = embedder
        dimension = embedder.dimension if embedder else self._expected_dimension()
        model = embedder.model_name if embedder else index_model(settings)
        self.schema_version: int = migrate(self.dsn, model=model, dimension=dimension)
        self._opened: Opened | None = None
        self._lock = threading.Lock()
        self._seen = (0, 0)  # (write epoch, write fence) at the last search

    def _expected_dimension(self) -> int:
        if self.settings.embedding_provider == "local":
            return MODEL_DIMENSIONS["all-MiniLM-L6-v2"]
        return self.embedder.dimension  # remote: ask the server once

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = get_embedder(self.settings)
        return self._embedder

    @property
    def opened(self) -> Opened | None:
        """This process's open components, or None before :meth:`ensure_open` here (after a fork, the
        parent's are not this process's)."""
        opened = self._opened
        return opened if opened is not None and opened.pid == os.getpid() else None

    def _opened_here(self, name: str) -> Opened:
        opened = self.opened
        if opened is None:
            raise NotOpen(f"Services.{name} is opened per process: call ensure_open() in this process "
                          f"(pid {os.getpid()}) first")
        return opened

    @property
    def db(self) -> Database:
        return self._opened_here("db").db

    @property
    def searcher(self) -> Searcher:
        return self._opened_here("searcher").searcher

    @property
    def ingester(self) -> Ingester:
        return self._opened_here("ingester").ingester

    @property
    def cache(self) -> ResultCache:
        return self._opened_here("cache").cache

    @property
    def auditor(self) -> Auditor:
        return self._opened_here("auditor").auditor

    def ensure_open(self, *, wait: bool = True) -> Services:
        """Open pools and load the model in this process (idempotent, fork-aware). ``wait``: until the
        pools hold their first connections (raising if the database cannot be reached); without it the
        pools connect in the background and requests meanwhile get 503 "database unavailable"."""
        if self.opened is not None:
            return self
        with self._lock:
            if self.opened is not None:
                return self
            if self._opened is not None:
                # inherited from a parent process: forget its objects without closing its sockets
                self._embedder = None if self.settings.embedding_provider == "local" else self._embedder
            db = Database(self.settings, self.dsn, self.read_dsn)
            db.open(wait=wait)
            try:
                self._opened = self._open_components(db)
            except BaseException:
                db.close()  # the model or the cache failed: no pools left behind for nobody to close
                raise
            self._seen = (0, 0)
            log.info("services open in pid %s", os.getpid())
        return self

    def _open_components(self, db: Database) -> Opened:
        embedder = metrics.instrument_embedder(self.embedder, self.settings.embedding_provider)
        backend = build_backend(self.settings)  # the result cache's and the query vectors' store
        searcher = Searcher(db, embedder, ef_search=self.settings.hnsw_ef_search,
                            exact_max_fraction=self.settings.dense_exact_fraction, fusion=fusion_config(self.settings),
                            bm25=bm25_config(self.settings),
                            query_vectors=query_vector_cache(self.settings, backend, embedder))
        ingester = Ingester(db, embedder, default_visibility=self.settings.default_visibility,
                            limits=ParseLimits.from_settings(self.settings),
                            max_chunks=self.settings.max_document_chunks)
        cache = build_cache(self.settings, db, backend, searcher.describe(), searcher.query_vectors)
        if db.router is not None and isinstance(cache.backend, RedisBackend):
            fence = db.router.fence  # shared by every process of every instance (replicas.py)
            fence.shared_get, fence.shared_advance = cache.backend.fence_get, cache.backend.fence_advance
        return Opened(os.getpid(), db, searcher, ingester, cache, Auditor(db, self.settings))

    def run_search(self, user: Principal, params: SearchParams) -> SearchOutcome:
        """One search as the API runs it: cache-aside (cache.py), scoped to the caller's permissions."""
        self.ensure_open()
        opened = self._opened_here("searcher")
        show_bm25 = user.role.name in self.settings.scores_bm25_roles

        def compute() -> list[Hit]:
            hits = opened.searcher.search(user, params)
            if not show_bm25:
                # BM25 uses corpus-wide statistics that count hidden chunks: not shown to this role
                # (SCORES_BM25_ROLES). Dropped before caching; the role is part of the cache key.
                for hit in hits:
                    hit.bm25 = None
            return hits

        router = opened.db.router
        if router is not None:
            router.fence.sync()  # another process's write (replicas.py: read-your-writes)
        seen = (opened.db.write_epoch, router.fence.lsn if router else 0)
        if seen != self._seen:  # a write since the last search: no cached answer from before it
            self._seen = seen
            opened.cache.generation.invalidate()
        attempts = 1 + (len(router.replicas) if router else 0)
        for attempt in range(attempts):
            try:
                return opened.cache.fetch(user, params, compute)
            except ReplicaFailed:
                if attempt == attempts - 1:
                    raise
                log.info("search retried on the next node after a replica failed")
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close what this process opened: the auditor writes what is queued, then cache and pools."""
        with self._lock:
            opened = self.opened
            if opened is None:  # not opened here (or inherited from a parent: its sockets are not ours)
                return
            self._opened = None
        opened.auditor.close()  # its writer thread writes what is queued, then ends
        opened.cache.close()
        opened.db.close()
