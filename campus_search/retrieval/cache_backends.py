"""Where cached entries live: Redis (configured, or the embedded one; shared by every worker and replica,
behind a circuit breaker so a dead Redis costs no timeouts) or a bounded in-process LRU with TTL
(``REDIS_URL=memory://``). Both hold bytes under string keys; :func:`build_backend` picks one."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from campus_search import metrics
from campus_search.breaker import CircuitBreaker
from campus_search.config import Settings
from campus_search.errors import ServiceUnavailable


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

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        """Several keys in one round trip (MGET); all None when Redis fails."""
        return self._run("get", lambda: self.client.mget(keys)) or [None] * len(keys)

    def set_many(self, items: list[tuple[str, bytes, int]]) -> bool:
        """(key, value, ttl) items written in one round trip (a pipeline, not a transaction: each SET
        stands alone, as separate calls would)."""
        def write() -> bool:
            pipe = self.client.pipeline(transaction=False)
            for key, value, ttl in items:
                pipe.set(key, value, ex=ttl)
            return all(pipe.execute())
        return bool(self._run("set", write, False)) if items else True

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

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        return [self.get(key) for key in keys]

    def set_many(self, items: list[tuple[str, bytes, int]]) -> bool:
        return all([self.set(key, value, ttl) for key, value, ttl in items])

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


def build_backend(settings: Settings) -> Backend:
    """Redis when one is configured or embedded (:func:`campus_search.storage.embedded_redis.resolve`),
    else this process's bounded LRU."""
    from campus_search.storage.embedded_redis import resolve

    url, mode = resolve(settings)
    if url:
        return RedisBackend(url, timeout=settings.redis_timeout, pause=settings.redis_retry_after,
                            prefix=settings.redis_key_prefix, mode=mode)
    return LocalBackend(settings.cache_local_max_mb * 1024 * 1024)
