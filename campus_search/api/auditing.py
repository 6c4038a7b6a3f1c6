"""The web side of the audit log: what a request contributes to its records (:func:`request_context`),
and the search blueprint's hook that writes one record per search, success or not, and withholds
results whose record could not be written (:func:`audit_search_response`)."""

from __future__ import annotations

import logging
from typing import Any

from flask import current_app, g, has_request_context, request
from werkzeug.exceptions import HTTPException

from campus_search.api import extension
from campus_search.api.errors import error_response
from campus_search.audit.actions import RequestContext, search_record
from campus_search.audit.records import Auditor, AuditUnavailable, auditor_of
from campus_search.ops.held import HELD_KEY, HOLD_KEY, AuditHold
from campus_search.security.proxies import client_ip

#: the logger of the hook before it moved here from the audit package
log = logging.getLogger("campus_search.audit.records")


def request_context(settings: Any) -> RequestContext | None:
    """The current request as the audit log records it (None outside a request: the command line)."""
    if not has_request_context():
        return None
    return RequestContext(request_id=g.get("request_id"), client_ip=client_ip(request, settings),
                          user_agent=request.headers.get("User-Agent"), started=g.get("start_time"),
                          principal=g.get("principal"))


def _search_body() -> dict[str, Any]:
    """The search request's JSON object, or {} when there is none to read: a body over the request
    limit (answered 413) is never read, so its record is built from what is known without it."""
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit is not None and request.content_length is not None and request.content_length > limit:
        return {}
    try:
        body = request.get_json(silent=True, cache=True)
    except HTTPException:  # e.g. a body without Content-Length that turns out larger than the limit
        return {}
    return body if isinstance(body, dict) else {}


def _search_record(auditor: Auditor, response: Any) -> Any:
    """The record of the current ``POST /api/search`` request, from what the view left on ``g``
    (``search_params``, ``search_outcome``) and the response."""
    error: Any = None
    if response.status_code >= 400:
        body = (response.get_json(silent=True) or {}).get("error") if response.is_json else None
        error = body.get("code") if isinstance(body, dict) else str(response.status_code)
    return search_record(auditor, request_context(auditor.settings) or RequestContext(),
                         status=response.status_code, error=error, params=g.get("search_params"),
                         body=_search_body(), outcome=g.get("search_outcome"))


def audit_search_response(response: Any) -> Any:
    """``after_request`` hook of the search blueprint: one record per search, success or not.

    Runs for error responses too (Flask finalises handled errors through after_request), so 400s,
    401s, 403s and 429s are recorded. Fail closed: a successful answer whose record cannot be written
    becomes a 503 (with AUDIT_FAILURE_MODE=refuse).

    When the server holds answers without a thread (``ops/held.py``: the gunicorn worker), the record is
    handed to the writer and not waited for here: the response is held, with the 503 as its alternative,
    until the record's outcome is known; nothing is sent before. Otherwise this waits for the outcome."""
    services = extension.services()
    auditor: Auditor | None = None
    stored = False
    try:
        auditor = auditor_of(services)
        record = _search_record(auditor, response)
        if request.environ.get(HOLD_KEY):
            try:
                pending = auditor.submit(record)
            except Exception as exc:  # no writer to take it (closed): as a write that failed
                auditor.log_unstored(record, exc)
            else:
                alternative = None if response.status_code >= 400 or not auditor.refuse_on_failure \
                    else _rendered(_withheld())
                request.environ[HELD_KEY] = AuditHold(auditor, pending, alternative)
                return response
        else:
            stored = auditor.write(record)
    except Exception:  # never let auditing crash the request; the failure is loud instead
        log.exception("audit record could not be built")
    if stored or response.status_code >= 400:
        return response
    if auditor is not None and not auditor.refuse_on_failure:
        return response
    return _withheld()


def _withheld() -> Any:
    """The answer of a search whose record could not be written (AUDIT_FAILURE_MODE=refuse)."""
    return error_response(503, AuditUnavailable.code, "the audit log is unavailable; results are withheld",
                          headers={"Retry-After": "5"})


def _rendered(response: Any) -> tuple[str, list[tuple[str, str]], bytes]:
    """A response's status line, its own headers (body type, Retry-After) and body, for a held answer's
    alternative; the headers the app adds to every response later (request id, caching) come from the
    held response (ops/held.py)."""
    headers = [(k, v) for k, v in response.headers.items() if k.lower() != "content-length"]
    return response.status, headers, response.get_data()
