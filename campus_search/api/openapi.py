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

from .. import __version__

bp = Blueprint("openapi", __name__)


@cache
def openapi_document() -> dict[str, Any]:
    """The parsed document, with ``info.version`` set to the package's version."""
    doc = json.loads(resources.files("campus_search").joinpath("openapi.json").read_text(encoding="utf-8"))
    doc["info"]["version"] = __version__
    return doc


@cache
def _body() -> bytes:
    return json.dumps(openapi_document(), indent=1).encode("utf-8")


@bp.get("/api/openapi.json")
def openapi_json() -> Response:
    response = Response(_body(), mimetype="application/json")
    response.headers["Cache-Control"] = "public, max-age=300"  # the document changes only with a release
    return response
