"""``POST /api/admin/cache/clear`` (SPEC §1): drop this service's cached results. Admin only, audited.

The audit record is written before any key is removed (Redis cannot share a transaction with the
audit log): when the record cannot be stored (AUDIT_FAILURE_MODE=refuse) the answer is 503 and nothing
was cleared; when the removal then fails, a failure record follows.

Deletes the keys under ``REDIS_KEY_PREFIX`` in the result and query-embedding namespaces, by SCAN and
UNLINK (never FLUSHDB/FLUSHALL: the Redis may be shared). Rate-limit counters stay. The embedded Redis
(the default without ``REDIS_URL``) is shared by every worker, so the clear reaches them all; only with
``REDIS_URL=memory://`` does the cache live in each process, and then the clear reaches only the worker
that handled the request (``"scope": "process"``). Index changes need no clear in any case (the index
generation is part of every key).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, g, jsonify

from campus_search.api import extension
from campus_search.api.auditing import request_context
from campus_search.audit.actions import record_admin_action, record_failure
from campus_search.security.auth import require_admin

log = logging.getLogger(__name__)

bp = Blueprint("cache_admin", __name__)


@bp.post("/api/admin/cache/clear")
def clear_cache() -> Any:
    services = extension.services()
    admin = require_admin(services.settings)
    cache = services.ensure_open().cache
    details = {"backend": cache.backend.kind}
    context = request_context(services.settings)
    record_admin_action(services, "cache.clear", details=details, context=context)  # first: no record, no clear
    try:
        removed = cache.clear()
    except Exception as exc:
        code = getattr(exc, "code", "internal_error")
        record_failure(services, "cache.clear", None, {**details, "error": code}, getattr(exc, "status", 500),
                       context=context)
        raise
    log.info("cache cleared by admin %s: %d keys", admin.user_id, removed)
    return jsonify({"cleared": True, "keys_removed": removed, "backend": cache.backend.kind,
                    "mode": cache.backend.mode,
                    "scope": "process" if cache.backend.kind == "memory" else "service",
                    "request_id": g.request_id})
