"""Domain errors. Each maps to one HTTP status and a stable JSON body (see ``api/errors.py``)."""

from __future__ import annotations

from typing import Any


class CampusSearchError(Exception):
    """Base class. ``code`` is a stable machine-readable identifier; ``message`` is safe to show."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers or {}


class ConfigError(CampusSearchError):
    code = "configuration_error"


class BadRequest(CampusSearchError):
    status = 400
    code = "bad_request"


class Unprocessable(CampusSearchError):
    status = 422
    code = "unprocessable"


class Unauthorized(CampusSearchError):
    status = 401
    code = "unauthorized"


class Forbidden(CampusSearchError):
    status = 403
    code = "forbidden"


class NotFound(CampusSearchError):
    status = 404
    code = "not_found"


class PayloadTooLarge(CampusSearchError):
    status = 413
    code = "payload_too_large"


class RateLimited(CampusSearchError):
    status = 429
    code = "rate_limited"


class ServiceUnavailable(CampusSearchError):
    """A dependency (database, embedding service) is down or saturated."""

    status = 503
    code = "service_unavailable"


class EmbeddingError(ServiceUnavailable):
    code = "embedding_unavailable"


class IngestError(CampusSearchError):
    """A document could not be read or parsed; ingestion reports it and goes on."""

    status = 422
    code = "ingest_error"
