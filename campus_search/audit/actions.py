"""What an audit record says about an action: the request it came in (:class:`RequestContext`, which the
web layer fills in: this package imports no web framework), the search record's fields, and admin
actions and changes recorded in their own transaction or in the change's (:func:`admin_change`).
The chain and the writer are :mod:`campus_search.audit.records`'.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from campus_search.audit.chain import AuditRecord, canonical_json, clean_text
from campus_search.audit.records import Auditor, AuditUnavailable, auditor_of
from campus_search.errors import CampusSearchError
from campus_search.retrieval.querytext import normalise_query


@dataclass(frozen=True)
class RequestContext:
    """The request an action came in, as the web layer read it (None instead: the command line)."""

    request_id: str | None = None
    client_ip: str | None = None
    user_agent: str | None = None
    started: float | None = None  # time.perf_counter() when the request began
    principal: Any = None


def request_fields(context: RequestContext | None) -> dict[str, Any]:
    if context is None:
        return {"user_agent": "campus-search cli"}
    return {
        "request_id": context.request_id,
        "client_ip": clean_text(context.client_ip, 64),
        "user_agent": clean_text(context.user_agent, 512),
        "response_time_ms": (time.perf_counter() - context.started) * 1000 if context.started else None,
    }


def principal_fields(principal: Any) -> dict[str, Any]:
    if principal is None:
        return {}
    return {"user_id": clean_text(principal.user_id, 256), "role": principal.role.name,
            "department": clean_text("; ".join(principal.departments), 1000) or None}


def groups_fields(principal: Any) -> dict[str, Any]:
    """How the caller's groups claim was used: how many groups it gave (never the groups themselves: a
    claim can be long and is the identity provider's business) and, when it was malformed, what was done
    about it (``access.clean_groups``)."""
    if principal is None or (not principal.groups and not principal.groups_problem):
        return {}
    out: dict[str, Any] = {"groups": len(principal.groups)}
    if principal.groups_problem:
        out["groups_problem"] = clean_text(principal.groups_problem, 200)
    return out


def search_record(auditor: Auditor, context: RequestContext, *, status: int, error: Any, params: Any,
                  body: Mapping[str, Any], outcome: Any) -> AuditRecord:
    """The audit record of one search: from its parameters (None when the request was refused before
    they were made; then the raw ``body``), its outcome (None if it did not run), the response's
    ``status`` and, for a failure, what to record as its error (the API's error code)."""
    settings = auditor.settings
    query = params.query if params is not None else body.get("query")
    filters = params.filters if params is not None else body.get("filters")
    details: dict[str, Any] = {}
    if params is not None:
        details.update(max_results=params.max_results, similarity_threshold=params.similarity_threshold)
    if outcome is not None:
        details["from_cache"] = bool(outcome.from_cache)
    if status >= 400:
        details["error"] = error
    details.update(groups_fields(context.principal))
    return AuditRecord(
        kind="search", action="search", success=status < 400, status=status,
        query_hmac=auditor.query_hash(query) if isinstance(query, str) else None,
        query_text=clean_text(normalise_query(query)) if settings.audit_raw_queries and isinstance(query, str)
        else None,
        filters=canonical_json(filters) if isinstance(filters, Mapping) else None,
        details=canonical_json(details) if details else None,
        result_count=outcome.count if outcome is not None and status < 400 else None,
        **principal_fields(context.principal), **request_fields(context))


# --- admin actions ---------------------------------------------------------------------------------

def _admin_record(services: Any, action: str, target: str | None, details: Mapping[str, Any] | None,
                  success: bool, status: int | None, principal: Any, context: RequestContext | None) -> AuditRecord:
    if principal is None and context is not None:
        principal = context.principal
    return AuditRecord(kind="admin", action=clean_text(action, 100) or "unknown", success=success,
                       status=status if status is not None else (200 if success else None),
                       target=clean_text(target, 1000), details=canonical_json(dict(details)) if details else None,
                       **principal_fields(principal), **request_fields(context))


def record_admin_action(services: Any, action: str, *, target: str | None = None,
                        details: Mapping[str, Any] | None = None, success: bool = True, status: int | None = None,
                        principal: Any = None, context: RequestContext | None = None) -> AuditRecord:
    """Audit an admin action (``cache.clear``, ``explain`` ...) in its own transaction; the caller
    (``context.principal`` unless ``principal`` is given) and the request's fields come from ``context``
    (None: the command line). Raises AuditUnavailable (503) if the record
    cannot be stored and AUDIT_FAILURE_MODE=refuse. Changes to the index record through
    :func:`admin_change` instead, in the change's own transaction."""
    auditor = auditor_of(services)
    record = _admin_record(services, action, target, details, success, status, principal, context)
    if not auditor.write(record) and auditor.refuse_on_failure:
        raise AuditUnavailable("the audit log is unavailable; the action was recorded in the error log only",
                               headers={"Retry-After": "5"})
    return record


def change_records(services: Any, action: str, changes: Sequence[tuple[str | None, Mapping[str, Any]]], *,
                   principal: Any = None) -> list[AuditRecord]:
    """Success records of admin changes, one per ``(target, details)``, for :func:`record_changes_in`."""
    return [_admin_record(services, action, target, details, True, 200, principal, None) for target, details in changes]


def record_changes_in(services: Any, conn: Any, records: list[AuditRecord]) -> bool:
    """Audit changes made by ``conn``'s open transaction, inside it, all ``records`` (:func:`change_records`)
    written together (call it last: the chain head's lock is held until the commit), so the changes and
    their records commit together. Returns whether the records were stored: with AUDIT_FAILURE_MODE=refuse
    unwritable records raise AuditUnavailable instead, which must roll the change back; with ``log`` they
    go to the error log and False is returned. A database error that ends the connection
    (``psycopg.OperationalError``) is raised as it is: the change cannot commit then either."""
    return auditor_of(services).append_all_in(conn, records)


@contextmanager
def admin_action(services: Any, action: str, *, target: str | None = None, details: Mapping[str, Any] | None = None,
                 context: RequestContext | None = None) -> Iterator[dict[str, Any]]:
    """``with admin_action(services, "explain") as details: details["visible"] = ...``: records success
    after the block, or failure with the error code (and re-raises the original error). For actions
    that change nothing stored; a change to the index uses :func:`admin_change`."""
    info = dict(details or {})
    try:
        yield info
    except CampusSearchError as exc:
        record_failure(services, action, target, {**info, "error": exc.code}, exc.status, context=context)
        raise
    except Exception:
        record_failure(services, action, target, {**info, "error": "internal_error"}, 500, context=context)
        raise
    record_admin_action(services, action, target=target, details=info, context=context)


class AdminChange:
    """What :func:`admin_change` yields: ``details`` for the record, and :meth:`record_in` for the writer
    of the change to call inside its transaction."""

    def __init__(self, services: Any, action: str, target: str | None, details: Mapping[str, Any],
                 context: RequestContext | None = None) -> None:
        self.services, self.action, self.target, self.context = services, action, target, context
        self.details = dict(details)
        self.attempted = False

    def record_in(self, conn: Any, **details: Any) -> None:
        """Write the success record in ``conn``'s open transaction (last, just before it commits). With
        AUDIT_FAILURE_MODE=refuse an unwritable record raises AuditUnavailable, which rolls the change
        back: the change and its record commit together or not at all."""
        self.details.update(details)
        self.attempted = True
        record = _admin_record(self.services, self.action, self.target, self.details, True, 200, None,
                               self.context)
        auditor_of(self.services).append_in(conn, record)


@contextmanager
def admin_change(services: Any, action: str, *, target: str | None = None, details: Mapping[str, Any] | None = None,
                 context: RequestContext | None = None) -> Iterator[AdminChange]:
    """An admin change to the index (``document.upsert``, ``document.metadata``, ``document.delete``)::

        with admin_change(services, "document.delete", target=doc_id) as change:
            ingester.delete([doc_id], audit=lambda conn, n: change.record_in(conn))

    The success record is written in the change's transaction; a failed change is recorded as a
    failure (with its error code) in a transaction of its own, and the original error re-raised."""
    change = AdminChange(services, action, target, details or {}, context)
    try:
        yield change
    except AuditUnavailable:
        if not change.attempted:
            record_failure(services, action, target, {**change.details, "error": AuditUnavailable.code}, 503,
                           context=context)
        raise  # (the record of a change rolled back for want of its record is in the error log already)
    except CampusSearchError as exc:
        record_failure(services, action, target, {**change.details, "error": exc.code}, exc.status, context=context)
        raise
    except Exception:
        record_failure(services, action, target, {**change.details, "error": "internal_error"}, 500, context=context)
        raise
    if not change.attempted:  # the writer made no transaction (nothing to change): record it on its own
        record_admin_action(services, action, target=target, details=change.details, context=context)


def record_failure(services: Any, action: str, target: str | None, info: dict[str, Any], status: int, *,
                   context: RequestContext | None = None) -> None:
    with suppress(AuditUnavailable):  # logged already; the action's own error is the one to report
        record_admin_action(services, action, target=target, details=info, success=False, status=status,
                            context=context)
