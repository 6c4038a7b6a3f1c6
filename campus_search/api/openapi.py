"""``GET /api/openapi.json``: the OpenAPI 3.1 description of the HTTP API (``campus_search/openapi.json``).

The document is a file in the package, kept true by ``tests/test_openapi.py``, which checks every
route of the running app against it and validates real responses with its schemas.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from flask import Blueprint, Response

from campus_search import __version__

bp = Blueprint("openapi", __name__)


#: Answers of the HTTP server itself (campus_search/ops/gunicorn_worker.py), before the app sees a request;
#: any operation can get them, so :func:`openapi_document` adds them to every operation.
SERVER_LIMITS = {
    "408": ("RequestTimeout", "The request (head, and a body up to MAX_REQUEST_BYTES) did not arrive within "
                              "REQUEST_READ_TIMEOUT seconds (default 10); the connection is closed."),
    "414": ("URITooLong", "The request line (method, URL with its query string, version) is longer than "
                          "4094 bytes."),
    "431": ("HeaderFieldsTooLarge", "A header line is longer than 8190 bytes (a bearer token included), or "
                                    "there are more than 100 header fields."),
}


@cache
def openapi_document() -> dict[str, Any]:
    """The parsed document, with ``info.version`` set to the package's version and the HTTP server's own
    limits (:data:`SERVER_LIMITS`) among every operation's responses."""
    doc = json.loads(resources.files("campus_search").joinpath("openapi.json").read_text(encoding="utf-8"))
    doc["info"]["version"] = __version__
    responses = doc.setdefault("components", {}).setdefault("responses", {})
    for status, (name, description) in SERVER_LIMITS.items():
        responses[name] = {"description": description,
                           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for operations in doc["paths"].values():
            for operation in operations.values():
                if isinstance(operation, dict) and "responses" in operation:
                    operation["responses"].setdefault(status, {"$ref": f"#/components/responses/{name}"})
    return doc


@cache
def _body() -> bytes:
    return json.dumps(openapi_document(), indent=1).encode("utf-8")


@bp.get("/api/openapi.json")
def openapi_json() -> Response:
    response = Response(_body(), mimetype="application/json")
    response.headers["Cache-Control"] = "public, max-age=300"  # the document changes only with a release
    return response
