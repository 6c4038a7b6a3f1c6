"""The search-result cache against a real redis-server and the real PostgreSQL + pgvector index:
repeats are served from cache, permission scopes never share entries, index changes invalidate, and
cache clear touches only this service's keys."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from campus_search.app import create_app
from campus_search.embedding.local import LocalMiniLM
from campus_search.ingest.metadata import AccessMetadata
from campus_search.ingest.sources import Block, ParsedDocument
from campus_search.retrieval.query_vectors import TieredEmbeddingCache, query_vector_cache
from campus_search.security.roles import DEFAULT_ROLES, Principal, is_visible

QUERY = {"query": "eduroam wifi connection", "config": {"max_results": 10, "similarity_threshold": -1.0}}

DOCS = {
    "wifi-public": ("Eduroam wifi setup", "Connect your laptop or phone to the eduroam wifi network with your "
                    "university username and password.", {}),
    "wifi-it": ("Eduroam wifi administration", "IT Services staff manage the eduroam wifi RADIUS servers and "
                "certificates.", {"department": "IT Services", "visibility": "department", "clearance_level": 3}),
    "wifi-finance": ("Eduroam wifi for finance kiosks", "Finance staff register payment kiosks on the eduroam "
                     "wifi network.", {"department": "Finance", "visibility": "department", "clearance_level": 3}),
    "wifi-secret": ("Eduroam wifi root credentials", "Restricted: the eduroam wifi controller root credentials "
                    "and recovery keys.", {"department": "IT Services", "clearance_level": 5}),
    "exams": ("Exam timetable", "The exam timetable is published six weeks before the exam diet.", {}),
}


def doc(ext_id: str, title: str, text: str, meta: dict[str, Any]) -> ParsedDocument:
    return ParsedDocument(external_id=ext_id, title=title, blocks=[Block(text)], metadata=dict(meta), source=ext_id)


def ingest(services: Any, docs: dict[str, tuple[str, str, dict[str, Any]]]) -> None:
    report = services.ingester.ingest([doc(k, *v) for k, v in docs.items()], AccessMetadata())
    assert report.failed == 0


@pytest.fixture
def cached_app(settings_factory: Callable[..., Any], services_factory: Callable[..., Any], redis_server: Any,
               redis_prefix: str) -> Callable[..., tuple[Any, Any]]:
    """factory(**settings) -> (services, test client) on a fresh database holding DOCS, caching in Redis."""

    def make(**overrides: Any) -> tuple[Any, Any]:
        settings = settings_factory(redis_url=redis_server.url, redis_key_prefix=redis_prefix, **overrides)
        services = services_factory(settings)
        ingest(services, DOCS)
        app = create_app(services)
        app.config["TESTING"] = True
        return services, app.test_client()

    return make


def search(client: Any, auth: str, body: dict[str, Any] = QUERY) -> dict[str, Any]:
    r = client.post("/api/search", json=body, headers={"Authorization": auth})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def ids(body: dict[str, Any]) -> set[str]:
    return {h["document_id"] for h in body["results"]}


def results(body: dict[str, Any]) -> list[dict[str, Any]]:
    return body["results"]


def test_repeated_query_is_served_from_redis(cached_app: Any, token: Any, redis_server: Any,
                                             redis_prefix: str) -> None:
    services, client = cached_app()
    auth = token("student", sub="s1")
    first = search(client, auth)
    assert first["from_cache"] is False and first["count"] > 0
    r = redis_server.client()
    assert len(r.keys(redis_prefix + "search:*")) == 1
    second = search(client, auth)
    assert second["from_cache"] is True
    assert results(second) == results(first)  # the same answer, field for field
    # Same query with extra whitespace: the same entry. Another page size: another entry.
    spaced = search(client, auth, {**QUERY, "query": "  eduroam   wifi connection "})
    assert spaced["from_cache"] is True
    other = search(client, auth, {**QUERY, "config": {"max_results": 2, "similarity_threshold": -1.0}})
    assert other["from_cache"] is False and other["count"] == 2
    filtered = search(client, auth, {**QUERY, "filters": {"min_priority": 3}})
    assert filtered["from_cache"] is False
    assert len(r.keys(redis_prefix + "search:*")) == 3
    stats = services.cache.stats()  # the cache section of /api/admin/stats
    assert stats["backend"] == "redis" and stats["used_memory"] > 0 and stats["connected_clients"] >= 1
    assert stats["process"] == {"hits": 2, "misses": 3, "stores": 3, "skipped": 0, "failures": 0,
                                "circuit": "closed"}


def test_less_access_never_gets_a_result_cached_for_more(cached_app: Any, token: Any) -> None:
    services, client = cached_app()
    callers = [  # most access first, so every later caller could only be wrongly served from cache
        ("admin", token("admin", sub="a1"), DEFAULT_ROLES["admin"], ()),
        ("academic", token("academic", sub="ac1"), DEFAULT_ROLES["academic"], ()),
        ("staff-it", token("staff", sub="st1", departments=["IT Services"]), DEFAULT_ROLES["staff"],
         ("IT Services",)),
        ("staff-finance", token("staff", sub="st2", departments=["Finance"]), DEFAULT_ROLES["staff"], ("Finance",)),
        ("student", token("student", sub="s1", departments=["IT Services"]), DEFAULT_ROLES["student"],
         ("IT Services",)),
    ]
    seen: dict[str, set[str]] = {}
    for name, auth, role, depts in callers:
        body = search(client, auth)
        assert body["from_cache"] is False, f"{name} was served an entry computed for someone else"
        user = Principal(user_id=name, role=role, departments=depts)
        for hit in results(body):
            assert is_visible(hit["metadata"], user), (name, hit["document_id"])
        seen[name] = ids(body)
        again = search(client, auth)
        assert again["from_cache"] is True and ids(again) == seen[name]
    assert "wifi-secret" in seen["admin"] and "wifi-secret" not in seen["academic"]
    assert seen["staff-it"] >= {"wifi-public", "wifi-it"} and "wifi-finance" not in seen["staff-it"]
    assert seen["staff-finance"] >= {"wifi-public", "wifi-finance"} and "wifi-it" not in seen["staff-finance"]
    assert seen["student"] == {"wifi-public", "exams"}

    # Equal scope shares entries: another IT staff member, and a student whatever department they name.
    # (Served from cache, but not told so: another person's search stored those entries.)
    hits = services.cache.hits
    same_scope = search(client, token("staff", sub="st9", departments=["IT Services"]))
    assert services.cache.hits == hits + 1 and ids(same_scope) == seen["staff-it"]
    assert search(client, token("student", sub="s2"))["from_cache"] is False
    assert services.cache.hits == hits + 2
    # The campus changes combined_score, so it is part of the key.
    kb = search(client, token("staff", sub="st1", departments=["IT Services"], campus="King's Buildings"))
    assert kb["from_cache"] is False


def test_ingest_metadata_change_and_delete_invalidate(cached_app: Any, services_factory: Any, token: Any) -> None:
    services, client = cached_app(cache_generation_check=0.0)
    # Changes come from another process's view of the same database, as `campus-search ingest` would.
    writer = services_factory(services.settings)
    student = token("student", sub="s1")
    search(client, student)
    assert search(client, student)["from_cache"] is True

    ingest(writer, {"wifi-new": ("Eduroam wifi on the new campus", "The new campus has eduroam wifi in every "
                                 "building.", {})})
    after_add = search(client, student)
    assert after_add["from_cache"] is False and "wifi-new" in ids(after_add)
    assert search(client, student)["from_cache"] is True

    # Metadata only (no re-embedding): the public guide becomes clearance 3; students must lose it now.
    title, text, _ = DOCS["wifi-public"]
    ingest(writer, {"wifi-public": (title, text, {"clearance_level": 3, "visibility": "public"})})
    after_meta = search(client, student)
    assert after_meta["from_cache"] is False and "wifi-public" not in ids(after_meta)

    assert writer.ingester.delete(["wifi-new"]) == 1
    after_delete = search(client, student)
    assert after_delete["from_cache"] is False and "wifi-new" not in ids(after_delete)


def test_cache_clear_removes_only_this_services_keys(cached_app: Any, token: Any, redis_server: Any,
                                                     redis_prefix: str) -> None:
    services, client = cached_app()
    r = redis_server.client()
    foreign = {"other-app:search:1": b"x", "campus-search:v2:search:1": b"x",
               redis_prefix.rstrip(":") + "-staging:search:1": b"x", redis_prefix + "rl:LIMITER/user:1": b"7"}
    r.mset(foreign)
    auth = token("student", sub="s1")
    search(client, auth)
    assert r.keys(redis_prefix + "search:*") and r.keys(redis_prefix + "emb:*")

    assert client.post("/api/admin/cache/clear").status_code == 401
    denied = client.post("/api/admin/cache/clear", headers={"Authorization": token("staff")})
    assert denied.status_code == 403 and denied.get_json()["error"]["code"] == "forbidden"
    assert r.keys(redis_prefix + "search:*"), "a refused clear changes nothing"

    ok = client.post("/api/admin/cache/clear", headers={"Authorization": token("admin", sub="root")})
    assert ok.status_code == 200, ok.get_json()
    body = ok.get_json()
    assert body["cleared"] is True and body["keys_removed"] == 2 and body["backend"] == "redis"
    assert not r.keys(redis_prefix + "search:*") and not r.keys(redis_prefix + "emb:*")
    assert {k: r.get(k) for k in foreign} == foreign  # other services, other versions, rate-limit counters
    with services.db.connection() as conn:  # audited as an admin action (SPEC §3)
        audited = conn.execute("SELECT action, user_id, success, details FROM audit_log WHERE kind = 'admin'"
                               ).fetchall()
    assert [(a, u, ok, json.loads(d)) for a, u, ok, d in audited] == [
        ("cache.clear", "root", True, {"backend": "redis"})]  # written before the clear
    assert search(client, auth)["from_cache"] is False


def test_query_embeddings_are_shared_through_redis(cached_app: Any, redis_server: Any, redis_prefix: str,
                                                   embedder: Any, token: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    services, client = cached_app()
    search(client, token("student"))
    r = redis_server.client()
    keys = r.keys(redis_prefix + "emb:*")
    assert len(keys) == 1 and len(r.get(keys[0])) == embedder.dimension * 4
    # A process with an empty local LRU (another worker) finds the vector in Redis.
    fresh = query_vector_cache(services.settings, services.cache.backend, embedder)
    assert isinstance(fresh, TieredEmbeddingCache)
    vector = fresh.get(QUERY["query"])
    assert vector is not None
    np.testing.assert_array_equal(vector, embedder.embed_query([QUERY["query"]])[0])
    assert fresh.get("a query nobody asked") is None
    # ...but a process that embeds queries with the other graph (EMBEDDING_QUERY_INT8) does not: its
    # vectors are another computation, and the two are never mixed
    other = LocalMiniLM(threads=1, query_int8=embedder.query_graph != "int8", cache_dir=embedder.cache_dir)
    assert query_vector_cache(services.settings, services.cache.backend, other).get(QUERY["query"]) is None
    # ...nor one whose int8 graph is another recipe (a server of another version on the same Redis)
    newer = LocalMiniLM(threads=1, query_int8=True, cache_dir=embedder.cache_dir)
    assert query_vector_cache(services.settings, services.cache.backend, newer).get(QUERY["query"]) is not None \
        or embedder.query_graph != "int8"
    monkeypatch.setattr("campus_search.embedding.local.RECIPE", "another-recipe")
    assert newer.query_graph_id == "int8/another-recipe"
    assert query_vector_cache(services.settings, services.cache.backend, newer).get(QUERY["query"]) is None


def test_without_redis_the_in_process_cache_serves_repeats(client: Any, token: Any, demo_services: Any) -> None:
    assert demo_services.cache.backend.kind == "memory"
    body = {"query": "renewing library books online (in-process cache test)"}
    auth = token("academic", sub="cache-local")
    first = search(client, auth, body)
    second = search(client, auth, body)
    assert (first["from_cache"], second["from_cache"]) == (False, True)
    assert results(second) == results(first)
    assert search(client, token("student", sub="cache-local-2"), body)["from_cache"] is False


def test_cache_disabled_never_claims_a_hit(cached_app: Any, token: Any, redis_server: Any,
                                           redis_prefix: str) -> None:
    _, client = cached_app(cache_enabled=False)
    auth = token("student")
    assert [search(client, auth)["from_cache"] for _ in range(3)] == [False, False, False]
    assert not redis_server.client().keys(redis_prefix + "*")


def test_a_result_computed_while_the_index_changed_is_not_stored(cached_app: Any, services_factory: Any,
                                                                  token: Any) -> None:
    """The guard in ResultCache.fetch: an answer is stored only if the index generation did not move
    while it was computed. Here another process (as `campus-search ingest` would) raises the public
    guide to clearance 3 *during* a student's search; that answer (still showing the guide) must not be
    cached, or the student keeps getting it for as long as this process reuses the old generation --
    60 s here (the most allowed), so no clock decides the outcome."""
    services, client = cached_app(cache_generation_check=60.0)
    writer = services_factory(services.settings)
    student = token("student", sub="s1")
    original = services.searcher.search
    changed: list[bool] = []

    def search_then_change(*args: Any, **kwargs: Any) -> Any:
        hits = original(*args, **kwargs)
        if not changed:
            title, text, _ = DOCS["wifi-public"]
            ingest(writer, {"wifi-public": (title, text, {"clearance_level": 3, "visibility": "public"})})
            changed.append(True)
        return hits

    services.searcher.search = search_then_change  # type: ignore[method-assign]
    during = search(client, student)
    assert changed and during["from_cache"] is False and "wifi-public" in ids(during)  # computed before
    after = search(client, student)
    assert "wifi-public" not in ids(after), "a result of the old index was cached and served"
    assert after["from_cache"] is False
    assert search(client, student)["from_cache"] is True  # the settled answer is cached as usual


def test_the_shipped_freshness_window_is_one_second_through_the_api(cached_app: Any, services_factory: Any,
                                                                    token: Any) -> None:
    """With the shipped CACHE_GENERATION_CHECK (1 s), a committed change may be missed by cached searches
    for under a second and never longer. The process's clock is replaced so the window, not the speed of
    this machine, decides."""
    from campus_search.config import Settings

    services, client = cached_app()
    assert services.settings.cache_generation_check == Settings().cache_generation_check == 1.0
    tracker = services.cache.generation
    assert tracker.max_age == 1.0
    now = [1000.0]
    tracker.clock = lambda: now[0]
    writer = services_factory(services.settings)
    student = token("student", sub="s1")
    assert "wifi-public" in ids(search(client, student))
    assert search(client, student)["from_cache"] is True
    title, text, _ = DOCS["wifi-public"]
    ingest(writer, {"wifi-public": (title, text, {"clearance_level": 3, "visibility": "public"})})
    now[0] += 0.9  # inside the window: the generation read 0.9 s ago is reused
    stale = search(client, student)
    assert stale["from_cache"] is True and "wifi-public" in ids(stale)
    now[0] += 0.2  # past it: the generation is read again, the change is seen
    fresh = search(client, student)
    assert fresh["from_cache"] is False and "wifi-public" not in ids(fresh)


def test_from_cache_tells_non_admins_only_of_their_own_searches(cached_app: Any, token: Any) -> None:
    """Issue 16: ``from_cache: true`` on a student's first search would tell them that somebody in the
    same permission scope searched these exact words within CACHE_TTL_SEARCH. Non-admins are told only
    of hits on their own earlier searches; admins (FROM_CACHE_ROLES) of every hit; the audit record
    keeps the truth for everyone."""
    services, client = cached_app()
    body = {**QUERY, "query": "counselling appointment for anxiety"}
    first, again = token("student", sub="s1"), token("student", sub="s2")
    assert search(client, first, body)["from_cache"] is False
    assert search(client, first, body)["from_cache"] is True  # their own earlier search
    hits = services.cache.hits
    other = client.post("/api/search", json=body, headers={"Authorization": again})
    assert other.status_code == 200 and other.get_json()["from_cache"] is False
    assert services.cache.hits == hits + 1  # it was a hit: only the disclosure differs
    assert search(client, again, body)["from_cache"] is False  # still s1's entry
    with services.db.connection() as conn:
        (details,) = conn.execute("SELECT details FROM audit_log WHERE request_id = %s",
                                  (other.headers["X-Request-ID"],)).fetchone()
    assert json.loads(details)["from_cache"] is True
    # admins are told of every hit, including one another admin's search stored
    assert search(client, token("admin", sub="a1"), body)["from_cache"] is False
    assert search(client, token("admin", sub="a2"), body)["from_cache"] is True
    # anonymous callers share one user id, so no entry is ever "their own"
    _, anon = cached_app(allow_anonymous=True)
    anon_body = {**QUERY, "query": "anonymous cache disclosure check"}
    flags = [anon.post("/api/search", json=anon_body).get_json()["from_cache"] for _ in range(2)]
    assert flags == [False, False]


def test_from_cache_roles_is_configurable(cached_app: Any, token: Any) -> None:
    _, client = cached_app(from_cache_roles=("student",))
    body = {**QUERY, "query": "exam timetable publication"}
    assert search(client, token("student", sub="s1"), body)["from_cache"] is False
    assert search(client, token("student", sub="s2"), body)["from_cache"] is True
    _, nobody = cached_app(from_cache_roles=())
    assert search(nobody, token("admin", sub="a1"), body)["from_cache"] is False
    assert search(nobody, token("admin", sub="a2"), body)["from_cache"] is False
    assert search(nobody, token("admin", sub="a2"), body)["from_cache"] is False  # a1 stored it
    assert search(nobody, token("admin", sub="a1"), body)["from_cache"] is True


def test_scores_bm25_setting_is_part_of_the_cache_key(cached_app: Any, services_factory: Any, token: Any) -> None:
    """Two deployments of one index and one Redis that disagree on SCORES_BM25_ROLES never serve each
    other's entries: one holds scores.bm25 for students, the other must not (and the reverse)."""
    services, hidden = cached_app()
    shown_settings = dataclasses.replace(services.settings, scores_bm25_roles=("admin", "student"))
    shown = create_app(services_factory(shown_settings)).test_client()
    auth = token("student", sub="s1")
    first = search(hidden, auth)
    assert first["count"] > 0 and not any("bm25" in h["scores"] for h in first["results"])
    assert search(hidden, auth)["from_cache"] is True  # stored, and this caller's own
    other = search(shown, auth)
    assert other["from_cache"] is False and all("bm25" in h["scores"] for h in other["results"])
