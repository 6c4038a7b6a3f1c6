"""Pure logic of cache.py: circuit breaker, in-process LRU, generation memo, the stored format."""

from __future__ import annotations

import json

from campus_search.breaker import CircuitBreaker
from campus_search.retrieval.cache import decode_results, encode_results
from campus_search.retrieval.cache_backends import LocalBackend
from campus_search.retrieval.generation import GenerationTracker
from campus_search.retrieval.results import Hit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_on_failure_then_lets_exactly_one_probe_through() -> None:
    clock = Clock()
    b = CircuitBreaker(pause=5.0, clock=clock)
    assert b.state == "closed" and b.allow()
    b.failure(ConnectionError())
    assert b.state == "open" and not b.allow()
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.2
    assert b.state == "half-open"
    assert b.allow() is True  # the probe
    assert b.allow() is False  # everyone else keeps skipping while it runs
    b.failure(TimeoutError())  # probe failed: another full pause
    assert b.state == "open" and b.failures == 2 and b.last_error == "TimeoutError"
    clock.now += 5.1
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow() and b.allow()


def test_local_backend_expires_entries_and_stays_within_its_size() -> None:
    clock = Clock()
    cache = LocalBackend(max_bytes=1000, clock=clock)
    cache.set("p:search:a", b"A" * 200, ttl=10)
    assert cache.get("p:search:a") == b"A" * 200
    clock.now += 10
    assert cache.get("p:search:a") is None and cache.used == 0
    for name in "abcd":  # 4 x ~310 bytes > 1000: the least recently used one goes
        cache.set(f"p:search:{name}", name.encode() * 200, ttl=60)
        if name == "b":
            cache.get("p:search:a")  # read: a is now more recently used than b
    assert cache.used <= 1000
    assert cache.get("p:search:b") is None
    assert all(cache.get(f"p:search:{n}") is not None for n in "acd")
    assert cache.set("p:search:huge", b"x" * 5000, ttl=60) is False


def test_local_backend_clear_is_by_namespace() -> None:
    cache = LocalBackend(max_bytes=10_000)
    cache.set("p:search:1", b"1", ttl=60)
    cache.set("p:emb:1", b"1", ttl=60)
    cache.set("p:other:1", b"1", ttl=60)
    assert cache.clear(("search", "emb")) == 2
    assert cache.get("p:other:1") == b"1"


def test_generation_is_reused_for_at_most_max_age_seconds() -> None:
    clock = Clock()
    reads: list[int] = []

    def read() -> str:
        reads.append(1)
        return f"g{len(reads)}"

    tracker = GenerationTracker(read, max_age=1.0, clock=clock)
    assert tracker.current() == "g1"
    clock.now += 0.99
    assert tracker.current() == "g1" and len(reads) == 1
    clock.now += 0.02
    assert tracker.current() == "g2"
    assert tracker.refresh() == "g3"  # a miss always reads afresh
    always = GenerationTracker(read, max_age=0.0, clock=clock)
    assert always.current() != always.current()


def test_entries_hold_count_and_rendered_results_and_garbage_is_a_miss() -> None:
    hit = Hit(chunk_id=7, document_id="d", document_title="T", section_title=None, text="é 中\n\"q\"",
              page_number=3, raw_meta={"priority": 4}, similarity=0.1234567890123, relevance=0.5,
              combined_score=0.61)
    count, rendered, owner = decode_results(encode_results([hit, hit], "ab12")) or (None, None, None)
    assert count == 2 and json.loads(rendered) == [hit.as_json(), hit.as_json()] and owner == "ab12"
    assert decode_results(encode_results([])) == (0, "[]", "")
    for garbage in (b"not json", b"2\n{}", b"x\n[]", b"[1]", b"3\n[\xff]", b"2 \xff\n[]"):
        assert decode_results(garbage) is None




def test_permission_scope_is_unambiguous() -> None:
    """A department whose name contains the separator must not share cache entries with two others."""
    from campus_search.security.roles import DEFAULT_ROLES, Principal

    staff = DEFAULT_ROLES["staff"]
    two = Principal("a", staff, departments=("Arts", "Law"))
    one = Principal("b", staff, departments=("Arts,Law",))
    assert two.scope_key() != one.scope_key()
    assert two.scope_key() == Principal("c", staff, departments=("Law", "Arts", "Law")).scope_key()
    student = Principal("s", DEFAULT_ROLES["student"], departments=("Arts",))
    assert student.scope_key() == Principal("t", DEFAULT_ROLES["student"]).scope_key()  # public only either way
