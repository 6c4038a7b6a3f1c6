"""``POST /api/search`` — the main endpoint (SPEC §1)."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

from flask import Blueprint, current_app, g, request

from campus_search.api import extension
from campus_search.api.auditing import audit_search_response
from campus_search.errors import BadRequest, Forbidden, PayloadTooLarge
from campus_search.retrieval.params import SearchParams, validate_filters
from campus_search.retrieval.results import SearchOutcome
from campus_search.security.auth import authenticate
from campus_search.security.roles import Principal

log = logging.getLogger(__name__)

bp = Blueprint("search", __name__)
bp.after_request(audit_search_response)  # one audit record per search, success or failure (api/auditing.py)

TOP_LEVEL = {"query", "filters", "config", "user"}
CONFIG_KEYS = {"max_results", "similarity_threshold"}


def json_body() -> dict[str, Any]:
    """The request body as a JSON object, or a 400/413 that says what is wrong."""
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    data = request.get_json(force=True, silent=True, cache=True)
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    try:  # JSON may escape lone surrogates ("\ud800"), which are not text and cannot reach the database
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("request body contains invalid Unicode (a lone surrogate)") from None
    return data


def parse_search_request(data: dict[str, Any], user: Principal) -> SearchParams:
    settings = extension.current().settings
    unknown = sorted(set(data) - TOP_LEVEL)
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(unknown)}", details={"allowed": sorted(TOP_LEVEL)})
    query = data.get("query")
    if query is None:
        raise BadRequest("query is required")
    if not isinstance(query, str):
        raise BadRequest("query must be a string")
    query = query.strip()
    if not query:
        raise BadRequest("query must not be empty")
    if len(query) > settings.max_query_chars:
        raise BadRequest(f"query is longer than {settings.max_query_chars} characters")
    if "\x00" in query:
        raise BadRequest("query contains a NUL character")
    if "user" in data and not isinstance(data["user"], dict):
        raise BadRequest("user must be an object (it is ignored: identity comes from the bearer token)")
    body_user = data.get("user")
    if body_user is not None:
        # Identity comes from the token only. An old client's matching user object is tolerated;
        # one that claims to be somebody else is an escalation attempt and is refused.
        claimed = body_user.get("user_id")
        if claimed is not None and str(claimed) != user.user_id:
            log.warning("refused: body user %r does not match token subject %r", str(claimed)[:100],
                        user.user_id[:100])
            raise Forbidden("the user in the request body does not match the bearer token")
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise BadRequest("config must be an object")
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise BadRequest(f"unknown config fields: {', '.join(unknown)}", details={"allowed": sorted(CONFIG_KEYS)})
    requested = config.get("max_results")
    max_results = settings.default_max_results if requested is None else requested
    if isinstance(max_results, bool) or not isinstance(max_results, int) or max_results < 1:
        raise BadRequest("config.max_results must be a positive integer")
    cap = min(user.role.max_results, settings.max_results_per_query)
    # Said out loud, not silently: the response's "applied" reports the value used and whether it was cut.
    g.search_applied = {"max_results": min(max_results, cap), "requested_max_results": requested,
                        "max_results_cap": cap, "clamped": max_results > cap}
    max_results = min(max_results, cap)
    threshold = config.get("similarity_threshold", settings.similarity_threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold) \
            or not -1.0 <= threshold <= 1.0:
        raise BadRequest("config.similarity_threshold must be a number between -1 and 1")
    filters = validate_filters(data.get("filters"), user)
    g.search_applied["similarity_threshold"] = float(threshold)
    return SearchParams(query=query, filters=filters, max_results=max_results,
                        similarity_threshold=float(threshold))


def disclosed_from_cache(outcome: SearchOutcome, user: Principal, roles: tuple[str, ...]) -> bool:
    """What the caller is told in ``from_cache``. A hit on an entry somebody else's search stored would
    tell the caller that someone in the same permission scope searched these exact words recently, so
    only FROM_CACHE_ROLES (admins by default) learn of every hit; anyone else learns only of hits on
    their own earlier searches. The audit record keeps the truth."""
    if not outcome.from_cache:
        return False
    return outcome.stored_by_caller or user.role.name in roles


@bp.post("/api/search")
def search_documents() -> Any:
    started = time.perf_counter()
    services = extension.services()
    user = authenticate(services.settings)
    params = g.search_params = parse_search_request(json_body(), user)
    outcome = g.search_outcome = services.run_search(user, params)
    rest = {
        "count": outcome.count,
        "query": params.query,
        "response_time": round(time.perf_counter() - started, 4),
        "from_cache": disclosed_from_cache(outcome, user, services.settings.from_cache_roles),
        "applied": g.search_applied,
        "request_id": g.request_id,
        "user_id": user.user_id,
        "timestamp": round(time.time(), 3),
    }
    # The results array is spliced in as rendered JSON: a cache hit hands it over as stored.
    body = '{"results":' + outcome.results_json() + "," + json.dumps(rest, ensure_ascii=False)[1:]
    return current_app.response_class(body, mimetype="application/json")
