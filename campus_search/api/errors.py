"""One JSON error shape for every failure: ``{"error": {"code", "message", "request_id"[, "details"]}}``.

Never an HTML page, a stack trace or an exception's own text (which may carry SQL or paths).
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from flask import Flask, g, jsonify
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from campus_search.errors import CampusSearchError

log = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, *, details: Any = None,
                   headers: dict[str, str] | None = None) -> Any:
    body: dict[str, Any] = {"code": code, "message": message, "request_id": g.get("request_id")}
    if details is not None:
        body["details"] = details
    response = jsonify({"error": body})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


class JSONProvider(DefaultJSONProvider):
    """Flask's JSON, with keys in the order written, and a body nested too deeply for the parser
    (``[`` repeated 60,000 times) treated as any other malformed JSON: a 400, not a RecursionError."""

    sort_keys = False

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


def root_causes(exc: BaseException, limit: int = 3) -> str:
    """`` (caused by Class: message; ...)`` for the exceptions behind ``exc`` (``raise ... from``), for the
    log: a 503's message says what is unavailable, its causes say why. Each message is bounded."""
    parts: list[str] = []
    seen = {id(exc)}
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen and len(parts) < limit:
        seen.add(id(cause))
        text = " ".join(str(cause).split())[:300]
        parts.append(f"{cause.__class__.__name__}: {text}" if text else cause.__class__.__name__)
        cause = cause.__cause__ or cause.__context__
    return f" (caused by {'; '.join(parts)})" if parts else ""


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(psycopg.DataError)
    def _bad_value(exc: psycopg.DataError) -> Any:
        # The database refused a value from the request (a NUL character, a number out of range):
        # the client's input, not a server fault.
        log.info("database refused a request value: %s", exc.__class__.__name__)
        return error_response(400, "bad_request", "the request contains a value that cannot be stored or "
                                                  "compared (for example a NUL character)")

    @app.errorhandler(CampusSearchError)
    def _domain(exc: CampusSearchError) -> Any:
        if exc.status == 500:
            # A server fault (a configuration error names files and settings): the log gets the whole
            # story, the client a message that reveals nothing about the server.
            log.error("%s: %s%s", exc.code, exc.message, root_causes(exc))
            return error_response(500, exc.code, "server error; the request id identifies it in the logs",
                                  headers=exc.headers)
        if exc.status > 500:
            log.warning("%s: %s%s", exc.code, exc.message, root_causes(exc))
        return error_response(exc.status, exc.code, exc.message, details=exc.details, headers=exc.headers)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Any:
        code = (exc.name or "error").lower().replace(" ", "_")
        headers = {}
        if exc.code == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        messages = {400: "malformed request", 404: "no such endpoint", 405: "method not allowed",
                    413: "request body too large", 415: "unsupported media type"}
        return error_response(exc.code or 500, code, messages.get(exc.code or 0, exc.name or "error"),
                              headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; the request id identifies it in the logs")
