"""Which embedder a configuration means: :func:`get_embedder` builds the configured one once per process
(the bundled :class:`~campus_search.embedding.local.LocalMiniLM` or a
:class:`~campus_search.embedding.remote.RemoteEmbedder`), and :func:`index_model` names the model whose
vectors the index holds.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from campus_search.config import Settings
from campus_search.embedding.base import Embedder
from campus_search.embedding.local import LocalMiniLM
from campus_search.embedding.quantized import query_int8_enabled
from campus_search.embedding.remote import build_remote_embedder

#: Vector dimension of the models whose dimension is known without asking a server.
MODEL_DIMENSIONS = {LocalMiniLM.model_name: LocalMiniLM.dimension}


def index_model(settings: Settings) -> str:
    """The model whose vectors the index holds: the in-process model ignores EMBEDDING_MODEL."""
    return LocalMiniLM.model_name if settings.embedding_provider == "local" else settings.embedding_model


def model_cache_dir(configured: str = "") -> Path:
    """MODEL_CACHE_DIR (``configured``), else ``$XDG_CACHE_HOME/campus-search`` (``~/.cache/campus-search``)."""
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "campus-search"


def local_query_int8(settings: Settings) -> bool:
    """Whether the in-process model embeds queries with the int8 query graph (EMBEDDING_QUERY_INT8)."""
    return settings.embedding_provider == "local" and query_int8_enabled(settings.embedding_query_int8)


_cache: dict[tuple[str, str, str, int, int, bool], Embedder] = {}
_cache_lock = threading.Lock()


def get_embedder(settings: Settings, *, threads: int | None = None) -> Embedder:
    """The configured embedder, built once per process (and per thread count)."""
    n = threads or settings.embedding_threads
    # per process (never share a session across fork) and per provider, server and model
    query_int8 = local_query_int8(settings)
    key = (settings.embedding_provider, settings.embedding_url or "", settings.embedding_model, n, os.getpid(),
           query_int8)
    with _cache_lock:
        if key not in _cache:
            if settings.embedding_provider == "local":
                _cache[key] = LocalMiniLM(threads=n, query_int8=query_int8,
                                          cache_dir=model_cache_dir(settings.model_cache_dir))
            else:
                _cache[key] = build_remote_embedder(settings)
        return _cache[key]


def forget_embedders() -> None:
    """Drop this process's embedders (their memory returns once nothing else holds them)."""
    with _cache_lock:
        _cache.clear()


def ingest_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))
