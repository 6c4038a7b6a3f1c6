"""The search-result cache (cache-aside), scoped to the caller's permissions.

Redis (``REDIS_URL``/``REDIS_HOST``, or without them the embedded Redis under ``DATA_DIR``: see
embedded_redis.py), shared by every worker and replica; with ``REDIS_URL=memory://`` a bounded
in-process LRU with TTL in each process (cache_backends.py). Query vectors are cached apart
(query_vectors.py), the generation tag is generation.py's. docs/caching-and-rate-limits.md is the long form.

A result key is the SHA-256 of everything that decides the answer:

- the search parameters: the query with whitespace collapsed (NFC), the validated filters,
  ``max_results`` after the role's clamp, the similarity threshold (every ``SearchParams`` field);
- the caller's permission scope: role name, ``Principal.scope_key()`` (clearance, department and group
  scope) and campus (it changes ``combined_score``), so a result is only ever served to callers who
  would get exactly the same answer, never to one who may see less;
- the index generation tag: ``index_state.generation`` (bumped in the same transaction as every
  ingest or delete) plus the row's ``xmin``, the database name and the cluster's system identifier,
  so neither a restored backup nor a re-created database whose counter restarted can reuse entries;
- the retrieval configuration (``Searcher.describe()``) and the result format.

Freshness: a process reuses the generation tag it read for at most ``CACHE_GENERATION_CHECK`` seconds
(default 1) on cache hits; a miss always uses a tag read afresh during that request (the lookup's own
read when it had to make one, else a new read just before the search). So a committed change stops cached
answers within that bound. An entry is stored only when the generation read just before the search equals the
one read just after it, so it holds exactly that generation's answer (one database server, whose
snapshots only move forward; see the doc for load-balanced replicas).

Redis failures never fail a search: commands have short timeouts, and a circuit breaker skips Redis
for ``REDIS_RETRY_AFTER`` seconds after a failure, then lets one request try again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from campus_search import metrics
from campus_search.config import Settings
from campus_search.retrieval.cache_backends import Backend, RedisBackend
from campus_search.retrieval.generation import GenerationTracker, read_generation
from campus_search.retrieval.params import SearchParams
from campus_search.retrieval.query_vectors import EMBEDDING_NS, TieredEmbeddingCache
from campus_search.retrieval.results import Hit, SearchOutcome, render_results
from campus_search.security.roles import Principal

log = logging.getLogger(__name__)

FORMAT = 3  # bump when the stored layout changes (2: count + rendered results; 3: + who stored it)
SEARCH_NS = "search"


def _count(operation: str, status: str) -> None:
    metrics.cache_op(operation, status)


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return {"$dt": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"cannot cache a {type(value).__name__}")


HIT_FIELDS = tuple(f.name for f in dataclasses.fields(Hit))


def owner_tag(user: Principal) -> str:
    """Who stored an entry, as a hash of the user id ('' for anonymous callers, who share one id): lets
    a caller be told of a cache hit on their own earlier search only (docs/security.md)."""
    if user.anonymous:
        return ""
    return hashlib.sha256(b"campus-search/cache-owner\x00" + user.user_id.encode()).hexdigest()[:32]


def encode_results(hits: list[Hit], owner: str = "") -> bytes:
    """What a result-cache entry holds: the count, a space, the owner tag, a newline, the response's
    rendered ``results`` array."""
    return f"{len(hits)} {owner}\n{render_results(hits)}".encode()


def decode_results(raw: bytes) -> tuple[int, str, str] | None:
    """(count, rendered results, owner tag) of an entry, or None if it is unreadable (then it is a miss)."""
    head, sep, body = raw.partition(b"\n")
    count, _, owner = head.partition(b" ")
    if not sep or not count.isdigit() or not body.startswith(b"[") or not body.endswith(b"]"):
        return None
    try:
        return int(count), body.decode(), owner.decode("ascii")
    except UnicodeDecodeError:
        return None


class ResultCache:
    """Cache-aside for :meth:`Services.run_search`. ``fetch`` returns ``(hits, from_cache)``."""

    def __init__(self, settings: Settings, backend: Backend, generation: GenerationTracker,
                 retrieval: dict[str, Any] | None = None, vectors: TieredEmbeddingCache | None = None) -> None:
        self.settings = settings
        self.backend = backend
        #: the searcher's query vectors when they are kept in the same Redis: read with the result's key and
        #: written with the result (one round trip each way for a search that runs, not two)
        self.vectors = vectors
        self.generation = generation
        self.prefix = settings.redis_key_prefix
        self.enabled = settings.cache_enabled
        self.hits = self.misses = self.stores = 0
        # SCORES_BM25_ROLES changes what an entry holds (scores.bm25 present or not) for a role
        self._static = json.dumps({"format": FORMAT, "hit": HIT_FIELDS, "retrieval": retrieval or {},
                                   "bm25_roles": sorted(settings.scores_bm25_roles)},
                                  sort_keys=True, default=str)

    def key(self, user: Principal, params: SearchParams, generation: str) -> str:
        fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
        # params.query is normalised already (SearchParams): the key is the text the search runs on
        fields["filters"] = dict(sorted(dict(params.filters).items()))
        payload = {"params": fields, "role": user.role.name, "scope": user.scope_key(), "campus": user.campus,
                   "generation": generation, "static": self._static}
        text = json.dumps(payload, sort_keys=True, default=_json_default, ensure_ascii=False)
        return f"{self.prefix}{SEARCH_NS}:{hashlib.sha256(text.encode()).hexdigest()}"

    def fetch(self, user: Principal, params: SearchParams, compute: Callable[[], list[Hit]]) -> SearchOutcome:
        if not self.enabled:
            return SearchOutcome(compute())
        vectors = self.vectors
        scope: contextlib.AbstractContextManager[list[tuple[str, bytes, int]]] = (
            vectors.request() if vectors is not None else contextlib.nullcontext([]))
        with scope as writes:
            asked = self.generation.clock()
            key = self.key(user, params, self.generation.current())
            if vectors is None or vectors.local.get(params.query) is not None:
                raw = self.backend.get(key)
            else:  # the query's vector in the same round trip, in case the search has to run
                raw, vector = self.backend.get_many([key, vectors.key(params.query)])
                vectors.seed(params.query, vector)
            if raw is not None:
                entry = decode_results(raw)
                if entry is not None:
                    self.hits += 1
                    _count("get", "hit")
                    owner = owner_tag(user)
                    return SearchOutcome([], from_cache=True, rendered=entry[1], count=entry[0],
                                         stored_by_caller=bool(owner) and entry[2] == owner)
            self.misses += 1
            _count("get", "miss")
            # The tag just read for the lookup (when it had to be read afresh) brackets the search as well
            # as a new read would: no second round trip for it.
            before = self.generation.read_since(asked) or self.generation.refresh()
            hits = compute()
        # Stored only if the generation did not move during the search: then the answer is exactly
        # generation ``before``'s. (If it moved, the next request computes and stores it.) A query vector
        # embedded meanwhile goes out in the same round trip.
        store = self.generation.refresh() == before
        if store:
            writes.append((self.key(user, params, before), encode_results(hits, owner_tag(user)),
                           self.settings.cache_ttl_search))
        if self.backend.set_many(writes) and store:
            self.stores += 1
            _count("set", "ok")
        return SearchOutcome(hits)

    def clear(self) -> int:
        """Delete this service's cached results and query embeddings (not rate-limit counters, not
        other applications' keys). In-process caches: this process only."""
        removed = self.backend.clear((SEARCH_NS, EMBEDDING_NS))
        _count("clear", "ok")
        log.info("cache cleared: %d keys", removed)
        return removed

    def health(self) -> dict[str, Any]:
        """The ``cache`` component of ``/health``. The cache is optional: when Redis is down searches
        run uncached, so ``required`` is False and ``status`` says ``degraded`` rather than down."""
        started = time.perf_counter()
        out = self.backend.health()
        out.update(backend=self.backend.kind, mode=self.backend.mode, enabled=self.enabled, required=False,
                   status="ok" if out["healthy"] else "degraded",
                   response_time=round(time.perf_counter() - started, 4))
        return out

    def stats(self) -> dict[str, Any]:
        """For ``/api/admin/stats``: the Redis server's figures (or this process's), plus this process's
        own hit/miss counts."""
        process: dict[str, Any] = {"hits": self.hits, "misses": self.misses, "stores": self.stores}
        if isinstance(self.backend, RedisBackend):
            process.update(skipped=self.backend.skipped, failures=self.backend.breaker.failures,
                           circuit=self.backend.breaker.state)
        out: dict[str, Any] = {"backend": self.backend.kind, "mode": self.backend.mode, "used_memory": None,
                               "connected_clients": None, "keyspace_hits": self.hits, "keyspace_misses": self.misses}
        out.update({k: v for k, v in self.backend.info().items() if v is not None})
        out["process"] = process
        return out

    def close(self) -> None:
        self.backend.close()


def build_cache(settings: Settings, db: Any, backend: Backend, retrieval: dict[str, Any] | None = None,
                query_vectors: Any = None) -> ResultCache:
    """The process's result cache in ``backend``, keyed by ``db``'s index generation and the retrieval
    configuration (``Searcher.describe()``); ``query_vectors``, the searcher's, share its round trips when
    they are kept in the same Redis."""
    generation = GenerationTracker(lambda: read_generation(db), settings.cache_generation_check)
    vectors = query_vectors if isinstance(query_vectors, TieredEmbeddingCache) and \
        query_vectors.backend is backend else None
    return ResultCache(settings, backend, generation, retrieval, vectors)
