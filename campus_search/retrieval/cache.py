"""Search-result cache (cache-aside) and the shared query-embedding cache.

Redis (``REDIS_URL``/``REDIS_HOST``, or without them the embedded Redis under ``DATA_DIR``: see
embedded_redis.py), shared by every worker and replica; with ``REDIS_URL=memory://`` a bounded
in-process LRU with TTL in each process. docs/caching-and-rate-limits.md is the long form.

A result key is the SHA-256 of everything that decides the answer:

- the search parameters: the query with whitespace collapsed (NFC), the validated filters,
  ``max_results`` after the role's clamp, the similarity threshold (every ``SearchParams`` field);
- the caller's permission scope: role name, ``Principal.scope_key()`` (clearance and department
  scope) and campus (it changes ``combined_score``), so a result is only ever served to callers who
  would get exactly the same answer, never to one who may see less;
- the index generation tag: ``index_state.generation`` (bumped in the same transaction as every
  ingest or delete) plus the row's ``xmin``, the database name and the cluster's system identifier,
  so neither a restored backup nor a re-created database whose counter restarted can reuse entries;
- the retrieval configuration (``Searcher.describe()``) and the result format.

Freshness: a process reuses the generation tag it read for at most ``CACHE_GENERATION_CHECK`` seconds
(default 1) on cache hits; a miss always reads it afresh. So a committed change stops cached answers
within that bound. An entry is stored only when the generation read just before the search equals the
one read just after it, so it holds exactly that generation's answer (one database server, whose
snapshots only move forward; see the doc for load-balanced replicas).

Redis failures never fail a search: commands have short timeouts, and a circuit breaker skips Redis
for ``REDIS_RETRY_AFTER`` seconds after a failure, then lets one request try again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from campus_search import metrics
from campus_search.breaker import CircuitBreaker
from campus_search.config import Settings
from campus_search.errors import ServiceUnavailable
from campus_search.retrieval.search import Hit, SearchOutcome, SearchParams, render_results
from campus_search.security.roles import Principal

log = logging.getLogger(__name__)

FORMAT = 3  # bump when the stored layout changes (2: count + rendered results; 3: + who stored it)
SEARCH_NS = "search"
EMBEDDING_NS = "emb"
#: One statement, so every part comes from the same snapshot.
GENERATION_SQL = ("SELECT i.generation, i.xmin::text, current_database(), "
                  "(SELECT system_identifier FROM pg_control_system())::text FROM index_state i")


def _count(operation: str, status: str) -> None:
    metrics.cache_op(operation, status)


def redis_client(url: str, timeout: float) -> redis.Redis:
    """A client that fails fast: short timeouts, and one immediate retry only for a dropped connection
    (a pooled socket that died with a restarted server), never for a timeout."""
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)))


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisBackend:
    """Redis behind the circuit breaker. Reads and writes never raise; a failure counts as a miss."""

    kind = "redis"

    def __init__(self, url: str, *, timeout: float, pause: float, prefix: str, mode: str = "external") -> None:
        self.mode = mode  # "external" (a configured server) or "embedded" (embedded_redis.py)
        self.client = redis_client(url, timeout)
        self.breaker = CircuitBreaker(pause, name="redis")
        self.prefix = prefix
        self.skipped = 0  # calls not made because the circuit was open

    def _run(self, operation: str, fn: Callable[[], Any], default: Any = None) -> Any:
        if not self.breaker.allow():
            self.skipped += 1
            return default
        try:
            value = fn()
        except redis.RedisError as exc:
            self.breaker.failure(exc)
            _count(operation, "error")
            return default
        self.breaker.success()
        return value

    def get(self, key: str) -> bytes | None:
        return self._run("get", lambda: self.client.get(key))

    def set(self, key: str, value: bytes, ttl: int) -> bool:
        return bool(self._run("set", lambda: self.client.set(key, value, ex=ttl), False))

    # The write fence (replicas.py): the primary's WAL position after the latest search-visible write,
    # kept at its maximum. An hour's TTL: a fence from an abandoned timeline (point-in-time recovery) or
    # another cluster stops holding reads on the primary by then.
    FENCE_TTL = 3600
    _FENCE_MAX = ("local v = tonumber(redis.call('GET', KEYS[1]) or '0') "
                  "if tonumber(ARGV[1]) > v then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end return 1")

    def fence_get(self) -> int | None:
        raw = self._run("get", lambda: self.client.get(f"{self.prefix}write-fence"))
        return int(raw) if raw is not None and raw.isdigit() else None

    def fence_advance(self, lsn: int) -> None:
        self._run("set", lambda: self.client.eval(self._FENCE_MAX, 1, f"{self.prefix}write-fence", int(lsn),
                                                  self.FENCE_TTL))

    def clear(self, namespaces: tuple[str, ...]) -> int:
        """UNLINK this service's keys in ``namespaces`` (SCAN by prefix; never FLUSHDB/FLUSHALL)."""
        if not self.breaker.allow():
            raise ServiceUnavailable("cache unavailable, try again shortly", headers={"Retry-After": "5"})
        removed = 0
        try:
            for ns in namespaces:
                batch: list[bytes] = []
                for key in self.client.scan_iter(match=_glob_escape(f"{self.prefix}{ns}:") + "*", count=1000):
                    batch.append(key)
                    if len(batch) >= 500:
                        removed += int(self.client.unlink(*batch))
                        batch.clear()
                if batch:
                    removed += int(self.client.unlink(*batch))
        except redis.RedisError as exc:
            self.breaker.failure(exc)
            raise ServiceUnavailable("cache unavailable, try again shortly", headers={"Retry-After": "5"}) from exc
        self.breaker.success()
        return removed

    def health(self) -> dict[str, Any]:
        # Health probes ping even while the circuit is open: that is how recovery is noticed between
        # searches, and the probe is cheap and already bounded by the timeout.
        try:
            self.client.ping()
        except redis.RedisError as exc:
            self.breaker.failure(exc)
            return {"healthy": False, "connection_active": False, "circuit": self.breaker.state,
                    "error": exc.__class__.__name__}
        self.breaker.success()
        return {"healthy": True, "connection_active": True, "circuit": self.breaker.state}

    def info(self) -> dict[str, Any]:
        fields = ("used_memory", "connected_clients", "keyspace_hits", "keyspace_misses")
        raw = self._run("get", lambda: self.client.info(), {})
        return {name: raw.get(name) for name in fields}

    def close(self) -> None:
        self.client.close()


class LocalBackend:
    """In-process LRU with per-entry TTL, bounded by total size in bytes (one per process)."""

    kind = "memory"
    mode = "in-process"

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self.used = 0
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _size(key: str, value: bytes) -> int:
        return len(key) + len(value) + 100  # rough per-entry overhead

    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            if entry[0] <= self.clock():
                self._drop(key)
                return None
            self._data.move_to_end(key)
            return entry[1]

    def set(self, key: str, value: bytes, ttl: int) -> bool:
        size = self._size(key, value)
        if size > self.max_bytes:
            return False
        with self._lock:
            if key in self._data:
                self._drop(key)
            self._data[key] = (self.clock() + ttl, value)
            self.used += size
            while self.used > self.max_bytes:
                self._drop(next(iter(self._data)))
        return True

    def _drop(self, key: str) -> None:
        _, value = self._data.pop(key)
        self.used -= self._size(key, value)

    def clear(self, namespaces: tuple[str, ...]) -> int:
        with self._lock:
            doomed = [k for k in self._data if any(k.split(":")[-2] == ns for ns in namespaces)]
            for key in doomed:
                self._drop(key)
        return len(doomed)

    def health(self) -> dict[str, Any]:
        return {"healthy": True, "connection_active": False, "circuit": "closed"}

    def info(self) -> dict[str, Any]:
        return {"used_memory": self.used, "connected_clients": 0, "entries": len(self._data)}

    def close(self) -> None:
        with self._lock:
            self._data.clear()
            self.used = 0


Backend = RedisBackend | LocalBackend


class GenerationTracker:
    """The index generation tag, re-read at most every ``max_age`` seconds on the hit path."""

    def __init__(self, read: Callable[[], str], max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self.max_age = max_age
        self.clock = clock
        self._value: str | None = None
        self._read_at = float("-inf")

    def current(self) -> str:
        if self._value is not None and self.clock() - self._read_at < self.max_age:
            return self._value
        return self.refresh()

    def invalidate(self) -> None:
        """Make the next :meth:`current` read the tag afresh (a write this process knows of moved it)."""
        self._read_at = float("-inf")

    def refresh(self) -> str:
        started = self.clock()  # age counts from before the read: conservative
        value = self._read()
        self._value, self._read_at = value, started
        return value


def read_generation(db: Any) -> str:
    """``sysid:database:generation:xmin`` of ``index_state``, from the read pool (where searches run)."""
    with db.connection(read=True) as conn:
        row = conn.execute(GENERATION_SQL).fetchone()
    if row is None:
        return "none"
    generation, xmin, database, sysid = row
    return f"{sysid}:{database}:{generation}:{xmin}"


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
                 retrieval: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.backend = backend
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
        raw = self.backend.get(self.key(user, params, self.generation.current()))
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
        before = self.generation.refresh()
        hits = compute()
        # Stored only if the generation did not move during the search: then the answer is exactly
        # generation ``before``'s. (If it moved, the next request computes and stores it.)
        if self.generation.refresh() == before and self.backend.set(
                self.key(user, params, before), encode_results(hits, owner_tag(user)),
                self.settings.cache_ttl_search):
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


class TieredEmbeddingCache:
    """Query vectors: this process's LRU first, then Redis (shared by all processes), then the model.
    Same ``get``/``put`` interface as :class:`~campus_search.retrieval.search.QueryEmbeddingCache`."""

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


def build_cache(settings: Settings, db: Any, searcher: Any) -> ResultCache:
    """The process's result cache; with Redis, also puts the shared layer under the searcher's
    query-embedding cache."""
    from campus_search.storage.embedded_redis import resolve

    url, mode = resolve(settings)
    backend: Backend
    if url:
        backend = RedisBackend(url, timeout=settings.redis_timeout, pause=settings.redis_retry_after,
                               prefix=settings.redis_key_prefix, mode=mode)
        if settings.cache_enabled:
            embedder = searcher.embedder
            searcher.query_vectors = TieredEmbeddingCache(
                searcher.query_vectors, backend, model=embedder.model_name, dimension=embedder.dimension,
                ttl=settings.cache_ttl_embedding)
    else:
        backend = LocalBackend(settings.cache_local_max_mb * 1024 * 1024)
    describe = getattr(searcher, "describe", None)
    generation = GenerationTracker(lambda: read_generation(db), settings.cache_generation_check)
    return ResultCache(settings, backend, generation, describe() if describe else None)
