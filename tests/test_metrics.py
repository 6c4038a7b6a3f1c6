"""GET /metrics: Prometheus text format, every SPEC §1 name, values that move, bounded label values.

Metrics are process-wide (as in production), so tests compare values before and after their own
requests instead of assuming a fresh registry.
"""

from __future__ import annotations

import random
import string
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from campus_search import metrics

SEARCH = "search_documents"  # the brief's label value (BRIEF.md, grafana/, prometheus/alerts.yml)

#: family name (as the parser reports it: counters without ``_total``) -> type
EXPECTED = {
    "vector_search_requests": "counter",
    "vector_search_request_duration_seconds": "histogram",
    "vector_search_active_connections": "gauge",
    "vector_search_db_pool_size": "gauge",
    "vector_search_db_pool_max_size": "gauge",
    "vector_search_db_pool_requests_waiting": "gauge",
    "vector_search_db_pool_errors": "counter",
    "vector_search_queries": "counter",
    "vector_search_zero_result_queries": "counter",
    "vector_search_cache_operations": "counter",
    "vector_search_embedding_requests": "counter",
    "vector_search_embedding_duration_seconds": "histogram",
    "vector_search_embedded_texts": "counter",
    "vector_search_rate_limited_requests": "counter",
    "vector_search_audit_write_failures": "counter",
    "vector_search_health_check_healthy": "gauge",
}


def scrape(client: Any) -> dict[str, Any]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.get_data(as_text=True))}


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    family = families.get(sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
                          .removesuffix("_bucket"))
    if family is None:
        return 0.0
    return sum(s.value for s in family.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def search(client: Any, auth: str, query: str, **config: Any) -> Any:
    body: dict[str, Any] = {"query": query}
    if config:
        body["config"] = config
    return client.post("/api/search", json=body, headers={"Authorization": auth})


def test_every_metric_name_is_exposed_with_the_right_type(client: Any, token: Any) -> None:
    staff = token("professional_services", departments=["IT Services"])
    assert search(client, staff, "how do I reset a staff password").status_code == 200
    assert search(client, staff, "zzqx unmatched gibberish", similarity_threshold=0.99).get_json()["count"] == 0
    assert client.get("/health").status_code == 200
    families = scrape(client)
    missing = {name for name in EXPECTED if name not in families}
    assert not missing, f"metrics missing from /metrics: {sorted(missing)}"
    for name, kind in EXPECTED.items():
        assert families[name].type == kind, name
    assert all(name.startswith("vector_search_") for name in EXPECTED)


def test_values_move_with_requests(client: Any, token: Any) -> None:
    staff = token("professional_services", sub="metrics-staff", departments=["IT Services"])
    before = scrape(client)
    query = "how do I renew my library books " + "".join(random.choices(string.ascii_lowercase, k=8))
    for _ in range(3):  # identical: the first is embedded and cached, the next two are cache hits
        assert search(client, staff, query).status_code == 200
    assert search(client, staff, "qqzx nothing matches this", similarity_threshold=0.99).status_code == 200
    assert client.post("/api/search", json={"query": "no token"}).status_code == 401
    after = scrape(client)

    def delta(sample: str, **labels: str) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    assert delta("vector_search_requests_total", method="POST", endpoint=SEARCH, status="200") == 4
    assert delta("vector_search_requests_total", method="POST", endpoint=SEARCH, status="401") == 1
    # the first scrape itself was counted after it answered
    assert delta("vector_search_requests_total", method="GET", endpoint="metrics", status="200") == 1
    assert delta("vector_search_request_duration_seconds_count", endpoint=SEARCH) == 5
    assert delta("vector_search_request_duration_seconds_sum", endpoint=SEARCH) > 0
    assert delta("vector_search_queries_total", user_role="staff", department="IT Services") == 4
    assert delta("vector_search_zero_result_queries_total", department="IT Services") == 1
    assert delta("vector_search_cache_operations_total", operation="get", status="hit") >= 2
    assert delta("vector_search_cache_operations_total", operation="get", status="miss") >= 2
    assert delta("vector_search_embedding_requests_total", provider="local", status="ok") >= 2
    assert delta("vector_search_embedding_duration_seconds_count", provider="local") >= 2
    assert value(after, "vector_search_db_pool_size") >= 1
    assert value(after, "vector_search_db_pool_max_size") >= value(after, "vector_search_db_pool_size")


def test_component_counters_record_what_they_are_told() -> None:
    families_before = {f.name: f for f in metrics.registry().collect()}

    def current(name: str, sample: str, **labels: str) -> float:
        fams = {f.name: f for f in metrics.registry().collect()}
        return sum(s.value for s in fams[name].samples
                   if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))

    assert "vector_search_rate_limited_requests" in families_before
    family, sample = "vector_search_rate_limited_requests", "vector_search_rate_limited_requests_total"
    rl = current(family, sample, user_role="student")
    af = current("vector_search_audit_write_failures", "vector_search_audit_write_failures_total")
    other = current("vector_search_cache_operations", "vector_search_cache_operations_total",
                    operation="other", status="other")
    metrics.rate_limited("student")
    metrics.audit_failure()
    metrics.cache_op("free text from a caller", "also free text")  # never becomes a label value
    assert current(family, sample, user_role="student") == rl + 1
    assert current("vector_search_audit_write_failures", "vector_search_audit_write_failures_total") == af + 1
    assert current("vector_search_cache_operations", "vector_search_cache_operations_total",
                   operation="other", status="other") == other + 1


def _random_text(rng: random.Random, n: int = 10) -> str:
    return "".join(rng.choices(string.ascii_letters + string.digits, k=n))


def test_label_values_stay_bounded_under_random_input(client: Any, token: Any, demo_app: Any) -> None:
    rng = random.Random(6)
    secrets_seen: list[str] = []
    for i in range(40):
        marker = "Z" + _random_text(rng)
        secrets_seen.append(marker)
        kind = i % 4
        if kind == 0:  # random query text, random department claim, unknown SSO role
            auth = token(rng.choice(["professional_services", "made_up_" + marker]), sub="user-" + marker,
                         departments=["Dept " + marker])
            search(client, auth, f"{marker} where is the library")
        elif kind == 1:  # a method nobody defined
            client.open("/api/search", method="X" + marker.upper()[:8])
        elif kind == 2:  # URLs that match no route
            client.get(f"/{marker}/{_random_text(rng)}?q={marker}")
        else:  # a search whose body is not even valid
            client.post("/api/search", data=marker, headers={"Authorization": token("student", sub=marker)})
    text = client.get("/metrics").get_data(as_text=True)
    for marker in secrets_seen:
        assert marker not in text and marker.lower() not in text.lower()

    endpoints = {metrics.endpoint_label(rule.endpoint) for rule in demo_app.url_map.iter_rules()} | {"unmatched"}
    families = {f.name: f for f in text_string_to_metric_families(text)}
    seen: dict[str, set[str]] = {}  # "family.label" -> values
    for family in families.values():
        if not family.name.startswith("vector_search_"):
            continue
        for s in family.samples:
            for label, val in s.labels.items():
                if label != "le":
                    seen.setdefault(f"{family.name}.{label}", set()).add(val)
    requests = "vector_search_requests"
    assert seen[f"{requests}.method"] <= metrics.METHODS | {"other"}
    assert "other" in seen[f"{requests}.method"]
    assert seen[f"{requests}.endpoint"] <= endpoints
    assert "unmatched" in seen[f"{requests}.endpoint"]
    assert seen[f"{requests}.status"] <= {str(code) for code in range(100, 600)}
    assert seen["vector_search_request_duration_seconds.endpoint"] <= endpoints
    assert seen["vector_search_queries.user_role"] <= metrics.ROLES | {"other"}
    assert seen["vector_search_cache_operations.operation"] <= metrics.CACHE_OPERATIONS | {"other"}
    assert seen["vector_search_cache_operations.status"] <= metrics.CACHE_STATUSES | {"other"}
    departments = seen["vector_search_queries.department"]
    assert len(departments) <= metrics.MAX_DEPARTMENT_LABELS + 2
    assert "other" in departments  # the random department claims all landed here
    for name, values in seen.items():
        assert len(values) <= metrics.MAX_DEPARTMENT_LABELS + 2 or name.endswith(".endpoint"), name


def test_endpoint_labels_are_the_briefs_view_names_and_unique(demo_app: Any, client: Any) -> None:
    endpoints = {rule.endpoint for rule in demo_app.url_map.iter_rules() if rule.endpoint != "static"}
    labels = {metrics.endpoint_label(e) for e in endpoints}
    assert len(labels) == len(endpoints), "two blueprints have a view of the same name: labels would merge"
    assert {"search_documents", "health_check", "metrics"} <= labels  # BRIEF.md's sample output
    assert metrics.endpoint_label(None) == "unmatched"
    client.get("/health/live")
    families = scrape(client)
    assert value(families, "vector_search_requests_total", method="GET", endpoint="liveness", status="200") >= 1
    assert value(families, "vector_search_requests_total", endpoint="ops.liveness") == 0
